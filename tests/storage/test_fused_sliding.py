"""FusedCache on sliding-window layers (Mistral: every layer; Gemma 3: sliding + global): the kernels mask what the
window leaves out (their ``window`` argument), the layer drops it from its storage, and what it keeps is stored
exactly as CompressedCache's sliding layer keeps it (the full-length rule of the scheme, as in a decode loop).

Like tests/storage/test_fused.py, without CUDA the kernels run in Triton's interpreter, on tiny float32 models.
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

import kvlab.storage.cache as cache_mod  # noqa: E402
from kvlab.kernels.kivi_attention import attention_ref  # noqa: E402
from kvlab.quant.policy import parse_policy  # noqa: E402
from kvlab.storage import FusedCache  # noqa: E402
from kvlab.storage.cache import CompressedCache, cache_kwarg  # noqa: E402
from kvlab.storage.fused import FusedLayer, fused_layer, use_fused_attention  # noqa: E402
from kvlab.storage.layers import CompressedSlidingLayer  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
KIVI4 = "kivi:bits=4,group=32,residual=32"
KIVI2 = "kivi:bits=2,group=16,residual=32"
MODULE = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
TOL = 2e-5  # |fused - CompressedCache| of the logits over max |logits|, float32 (tests/storage/test_fused.py)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mistral(window):
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                     sliding_window=window, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).to(DEV).eval()


def _gemma3(window):
    cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                        sliding_window=window, max_position_embeddings=512,
                                        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).to(DEV).eval()


def _generate(model, ids, cache, new, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             **{cache_kwarg(model): cache})
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("arch, window, spec, new", [
    ("mistral", 24, KIVI4, 40),  # window < residual: evicted in residual blocks that V holds quantized
    ("mistral", 70, KIVI2, 60),  # window > residual, groups of 16; the prompt (50) inside the window at first
    ("mistral", 24, "q4_0", 80),  # per-token blocks, dropped 64 at a time
    ("gemma3", 24, "k=q8_0;v=q4_0", 50),  # a sliding and a global layer
])
def test_generate_equals_compressed_cache(arch, window, spec, new):
    """generate() through FusedCache on sliding layers gives CompressedCache's tokens and logits (within the
    kernels' float32 tolerance), every decode step took the fused kernel, and a sliding layer holds at most its
    window plus the units its layout drops at once."""
    model = (_mistral if arch == "mistral" else _gemma3)(window)
    ids = torch.randint(0, 128, (2, 50), generator=torch.Generator().manual_seed(1)).to(DEV)
    model.set_attn_implementation("sdpa" if arch == "mistral" else "eager")
    ref = CompressedCache(spec, config=model.config)
    ref_tok, ref_logits = _generate(model, ids, ref, new)
    use_fused_attention(model)
    fused = FusedCache(spec, config=model.config)
    tok, logits = _generate(model, ids, fused, new)
    assert torch.equal(tok, ref_tok)
    assert _rel(logits, ref_logits) <= TOL
    assert [(layer.n_fused, layer.n_dequant) for layer in fused.layers] == [(new - 1, 1)] * 2
    L = 50 + new - 1
    assert fused.get_seq_length() == ref.get_seq_length() == L
    sliding = [layer for layer in fused.layers if layer.sliding_window is not None]
    assert len(sliding) == (2 if arch == "mistral" else 1)
    unit = 64 if spec == "q4_0" else 2 * 32  # ggml's eviction unit; KIVI: a residual block, and V's window
    for layer in sliding:
        assert layer.offset > 0 and window - 1 <= layer.held <= window - 1 + unit
        # the bytes are those of the tokens held, not of every token seen
        B, H, D = layer.shape
        per_token = parse_policy(spec).bytes_per_token(2, H, layer.held, D) * B / 2
        assert sum(layer._used_bytes().values()) == pytest.approx(per_token * layer.held)
    # the eviction was real: a full-attention FusedCache of the same policy holds more
    assert fused.nbytes()["total"] < ref.nbytes()["total"] + sum(
        sum(layer._used_bytes().values()) for layer in sliding) * (L / window)


@pytest.mark.parametrize("spec, window", [(KIVI4, 24), (KIVI2, 90), ("q8_0", 30)])
def test_layer_values_equal_compressed_sliding_layer(spec, window):
    """One layer driven directly, in steps of 37, 1, 3, 30, 1, 3, 16, 1 ... tokens past the window several times:
    the tokens the fused layer hands SDPA (dequantized, the last min(seen, W - 1) + n) equal bit for bit what
    CompressedSlidingLayer returns, and the fused kernel (with the sliding mask) equals attention over them."""
    g = torch.Generator().manual_seed(3)
    B, H, D = 2, 2, 64
    pol = parse_policy(spec)
    layer = fused_layer(pol.quantizer(0, 0, "k", 1), pol.quantizer(0, 0, "v", 1), sliding_window=window)
    ref = CompressedSlidingLayer(pol, 0, 1, {}, sliding_window=window)
    for step, t in enumerate((37, 1, 3, 30, 1, 3, 16, 1, 2, 40, 1, 5, 1)):
        k = torch.randn(B, H, t, D, generator=g).to(DEV)
        v = torch.randn(B, H, t, D, generator=g).to(DEV)
        rk, rv = ref.update(k, v)
        layer.update(k, v)
        fk, fv = layer._dequantize()
        assert torch.equal(fk[:, :, -rk.shape[2]:], rk.float()) and torch.equal(fv[:, :, -rv.shape[2]:], rv.float())
        if t <= 16:
            q = torch.randn(B, 2 * H, t, D, generator=g).to(DEV)
            out = layer._decode(q, D**-0.5)
            want = torch.stack([attention_ref(q[b], rk[b], rv[b], D**-0.5, window) for b in range(B)])
            assert ((out - want).abs().max() / want.abs().max()).item() <= TOL, step
        layer.attend(MODULE, torch.zeros(B, 2 * H, t, D, device=DEV), None, D**-0.5)  # evicts, as after attention
        assert layer.held >= min(layer.cumulative_length, window - 1)


def test_left_padding_is_refused_from_the_mask_alone(monkeypatch):
    """Before transformers 5.24 the model passes no position_ids to Cache.update, so the cache cannot read the
    padding off them; the fused layer still sees it in the prefill's mask and refuses the batch."""
    model = _mistral(24)
    use_fused_attention(model)
    monkeypatch.setattr(cache_mod, "left_padding", lambda *a: None)  # what an older transformers leaves it
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEV)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with pytest.raises(ValueError, match=r"left-padded batch \(the mask hides past tokens.*kvlab\.CompressedCache"):
        _generate(model, ids, FusedCache(KIVI4, config=model.config), 2, mask)
    tok, _ = _generate(model, ids, FusedCache(KIVI4, config=model.config), 2)  # unpadded: served
    assert tok.shape == (2, 2)


def test_compressed_cache_warns_when_padding_cannot_be_seen():
    """CompressedCache reads left padding off the position_ids transformers >= 5.24 passes to update; a batch
    update without them says that a padded batch would go unnoticed (a single row, or given ids: silent)."""
    cfg = _mistral(24).config
    k = torch.randn(2, 2, 5, 64)
    with pytest.warns(UserWarning, match="no position_ids.*left-padded batch cannot be told"):
        CompressedCache("q8_0", config=cfg).update(k, k, 0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompressedCache("q8_0", config=cfg).update(k[:1], k[:1], 0)
        CompressedCache("q8_0", config=cfg).update(k, k, 0, kwargs={"position_ids": torch.arange(5)[None].repeat(2, 1)})


def test_sliding_layers_are_fused_layers():
    model = _gemma3(40)
    use_fused_attention(model)
    cache = CompressedCache(KIVI4, config=model.config, fused=True)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2)).to(DEV)
    _generate(model, ids, cache, 2)
    assert all(isinstance(layer, FusedLayer) for layer in cache.layers)
    assert [layer.sliding_window for layer in cache.layers] == [40, None]
    assert [layer.get_max_cache_shape() for layer in cache.layers][0] == 40
