"""Offline calibration of the causal KVQuant (``kvquantc``): pre-RoPE K and V captured on calibration text,
fitted into one content-addressed file per (model, bits, outlier_frac) (:mod:`kvlab.quant.kvquantc`).

As in the paper, the calibration text is not the evaluation text: by default WikiText-2's validation split,
while perplexity is measured on its test split. The first ``skip_first`` tokens of every window (the fp16
attention sinks) are left out of the statistics, since the scheme never quantizes them.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvlab.evaluation.corpus import load_corpus
from kvlab.evaluation.ppl import SAMPLES, make_windows, resolve_bos, tokenize, tokens_sha256
from kvlab.quant.kvquantc import DEFAULT_OUTLIER_FRAC, Calibration, KVQuantC, fit_calibration

__all__ = ["calibrate_kvquant", "calibration_windows", "kvquantc_specs", "outlier_report"]


def calibration_windows(tokenizer, corpus: str = "wikitext-2-v1", split: str = "valid", ctx: int = 2048,
                        windows: int = 16, data_dir=None, bos: str = "auto", sample: str = "spread",
                        seed: int = 0) -> torch.Tensor:
    """(windows, ctx) token ids of ``split`` of ``corpus``, cut as :func:`kvlab.evaluation.evaluate.load_windows`
    cuts the test split (same tokenizer call, BOS rule and sampling)."""
    if corpus == "auto":
        raise ValueError("calibration: corpus='auto' is not allowed (a calibration must name its text); allowed: "
                         "wikitext-2-v1, wikitext-2-raw-v1, pydoc, c4 or a text file")
    if sample not in SAMPLES:
        raise ValueError(f"sample={sample!r} is not allowed; allowed: {', '.join(SAMPLES)}")
    text = load_corpus(corpus, split=split, data_dir=data_dir)
    ids = tokenize(tokenizer, text, max_tokens=ctx * windows if sample == "first" else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = make_windows(ids, ctx, windows, bos=resolve_bos(tokenizer, bos), sample=sample, seed=seed)
    for c in caught:
        print(f"kvlab: {c.message}", file=sys.stderr)
    return w


def _capture_kv(model, windows: torch.Tensor, skip_first: int, progress: bool):
    """Pre-RoPE K and V of every layer over ``windows`` -> two lists (one entry a layer) of (H, N, D) float32."""
    from kvlab.emulation import hooks

    device = next(model.parameters()).device
    n_layers = len(hooks.attention_modules(model))
    ks, vs = [[] for _ in range(n_layers)], [[] for _ in range(n_layers)]
    with hooks.capture(model, which=("k", "v"), rope=("pre",)) as got, torch.no_grad():
        for i in tqdm(range(windows.shape[0]), desc="calibration windows", disable=not progress):
            model(input_ids=windows[i : i + 1].to(device), use_cache=False)
            for layer in range(n_layers):
                ks[layer].append(got[(layer, "k_pre")][0, :, skip_first:].float())
                vs[layer].append(got[(layer, "v")][0, :, skip_first:].float())
    return [torch.cat(k, dim=1) for k in ks], [torch.cat(v, dim=1) for v in vs]


def calibrate_kvquant(model, tokenizer, bits=3, corpus: str = "wikitext-2-v1", split: str = "valid",
                      ctx: int = 2048, windows: int = 16, seed: int = 0, data_dir=None, out=None,
                      outlier_frac: float = DEFAULT_OUTLIER_FRAC, sample: str = "spread", bos: str = "auto",
                      skip_first: int = 1, model_name: str | None = None, progress: bool = True) -> list[Calibration]:
    """Fit and save one ``kvquantc`` calibration per entry of ``bits`` (an int or a sequence: one forward pass
    serves them all) on ``windows`` windows of ``ctx`` tokens of ``split`` of ``corpus`` (drawn as ``sample``
    with ``seed``). Files go to ``out`` (default :func:`kvlab.quant.kvquantc.calibration_dir`), named by their
    content id; returns the calibrations (``cal.id`` is what ``kvquantc:bits=B,calib=<id>`` names).
    Deterministic given the model, the text and the seed."""
    bits_list = _checked_bits(bits, outlier_frac, skip_first, ctx)
    w = calibration_windows(tokenizer, corpus, split, ctx, windows, data_dir, bos=bos, sample=sample, seed=seed)
    meta = _metadata(model, tokenizer, w, corpus, split, sample, seed, bos, skip_first, model_name)
    return _fit_and_save(model, w, meta, bits_list, outlier_frac, skip_first, out, progress)


def _checked_bits(bits, outlier_frac, skip_first, ctx) -> list[int]:
    """``bits`` as a list, every setting validated before any forward pass (the scheme's own checks)."""
    bits_list = [bits] if isinstance(bits, int) else list(bits)
    for b in bits_list:
        KVQuantC(bits=b, outlier_frac=outlier_frac)
    if not isinstance(skip_first, int) or not 0 <= skip_first < ctx:
        raise ValueError(f"skip_first={skip_first!r} is not allowed; allowed: an integer in [0, ctx)")
    return bits_list


def _metadata(model, tokenizer, w, corpus, split, sample, seed, bos, skip_first, model_name) -> dict:
    """What a calibration records about its inputs (also what :func:`kvquantc_specs` matches to reuse one)."""
    from kvlab.model.fingerprint import model_fingerprint
    from kvlab.model.loading import DEFAULT_MODEL

    return {"model": model_name or getattr(model.config, "kvlab_name", DEFAULT_MODEL),
            "model_fingerprint": model_fingerprint(model), "corpus": corpus, "split": split, "ctx": int(w.shape[1]),
            "windows": int(w.shape[0]), "sample": sample, "seed": seed, "bos_token_id": resolve_bos(tokenizer, bos),
            "skip_first": skip_first, "tokens_sha256": tokens_sha256(w)}


def _fit_and_save(model, w, meta, bits_list, outlier_frac, skip_first, out, progress) -> list[Calibration]:
    k_pre, v = _capture_kv(model, w, skip_first, progress)
    cals = []
    for b in bits_list:
        cal = fit_calibration(k_pre, v, b, outlier_frac, meta)
        path = cal.save(out)
        if progress:
            print(f"kvlab calibrate: bits={b} -> {path} (spec {cal.spec})", file=sys.stderr)
        cals.append(cal)
    return cals


def kvquantc_specs(model, tokenizer, bits=(3, 4), corpus: str = "auto", split: str = "valid", ctx: int = 2048,
                   windows: int = 16, seed: int = 0, data_dir=None, folder=None,
                   outlier_frac: float = DEFAULT_OUTLIER_FRAC,
                   sample: str = "spread", bos: str = "auto", skip_first: int = 1, model_name: str | None = None,
                   progress: bool = True) -> list[str]:
    """The ``kvquantc`` spec of each entry of ``bits`` for ``model`` (what a notebook puts in its grid),
    calibrating only what ``folder`` (default :func:`kvlab.quant.kvquantc.calibration_dir`) does not already
    hold: a file whose metadata match this model's fingerprint, the calibration tokens (their sha256), the
    window layout, bits and outlier_frac is reused. Every calibration returned is registered in memory, so
    the specs load in this process whatever the folder. ``corpus="auto"`` resolves as the evaluation does
    (WikiText-2 if reachable); a corpus without a split of its own (``pydoc``: one text for every split) gives
    no specs and a warning, since its calibration would see the evaluation text."""
    from safetensors import safe_open

    from kvlab.evaluation.evaluate import resolve_corpus
    from kvlab.quant.kvquantc import calibration_dir

    bits_list = _checked_bits(bits, outlier_frac, skip_first, ctx)
    if not bits_list:
        return []
    name = resolve_corpus(corpus, data_dir)[0] if corpus == "auto" else corpus
    if name == "pydoc":
        warnings.warn("kvquantc_specs: corpus 'pydoc' has no calibration split apart from its evaluation text; "
                      "kvquantc left out (give WikiText-2 through data_dir or another corpus)", stacklevel=2)
        return []
    w = calibration_windows(tokenizer, name, split, ctx, windows, data_dir, bos=bos, sample=sample, seed=seed)
    meta = {k: str(v) for k, v in _metadata(model, tokenizer, w, name, split, sample, seed, bos, skip_first,
                                            model_name).items()}
    folder = calibration_dir() if folder is None else folder
    found: dict[int, Calibration] = {}
    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        with safe_open(str(path), framework="pt") as f:
            md = dict(f.metadata() or {})
        same = all(md.get(k) == v for k, v in meta.items() if k != "model")
        if same and md.get("outlier_frac") == repr(float(outlier_frac)) and md.get("bits", "").isdigit():
            found.setdefault(int(md["bits"]), Calibration.load(path.stem, folder))
    todo = [b for b in bits_list if b not in found]
    if todo:
        for cal in _fit_and_save(model, w, meta, todo, outlier_frac, skip_first, folder, progress):
            found[cal.bits] = cal
    return [found[b].register().spec for b in bits_list]


def outlier_report(model, windows: torch.Tensor, spec: str, progress: bool = True) -> dict[str, dict[str, int]]:
    """How the per-token outlier budget of a ``kvquantc`` scheme spec meets ``windows`` (e.g. the test
    windows): for K and V, summed over layers and heads, its ``outlier_counts`` (values, beyond the
    calibrated thresholds, kept in fp16 slots, saturated) on the captured K (pre-RoPE) and V, cast to fp16."""
    from kvlab import quant
    from kvlab.emulation import hooks

    base = quant.get(spec)
    if not hasattr(base, "outlier_counts"):
        raise ValueError(f"outlier_report: {spec!r} has no fixed outlier budget to report; allowed: a kvquantc spec")
    device = next(model.parameters()).device
    n_layers = len(hooks.attention_modules(model))
    base.check_geometry(n_layers, getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads)
    per_layer = {(w, layer): base.for_tensor(w).for_layer(layer) for w in "kv" for layer in range(n_layers)}
    total = {w: {"values": 0, "beyond": 0, "kept": 0, "saturated": 0} for w in "kv"}
    with hooks.capture(model, which=("k", "v"), rope=("pre",)) as got, torch.no_grad():
        for i in tqdm(range(windows.shape[0]), desc="outlier windows", disable=not progress):
            model(input_ids=windows[i : i + 1].to(device), use_cache=False)
            for (w, layer), q in per_layer.items():
                x = got[(layer, "k_pre" if w == "k" else "v")].half().float()
                for key, n in q.outlier_counts(x).items():
                    total[w][key] += n
    return total
