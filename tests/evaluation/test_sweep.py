"""kvlab.evaluation.sweep: resumes after SIGKILL with nothing lost or duplicated; shards merge."""

from __future__ import annotations

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


def test_rerun_skips_finished_configs(model, tokenizer, tmp_path):
    sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path, progress=False, **ARGS)
    f = next((tmp_path / "ppl").glob("*.csv"))
    mtime = f.stat().st_mtime_ns
    sweep(["q4_0"], model=model, tokenizer=tokenizer, out=tmp_path, progress=False, **ARGS)
    assert f.stat().st_mtime_ns == mtime


def test_key_depends_on_every_input():
    base = config_key("ppl", "p", "prefill", "m", "t")
    assert len({base, config_key("errors", "p", "prefill", "m", "t"), config_key("ppl", "q", "prefill", "m", "t"),
                config_key("ppl", "p", "static", "m", "t"), config_key("ppl", "p", "prefill", "n", "t"),
                config_key("ppl", "p", "prefill", "m", "u")}) == 6
    # the BOS token is part of the key; windows without one keep the keys of before the option
    assert config_key("ppl", "p", "prefill", "m", "t", None) == base != config_key("ppl", "p", "prefill", "m", "t", 1)


def test_committed_results_keep_their_keys():
    """The embedded model's tokenizer adds no BOS, so the stored results' keys are still what a sweep computes."""
    files = sorted((Path(__file__).parents[2] / "data" / "results" / "ppl").glob("*.csv"))
    if not files:
        pytest.skip("no committed results")
    for f in files:
        r = pd.read_csv(f, nrows=1).iloc[0]
        assert config_key("ppl", r.policy, r.emulation, r.model, r.tokens_sha256) == r.key == f.stem


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
