"""Capture or replace Q/K/V inside a Hugging Face causal LM, through transformers' attention interface.

No forked model files: an attention function is registered with ``AttentionInterface`` (and the SDPA
mask builder with ``AttentionMaskInterface``, so padded batches keep their mask), selected with
``model.set_attn_implementation``, and the original implementation is restored on exit, also after an
exception. The function sees post-RoPE K/V of shape (B, kv_heads, T, D) before any GQA repeat.

Decode-exact emulation (``emulation="prefill"``): in real decoding, query t attends to the cache as it
stood when the cache held t+1 tokens. For each (query, key) pair the key's value is therefore chosen
among versions: 0 = as held in the fp16 window (an fp16 cast), 1 = as the scheme stores it, 2 = as the
recency policy's ``old`` scheme re-stores it; the choice follows each scheme's ``fp16_tokens(L)`` rule.
Schemes without a window (llama.cpp blocks, int per token) read every token, the current one
included, back quantized, as llama.cpp does. ``emulation="static"`` instead lets every query see the
cache as it stands after the whole window ("quantize everything, then prefill"). Token positions are
assumed to start at 0 in every row (right padding only).

Where a layer reads mixed versions, attention runs blockwise through SDPA (``_attend``); the eager
per-(query, key) form ``_attend_reference`` is what it is tested against, and what ``measure`` uses.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from kvlab.model.attention import register_attention, sdpa
from kvlab.model.rope import apply_rope, invert_rope, rope_cos_sin
from kvlab.quant.policy import Policy, parse_policy

__all__ = ["attention_modules", "capture", "compress", "measure"]

_NAME = "kvlab"
_EMULATIONS = ("prefill", "static")


def attention_modules(model) -> list[torch.nn.Module]:
    """The attention modules of ``model`` in layer order; ValueError if it cannot be hooked."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    if not mods or not hasattr(model, "set_attn_implementation") or not hasattr(model.config, "_attn_implementation"):
        raise ValueError(f"{type(model).__name__} cannot be hooked: kvlab needs a transformers causal LM whose "
                         "attention modules carry layer_idx and call the configurable attention interface "
                         "(Llama, Qwen2, Mistral, SmolLM...)")
    mods.sort(key=lambda m: m.layer_idx)
    return mods


def _register() -> None:
    register_attention(_NAME, _attention)


@dataclass
class _State:
    model: torch.nn.Module
    n_layers: int
    policy: Policy | None = None
    emulation: str = "prefill"
    captures: dict | None = None  # (layer, name) -> tensor, filled by capture()
    capture_layers: frozenset = frozenset()
    capture_names: tuple = ()
    rows: list | None = None  # per-layer/head error rows, filled by measure()
    _rules: dict = field(default_factory=dict)  # (spec, n_keys, emulation) -> _rule's matrix
    _selections: dict = field(default_factory=dict)  # _selection's key -> _Selection
    _plans: dict = field(default_factory=dict)  # (k key, v key, dtype, device) -> _build_plan's blocks
    original: str = "sdpa"  # the model's attention implementation before kvlab's (set by _hooked)


@contextmanager
def _hooked(model, state: _State):
    mods = attention_modules(model)
    original = model.config._attn_implementation
    state.original = original
    _register()
    handles = []
    try:
        for m in mods:
            m._kvlab = state
            handles.append(m.register_forward_pre_hook(_keep_rope, with_kwargs=True))
        model.set_attn_implementation(_NAME)
        yield state
    finally:
        for h in handles:
            h.remove()
        for m in mods:
            for name in ("_kvlab", "_kvlab_rope"):
                if hasattr(m, name):
                    delattr(m, name)
        model.set_attn_implementation(original)


def _keep_rope(module, args, kwargs):
    """Forward pre-hook: keep the (cos, sin) the layer is given, its own rotary embedding (per layer type in
    Gemma 3, partial in Phi / GPT-NeoX), for inverting RoPE in the attention function."""
    module._kvlab_rope = kwargs.get("position_embeddings")


def _n_layers(model) -> int:
    return len(attention_modules(model))


def _prepare_policy(model, policy) -> Policy:
    policy = parse_policy(policy)
    cfg = model.config
    policy.check_model(_n_layers(model), getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    return policy


@contextmanager
def compress(model, policy, emulation: str = "prefill"):
    """Inside the block, every attention layer reads K/V through ``policy`` (a spec or Policy)."""
    if emulation not in _EMULATIONS:
        raise ValueError(f"emulation={emulation!r} is not allowed; allowed: {', '.join(_EMULATIONS)} "
                         "(token-by-token decoding runs through kvlab.CompressedCache)")
    state = _State(model, _n_layers(model), _prepare_policy(model, policy), emulation)
    with _hooked(model, state):
        yield state


@contextmanager
def measure(model, policy, emulation: str = "prefill"):
    """Per-layer/head errors of ``policy`` with the model running unmodified: each layer computes its
    output from the original K/V (which it passes on) and from the compressed K/V (which it measures),
    from the same Q. Rows accumulate in the yielded list, one per forward x layer x kv head."""
    if emulation not in _EMULATIONS:
        raise ValueError(f"emulation={emulation!r} is not allowed; allowed: {', '.join(_EMULATIONS)}")
    state = _State(model, _n_layers(model), _prepare_policy(model, policy), emulation, rows=[])
    with _hooked(model, state):
        yield state.rows


_CAPTURABLE = ("q", "k", "v")


@contextmanager
def capture(model, layers=None, which=("q", "k", "v"), rope=("pre", "post")):
    """Capture Q/K/V (B, heads, T, D) on CPU; yields a dict {(layer, "k_pre"|"k_post"|"q_pre"|...|"v"): tensor}.
    Pre-RoPE values are recovered by inverting the model's own rotary embedding. A later forward in the
    block overwrites the earlier one's tensors."""
    n = _n_layers(model)
    layers = list(range(n)) if layers is None else list(layers)
    bad = [la for la in layers if not isinstance(la, int) or not 0 <= la < n]
    if bad:
        raise ValueError(f"layer index {bad[0]!r} out of range; the model has layers 0..{n - 1}")
    for w in which:
        if w not in _CAPTURABLE:
            raise ValueError(f"which={w!r} is not allowed; allowed: {', '.join(_CAPTURABLE)}")
    for r in rope:
        if r not in ("pre", "post"):
            raise ValueError(f"rope={r!r} is not allowed; allowed: pre, post")
    names = tuple("v" if w == "v" else f"{w}_{r}" for w in which for r in (rope if w != "v" else ("post",)))
    state = _State(model, n, captures={}, capture_layers=frozenset(layers), capture_names=names)
    with _hooked(model, state):
        yield state.captures


# ---------------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------------
def _sdpa(module, query, key, value, attention_mask, **kw):
    """The model's own attention implementation, the one selected before kvlab's (SDPA for most; eager for
    models without SDPA support, e.g. Gemma 2), on kvlab's boolean mask."""
    state = getattr(module, "_kvlab", None)
    impl = "sdpa" if state is None else state.original
    if impl == "eager":
        import sys

        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is not None:
            if attention_mask is not None and attention_mask.dtype == torch.bool:  # eager adds its mask
                attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device
                                             ).masked_fill_(~attention_mask, torch.finfo(query.dtype).min)
            return eager(module, query, key, value, attention_mask, **kw)
    return sdpa(module, query, key, value, attention_mask, **kw)


def _cos_sin(state, x, n_tokens, position_ids, n_query, given=None):
    """(cos, sin) (B, n_tokens, rotary dims) of the keys: those the layer was given (``given``) where they
    cover every key, else from the model's rotary module."""
    if given is not None and isinstance(given, (tuple, list)) and given[0].shape[-2] == n_tokens:
        return given
    if position_ids is None or n_query != n_tokens:
        position_ids = torch.arange(n_tokens, device=x.device).unsqueeze(0)
    return rope_cos_sin(state.model, x, position_ids)


def _rule(state: _State, q, n_keys: int) -> torch.Tensor:
    """(n_keys, n_keys) bool: [t, s] = key s is read quantized by query t (cache of t+1 tokens)."""
    key = (q.spec, n_keys, state.emulation)
    if key not in state._rules:
        if state.emulation == "static":
            row = ~q.fp16_tokens(n_keys)
            m = row.expand(n_keys, n_keys).clone()
        else:
            m = torch.zeros(n_keys, n_keys, dtype=torch.bool)
            for t in range(n_keys):
                m[t, : t + 1] = ~q.fp16_tokens(t + 1)
        state._rules[key] = m
    return state._rules[key]


def _causal(n_query: int, n_keys: int) -> torch.Tensor:
    """(Tq, Tk) bool: query i (token n_keys - n_query + i) sees key s."""
    return torch.ones(n_query, n_keys, dtype=torch.bool).tril(n_keys - n_query)


class _Selection(NamedTuple):
    version: torch.Tensor  # (Tq, Tk) uint8: the version of key s that query i reads; 0 above the diagonal
    plain: bool  # every query reads every key it sees at version 1 (as the scheme stores it)


def _selection(state: _State, q, aged: bool, n_query: int, n_keys: int) -> tuple:
    """Key into ``state._selections`` of the version choice of one kv head under quantizer ``q``;
    ``aged``: the recency policy demotes this head's old tokens to version 2."""
    key = (q.spec, aged, n_query, n_keys)
    if key not in state._selections:
        quantized = _rule(state, q, n_keys)[n_keys - n_query :]  # (Tq, Tk)
        version = quantized.to(torch.uint8)
        if aged:
            t = torch.arange(n_keys - n_query, n_keys).unsqueeze(1)
            s = torch.arange(n_keys).unsqueeze(0)
            version[quantized & (s <= t - state.policy.recent)] = 2
        plain = bool((version[_causal(n_query, n_keys)] == 1).all())
        state._selections[key] = _Selection(version, plain)
    return key


def _roundtrip(q, x, which, state, cos_sin):
    x = q.stored_input(x)  # what the cache would receive: fp16 values, as CompressedCache stores them
    if which == "k" and q.prerope:
        cos, sin = cos_sin()
        return apply_rope(q.roundtrip(invert_rope(x, cos, sin)), cos, sin)
    return q.roundtrip(x)


def _versions(state: _State, layer: int, which: str, x: torch.Tensor, n_query: int, cos_sin):
    """x (B, Hkv, Tk, D) -> (versions, keys): versions [fp16 cast, as stored, (as re-stored by old)],
    each (B, Hkv, Tk, D); keys, one per kv head, index ``state._selections``."""
    policy, n_heads, n_keys = state.policy, x.shape[1], x.shape[2]
    quantizers = [policy.quantizer(layer, h, which, state.n_layers) for h in range(n_heads)]
    groups: dict[str, list[int]] = {}
    for h, q in enumerate(quantizers):
        groups.setdefault(q.spec, []).append(h)
    if len(groups) == 1:
        xq = _roundtrip(quantizers[0], x, which, state, cos_sin).to(x.dtype)
    else:
        xq = torch.empty_like(x)
        for heads in groups.values():  # a subset of the layer's heads: the scheme's tables for those heads
            q = quantizers[heads[0]].for_heads(heads)
            xq[:, heads] = _roundtrip(q, x[:, heads], which, state, cos_sin).to(x.dtype)
    versions = [x.to(torch.float16).to(x.dtype), xq]
    old = policy.old_quantizer(which)
    aged = [old is not None and not policy.kept(layer, h, which, state.n_layers) for h in range(n_heads)]
    if any(aged):
        main = [h for h in range(n_heads) if aged[h]]
        xo = xq.clone()
        xo[:, main] = _roundtrip(old, xq[:, main], which, state, cos_sin).to(x.dtype)
        versions.append(xo)
    keys = tuple(_selection(state, q, a, n_query, n_keys) for q, a in zip(quantizers, aged))
    return versions, keys


def _query(state: _State, layer: int, query: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """query (B, Hq, Tq, D) as each kv head's K scheme has the dot product meet it (``Quantizer.query``: the
    identity unless a scheme emulates another engine's compute path)."""
    quantizers = [state.policy.quantizer(layer, h, "k", state.n_layers) for h in range(n_kv_heads)]
    if all(q.query_is_identity for q in quantizers):
        return query
    n_rep = query.shape[1] // n_kv_heads
    out = query.clone()
    for h, q in enumerate(quantizers):
        if not q.query_is_identity:
            out[:, h * n_rep:(h + 1) * n_rep] = q.query(query[:, h * n_rep:(h + 1) * n_rep])
    return out


def _plain(state: _State, keys) -> bool:
    return all(state._selections[k].plain for k in keys)


def _reference_inputs(state: _State, versions, keys):
    """(versions, sel (Hkv, Tq, Tk) or None) for :func:`_attend_reference`; None: every key read as stored."""
    if _plain(state, keys):
        return [versions[1]], None
    return versions, torch.stack([state._selections[k].version for k in keys]).to(versions[0].device)


def _attend_reference(query, k_versions, k_sel, v_versions, v_sel, attention_mask, scaling, softcap=None):
    """Straightforward attention where each (query, key) pair picks its K and V version (``sel`` None:
    version 0 everywhere). query (B, Hq, Tq, D), versions (B, Hkv, Tk, D), sel (Hkv, Tq, Tk). ``softcap``:
    the model's logit soft-capping (Gemma 2: scores -> softcap * tanh(scores / softcap), before the mask).
    Returns out (B, Hq, Tq, D), probs (B, Hq, Tq, Tk)."""
    B, Hq, Tq, _ = query.shape
    Hkv, Tk = k_versions[0].shape[1], k_versions[0].shape[2]
    n_rep = Hq // Hkv

    def rep(t):  # (B, Hkv, Tk, D) -> (B, Hq, Tk, D), as transformers' repeat_kv
        return t.repeat_interleave(n_rep, dim=1) if n_rep > 1 else t

    scores = None
    for i, kv in enumerate(k_versions):
        s = torch.matmul(query, rep(kv).transpose(-1, -2)) * scaling
        scores = s if scores is None else torch.where((k_sel == i).repeat_interleave(n_rep, 0), s, scores)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        scores = scores.masked_fill(~_causal(Tq, Tk).to(query.device), float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :Tk], float("-inf"))
    else:
        scores = scores + attention_mask[..., :Tk]
    probs = torch.softmax(scores if scores.dtype == torch.float64 else scores.float(), dim=-1).to(query.dtype)
    out = None
    for i, vv in enumerate(v_versions):
        p = probs if v_sel is None else probs * (v_sel == i).repeat_interleave(n_rep, 0).to(probs.dtype)
        o = torch.matmul(p, rep(vv))
        out = o if out is None else out + o
    return out, probs


# Blockwise evaluation. A block of consecutive queries attends, in one SDPA call, to the concatenation of
# one key range per (K version, V version) combination it reads; an additive mask leaves each (query,
# key) pair exactly one visible copy, so the result equals the reference up to float rounding. Block
# boundaries minimise the SDPA work (rows x columns) plus a per-call overhead, by dynamic programming.
_BLOCK_OVERHEAD = 4096  # cost of one SDPA call, in (query, key) pairs
_MAX_BLOCK = 256  # queries per block, at most


def _hidden(dtype) -> float:  # additive-mask value of a hidden pair; finite, so that two add up safely
    return torch.finfo(dtype).min / 2


@dataclass
class _Block:
    rows: slice  # query rows
    segments: list  # (k version, v version, first key, end key)
    mask: torch.Tensor  # (rows, columns) additive: 0 where the column is the copy the query reads
    cols: torch.Tensor  # (columns,) long: the key each column holds


def _split_rows(lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, int]]:
    """lo, hi (combinations, Tq): key range [lo, hi) each query reads in each combination (lo >= hi:
    none). Returns the blocks [(first row, end row)] of least total rows x columns + overhead."""
    n = lo.shape[1]
    best = np.full(n + 1, np.inf)
    best[0], start = 0.0, np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        end = min(n, i + _MAX_BLOCK)
        width = np.zeros(end - i)
        for c in range(lo.shape[0]):
            width += np.maximum(np.maximum.accumulate(hi[c, i:end]) - np.minimum.accumulate(lo[c, i:end]), 0)
        cost = best[i] + np.arange(1, end - i + 1) * width + _BLOCK_OVERHEAD
        better = cost < best[i + 1 : end + 1]
        best[i + 1 : end + 1][better] = cost[better]
        start[i + 1 : end + 1][better] = i
    blocks, j = [], n
    while j > 0:
        blocks.append((int(start[j]), j))
        j = int(start[j])
    return blocks[::-1]


def _build_plan(k_version: torch.Tensor, v_version: torch.Tensor, dtype) -> list[_Block]:
    """Blocks for one kv head group: k_version, v_version (Tq, Tk) uint8 from ``_Selection``."""
    n_query, n_keys = k_version.shape
    code = (k_version * 3 + v_version).masked_fill_(~_causal(n_query, n_keys), 255)  # (Tq, Tk) combination
    combos, lo, hi = [], [], []  # per combination read somewhere: (Tq,) key range [lo, hi) of each query
    for c in range(9):
        present = code == c
        rows = present.any(1)
        if rows.any():
            present = present.to(torch.uint8)  # argmax: the first maximum
            combos.append(c)
            lo.append(present.argmax(1).masked_fill_(~rows, n_keys))
            hi.append((n_keys - present.flip(1).argmax(1)).masked_fill_(~rows, 0))
    lo, hi = torch.stack(lo).numpy(), torch.stack(hi).numpy()
    plan = []
    for a, b in _split_rows(lo, hi):
        segments, visible, cols = [], [], []
        for ci, c in enumerate(combos):
            first, end = int(lo[ci, a:b].min()), int(hi[ci, a:b].max())
            if first < end:
                segments.append((c // 3, c % 3, first, end))
                visible.append(code[a:b, first:end] == c)
                cols.append(torch.arange(first, end))
        mask = torch.zeros(b - a, sum(len(c) for c in cols), dtype=dtype)
        mask.masked_fill_(~torch.cat(visible, dim=1), _hidden(dtype))
        plan.append(_Block(slice(a, b), segments, mask, torch.cat(cols)))
    return plan


def _attend(state: _State, query, k_versions, k_keys, v_versions, v_keys, attention_mask, scaling):
    """Attention where each (query, key) pair reads the K and V versions its selection names, blockwise
    through SDPA. query (B, Hq, Tq, D), versions (B, Hkv, Tk, D). Returns out (B, Tq, Hq, D)."""
    B, Hq, Tq, _ = query.shape
    Hkv, Tk = k_versions[0].shape[1], k_versions[0].shape[2]
    n_rep = Hq // Hkv
    out = query.new_empty(B, Tq, Hq, v_versions[0].shape[-1])
    if attention_mask is not None:  # (B or 1, 1, Tq, >= Tk), made additive
        am = attention_mask[..., :Tk]
        if am.dtype == torch.bool:
            am = torch.zeros(am.shape, dtype=query.dtype, device=am.device).masked_fill_(
                ~am, _hidden(query.dtype))
    groups: dict[tuple, list[int]] = {}  # kv heads that read alike share the blocks
    for h, key in enumerate(zip(k_keys, v_keys)):
        groups.setdefault(key, []).append(h)
    for (k_key, v_key), heads in groups.items():
        plan_key = (k_key, v_key, query.dtype, query.device)
        if plan_key not in state._plans:
            k_sel, v_sel = state._selections[k_key].version, state._selections[v_key].version
            plan = _build_plan(k_sel, v_sel, query.dtype)
            for blk in plan:
                blk.mask, blk.cols = blk.mask.to(query.device), blk.cols.to(query.device)
            state._plans[plan_key] = plan
        if len(heads) == Hkv:
            kv_heads, q_heads = slice(None), slice(None)
        else:
            kv_heads, q_heads = heads, [h * n_rep + r for h in heads for r in range(n_rep)]
        for blk in state._plans[plan_key]:
            k = torch.cat([k_versions[i][:, kv_heads, a:b] for i, _, a, b in blk.segments], dim=2)
            v = torch.cat([v_versions[j][:, kv_heads, a:b] for _, j, a, b in blk.segments], dim=2)
            mask = blk.mask if attention_mask is None else blk.mask + am[..., blk.rows, :][..., blk.cols]
            o = torch.nn.functional.scaled_dot_product_attention(
                query[:, q_heads, blk.rows], k, v, attn_mask=mask, scale=scaling, enable_gqa=n_rep > 1)
            out[:, blk.rows, q_heads] = o.transpose(1, 2)
    return out


def _store_captures(state, layer, query, key, value, cos_sin):
    for name in state.capture_names:
        if name == "v":
            t = value
        else:
            t = query if name.startswith("q") else key
            if name.endswith("_pre"):
                cos, sin = cos_sin()
                if t is query:
                    cos, sin = cos[:, -query.shape[2]:], sin[:, -query.shape[2]:]
                t = invert_rope(t, cos, sin)
        state.captures[(layer, name)] = t.detach().to("cpu", copy=True)


#: elements of one (Hq, query rows, keys) block of scores in :func:`_reference_errors`
_ERROR_BLOCK_ELEMENTS = 1 << 21


def _reference_errors(query, qq, key, value, kv, ks, vv, vs, attention_mask, scaling, softcap=None):
    """The fp16 attention (query over key/value) and the compressed one (qq over the versions, ``ks`` /
    ``vs`` selections as :func:`_attend_reference` takes them), by blocks of query rows, each block only
    over the keys it can see (the causal prefix, or every key where the mask shows one beyond it), so no
    (Hq, Tq, Tk) map is ever held whole. query/qq (B, Hq, Tq, D), key/value (B, Hkv, Tk, D). Returns
    out_ref, out_q (B, Hq, Tq, D) and kl (B, Hq, Tq): KL(p_ref || p_q) of each query's attention row."""
    from kvlab.metrics import kl_div

    B, Hq, Tq, _ = query.shape
    Tk = key.shape[2]
    rows = max(16, min(Tq, _ERROR_BLOCK_ELEMENTS // max(1, B * Hq * Tk)))
    outs_ref, outs_q, kls = [], [], []
    for a in range(0, Tq, rows):
        b = min(Tq, a + rows)
        end = Tk - Tq + b  # the causal prefix of keys the block's last query sees
        am = None
        if attention_mask is not None:
            am = attention_mask[..., a:b, :Tk]
            beyond = am[..., end:]
            shown = beyond if am.dtype == torch.bool else beyond > _hidden(am.dtype)
            if beyond.numel() and bool(shown.any()):  # a mask that shows later keys: keep them all
                end = Tk
            am = am[..., :end]
        # _attend_reference masks (without a mask) with _causal(b - a, end): the block's queries are the
        # last b - a tokens of the first `end` keys, as they are of the window's
        sl = (slice(None), slice(None), slice(None, end))
        o_r, p_r = _attend_reference(query[:, :, a:b], [key[sl]], None, [value[sl]], None, am, scaling, softcap)
        o_q, p_q = _attend_reference(qq[:, :, a:b], [x[sl] for x in kv], None if ks is None else ks[:, a:b, :end],
                                     [x[sl] for x in vv], None if vs is None else vs[:, a:b, :end], am, scaling,
                                     softcap)
        outs_ref.append(o_r), outs_q.append(o_q), kls.append(kl_div(p_r, p_q))
    return torch.cat(outs_ref, 2), torch.cat(outs_q, 2), torch.cat(kls, 2)


def _error_rows(state, layer, key, value, kv, ks, vv, vs, out_ref, out_q, kl):
    """One row per kv head: tensor errors of K and V as stored after the whole window, attention
    output errors and attention-probability KL (``kl`` (B, Hq, Tq) per query row) from the same Q."""
    from kvlab.metrics import cosine, mse, nmse

    Hkv = key.shape[1]
    n_rep = out_ref.shape[1] // Hkv

    def stored(versions, sel):  # the tensor as held once all Tk tokens are in the cache
        if sel is None:
            return versions[0]
        last = sel[:, -1]  # (Hkv, Tk): the last query sees the final state
        out = versions[0].clone()
        for i in range(1, len(versions)):
            m = (last == i)[None, :, :, None]
            out = torch.where(m, versions[i], out)
        return out

    k_st, v_st = stored(kv, ks), stored(vv, vs)
    o_r = out_ref.unflatten(1, (Hkv, n_rep))
    o_q = out_q.unflatten(1, (Hkv, n_rep))
    kl = kl.unflatten(1, (Hkv, n_rep))  # (B, Hkv, n_rep, Tq)
    for h in range(Hkv):
        state.rows.append({
            "layer": layer, "head": h,
            "k_mse": float(mse(key[:, h], k_st[:, h])), "k_nmse": float(nmse(key[:, h], k_st[:, h])),
            "k_cos": float(cosine(key[:, h], k_st[:, h]).mean()),
            "v_mse": float(mse(value[:, h], v_st[:, h])), "v_nmse": float(nmse(value[:, h], v_st[:, h])),
            "v_cos": float(cosine(value[:, h], v_st[:, h]).mean()),
            "attn_nmse": float(nmse(o_r[:, h], o_q[:, h])), "attn_cos": float(cosine(o_r[:, h], o_q[:, h]).mean()),
            "attn_kl": float(kl[:, h].mean()),
        })


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """Registered as attention implementation ``kvlab``: query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D)."""
    state: _State | None = getattr(module, "_kvlab", None)
    if state is None:
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    layer = module.layer_idx
    scaling = module.scaling if scaling is None else scaling
    n_query, n_keys = query.shape[2], key.shape[2]
    memo = {}

    def cos_sin():
        if "cs" not in memo:
            memo["cs"] = _cos_sin(state, key, n_keys, kw.get("position_ids"), n_query,
                                  getattr(module, "_kvlab_rope", None))
        return memo["cs"]

    if state.captures is not None:
        if layer in state.capture_layers:
            _store_captures(state, layer, query, key, value, cos_sin)
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    kv, k_keys = _versions(state, layer, "k", key, n_query, cos_sin)
    vv, v_keys = _versions(state, layer, "v", value, n_query, cos_sin)
    qq = _query(state, layer, query, key.shape[1])  # (B, Hq, Tq, D): the query the compressed K meets
    softcap = kw.get("softcap")  # Gemma 2's logit soft-capping (its eager attention applies it)
    if state.rows is not None:
        kv, ks = _reference_inputs(state, kv, k_keys)
        vv, vs = _reference_inputs(state, vv, v_keys)
        out_ref, out_q, kl = _reference_errors(query, qq, key, value, kv, ks, vv, vs, attention_mask, scaling,
                                               softcap)
        _error_rows(state, layer, key, value, kv, ks, vv, vs, out_ref, out_q, kl)
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    if _plain(state, k_keys) and _plain(state, v_keys):  # every key read as stored: plain attention
        return _sdpa(module, qq, kv[1], vv[1], attention_mask, dropout=dropout, scaling=scaling, **kw)
    if softcap is not None:  # SDPA cannot soft-cap: the per-(query, key) form, as the model's eager attention
        kv, ks = _reference_inputs(state, kv, k_keys)
        vv, vs = _reference_inputs(state, vv, v_keys)
        out, _ = _attend_reference(qq, kv, ks, vv, vs, attention_mask, scaling, softcap)
        return out.transpose(1, 2).contiguous(), None
    return _attend(state, qq, kv, k_keys, vv, v_keys, attention_mask, scaling), None
