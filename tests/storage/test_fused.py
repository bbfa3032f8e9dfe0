"""FusedCache: the packed cache read by the fused decode kernels, against CompressedCache (kvlab.fused_cache).

Without CUDA the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
collection), so the model is tiny: 2 layers, 4 query heads, 2 kv heads, head_dim 64, float32, random
weights (seeded). Prompts are longer than the KIVI window, so K groups and V tokens are quantized both in
the prefill and during decoding.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import transformers

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

import kvlab.kernels._common as kernels_common  # noqa: E402
import kvlab.quant as kq  # noqa: E402
import kvlab.storage.cache  # noqa: E402
import kvlab.storage.fused as fc  # noqa: E402
from kvlab.quant.policy import parse_policy  # noqa: E402
from kvlab.storage import FusedCache  # noqa: E402
from kvlab.storage.cache import CompressedCache, cache_kwarg  # noqa: E402
from kvlab.storage.fused import fused_attention, fused_layer, use_fused_attention  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
PROMPT, NEW = 50, 20
KIVI4 = "kivi:bits=4,group=32,residual=32"
KIVI2 = "kivi:bits=2,group=16,residual=32"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("spec", ["kivi:bits=4", "kivi:bits=2", "q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("which", ["k", "v"])
def test_compressed_cache_reads_on_the_kernels_device(spec, which):
    """CompressedCache's readers on DEV (CUDA on the GPU box: once failed there with integer ops written into
    float ``out=`` tensors) equal the scheme's own decoding."""
    q = kq.get(spec).for_tensor(which)
    x = torch.randn(2, 3, 64, 64, device=DEV, generator=torch.Generator(DEV).manual_seed(0))
    packed = q.quantize_all(x)
    out = torch.empty_like(x)
    kvlab.storage.cache.read_packed(q, packed, out)
    assert torch.equal(out, q.dequantize(packed))


def tol(dtype: torch.dtype) -> float:
    """Allowed |fused - CompressedCache| of the logits relative to max |logits|. The caches hold the same
    values (tested bit for bit below); what differs is the attention arithmetic, fused kernel vs SDPA:
    for float32, summation order and exp2 vs exp, the 2e-5 (about 170 eps) of tests/test_kernels.py. Two
    layers of a random model carry it to the logits about unamplified (seen: 1.5e-6 relative)."""
    return 2e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps


def _config(head_dim=64, **kw):
    return transformers.LlamaConfig(num_hidden_layers=2, hidden_size=4 * head_dim, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=head_dim, intermediate_size=128, vocab_size=128,
                                    **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_config()).to(DEV).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (2, PROMPT), generator=torch.Generator().manual_seed(1)).to(DEV)


def _generate(model, ids, cache, new=NEW, mask=None):
    """Greedy new tokens (B, new) and the logits of every step (new, B, vocab), through ``cache``."""
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             **{cache_kwarg(model): cache})
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


def _run_both(model, ids, spec, new=NEW, mask=None, max_len=None):
    """(CompressedCache tokens, logits, cache) and (FusedCache tokens, logits, cache); the model is left on
    the fused implementation."""
    model.set_attn_implementation("sdpa")
    ref = CompressedCache(spec, config=model.config)
    ref_out = _generate(model, ids, ref, new, mask)
    use_fused_attention(model)
    fused = FusedCache(spec, config=model.config, max_len=max_len)
    return (*ref_out, ref), (*_generate(model, ids, fused, new, mask), fused)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


# ---------------------------------------------------------------------------------------------------
# generate(): the same tokens and logits as CompressedCache
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, new", [(KIVI4, NEW), (KIVI2, NEW), ("k=q8_0;v=q4_0", 8)])
def test_generate_equals_compressed_cache(model, prompt, spec, new):
    (ref_tok, ref_logits, ref), (tok, logits, fused) = _run_both(model, prompt, spec, new)
    assert torch.equal(tok, ref_tok)
    # the prefill reads the same values through the same SDPA: bit-identical
    assert torch.equal(logits[0], ref_logits[0])
    assert _rel(logits, ref_logits) <= tol(torch.float32)
    # every decode step went through the fused kernel, the prefill through dequantize + SDPA
    assert [(layer.n_fused, layer.n_dequant) for layer in fused.layers] == [(new - 1, 1)] * 2
    L = PROMPT + new - 1
    assert fused.get_seq_length() == ref.get_seq_length() == L
    nb, nb_ref = fused.nbytes(), ref.nbytes()
    assert {k: nb[k] for k in ("codes", "metadata", "fp16", "total")} == \
        {k: nb_ref[k] for k in ("codes", "metadata", "fp16", "total")}
    assert nb["total"] == parse_policy(spec).bytes_per_token(2, 2, L, 64) * L * prompt.shape[0]


def test_tolerance_tells_window_rules_apart(model, prompt):
    """The check above can fail: the same KIVI with a window one group longer (so a few tokens fp16
    instead of quantized) moves the logits far outside the tolerance."""
    model.set_attn_implementation("sdpa")
    a = _generate(model, prompt, CompressedCache(KIVI4, config=model.config), new=4)[1]
    b = _generate(model, prompt, CompressedCache("kivi:bits=4,group=32,residual=64", config=model.config), new=4)[1]
    assert _rel(a, b) > 100 * tol(torch.float32)


def test_padded_batch_is_refused(model, prompt):
    """Left padding: the fused layout keeps one token count for every row, so pads would enter KIVI's groups
    and windows; FusedCache refuses the batch and names CompressedCache, which stores padded rows apart."""
    mask = torch.ones_like(prompt)
    mask[0, :7] = 0
    with pytest.raises(ValueError, match=r"left-padded batch.*kvlab\.CompressedCache"):
        _run_both(model, prompt, KIVI4, new=4, mask=mask)


# ---------------------------------------------------------------------------------------------------
# one layer driven directly: the stored values, multi-token steps, bytes
# ---------------------------------------------------------------------------------------------------
MODULE = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)


def _causal(n: int, L: int) -> torch.Tensor:  # (1, 1, n, L) bool, the last n of L tokens see their past
    return (torch.arange(L)[None, :] <= (L - n + torch.arange(n))[:, None])[None, None].to(DEV)


@pytest.mark.parametrize("spec", [KIVI2, "q4_0"])
def test_layer_values_and_attention_equal_compressed_cache(spec):
    """Steps of 1, 3 (fused, with an explicit causal mask) and 30 tokens (dequantize + SDPA) across group
    and window edges: the dequantized layer equals CompressedCache's K/V bit for bit at every step, the
    attention output within the kernel tolerance, and the bytes are CompressedCache's."""
    g = torch.Generator().manual_seed(3)
    B, H, D = 2, 2, 64
    pol = parse_policy(spec)
    layer = fused_layer(pol.quantizer(0, 0, "k", 1), pol.quantizer(0, 0, "v", 1), max_len=40)
    ref = CompressedCache(spec)
    L, paths = 0, []
    for t in (37, 1, 3, 30, 1, 3, 1):
        k, v = (torch.randn(2, B, H, t, D, generator=g) * 2).to(DEV)
        q = torch.randn(B, 2 * H, t, D, generator=g).to(DEV)
        L += t
        rk, rv = ref.update(k, v, 0)
        hk, hv = layer.update(k, v)
        dk, dv = layer._dequantize()
        assert torch.equal(dk, rk) and torch.equal(dv, rv), (t, L)
        mask = _causal(t, L)
        before = layer.n_fused
        out, _ = fused_attention(MODULE, q, hk, hv, mask, scaling=D**-0.5)
        expect, _ = fc._sdpa(MODULE, q, rk, rv, mask, D**-0.5)
        assert _rel(out, expect) <= tol(torch.float32), (t, L)
        paths.append(layer.n_fused > before)
        nb, nb_ref = layer.nbytes(), ref.nbytes()
        assert {k: nb[k] for k in ("codes", "metadata", "fp16")} == {k: nb_ref[k] for k in ("codes", "metadata", "fp16")}
        allocated = sum(b.numel() * b.element_size() for b in layer.bufs.values())
        assert nb["reserved"] >= 0 and allocated == sum(nb.values())
    assert paths == [False, True, True, False, True, True, True]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("spec", [KIVI4, KIVI2])
def test_fp16_layer_runs_the_cuda_kernel_gpu(spec, monkeypatch):
    """An fp16 KIVI layer on the GPU decodes through the CUDA C++ kernel (kvlab/kernels/csrc), over a few hundred
    tokens (several warp-blocks), within the fp16 tolerance of dequantize + SDPA."""
    from kvlab.kernels import kivi_cuda

    calls = []
    real = kivi_cuda.kivi_decode_attention_cuda
    monkeypatch.setattr(kivi_cuda, "kivi_decode_attention_cuda", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(4)
    B, H, D = 2, 2, 128
    pol = parse_policy(spec)
    layer = fused_layer(pol.quantizer(0, 0, "k", 1), pol.quantizer(0, 0, "v", 1), max_len=700)
    ref = CompressedCache(spec)
    L = 0
    for t in (300, 1, 3, 1, 250, 1, 1):
        k, v = (torch.randn(2, B, H, t, D, generator=g) * 2).to(DEV, torch.float16)
        q = torch.randn(B, 2 * H, t, D, generator=g).to(DEV, torch.float16)
        L += t
        rk, rv = ref.update(k, v, 0)
        hk, hv = layer.update(k, v)
        mask = _causal(t, L)
        out, _ = fused_attention(MODULE, q, hk, hv, mask, scaling=D**-0.5)
        expect, _ = fc._sdpa(MODULE, q.float(), rk.float(), rv.float(), mask, D**-0.5)
        assert _rel(out, expect) <= tol(torch.float16), (t, L)
    assert len(calls) == 5  # every decode step (1 and 3 tokens), not the two prefills


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs)")
@pytest.mark.parametrize("per_step", [True, False])
@pytest.mark.parametrize("spec", [KIVI4, KIVI2, "q8_0", "dynamic"])
def test_decode_steps_replayed_from_cuda_graphs_equal_eager_gpu(prompt, spec, per_step):
    """capture_decode_steps: the greedy steps replayed from their graphs give the eager loop's tokens and leave
    the cache holding the same bytes (fp16 model, so the KIVI steps run the CUDA kernel where it is built). The
    steps cross a K window boundary (PROMPT + 1 + NEW > 2 * residual), so a graph also holds a K pack."""
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(_config()).to(DEV).half().eval()
    use_fused_attention(m)
    kw = cache_kwarg(m)

    def fresh():
        if spec == "dynamic":
            return transformers.DynamicCache()
        return FusedCache(spec, config=m.config, max_len=PROMPT + 1 + NEW)

    def prefill(cache):
        with torch.no_grad():
            return m(input_ids=prompt, logits_to_keep=1, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)

    eager_cache = fresh()
    tok, eager = prefill(eager_cache), []
    with torch.no_grad():
        for _ in range(1 + NEW):  # the warm-up step capture_decode_steps runs eagerly, then the captured ones
            tok = m(input_ids=tok, logits_to_keep=1, **{kw: eager_cache}).logits[:, -1].argmax(-1, keepdim=True)
            eager.append(tok)
    eager = torch.cat(eager[1:], dim=1)

    cache = fresh()
    graphs, tokens = fc.capture_decode_steps(m, kw, cache, prefill(cache), NEW, warmup=1, per_step=per_step)
    assert len(graphs) == (NEW if per_step else 1)
    assert (tokens == -1).all()  # captured, not run
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(tokens, eager)
    assert cache.get_seq_length() == eager_cache.get_seq_length() == PROMPT + 1 + NEW
    if spec != "dynamic":
        assert cache.nbytes() == eager_cache.nbytes()
        for a, b in zip(cache.layers, eager_cache.layers):  # the stored tokens, as the layer reads them
            for x, y in zip(a._dequantize(), b._dequantize()):
                assert torch.equal(x, y)


def test_preallocated_buffers_do_not_move(model, prompt):
    """With max_len = prompt + new tokens nothing is reallocated while decoding, and the room left is
    what the capacities (K: whole residual blocks, V: multiples of 64 tokens) and the windows leave."""
    use_fused_attention(model)
    new = 8
    cache = FusedCache(KIVI4, config=model.config, max_len=PROMPT + new)
    kw = {cache_kwarg(model): cache}

    def pointers():  # the packed buffers (the fp16 windows are rebuilt as tokens leave them)
        return [{n: t.data_ptr() for n, t in layer.bufs.items() if not n.endswith("fp16")} for layer in cache.layers]

    with torch.no_grad():
        model(input_ids=prompt, **kw)
        before = pointers()
        for i in range(new):
            model(input_ids=prompt[:, i : i + 1], **kw)
    assert pointers() == before
    L, R, B, H, D = PROMPT + new, 32, 2, 2, 64
    nk, nv = L // R * R, L - R
    capk = capv = 64  # max_len = 58 rounded up to whole residual blocks (K) / to 64 tokens (V)
    per_token = B * H * D * (4 / 8 + 2 * 2 / 32)  # 4-bit codes, fp16 scale and minimum per 32 values
    windows = B * H * D * 2 * ((R - (L - nk)) + (R - (L - nv)))
    assert cache.nbytes()["reserved"] == 2 * ((capk - nk) * per_token + (capv - nv) * per_token + windows)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_model_must_use_the_fused_attention(model):
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attention implementation is 'sdpa', not 'kvlab_fused'"):
        FusedCache(KIVI4, config=model.config)
    assert use_fused_attention(model) == "sdpa"
    FusedCache(KIVI4, config=model.config)


@pytest.mark.parametrize("spec, match", [
    ("int:bits=4", "no fused kernel for K int"),
    ("q4_1", "no fused kernel"),
    ("k=kivi:bits=2;v=kivi:bits=4", "differ in bits, group or residual"),
    ("kivi:bits=2,group=8,residual=32", "group=8 is not allowed"),
    ("kivi:bits=4,group=32,residual=48", "residual=48"),
    ("q4_0:rotate=hadamard", "rotates head_dim"),
    ("kv=q4_0;keep_first=1", "2 schemes for K"),
    ("kv=int:bits=8;recent=16;old=int:bits=2", "recency"),
])
def test_unsupported_policies(model, spec, match):
    use_fused_attention(model)
    with pytest.raises(ValueError, match=match):
        FusedCache(spec, config=model.config)


def test_unsupported_models_and_arguments(model):
    cfg = _config(head_dim=80)
    cfg._attn_implementation = fc.NAME
    with pytest.raises(ValueError, match="head_dim=80"):
        FusedCache("q4_0", config=cfg)
    cfg = _config(head_dim=16)
    cfg._attn_implementation = fc.NAME
    with pytest.raises(ValueError, match="head_dim=16"):
        FusedCache("q8_0", config=cfg)  # the ggml kernels need head_dim >= 32
    chunked = _config(layer_types=["chunked_attention", "full_attention"], attention_chunk_size=32)
    chunked._attn_implementation = fc.NAME
    with pytest.raises(ValueError, match="1 chunked-attention layers of 2.*allowed: fused=False"):
        FusedCache(KIVI4, config=chunked)
    gemma2 = transformers.Gemma2Config(num_hidden_layers=2, head_dim=64, attn_logit_softcapping=50.0)
    gemma2._attn_implementation = fc.NAME
    with pytest.raises(ValueError, match=r"attn_logit_softcapping=50\.0.*allowed: fused=False"):
        FusedCache(KIVI4, config=gemma2)
    use_fused_attention(model)
    with pytest.raises(ValueError, match="max_len=0"):
        FusedCache(KIVI4, config=model.config, max_len=0)
    with pytest.raises(ValueError, match="dropout"):
        layer = fused_layer(*(parse_policy("q8_0").quantizer(0, 0, w, 1) for w in "kv"))
        k = torch.randn(1, 2, 4, 64, device=DEV)
        hk, hv = layer.update(k, k)
        fused_attention(MODULE, torch.randn(1, 4, 4, 64, device=DEV), hk, hv, None, dropout=0.1)


def test_update_without_fused_attention_is_refused():
    """K/V handed to another attention implementation would be read as the new tokens alone: the next
    update says so instead of going on."""
    layer = fused_layer(*(parse_policy(KIVI4).quantizer(0, 0, w, 1) for w in "kv"))
    k = torch.randn(1, 2, 40, 64, device=DEV)
    layer.update(k, k)
    with pytest.raises(ValueError, match="before attention read the last one"):
        layer.update(k[:, :, :1], k[:, :, :1])


def test_bad_shapes_and_devices(monkeypatch):
    layer = fused_layer(*(parse_policy("q4_0").quantizer(0, 0, w, 1) for w in "kv"))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        layer.update(torch.zeros(1, 2, 3, 64, dtype=torch.long, device=DEV), torch.zeros(1, 2, 3, 64, device=DEV))
    layer = fused_layer(*(parse_policy("q4_0").quantizer(0, 0, w, 1) for w in "kv"))
    with pytest.raises(ValueError, match=r"must both be \(B, H, t, D\)"):
        layer.update(torch.zeros(1, 2, 3, 64, device=DEV), torch.zeros(1, 2, 3, 32, device=DEV))
    monkeypatch.setattr(kernels_common, "interpreted", lambda: False)  # what fused.py asks through kvlab.kernels
    layer = fused_layer(*(parse_policy("q4_0").quantizer(0, 0, w, 1) for w in "kv"))
    with pytest.raises(ValueError, match="K/V are on cpu; the fused kernels need a CUDA device"):
        layer.update(torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 64))
    if not CUDA:
        cfg = _config()
        cfg._attn_implementation = fc.NAME
        with pytest.raises(ValueError, match="FusedCache needs a CUDA device"):
            FusedCache(KIVI4, config=cfg)


# ---------------------------------------------------------------------------------------------------
# CompressedCache(fused=True): the same layers, dispatched per layer
# ---------------------------------------------------------------------------------------------------
def test_compressed_cache_fused_dispatch(model, prompt):
    """A policy with an fp16 first layer: that layer stays a CompressedLayer (attended through SDPA by the
    fused attention function), the other is packed for the kernels; tokens as the unfused cache."""
    spec = f"kv={KIVI4};keep_first=1"
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="not 'kvlab_fused'"):
        CompressedCache(spec, config=model.config, fused=True)
    ref = CompressedCache(spec, config=model.config)
    ref_tok, ref_logits = _generate(model, prompt, ref, NEW)
    use_fused_attention(model)
    cache = CompressedCache(spec, config=model.config, fused=True)
    tok, logits = _generate(model, prompt, cache, NEW)
    assert [type(layer).__name__ for layer in cache.layers] == ["CompressedLayer", "FusedKiviLayer"]
    assert cache.layers[1].n_fused == NEW - 1
    assert torch.equal(tok, ref_tok)
    assert _rel(logits, ref_logits) <= tol(torch.float32)
    nb, nb_ref = cache.nbytes(), ref.nbytes()
    assert {k: nb[k] for k in ("codes", "metadata", "fp16", "total")} == \
        {k: nb_ref[k] for k in ("codes", "metadata", "fp16", "total")}
