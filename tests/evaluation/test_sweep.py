"""kvlab.evaluation.sweep: resumes after SIGKILL with nothing lost or duplicated; shards merge."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from kvlab.evaluation.sweep import config_key, merge, parse_shard, sweep

CONFIGS = ["q4_0", "int:bits=4", "kivi:bits=2,group=32,residual=32", "signmag:v=2"]
ARGS = dict(corpus="pydoc", ctx=48, windows=3)

SCRIPT = textwrap.dedent("""
    import sys, kvlab
    model, tok = kvlab.load_model()
    kvlab.sweep({configs!r}, model=model, tokenizer=tok, out=sys.argv[1], kinds=("ppl", "errors"),
                error_windows=1, progress=False, **{args!r})
""")


def _run(out: Path, kill_after_files: int | None = None) -> int:
    code = SCRIPT.format(configs=CONFIGS, args=ARGS)
    p = subprocess.Popen([sys.executable, "-c", code, str(out)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if kill_after_files is None:
        return p.wait(timeout=900)
    deadline = time.time() + 900
    while time.time() < deadline and p.poll() is None:
        if len(list((out / "ppl").glob("*.csv"))) >= kill_after_files:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    return p.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_midway_then_resume_gives_identical_results(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert _run(clean) == 0
    rc = _run(killed, kill_after_files=2)
    assert rc == -signal.SIGKILL
    n_before = len(list((killed / "ppl").glob("*.csv")))
    assert 2 <= n_before < len(CONFIGS) + 1  # some configs finished, not all
    mtimes = {f.name: f.stat().st_mtime_ns for f in (killed / "ppl").glob("*.csv")}
    assert _run(killed) == 0
    for f in (killed / "ppl").glob("*.csv"):  # finished configs were not redone
        if f.name in mtimes:
            assert f.stat().st_mtime_ns == mtimes[f.name]
    for kind in ("ppl", "errors"):
        assert (clean / f"{kind}.csv").read_bytes() == (killed / f"{kind}.csv").read_bytes()
    ppl = pd.read_csv(killed / "ppl.csv")
    assert len(ppl) == (len(CONFIGS) + 1) * ARGS["windows"]  # fp16 added, nothing duplicated
    assert not ppl.duplicated(["key", "window"]).any()


def test_shards_split_and_merge(model, tokenizer, tmp_path):
    a = tmp_path / "a"
    for i in range(2):
        sweep(CONFIGS[:2], model=model, tokenizer=tokenizer, out=a, shard=f"{i}/2", progress=False, **ARGS)
    b = tmp_path / "b"
    sweep(CONFIGS[:2], model=model, tokenizer=tokenizer, out=b, progress=False, **ARGS)
    assert (a / "ppl.csv").read_bytes() == (b / "ppl.csv").read_bytes()
    merged = merge(a)["ppl"]
    assert sorted(merged.config.unique()) == sorted(["fp16", *CONFIGS[:2]])


def test_rerun_skips_finished_configs(model, tokenizer, tmp_path, monkeypatch, capsys):
    import json

    from kvlab.evaluation.sweep import LEDGER_ENV

    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setenv(LEDGER_ENV, str(ledger))
    out = tmp_path / "out"
    first = sweep(["q4_0"], model=model, tokenizer=tokenizer, out=out, progress=False, **ARGS)["ppl"]
    f = next((out / "ppl").glob("*.csv"))
    mtime = f.stat().st_mtime_ns
    again = sweep(["q4_0", "q8_0"], model=model, tokenizer=tokenizer, out=out, progress=True, **ARGS)["ppl"]
    assert f.stat().st_mtime_ns == mtime
    # it says what it reused: fp16 and q4_0 from the first run, q8_0 computed
    assert (first.attrs["reused"], first.attrs["computed"]) == (0, 2)
    assert (again.attrs["reused"], again.attrs["computed"]) == (2, 1)
    assert "sweep: ppl: 2 configs reused from" in capsys.readouterr().out
    runs = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [r["ppl"] for r in runs] == [{"reused": 0, "computed": 2}, {"reused": 2, "computed": 1}]


def test_key_depends_on_every_input():
    base = config_key("ppl", "p", "prefill", "m", "t")
    assert len({base, config_key("errors", "p", "prefill", "m", "t"), config_key("ppl", "q", "prefill", "m", "t"),
                config_key("ppl", "p", "static", "m", "t"), config_key("ppl", "p", "prefill", "n", "t"),
                config_key("ppl", "p", "prefill", "m", "u")}) == 6
    # the BOS token is part of the key; windows without one keep the keys of before the option
    assert config_key("ppl", "p", "prefill", "m", "t", None) == base != config_key("ppl", "p", "prefill", "m", "t", 1)


def test_committed_results_keep_their_keys():
    """The stored results' keys are what a sweep computes: without a BOS part where the windows have none (the
    embedded model's tokenizer adds none), with it where they start with one (Gemma 3's)."""
    files = sorted((Path(__file__).parents[2] / "data" / "results" / "ppl").glob("*.csv"))
    if not files:
        pytest.skip("no committed results")
    from kvlab.model.fingerprint import LEGACY_NAMES

    for f in files:
        rows = pd.read_csv(f)
        r = rows.iloc[0]
        assert r.key == f.stem, f.name
        if r.model not in LEGACY_NAMES.values():  # keyed by its weights' sha256, which the row does not hold
            continue
        bos = int(r.bos_token_id) if "bos_token_id" in rows and pd.notna(r.bos_token_id) else None
        legacy = config_key("ppl", r.policy, r.emulation, r.model, r.tokens_sha256, bos)
        shaped = config_key("ppl", r.policy, r.emulation, r.model, f"{r.tokens_sha256}|{len(rows)}x{r.ctx}", bos)
        assert r.key == f.stem and r.key in (legacy, shaped), f.name  # keyed before or after the shape was hashed


def test_errors_are_stored_per_window_and_average_to_the_error_table(model, tokenizer, tmp_path):
    """Each error window has its own layer x head rows (the proxies' CIs resample them); their mean is
    error_table's average over the same windows. A one-window file from before the window column is
    reused as window 0; an averaged file of several windows is recomputed."""
    from kvlab.evaluation.evaluate import error_table, load_windows

    res = sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path, kinds=("errors",), error_windows=2,
                progress=False, **ARGS)
    err = res["errors"]
    q = err[err.config == "q4_0"]
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert len(q) == 2 * n_layers * n_heads and sorted(q.window.unique()) == [0, 1]
    _, w = load_windows(tokenizer, ARGS["corpus"], ARGS["ctx"], ARGS["windows"])
    avg = error_table(model, w[:2], "q4_0", progress=False)
    got = q.groupby(["layer", "head"], as_index=False)[["k_mse", "v_cos", "attn_kl"]].mean()
    pd.testing.assert_frame_equal(got, avg[["layer", "head", "k_mse", "v_cos", "attn_kl"]], rtol=1e-12)
    # an averaged two-window file as written before per-window rows: not a result of these windows
    f = tmp_path / "errors" / f"{q.key.iloc[0]}.csv"
    q[q.window == 0].drop(columns="window").to_csv(f, index=False)  # one row per layer x head, no window
    with pytest.warns(UserWarning, match="averaged over its windows"):
        sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path, kinds=("errors",), error_windows=2,
              progress=False, **ARGS)
    assert "window" in pd.read_csv(f).columns
    # a one-window file without the column is read as window 0 and reused, not recomputed
    one = sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path, kinds=("errors",), error_windows=1,
                progress=False, **ARGS)["errors"]
    f1 = tmp_path / "errors" / f"{one[one.config == 'q4_0'].key.iloc[0]}.csv"
    pd.read_csv(f1).drop(columns="window").to_csv(f1, index=False)
    mtime = f1.stat().st_mtime_ns
    again = sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path, kinds=("errors",), error_windows=1,
                  progress=False, **ARGS)["errors"]
    assert f1.stat().st_mtime_ns == mtime and (again[again.config == "q4_0"].window == 0).all()


@pytest.mark.parametrize("bad", ["2/2", "a/b", "1", (0, 0), (-1, 2)])
def test_bad_shard(bad):
    with pytest.raises(ValueError, match="shard="):
        parse_shard(bad)


def test_bad_config_fails_before_any_work(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown scheme 'nope'"):
        sweep(["q4_0", "nope"], model=model, tokenizer=tokenizer, out=tmp_path, progress=False, **ARGS)
    assert not (tmp_path / "ppl").exists()


def test_cli_sweep_summary_and_resume(tmp_path, capsys):
    """``python -m kvlab sweep``: the summary covers exactly this call's configs on this call's windows
    (other runs in the same folder are left out), and a re-run recomputes nothing."""
    import json

    from kvlab.cli import main

    argv = ["sweep", "q4_0", "int:bits=4", "--corpus", "pydoc", "--ctx", "48", "--windows", "3",
            "--out", str(tmp_path), "--json"]
    main(["sweep", "q8_0", "--corpus", "pydoc", "--ctx", "40", "--windows", "2", "--out", str(tmp_path), "--json"])
    capsys.readouterr()
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["config"] for r in rows) == ["fp16", "int:bits=4", "q4_0"]
    assert all(r["windows"] == 3 for r in rows)
    fp16 = next(r for r in rows if r["config"] == "fp16")
    assert fp16["delta_ppl"] == 0 and 0 <= fp16["kl"] < 1e-4  # fp16 rounding only
    assert all(r["ci_lo"] <= r["delta_ppl"] <= r["ci_hi"] for r in rows)
    files = {f: f.stat().st_mtime_ns for f in (tmp_path / "ppl").glob("*.csv")}
    assert len(files) == 5  # fp16 twice (two window sets), q8_0, q4_0, int:bits=4
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "ppl").glob("*.csv")} == files
    assert main([*argv, "--shard", "3/2"]) == 2
    assert "shard='3/2' is not allowed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# nothing silently wrong (issue 17): stale keys, damaged files, write errors, concurrent runs
# ---------------------------------------------------------------------------------------------------
TINY = dict(corpus="pydoc", ctx=32, windows=1, progress=False)


def test_committed_keys_belong_to_the_embedded_models_content(model, model64):
    """The committed results were keyed by the name; that name is kept for exactly the embedded float32
    weights (fingerprint pinned), so the study finds them, and any other content is keyed by its hash."""
    from kvlab.model.fingerprint import model_key

    assert model_key(model) == "smollm2-135m-instruct"
    assert model_key(model64).startswith("sha256:")


def test_changed_weights_change_the_key(model, tokenizer, tmp_path):
    """Swap two weight tensors in memory: a re-run into the same folder recomputes, as a fresh folder would."""
    import torch

    first = sweep([], model=model, tokenizer=tokenizer, out=tmp_path, **TINY)["ppl"]
    a, b = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        saved = a.clone()
        a.copy_(b)
        b.copy_(saved)
    try:
        second = sweep([], model=model, tokenizer=tokenizer, out=tmp_path, **TINY)["ppl"]
        fresh = sweep([], model=model, tokenizer=tokenizer, out=tmp_path / "fresh", **TINY)["ppl"]
    finally:
        with torch.no_grad():
            b.copy_(a)
            a.copy_(saved)
    assert second.key[0] != first.key[0] and second.nll[0] != first.nll[0]
    assert second.nll.tolist() == fresh.nll.tolist()
    assert len(list((tmp_path / "ppl").glob("*.csv"))) == 2


def test_windows_of_one_token_stream_in_another_shape_get_another_key(model, tokenizer, tmp_path):
    """(2, 32) and (1, 64) windows hold the same token bytes: the key hashes the shape too."""
    a = sweep([], model=model, tokenizer=tokenizer, out=tmp_path, corpus="pydoc", ctx=32, windows=2, progress=False)
    b = sweep([], model=model, tokenizer=tokenizer, out=tmp_path, corpus="pydoc", ctx=64, windows=1, progress=False)
    assert a["ppl"].attrs["tokens_sha256"] == b["ppl"].attrs["tokens_sha256"]
    assert a["ppl"].key[0] != b["ppl"].key[0] and len(b["ppl"]) == 1


@pytest.mark.parametrize("damage", ["truncate", "empty", "foreign"])
def test_damaged_result_file_is_recomputed_with_a_warning(model, tokenizer, tmp_path, damage):
    kw = dict(corpus="pydoc", ctx=32, windows=3, progress=False)
    clean = sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path, **kw)["ppl"]
    f = sorted((tmp_path / "ppl").glob("*.csv"))[0]
    text = f.read_text()
    f.write_text({"truncate": text[: len(text) * 2 // 3], "empty": "",
                  "foreign": text.replace(f.stem, "0" * 16)}[damage])
    with pytest.warns(UserWarning, match=f"sweep: {f}.*recomputing"):
        again = sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path, **kw)["ppl"]
    pd.testing.assert_frame_equal(again, clean)
    assert f.read_text() == text


def test_stray_csv_adds_no_columns(model, tokenizer, tmp_path):
    sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path, **TINY)
    before = (tmp_path / "ppl.csv").read_bytes()
    (tmp_path / "ppl" / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.warns(UserWarning, match="ignoring .*notes.csv"):
        merge(tmp_path)
    assert (tmp_path / "ppl.csv").read_bytes() == before


@pytest.mark.parametrize("err", ["ENOSPC", "EACCES"])
def test_write_error_mid_write_leaves_no_partial_row_and_a_rerun_completes(model, tokenizer, tmp_path,
                                                                           monkeypatch, err):
    """Disk full (or permission lost) while the second config's file is half written: the run fails with
    the OSError, nothing partial is left (no row, no temporary, no claim), and a re-run completes with
    exactly the results of an uninterrupted run."""
    import errno

    import kvlab._io

    configs = ["q4_0", "int:bits=4"]
    clean = tmp_path / "clean"
    sweep(configs, model=model, tokenizer=tokenizer, out=clean, **TINY)
    real_fdopen, calls = os.fdopen, []

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(getattr(errno, err), os.strerror(getattr(errno, err)))

    def fdopen(fd, *a, **k):
        calls.append(fd)
        f = real_fdopen(fd, *a, **k)
        return HalfWriter(f) if len(calls) == 2 else f

    monkeypatch.setattr(kvlab._io.os, "fdopen", fdopen)
    out = tmp_path / "out"
    with pytest.raises(OSError) as e:
        sweep(configs, model=model, tokenizer=tokenizer, out=out, **TINY)
    assert e.value.errno == getattr(errno, err)
    monkeypatch.setattr(kvlab._io.os, "fdopen", real_fdopen)
    left = sorted(p.name for p in (out / "ppl").iterdir())
    assert len(left) == 1 and left[0].endswith(".csv")  # the first config, whole; nothing else
    pd.read_csv(out / "ppl" / left[0])  # a whole file
    sweep(configs, model=model, tokenizer=tokenizer, out=out, **TINY)
    assert (out / "ppl.csv").read_bytes() == (clean / "ppl.csv").read_bytes()
    assert sorted(p.name for p in (out / "ppl").iterdir()) == sorted(p.name for p in (clean / "ppl").iterdir())


def test_out_naming_a_file_is_refused_before_any_run(model, tokenizer, tmp_path, monkeypatch, capsys):
    S = importlib.import_module("kvlab.evaluation.sweep")
    from kvlab.cli import main

    monkeypatch.setattr(S, "evaluate_policy", lambda *a, **k: pytest.fail("a config ran"))
    f = tmp_path / "results.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="results.txt.* is a file"):
        sweep(["q4_0"], model=model, tokenizer=tokenizer, out=f, **TINY)
    assert main(["sweep", "q4_0", "--corpus", "pydoc", "--ctx", "32", "--windows", "1", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("bad, match", [("kivi:group=48,residual=96", "group=48 does not divide head_dim"),
                                        ("int:bits=4,group=48", "group=48"),
                                        ("q4_0;keep_first=31", "keep_first=31")])
def test_every_config_checked_against_the_model_before_any_run(model, tokenizer, tmp_path, monkeypatch, bad,
                                                                match):
    S = importlib.import_module("kvlab.evaluation.sweep")

    monkeypatch.setattr(S, "evaluate_policy", lambda *a, **k: pytest.fail("a config ran before the check"))
    with pytest.raises(ValueError, match=match) as e:
        sweep(["q4_0", bad], model=model, tokenizer=tokenizer, out=tmp_path, **TINY)
    assert repr(bad) in str(e.value)
    assert not (tmp_path / "ppl").exists()


CONCURRENT = textwrap.dedent("""
    import hashlib, importlib, os, sys, time
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    S = importlib.import_module("kvlab.evaluation.sweep")

    out, log, go = sys.argv[1:4]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32)).eval()
    S.load_windows = lambda tok, corpus, ctx, windows, data_dir=None, **kw: (
        "fake", (torch.arange(ctx * windows) % 64).view(windows, ctx))

    def evaluate(model, w, pol, **kw):  # cheap and deterministic; logs who computed what
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {pol.spec}\\n")
        time.sleep(0.2)
        h = int(hashlib.sha256(pol.spec.encode()).hexdigest()[:8], 16) / 2**32
        return {"window_nll": [h] * w.shape[0], "window_kl": [h / 10] * w.shape[0]}

    S.evaluate_policy = evaluate
    open(f"{go}.{os.getpid()}", "w").close()
    while not os.path.exists(go):
        time.sleep(0.01)
    r = S.sweep(CONFIG_LIST, model=model, tokenizer=None, out=out, progress=False, ctx=32, windows=2, bos="never")
    sys.stdout.write(r["ppl"].to_csv(index=False))
""")


def test_concurrent_sweeps_split_the_work_and_agree(tmp_path):
    """Two processes on one --out: no config is computed twice, and both return the same merged table."""
    configs = ["q4_0", "q8_0", "int:bits=4", "int:bits=8", "kivi:bits=2", "kivi:bits=4", "q4_1", "bf16"]
    out, log, go = tmp_path / "out", tmp_path / "log", tmp_path / "go"
    code = CONCURRENT.replace("CONFIG_LIST", repr(configs))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(log), str(go)], stdout=subprocess.PIPE,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}) for _ in range(2)]
    deadline = time.time() + 300
    while len(list(tmp_path.glob("go.*"))) < 2 and time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a sweep process died"
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    done = [line.split(" ", 1) for line in log.read_text().splitlines()]
    specs = [spec for _, spec in done]
    assert len(specs) == len(configs) + 1 == len(set(specs))  # each config (and fp16) computed once
    assert len({pid for pid, _ in done}) == 2  # and the work was shared
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == 1 + 2 * (len(configs) + 1)
    assert not list((out / "ppl").glob("*.lock"))


def test_claims_of_dead_processes_are_taken_over(model, tokenizer, tmp_path):
    """A run killed while computing leaves its claim file: the lock died with it, so a re-run computes."""
    first = sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path / "a", **TINY)["ppl"]
    out = tmp_path / "b"
    (out / "ppl").mkdir(parents=True)
    locks = [out / "ppl" / f"{k}.lock" for k in first.key.unique()]
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        for p in {[str(p) for p in locks]!r}:
            fcntl.flock(os.open(p, os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"held\n"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert all(p.exists() for p in locks)
    again = sweep(["q4_0"], model=model, tokenizer=tokenizer, out=out, **TINY)["ppl"]
    pd.testing.assert_frame_equal(again, first)
    assert not any(p.exists() for p in locks)


@pytest.mark.slow
def test_weights_swapped_inside_a_gguf_are_not_served_stale(tmp_path, monkeypatch):
    """The issue's reproduction: sweep a copy of the embedded GGUF, swap two weight tensors' bytes inside the
    file, sweep again into the same folder: the results are those of a fresh folder, not the stale ones."""
    import shutil

    import gguf

    from kvlab.model.loading import embedded_gguf_path

    monkeypatch.setenv("KVLAB_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    shutil.copy(embedded_gguf_path(), f)
    kw = dict(model_name=str(f), out=tmp_path / "A", **TINY)
    first = sweep(["q4_0"], **kw)["ppl"]
    reader = gguf.GGUFReader(str(f))
    a, b = (next(t for t in reader.tensors if t.name == n) for n in ("blk.0.attn_q.weight", "blk.0.attn_output.weight"))
    (oa, ob, n), data = (int(a.data_offset), int(b.data_offset), int(a.n_bytes)), bytearray(f.read_bytes())
    del reader, a, b
    assert n == len(data[ob : ob + n])
    data[oa : oa + n], data[ob : ob + n] = data[ob : ob + n], data[oa : oa + n]
    f.write_bytes(bytes(data))
    second = sweep(["q4_0"], **kw)["ppl"]
    fresh = sweep(["q4_0"], **{**kw, "out": tmp_path / "B"})["ppl"]
    assert set(second.key).isdisjoint(first.key)
    assert second.nll.tolist() == fresh.nll.tolist()
    assert all(abs(x - y) > 1e-3 for x, y in zip(second.nll, first.nll))
