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
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .cache import stored_input
from .policy import Policy, parse_policy
from .rope import apply_rope, invert_rope, rope_cos_sin

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
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(_NAME, _attention)
    AttentionMaskInterface.register(_NAME, sdpa_mask)


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
    _rules: dict = field(default_factory=dict)


@contextmanager
def _hooked(model, state: _State):
    mods = attention_modules(model)
    original = model.config._attn_implementation
    _register()
    try:
        for m in mods:
            m._kvlab = state
        model.set_attn_implementation(_NAME)
        yield state
    finally:
        for m in mods:
            if hasattr(m, "_kvlab"):
                del m._kvlab
        model.set_attn_implementation(original)


def _n_layers(model) -> int:
    return len(attention_modules(model))


def _prepare_policy(model, policy) -> Policy:
    policy = parse_policy(policy)
    cfg = model.config
    policy.check_model(_n_layers(model), cfg.num_key_value_heads)
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
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


def _cos_sin(state, x, n_tokens, position_ids, n_query):
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


def _roundtrip(q, x, which, state, cos_sin):
    x = stored_input(q, x)  # what the cache would receive: fp16 values, as CompressedCache stores them
    if which == "k" and q.prerope:
        cos, sin = cos_sin()
        return apply_rope(q.roundtrip(invert_rope(x, cos, sin)), cos, sin)
    return q.roundtrip(x)


def _versions(state: _State, layer: int, which: str, x: torch.Tensor, n_query: int, cos_sin):
    """x (B, Hkv, Tk, D) -> (versions list of (B, Hkv, Tk, D), sel (Hkv, Tq, Tk) long or None)."""
    policy, n_heads, n_keys = state.policy, x.shape[1], x.shape[2]
    quantizers = [policy.quantizer(layer, h, which, state.n_layers) for h in range(n_heads)]
    old = policy.old_quantizer(which)
    xq = torch.empty_like(x)
    groups: dict[str, list[int]] = {}
    for h, q in enumerate(quantizers):
        groups.setdefault(q.spec, []).append(h)
    for heads in groups.values():
        q = quantizers[heads[0]]
        xq[:, heads] = _roundtrip(q, x[:, heads], which, state, cos_sin).to(x.dtype)
    rows = slice(n_keys - n_query, n_keys)
    sel = torch.stack([_rule(state, q, n_keys)[rows] for q in quantizers]).long()  # (Hkv, Tq, Tk)
    versions = [x.to(torch.float16).to(x.dtype), xq]
    if old is not None:
        xo = xq.clone()
        main = [h for h in range(n_heads) if not policy.kept(layer, h, which, state.n_layers)]
        if main:
            xo[:, main] = _roundtrip(old, xq[:, main], which, state, cos_sin).to(x.dtype)
        t = torch.arange(n_keys - n_query, n_keys).unsqueeze(1)
        s = torch.arange(n_keys).unsqueeze(0)
        aged = (s <= t - policy.recent) & (sel == 1)
        aged[[h for h in range(n_heads) if h not in main]] = False
        sel = torch.where(aged, torch.full_like(sel, 2), sel)
        versions.append(xo)
    causal = torch.ones(n_query, n_keys, dtype=torch.bool).tril(n_keys - n_query)
    if old is None and bool((sel == 1)[:, causal].all()):
        return [xq], None  # every key read quantized: plain attention over the quantized tensor
    return versions, sel


def _attend(query, k_versions, k_sel, v_versions, v_sel, attention_mask, scaling):
    """Attention where each (query, key) pair picks its K and V version. Returns out (B, Hq, Tq, D),
    probs (B, Hq, Tq, Tk)."""
    B, Hq, Tq, _ = query.shape
    Hkv, Tk = k_versions[0].shape[1], k_versions[0].shape[2]
    n_rep = Hq // Hkv

    def rep(t):  # (B, Hkv, Tk, D) -> (B, Hq, Tk, D), as transformers' repeat_kv
        return t.repeat_interleave(n_rep, dim=1) if n_rep > 1 else t

    scores = None
    for i, kv in enumerate(k_versions):
        s = torch.matmul(query, rep(kv).transpose(-1, -2)) * scaling
        scores = s if scores is None else torch.where((k_sel == i).repeat_interleave(n_rep, 0), s, scores)
    if attention_mask is None:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
        scores = scores.masked_fill(~causal, float("-inf"))
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


def _error_rows(state, layer, key, value, kv, ks, vv, vs, out_ref, p_ref, out_q, p_q):
    """One row per kv head: tensor errors of K and V as stored after the whole window, attention
    output errors and attention-probability KL from the same Q."""
    from .metrics import cosine, kl_div, mse, nmse

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
    kl = kl_div(p_ref.unflatten(1, (Hkv, n_rep)), p_q.unflatten(1, (Hkv, n_rep)))  # (B, Hkv, n_rep, Tq)
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
            memo["cs"] = _cos_sin(state, key, n_keys, kw.get("position_ids"), n_query)
        return memo["cs"]

    if state.captures is not None:
        if layer in state.capture_layers:
            _store_captures(state, layer, query, key, value, cos_sin)
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    kv, ks = _versions(state, layer, "k", key, n_query, cos_sin)
    vv, vs = _versions(state, layer, "v", value, n_query, cos_sin)
    if state.rows is not None:
        out_ref, p_ref = _attend(query, [key], None, [value], None, attention_mask, scaling)
        out_q, p_q = _attend(query, kv, ks, vv, vs, attention_mask, scaling)
        _error_rows(state, layer, key, value, kv, ks, vv, vs, out_ref, p_ref, out_q, p_q)
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    if ks is None and vs is None:
        return _sdpa(module, query, kv[0], vv[0], attention_mask, dropout=dropout, scaling=scaling, **kw)
    out, _ = _attend(query, kv, ks, vv, vs, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None
