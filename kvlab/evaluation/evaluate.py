"""High-level evaluation entry points shared by the CLI, the sweep and the notebooks."""

from __future__ import annotations

import os
import sys
import warnings

from kvlab.evaluation.corpus import load_corpus
from kvlab.evaluation.ppl import SAMPLES, PplResult, make_windows, resolve_bos, tokenize, window_nll
from kvlab.model.loading import DEFAULT_MODEL, load_model

__all__ = ["resolve_corpus", "load_windows", "baseline_ppl"]


def resolve_corpus(corpus: str, data_dir: str | None = None) -> tuple[str, str]:
    """``"auto"`` -> WikiText-2 (v1, test) if reachable, else Python's pydoc topics; returns (name, text)."""
    if corpus != "auto":
        return corpus, load_corpus(corpus, data_dir=data_dir)
    try:
        return "wikitext-2-v1", load_corpus("wikitext-2-v1", data_dir=data_dir)
    except FileNotFoundError:
        print("kvlab: WikiText-2 not reachable (no --data-dir/KVLAB_DATA_DIR, no hub); using corpus 'pydoc'",
              file=sys.stderr)
        return "pydoc", load_corpus("pydoc")


def load_windows(tokenizer, corpus: str = "auto", ctx: int = 512, windows: int = 24, data_dir=None,
                 bos: str = "auto", sample: str = "first", seed: int = 0):
    """Tokenize the corpus and cut (n, ctx) windows, each starting with the BOS token as ``bos`` resolves
    (:func:`kvlab.evaluation.ppl.resolve_bos`). ``sample``: ``"first"`` (the first windows of the split) or
    ``"spread"`` (one window drawn with ``seed`` from each of ``windows`` equal strata of the whole split:
    :func:`kvlab.evaluation.ppl.make_windows`). Returns (corpus_name, windows)."""
    bos_id = resolve_bos(tokenizer, bos)
    if sample not in SAMPLES:
        raise ValueError(f"sample={sample!r} is not allowed; allowed: {', '.join(SAMPLES)}")
    name, text = resolve_corpus(corpus, data_dir)
    ids = tokenize(tokenizer, text, max_tokens=ctx * windows if sample == "first" else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = make_windows(ids, ctx, windows, bos=bos_id, sample=sample, seed=seed)
    for c in caught:
        print(f"kvlab: {c.message}", file=sys.stderr)
    return name, w


def baseline_ppl(model_name=None, corpus="auto", ctx=512, windows=24, data_dir=None, progress=True,
                 model=None, tokenizer=None, bos="auto", sample="first", seed=0) -> PplResult:
    """Perplexity of the unmodified model (``bos``, ``sample``, ``seed``: see :func:`load_windows`)."""
    if model is None:
        model, tokenizer = load_model(model_name)
    name, w = load_windows(tokenizer, corpus, ctx, windows, data_dir, bos=bos, sample=sample, seed=seed)
    nll = window_nll(model, w, progress=progress)
    r = PplResult.from_nll(nll, w, model=model_name or DEFAULT_MODEL, corpus=name, bos=bos,
                           bos_token_id=resolve_bos(tokenizer, bos))
    r.extra.update({"sample": sample, **({"seed": seed} if sample == "spread" else {})})
    return r


# ---------------------------------------------------------------------------------------------------
# schemes inside the model
# ---------------------------------------------------------------------------------------------------
_BASE_LOGPROBS: dict = {}
# keep the unmodified model's log-probs in memory up to this size (24 windows of 2048 tokens of a 49k vocabulary
# take 9.7 GB; $KVLAB_BASE_LOGPROBS_BYTES raises or lowers it)
_BASE_CACHE_BYTES = int(os.environ.get("KVLAB_BASE_LOGPROBS_BYTES", 4 << 30))
#: a folder where log-probs that do not fit in memory are kept as safetensors files, shared by every process
#: that sets it (a 262k vocabulary's 2048-token window takes 2.1 GB: without it, every config of a sweep
#: repeats the unmodified forward of every window). Unset: no files.
BASE_LOGPROBS_DIR_ENV = "KVLAB_BASE_LOGPROBS_DIR"
_FINGERPRINTS: dict = {}


def _spill_path(model, windows, i):
    """The file of window i's log-probs under ``$KVLAB_BASE_LOGPROBS_DIR``, or None when that is unset."""
    from pathlib import Path

    from kvlab.evaluation.ppl import tokens_sha256
    from kvlab.model.fingerprint import model_fingerprint

    folder = os.environ.get(BASE_LOGPROBS_DIR_ENV)
    if not folder:
        return None
    fp = _FINGERPRINTS.get(id(model))
    if fp is None or fp[0] is not model:
        fp = _FINGERPRINTS[id(model)] = (model, model_fingerprint(model))
    n, t = windows.shape
    return Path(folder) / f"{fp[1][:16]}-{tokens_sha256(windows)[:16]}-{n}x{t}-w{i}.safetensors"


def _base_logprobs(model, windows, i):
    """What the KL against the unmodified model needs of window i (:func:`_base_stats`), memoized per (model,
    windows) when it fits, else kept under ``$KVLAB_BASE_LOGPROBS_DIR`` when that is set (computed once by
    whichever process gets there first; the others wait for it and read it)."""
    import torch

    from kvlab.evaluation.ppl import tokens_sha256
    from kvlab.model.geometry import text_config

    key = (id(model), tokens_sha256(windows), tuple(windows.shape), i)  # one token stream cut two ways: two keys
    if key in _BASE_LOGPROBS:
        return _BASE_LOGPROBS[key]
    vocab = getattr(text_config(model.config), "vocab_size", None) or 0
    fits = (len(_BASE_LOGPROBS) + 1) * windows.shape[1] * vocab * 4 <= _BASE_CACHE_BYTES
    spill = None if fits else _spill_path(model, windows, i)

    def compute():
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = model(input_ids=windows[i : i + 1].to(device), use_cache=False).logits
        return _base_stats(torch.log_softmax(logits.float(), -1))

    stats = compute() if spill is None else _spilled(spill, compute)
    if (len(_BASE_LOGPROBS) + 1) * stats["p"].numel() * 4 <= _BASE_CACHE_BYTES:
        _BASE_LOGPROBS[key] = stats
    return stats


#: positions a time in the float64 work over the vocabulary (8 x 262k x 8 bytes: 17 MB temporaries, small
#: enough for the allocator to reuse rather than fault in fresh pages for every one)
_CHUNK = 8


def _base_stats(lp) -> dict:
    """From the unmodified model's log-probs lp (1, T, vocab) float32: ``p`` = exp(lp) (float32, what the KL
    weighs by), ``c`` = sum_v p lp and ``s`` = sum_v p per position (float64, (1, T))."""
    import torch

    p = lp.exp()
    c = torch.empty(lp.shape[:2], dtype=torch.float64)
    s = torch.empty(lp.shape[:2], dtype=torch.float64)
    for a in range(0, lp.shape[1], _CHUNK):
        pd = p[:, a : a + _CHUNK].double()
        c[:, a : a + _CHUNK] = torch.einsum("btv,btv->bt", pd, lp[:, a : a + _CHUNK].double())
        s[:, a : a + _CHUNK] = pd.sum(-1)
    return {"p": p.contiguous(), "c": c, "s": s}


def _spilled(path, compute):
    """Read ``path`` (safetensors: :func:`_base_stats`' tensors), or compute and write it atomically under a
    lock."""
    import fcntl

    from safetensors.torch import load_file

    from kvlab._io import atomic_save_tensors

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if path.exists():
            try:
                got = load_file(path)
                if set(got) == {"p", "c", "s"}:
                    return got
                raise ValueError(f"tensors {sorted(got)}, not p, c, s")
            except Exception as e:  # a damaged or foreign file: say so and recompute it
                warnings.warn(f"kvlab: {path} is unreadable ({e}); recomputing it", stacklevel=3)
        stats = compute()
        atomic_save_tensors(stats, path, {"what": "the unmodified model's p = exp(log_softmax), sum p log p, sum p"})
        return stats


def _window_scores(logits, ids, base=None) -> tuple[float, float | None]:
    """Mean next-token NLL of one window and, given ``base`` (:func:`_base_stats`), the mean over positions
    of KL(base || softmax(logits)), both in float64. logits (1, T, vocab), ids (1, T).

    With lq = x - lse(x): KL = sum_v p (lp - lq) = c - sum_v p x + lse(x) s per position, so a config costs one
    log-sum-exp and one dot product over the vocabulary (p, c, s come with the base)."""
    import torch

    T = logits.shape[1]
    lse = torch.empty(T, dtype=torch.float64)
    px = torch.empty(T, dtype=torch.float64) if base is not None else None
    xd = None
    for a in range(0, T, _CHUNK):
        xd = logits[0, a : a + _CHUNK].double()
        lse[a : a + _CHUNK] = torch.logsumexp(xd, -1)
        if base is not None:
            px[a : a + _CHUNK] = torch.einsum("tv,tv->t", base["p"][0, a : a + _CHUNK].double(), xd)
    tgt = ids[0, 1:].to(logits.device)
    nll = float((lse[:-1] - logits[0, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double()).mean())
    if base is None:
        return nll, None
    kl = (base["c"][0] - px + lse * base["s"][0]).clamp_min(0).mean()
    return nll, float(kl)


def model_geometry(model) -> tuple[int, int, int]:
    """(layers, kv heads, head_dim) of a transformers causal LM (:func:`kvlab.model.geometry.geometry`)."""
    from kvlab.model.geometry import geometry

    return tuple(geometry(model))


def evaluate_policy(model, windows, policy, emulation: str = "prefill", kl: bool = True,
                    progress: bool = True) -> dict:
    """Per-window NLL (and mean logits KL vs the unmodified model) with ``policy`` on every layer.

    ``emulation``: ``prefill`` (decode-exact, one pass per window), ``static`` (quantize everything,
    then prefill) or ``decode`` (token by token through a real :class:`kvlab.CompressedCache`).
    Returns {"window_nll": [...], "window_kl": [...] or None, "seconds": wall time}.
    """
    import time

    import torch
    from tqdm.auto import tqdm

    from kvlab.emulation import hooks
    from kvlab.quant.policy import parse_policy
    from kvlab.storage.cache import CompressedCache, cache_kwarg

    if emulation not in ("prefill", "static", "decode"):
        raise ValueError(f"emulation={emulation!r} is not allowed; allowed: prefill, static, decode")
    policy = parse_policy(policy)
    device = next(model.parameters()).device
    nll, kls = [], []
    t0 = time.perf_counter()
    for i in tqdm(range(windows.shape[0]), desc=policy.spec[:48], disable=not progress, leave=False):
        ids = windows[i : i + 1].to(device)
        with torch.no_grad():
            if emulation == "decode":
                kw = {cache_kwarg(model): CompressedCache(policy, config=model.config)}
                logits = torch.cat([model(input_ids=ids[:, t : t + 1], use_cache=True, **kw).logits
                                    for t in range(ids.shape[1])], dim=1)
            else:
                with hooks.compress(model, policy, emulation=emulation):
                    logits = model(input_ids=ids, use_cache=False).logits
        w_nll, w_kl = _window_scores(logits, ids, _base_logprobs(model, windows, i) if kl else None)
        nll.append(w_nll)
        if kl:
            kls.append(w_kl)
    return {"window_nll": nll, "window_kl": kls if kl else None, "seconds": time.perf_counter() - t0}


def error_table(model, windows, policy, emulation: str = "prefill", progress: bool = True,
                per_window: bool = False):
    """Per-layer, per-kv-head tensor and attention-output errors of ``policy``: averaged over windows
    (one row per layer x head), or with ``per_window`` one row per window x layer x head (a ``window``
    column: the index in ``windows``), from which a proxy gets a CI over windows. A tidy pandas DataFrame."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from kvlab.emulation import hooks

    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # the decoder without the LM head: the logits are not measured
    rows = []
    with hooks.measure(model, policy, emulation=emulation) as measured, torch.no_grad():
        for i in tqdm(range(windows.shape[0]), desc="errors", disable=not progress, leave=False):
            start = len(measured)
            body(input_ids=windows[i : i + 1].to(device), use_cache=False)
            for row in measured[start:]:
                row["window"] = i
        rows = list(measured)
    df = pd.DataFrame(rows)
    if per_window:
        df = df.groupby(["window", "layer", "head"], as_index=False).mean()
        return df[["window", *[c for c in df.columns if c != "window"]]]
    return df.drop(columns="window").groupby(["layer", "head"], as_index=False).mean()


def scheme_report(model_name=None, corpus="auto", ctx=512, windows=24, data_dir=None, policy="fp16",
                  emulation="prefill", progress=True, model=None, tokenizer=None, seed=0, bos="auto",
                  sample="first") -> dict:
    """Everything the ``ppl --scheme`` CLI prints: PPL, delta vs the fp16 scheme on the same windows with
    a paired bootstrap CI, mean logits KL, bits per value and bytes per token. ``seed`` seeds the bootstrap
    and, with ``sample="spread"``, the window draw."""
    import math

    from kvlab.evaluation.ppl import PplResult
    from kvlab.metrics import paired_delta_ci
    from kvlab.quant.policy import parse_policy

    pol = parse_policy(policy)
    if model is None:
        model, tokenizer = load_model(model_name)
    name, w = load_windows(tokenizer, corpus, ctx, windows, data_dir, bos=bos, sample=sample, seed=seed)
    n_layers, n_heads, head_dim = model_geometry(model)
    pol.check_model(n_layers, n_heads, head_dim)  # before the fp16 reference runs
    ref = evaluate_policy(model, w, "fp16", emulation="prefill", kl=False, progress=progress)
    res = evaluate_policy(model, w, pol, emulation=emulation, kl=True, progress=progress)
    import torch

    r = PplResult.from_nll(torch.tensor(res["window_nll"], dtype=torch.float64), w,
                           model=model_name or DEFAULT_MODEL, corpus=name, bos=bos,
                           bos_token_id=resolve_bos(tokenizer, bos))
    delta, lo, hi = paired_delta_ci(ref["window_nll"], res["window_nll"], seed=seed)
    r.extra.update({
        "scheme": pol.spec, "emulation": emulation, "sample": sample, **({"seed": seed} if sample == "spread" else {}),
        "bits_per_value": pol.bits_per_value(n_layers, n_heads, ctx, head_dim),
        "bytes_per_token": pol.bytes_per_token(n_layers, n_heads, ctx, head_dim),
        "fp16_ppl": math.exp(sum(ref["window_nll"]) / len(ref["window_nll"])),
        "delta_ppl": delta, "delta_ppl_ci": [lo, hi],
        "kl": sum(res["window_kl"]) / len(res["window_kl"]), "window_kl": res["window_kl"],
        "seconds": res["seconds"],
    })
    return r.to_dict()
