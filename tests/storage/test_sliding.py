"""CompressedCache on sliding-window layers: the model's own semantics (transformers'
DynamicSlidingWindowLayer), decode-exact against the emulation in float64, and only the window held."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

from kvlab.emulation import hooks
from kvlab.storage.cache import CompressedCache, _layer_windows, cache_kwarg
from kvlab.storage.layers import CompressedLayer, CompressedSlidingLayer

W, SEQ = 16, 48

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _mistral(window=W):
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                     sliding_window=window, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).to(torch.float64).eval()


@pytest.fixture(scope="module")
def mistral():
    return _mistral()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))


def _decode(model, ids, cache):
    kw = {cache_kwarg(model): cache}
    with torch.no_grad():
        return torch.cat([model(input_ids=ids[:, t : t + 1], use_cache=True, **kw).logits
                          for t in range(ids.shape[1])], dim=1)


@pytest.mark.parametrize("spec", [
    "q8_0", "q4_0", "int:bits=4,group=32",
    "kivi:bits=2,group=8,residual=8",  # groups straddle the window's edge
    "kivi:bits=2,group=32,residual=32",  # the fp16 window is longer than the sliding window
    "k=kivi:bits=4,group=8,residual=8;v=q4_0",
])
def test_decode_through_sliding_layers_equals_emulation(mistral, ids, spec):
    """Token by token through the cache (every layer sliding, window 16, 48 tokens) equals the decode-exact
    emulation, which reads each key as the scheme holds it at that length under the model's sliding mask."""
    with torch.no_grad(), hooks.compress(mistral, spec):
        emulated = mistral(input_ids=ids, use_cache=False).logits
    cache = CompressedCache(spec, config=mistral.config)
    decoded = _decode(mistral, ids, cache)
    assert all(type(layer) is CompressedSlidingLayer for layer in cache.layers)
    assert torch.allclose(decoded, emulated, rtol=0, atol=1e-10), float((decoded - emulated).abs().max())
    with torch.no_grad():
        plain = mistral(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(plain, emulated, atol=1e-6)  # the scheme acted


def test_none_is_dynamic_sliding_window_layer(mistral, ids):
    """The ``none`` scheme returns exactly what DynamicSlidingWindowLayer returns: prefill longer than the
    window, then decoding, give bit-identical logits and the same greedy tokens."""
    caches = [DynamicCache(config=mistral.config), CompressedCache("none", config=mistral.config)]
    kw = [{cache_kwarg(mistral): c} for c in caches]
    with torch.no_grad():
        first = [mistral(input_ids=ids[:, :30], use_cache=True, **k).logits for k in kw]
        steps = [[mistral(input_ids=ids[:, t : t + 1], use_cache=True, **k).logits for t in range(30, SEQ)]
                 for k in kw]
    assert torch.equal(*first) and all(torch.equal(a, b) for a, b in zip(*steps))
    assert caches[1].get_seq_length() == SEQ
    prompt = ids[:, :24]
    out = [mistral.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                            **{cache_kwarg(mistral): c}) for c in (None, CompressedCache("none", config=mistral.config))]
    assert torch.equal(*out)


def test_a_sliding_layer_holds_its_window_only(mistral, ids):
    """After 48 tokens a layer of window 16 holds 15 tokens: q8_0 1 byte a value plus an fp16 scale per 32;
    KIVI's K groups of 8 keep the older tokens of the group the window's edge cuts (up to 7 more)."""
    cache = CompressedCache("q8_0", config=mistral.config)
    _decode(mistral, ids, cache)
    values = 2 * 2 * (W - 1) * 1 * 32  # layers x (K, V) x tokens x kv heads x head_dim
    nb = cache.nbytes()
    assert (nb["codes"], nb["metadata"], nb["fp16"]) == (values, values // 32 * 2, 0)
    cache = CompressedCache("none", config=mistral.config)
    _decode(mistral, ids, cache)
    assert cache.nbytes()["fp16"] == values * 8  # float64 values, held as they are
    cache = CompressedCache("kivi:bits=2,group=8,residual=8", config=mistral.config)
    _decode(mistral, ids, cache)
    for layer in cache.layers:
        for which in ("k", "v"):
            (s,) = layer.streams[which]
            assert W - 1 <= s.held() <= W - 1 + (7 if which == "k" else 0)


def test_evicted_storage_is_freed(ids):
    """A long decode does not grow a sliding layer's allocation: held + reserved bytes stay bounded."""
    model = _mistral(window=8)
    long = torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(2))
    cache = CompressedCache("q4_0", config=model.config)
    kw = {cache_kwarg(model): cache}
    sizes = []
    with torch.no_grad():
        for t in range(long.shape[1]):
            model(input_ids=long[:, t : t + 1], use_cache=True, **kw)
            nb = cache.nbytes()
            sizes.append(nb["total"] + nb["reserved"])
    assert cache.nbytes()["total"] == 2 * 2 * 7 * 32 // 2 + 2 * 2 * 7 * 2  # 7 tokens: 4-bit codes, fp16 scales
    assert max(sizes[80:]) <= max(sizes[:80])


def test_hybrid_model_gets_sliding_and_full_layers():
    cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=W,
                                        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).to(torch.float64).eval()
    seq = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    spec = "kivi:bits=2,group=8,residual=8"
    with torch.no_grad(), hooks.compress(model, spec):
        emulated = model(input_ids=seq, use_cache=False).logits
    cache = CompressedCache(spec, config=model.config)
    assert torch.allclose(_decode(model, seq, cache), emulated, rtol=0, atol=1e-10)
    assert [type(la) for la in cache.layers] == [CompressedSlidingLayer, CompressedLayer]
    assert [la.get_seq_length() for la in cache.layers] == [40, 40]


def test_layer_windows_from_the_config():
    mk = transformers.LlamaConfig
    assert _layer_windows(mk(num_hidden_layers=2)) == [None, None]
    chunked = mk(num_hidden_layers=2)
    chunked.layer_types, chunked.attention_chunk_size = ["chunked_attention", "full_attention"], 8
    assert _layer_windows(chunked) == [8, None]
    odd = mk(num_hidden_layers=2)
    odd.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="1 linear_attention layers of 2"):
        _layer_windows(odd)
    broken = mk(num_hidden_layers=1)
    broken.layer_types, broken.sliding_window = ["sliding_attention"], None
    with pytest.raises(ValueError, match="sliding_window=None"):
        _layer_windows(broken)


@pytest.mark.parametrize("spec, extra", [("q8_0", 0), ("kivi:bits=2,group=8,residual=8", 7)])
def test_a_prefill_longer_than_the_window_keeps_the_window(mistral, ids, spec, extra):
    """A 40-token prefill into layers of window 16: the prefill's run is cut to the last 15 tokens at once
    (a KIVI K group the edge cuts stays whole). q8_0 reads every token quantized at once, so a prefill is
    decode-exact and the logits equal the emulation's; KIVI's prefill queries read the fp16 window as it
    stands at 40 tokens, not as it stood at each of them, so later layers' K/V (and logits) differ."""
    cache = CompressedCache(spec, config=mistral.config)
    kw = {cache_kwarg(mistral): cache}
    with torch.no_grad():
        logits = [mistral(input_ids=ids[:, :40], use_cache=True, **kw).logits]
        held = [s.held() for la in cache.layers for s in la.streams["k"] + la.streams["v"]]
        logits += [mistral(input_ids=ids[:, t : t + 1], use_cache=True, **kw).logits for t in range(40, SEQ)]
    assert all(W - 1 <= h <= W - 1 + extra for h in held), held
    with torch.no_grad(), hooks.compress(mistral, spec):
        emulated = mistral(input_ids=ids, use_cache=False).logits
    if spec == "q8_0":
        assert torch.allclose(torch.cat(logits, 1), emulated, rtol=0, atol=1e-10)
