"""Resumable sweep engine: run a grid of scheme/policy specs, store tidy results keyed by config hash.

Layout under ``out`` (default ``data/results``):

- ``ppl/<key>.csv``: one row per window (NLL, logits KL) of one finished config;
- ``errors/<key>.csv``: one row per layer x kv head (tensor and attention-output errors);
- ``ppl.csv`` and ``errors.csv``: every finished config merged, sorted (rewritten at the end of a run).

``key`` hashes the canonical policy spec, the emulation, the model and the exact scored tokens, so a
re-run skips finished configs and a changed input never reuses stale rows. Each config's file is
written to a temporary name and renamed when the config is complete, so a run killed at any moment
(SIGKILL included) leaves only whole configs behind and resumes without redoing or duplicating them.
``shard=(i, n)`` runs every n-th config (from i), so GPUs or a job array can split a sweep; shards write
disjoint files and ``merge`` joins them by key.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kvlab._io import atomic_write_bytes
from kvlab.evaluation.evaluate import error_table, evaluate_policy, load_windows, model_geometry
from kvlab.evaluation.ppl import resolve_bos, tokens_sha256
from kvlab.model.loading import DEFAULT_MODEL, load_model
from kvlab.quant.policy import parse_policy

__all__ = ["config_key", "merge", "parse_shard", "sweep"]

KINDS = ("ppl", "errors")


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


def merge(out: str | Path, kinds=KINDS) -> dict[str, pd.DataFrame]:
    """Join every finished config's file under ``out`` into ``{kind}.csv`` (sorted, deterministic)."""
    out = Path(out)
    merged = {}
    for kind in kinds:
        files = sorted((out / kind).glob("*.csv"))
        if not files:
            continue
        df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
        order = ["key", "window"] if kind == "ppl" else ["key", "layer", "head"]
        df = df.sort_values(order, kind="stable").reset_index(drop=True)
        _write_csv(df, out / f"{kind}.csv")
        merged[kind] = df
    return merged


def sweep(configs, model=None, tokenizer=None, model_name: str | None = None, corpus: str = "auto",
          data_dir: str | None = None, ctx: int = 512, windows: int = 24, out: str | Path = "data/results",
          kinds=("ppl",), emulation: str = "prefill", error_windows: int = 2, shard=None,
          progress: bool = True, bos: str = "auto") -> dict[str, pd.DataFrame]:
    """Run every policy spec in ``configs`` and return their tidy tables {"ppl": df, "errors": df}: the rows
    of this call's configs (this shard's) on this call's windows. ``out/ppl.csv`` and ``out/errors.csv``
    are rewritten with every finished config in ``out``, earlier runs on other inputs included.

    The ``fp16`` scheme is always added (delta PPL is measured against it on the same windows).
    ``error_windows``: windows used for the per-layer/head error tables (the first ones). ``bos``: whether
    windows start with the BOS token (auto, always, never: :func:`kvlab.evaluation.ppl.resolve_bos`); rows
    of windows with one carry a ``bos_token_id`` column.
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
    i_shard, n_shard = parse_shard(shard)
    specs = list(dict.fromkeys(["fp16", *configs]))
    policies = [parse_policy(s) for s in specs]  # validate every spec before any work
    if model is None:
        model, tokenizer = load_model(model_name)
    model_id = model_name or getattr(model.config, "kvlab_name", DEFAULT_MODEL)
    n_layers, n_heads, head_dim = model_geometry(model)
    for p in policies:
        p.check_model(n_layers, n_heads)
    bos_id = resolve_bos(tokenizer, bos)
    corpus_name, w = load_windows(tokenizer, corpus, ctx, windows, data_dir, bos=bos)
    tok_hash = tokens_sha256(w)
    w_err = w[: max(1, min(error_windows, w.shape[0]))]
    err_hash = tokens_sha256(w_err)
    out = Path(out)
    todo = [(i, s, p) for i, (s, p) in enumerate(zip(specs, policies)) if i % n_shard == i_shard]
    keys = {kind: [] for kind in kinds}
    bar = tqdm(todo, desc="configs", disable=not progress)
    for _, spec, pol in bar:
        bar.set_postfix_str(spec[:40])
        meta = {"config": spec, "policy": pol.spec, "emulation": emulation, "model": model_id,
                "corpus": corpus_name, "ctx": int(w.shape[1]),
                "bits_per_value": pol.bits_per_value(n_layers, n_heads, int(w.shape[1]), head_dim),
                "bytes_per_token_4096": pol.bytes_per_token(n_layers, n_heads, 4096, head_dim),
                **({} if bos_id is None else {"bos_token_id": bos_id})}
        if "ppl" in kinds:
            key = config_key("ppl", pol.spec, emulation, model_id, tok_hash, bos_id)
            path = out / "ppl" / f"{key}.csv"
            keys["ppl"].append(key)
            if not path.exists():
                r = evaluate_policy(model, w, pol, emulation=emulation, kl=True, progress=progress)
                rows = pd.DataFrame({"key": key, **meta, "tokens_sha256": tok_hash,
                                     "window": range(len(r["window_nll"])), "nll": r["window_nll"],
                                     "kl": r["window_kl"]})
                _write_csv(rows, path)
        if "errors" in kinds:
            key = config_key("errors", pol.spec, emulation if emulation != "decode" else "prefill", model_id,
                             err_hash, bos_id)
            path = out / "errors" / f"{key}.csv"
            keys["errors"].append(key)
            if not path.exists():
                df = error_table(model, w_err, pol, emulation="static" if emulation == "static" else "prefill",
                                 progress=progress)
                for j, (k, v) in enumerate({"key": key, **meta, "tokens_sha256": err_hash}.items()):
                    df.insert(j, k, v)
                _write_csv(df, path)
    tables = {}
    for kind, df in merge(out, kinds).items():  # the folder may hold other runs: keep this call's rows
        tables[kind] = df[df["key"].isin(keys[kind])].reset_index(drop=True)
        tables[kind].attrs.update(tokens_sha256=tok_hash, error_tokens_sha256=err_hash)
    return tables
