"""Resumable sweep engine: run a grid of scheme/policy specs, store tidy results keyed by config hash.

Layout under ``out`` (default ``data/results``):

- ``ppl/<key>.csv``: one row per window (NLL, logits KL) of one finished config;
- ``errors/<key>.csv``: one row per error window x layer x kv head (tensor and attention-output errors;
  files of one window written before the ``window`` column existed are read as window 0);
- ``ppl.csv`` and ``errors.csv``: every finished config merged, sorted (rewritten at the end of a run).

``key`` hashes the canonical policy spec, the emulation, what the model is (a fingerprint of its weights
and config, :func:`kvlab.model.fingerprint.model_key`) and the exact scored tokens, so a re-run skips
finished configs and a changed input never reuses stale rows. Each config's file is written to a
temporary name and renamed when the config is complete, so a run killed at any moment (SIGKILL included)
or stopped by a write error (disk full) leaves only whole configs behind and resumes without redoing or
duplicating them; a finished file that is empty, truncated or not a result of its key is reported and
recomputed. Concurrent runs on one ``out`` split the work: a config is computed under an exclusive lock
on ``<kind>/<key>.lock`` (``fcntl.flock``, released by the kernel when its holder dies, so a killed run
leaves no claim behind), and a run waits for configs another run holds. ``shard=(i, n)`` runs every n-th
config (from i), so GPUs or a job array can split a sweep; shards write disjoint files and ``merge``
joins them by key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import warnings
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kvlab._io import atomic_write_bytes
from kvlab.evaluation.evaluate import error_table, evaluate_policy, load_windows, model_geometry
from kvlab.evaluation.ppl import resolve_bos, tokens_sha256
from kvlab.model.fingerprint import model_key
from kvlab.model.loading import DEFAULT_MODEL, load_model
from kvlab.quant.policy import parse_policy

__all__ = ["config_key", "merge", "parse_shard", "sweep"]

KINDS = ("ppl", "errors")
_META = ["key", "config", "policy", "emulation", "model", "corpus", "ctx", "bits_per_value",
         "bytes_per_token_4096", "tokens_sha256"]
_PPL_COLUMNS = [*_META, "window", "nll", "kl"]
_KEY_FILE = re.compile(r"[0-9a-f]{16}\.csv")


def parse_shard(shard) -> tuple[int, int]:
    """``"i/n"`` or ``(i, n)`` -> (i, n) with 0 <= i < n."""
    if shard is None:
        return 0, 1
    given = shard
    if isinstance(shard, str):
        a, sep, b = shard.partition("/")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise ValueError(f"shard={shard!r} is not allowed; allowed: 'i/n' with 0 <= i < n, e.g. '0/4'")
        shard = (int(a), int(b))
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise ValueError(f"shard={given!r} is not allowed; allowed: 'i/n' or (i, n) with n >= 1 and 0 <= i < n")
    return i, n


def config_key(kind: str, policy_spec: str, emulation: str, model: str, tokens: str,
               bos_token_id: int | None = None) -> str:
    """Stable 16-hex-digit key of one config on one set of inputs. ``bos_token_id``: the token that starts
    every window, or None; a key without one is the key of before the ``bos`` option, so results stored
    then (windows without BOS) stay valid."""
    parts = [kind, policy_spec, emulation, model, tokens]
    if bos_token_id is not None:
        parts.append(f"bos={int(bos_token_id)}")
    text = "|".join(parts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.17g")
    atomic_write_bytes(path, buf.getvalue().encode())


def _read_result(path: Path, kind: str, n_rows: int | None = None,
                 ctx: int | None = None) -> tuple[pd.DataFrame | None, str]:
    """(rows, "") for a whole result file of key ``path.stem`` (of ``n_rows`` rows scored at ``ctx``
    where given), else (None, what is wrong with it)."""
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None, "empty"
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    required = _PPL_COLUMNS if kind == "ppl" else [*_META, "layer", "head"]
    extra = set(df.columns) - set(required) - {"bos_token_id"}
    if not set(required) <= set(df.columns) or (kind == "ppl" and extra):
        return None, f"not a sweep {kind} file (columns {list(df.columns)}; expected {required})"
    legacy = kind == "errors" and "window" not in df.columns and len(df) > 0
    if legacy:
        if df.duplicated(["layer", "head"]).any():
            return None, "an errors file without a window column holding several rows per layer and head"
        df.insert(df.columns.get_loc("layer"), "window", 0)  # a one-window file from before the column
    if not len(df) or (df["key"].astype(str) != path.stem).any():
        return None, f"not the rows of key {path.stem} (truncated or foreign)"
    if df[[c for c in required if c != "kl"]].isna().any().any():
        return None, "truncated (a row has missing values)"
    if n_rows is not None and len(df) != n_rows:
        if legacy and n_rows > len(df):
            return None, "averaged over its windows (written before per-window error rows)"
        return None, f"truncated ({len(df)} rows, expected {n_rows})"
    if ctx is not None and (df["ctx"] != ctx).any():
        return None, f"scored at ctx {sorted(set(df['ctx']))}, not {ctx}"
    return df, ""


def merge(out: str | Path, kinds=KINDS) -> dict[str, pd.DataFrame]:
    """Join every finished config's file under ``out`` into ``{kind}.csv`` (sorted, deterministic). Files
    that are not whole sweep results (a stray CSV, an empty or truncated file) are skipped with a warning
    naming them."""
    out = Path(out)
    merged = {}
    for kind in kinds:
        frames = []
        for f in sorted((out / kind).glob("*.csv")):
            df, problem = _read_result(f, kind) if _KEY_FILE.fullmatch(f.name) else (None, "not named <key>.csv")
            if df is None:
                warnings.warn(f"sweep: ignoring {f}: {problem}", stacklevel=2)
                continue
            frames.append(df)
        if not frames:
            continue
        df = pd.concat(frames, ignore_index=True)
        order = ["key", "window"] if kind == "ppl" else ["key", "window", "layer", "head"]
        df = df.sort_values(order, kind="stable").reset_index(drop=True)
        _write_csv(df, out / f"{kind}.csv")
        merged[kind] = df
    return merged


@contextlib.contextmanager
def _claim(path: Path, wait: bool):
    """Hold an exclusive lock on ``path`` (created if needed); yields False when ``wait`` is False and
    another process holds it. The lock dies with its holder; the file is removed on release."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:  # the file we locked may have been released and removed meanwhile: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; allowed: a folder (created if missing) for the results")
    for kind in KINDS:
        if (out / kind).exists() and not (out / kind).is_dir():
            raise ValueError(f"out={str(out)!r}: {out / kind} is a file; the sweep keeps its results in that folder")


def sweep(configs, model=None, tokenizer=None, model_name: str | None = None, corpus: str = "auto",
          data_dir: str | None = None, ctx: int = 512, windows: int = 24, out: str | Path = "data/results",
          kinds=("ppl",), emulation: str = "prefill", error_windows: int = 2, shard=None,
          progress: bool = True, bos: str = "auto", sample: str = "first", seed: int = 0) -> dict[str, pd.DataFrame]:
    """Run every policy spec in ``configs`` and return their tidy tables {"ppl": df, "errors": df}: the rows
    of this call's configs (this shard's) on this call's windows. ``out/ppl.csv`` and ``out/errors.csv``
    are rewritten with every finished config in ``out``, earlier runs on other inputs included.

    The ``fp16`` scheme is always added (delta PPL is measured against it on the same windows).
    ``error_windows``: windows used for the per-layer/head error tables (the first ones). Every spec is
    checked against the model (layers, heads, head_dim, groups) before any config runs. ``bos``: whether
    windows start with the BOS token (auto, always, never: :func:`kvlab.evaluation.ppl.resolve_bos`); rows
    of windows with one carry a ``bos_token_id`` column. ``sample``/``seed``: which windows of the split
    (:func:`kvlab.evaluation.evaluate.load_windows`; the key hashes the tokens, so each draw has its own rows).
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
    out = Path(out)
    _check_out(out)
    i_shard, n_shard = parse_shard(shard)
    specs = list(dict.fromkeys(["fp16", *configs]))
    policies = [parse_policy(s) for s in specs]  # validate every spec before any work
    if model is None:
        model, tokenizer = load_model(model_name)
    model_id = model_name or getattr(model.config, "kvlab_name", DEFAULT_MODEL)
    n_layers, n_heads, head_dim = model_geometry(model)
    bos_id = resolve_bos(tokenizer, bos)
    corpus_name, w = load_windows(tokenizer, corpus, ctx, windows, data_dir, bos=bos, sample=sample, seed=seed)
    T = int(w.shape[1])
    metas = []
    for spec, p in zip(specs, policies):  # every config against the model, before the first one runs
        try:
            p.check_model(n_layers, n_heads, head_dim)
            metas.append({"config": spec, "policy": p.spec, "emulation": emulation, "model": model_id,
                          "corpus": corpus_name, "ctx": T,
                          "bits_per_value": p.bits_per_value(n_layers, n_heads, T, head_dim),
                          "bytes_per_token_4096": p.bytes_per_token(n_layers, n_heads, 4096, head_dim),
                          **({} if bos_id is None else {"bos_token_id": bos_id})})
        except ValueError as e:
            raise ValueError(f"config {spec!r} does not fit the model (layers {n_layers}, kv heads {n_heads}, "
                             f"head_dim {head_dim}): {e}") from e
    fingerprint = model_key(model)
    tok_hash = tokens_sha256(w)
    w_err = w[: max(1, min(error_windows, w.shape[0]))]
    err_hash = tokens_sha256(w_err)
    expected = {"ppl": int(w.shape[0]), "errors": int(w_err.shape[0]) * n_layers * n_heads}

    def key(kind, pol, em, digest, shape) -> str:
        """The key hashes the tokens and the windows' shape ((4, 512) and (8, 256) windows of one token
        stream hold the same bytes). Files from before the shape was hashed are keyed without it: such a
        file is used where it holds exactly these windows (same tokens, row count and ctx)."""
        new = config_key(kind, pol.spec, em, fingerprint, f"{digest}|{shape[0]}x{shape[1]}", bos_id)
        old = config_key(kind, pol.spec, em, fingerprint, digest, bos_id)
        if not (out / kind / f"{new}.csv").exists() and (out / kind / f"{old}.csv").exists():
            if _read_result(out / kind / f"{old}.csv", kind, expected[kind], T)[0] is not None:
                return old
        return new

    jobs = []  # (kind, key, spec, policy, meta) in config order
    for i, (spec, pol, meta) in enumerate(zip(specs, policies, metas)):
        if i % n_shard != i_shard:
            continue
        if "ppl" in kinds:
            jobs.append(("ppl", key("ppl", pol, emulation, tok_hash, w.shape), spec, pol, meta))
        if "errors" in kinds:
            em = emulation if emulation != "decode" else "prefill"
            jobs.append(("errors", key("errors", pol, em, err_hash, w_err.shape), spec, pol, meta))

    def run(job) -> bool:
        kind, key, _, pol, meta = job
        path = out / kind / f"{key}.csv"
        if path.exists():
            df, problem = _read_result(path, kind, expected[kind], T)
            if df is not None:
                return False  # finished meanwhile (by a concurrent run): reused
            warnings.warn(f"sweep: {path} is {problem}; recomputing it", stacklevel=3)
        if kind == "ppl":
            r = evaluate_policy(model, w, pol, emulation=emulation, kl=True, progress=progress)
            rows = pd.DataFrame({"key": key, **meta, "tokens_sha256": tok_hash,
                                 "window": range(len(r["window_nll"])), "nll": r["window_nll"],
                                 "kl": r["window_kl"]})
        else:
            rows = error_table(model, w_err, pol, emulation="static" if emulation == "static" else "prefill",
                               progress=progress, per_window=True)
            for j, (k, v) in enumerate({"key": key, **meta, "tokens_sha256": err_hash}.items()):
                rows.insert(j, k, v)
        _write_csv(rows, path)
        return True

    held = []  # configs another process is computing: waited for after the free ones
    reused = {kind: 0 for kind in kinds}
    bar = tqdm(jobs, desc="configs", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job[2][:40])
        path = out / job[0] / f"{job[1]}.csv"
        if path.exists() and _read_result(path, job[0], expected[job[0]], T)[0] is not None:
            reused[job[0]] += 1
            continue
        with _claim(path.with_suffix(".lock"), wait=False) as mine:
            if mine:
                run(job)
            else:
                held.append(job)
    bar.close()
    for job in held:
        with _claim(out / job[0] / f"{job[1]}.lock", wait=True):
            if not run(job):  # done by the other process (then skipped), or left undone by it (a crash)
                reused[job[0]] += 1
    tables = {}
    keys = {kind: [j[1] for j in jobs if j[0] == kind] for kind in kinds}
    counts = {kind: {"reused": reused[kind], "computed": len(keys[kind]) - reused[kind]} for kind in kinds}
    _report_counts(out, counts, progress)
    for kind, df in merge(out, kinds).items():  # the folder may hold other runs: keep this call's rows
        tables[kind] = df[df["key"].isin(keys[kind])].reset_index(drop=True)
        tables[kind].attrs.update(tokens_sha256=tok_hash, error_tokens_sha256=err_hash, **counts[kind])
    return tables


#: a file that every sweep appends its reused/computed counts to (one JSON object a line), if set: ``kvlab
#: study`` sets it to sum them over the notebooks it renders
LEDGER_ENV = "KVLAB_SWEEP_LEDGER"


def _report_counts(out: Path, counts: dict, progress: bool) -> None:
    """Say how many configs came from finished files in ``out`` and how many were computed (configs reused by
    a concurrent run count as reused); append them to ``$KVLAB_SWEEP_LEDGER`` when that is set."""
    import json

    if progress:
        text = "; ".join(f"{kind}: {c['reused']} configs reused from {out}, {c['computed']} computed"
                         for kind, c in counts.items())
        tqdm.write(f"sweep: {text}")
    ledger = os.environ.get(LEDGER_ENV)
    if ledger:
        with open(ledger, "a", encoding="utf-8") as f:
            f.write(json.dumps({"out": str(out), **counts}) + "\n")
