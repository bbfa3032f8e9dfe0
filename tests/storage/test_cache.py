"""CompressedCache: a drop-in transformers cache with real packed storage (generate, bytes, bad input)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

import kvlab.quant as kq
from kvlab.emulation import hooks
from kvlab.quant.policy import parse_policy
from kvlab.storage.cache import CompressedCache, cache_kwarg, read_packed

NEW = 64
PROMPT = "The history of the Python programming language begins"


def _config(layers=3, kv_heads=3, head_dim=64):
    return transformers.LlamaConfig(num_hidden_layers=layers, num_key_value_heads=kv_heads, num_attention_heads=3 * kv_heads,
                                    hidden_size=3 * kv_heads * head_dim, head_dim=head_dim, intermediate_size=64,
                                    vocab_size=64)


def _generate(model, ids, cache=None, keyword=None, new=NEW, **kw) -> torch.Tensor:
    """Greedy continuation (new tokens only) through ``cache`` (None: the model's default DynamicCache)."""
    extra = {} if cache is None else {keyword or cache_kwarg(model): cache}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **extra, **kw)
    return out[:, ids.shape[1]:]


def _agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(tokens equal, length of the common prefix)."""
    same = (a == b).flatten()
    return int(same.sum()), int(same.cumprod(0).sum())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def dynamic_tokens(model, prompt):
    return _generate(model, prompt)


# ---------------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------------
def test_fp16_generate_equals_dynamic_cache(model, prompt, dynamic_tokens):
    cache = CompressedCache("fp16", config=model.config)
    out = _generate(model, prompt, cache)
    assert torch.equal(out, dynamic_tokens)
    assert cache.get_seq_length() == prompt.shape[1] + NEW - 1  # the last token is never fed back
    nb = cache.nbytes()
    assert nb["codes"] == nb["metadata"] == 0
    assert nb["total"] == nb["fp16"] == 30 * 2 * 3 * 64 * 2 * cache.get_seq_length()


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"])
def test_both_cache_keywords(model, prompt, dynamic_tokens, keyword):
    """transformers 5.2x takes ``cache=`` and still ``past_key_values=`` (deprecated); 5.17 only the latter."""
    if keyword == "cache" and cache_kwarg(model) != "cache":
        pytest.skip(f"transformers {transformers.__version__} has no cache= keyword")
    cache = CompressedCache("none", config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = _generate(model, prompt, cache, keyword=keyword, new=8)
    assert torch.equal(out, dynamic_tokens[:, :8])
    assert cache.get_seq_length() == prompt.shape[1] + 7


def test_kvlab_calls_warn_no_deprecation(model, prompt):
    """kvlab's own calls (generate through the cache, the ``decode`` emulation's forward loop) pass the cache
    under ``cache_kwarg(model)``: no FutureWarning (transformers 5.2x deprecates ``past_key_values``) and no
    DeprecationWarning raised from transformers or kvlab."""
    from kvlab.evaluation.evaluate import evaluate_policy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _generate(model, prompt, CompressedCache("q8_0", config=model.config), new=4)
        evaluate_policy(model, prompt[:, :6], "q8_0", emulation="decode", kl=False, progress=False)
    bad = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)
           or (issubclass(w.category, DeprecationWarning) and ("transformers" in w.filename or "kvlab" in w.filename))]
    assert not bad, bad


def test_cache_kwarg_on_transformers_without_cache_keyword():
    """Before the ``cache`` keyword (transformers < 5.2x, down to the 4.57 that pyproject allows), a
    model's forward takes ``past_key_values`` only, and that is the keyword kvlab passes."""

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_kwarg(Old()) == "past_key_values" and cache_kwarg(New()) == "cache"


def test_manual_decode_loop_none_is_bit_identical(model, prompt):
    kw = cache_kwarg(model)
    caches = [DynamicCache(), CompressedCache("none", config=model.config)]
    with torch.no_grad():
        logits = [model(input_ids=prompt[:, :4], use_cache=True, **{kw: c}).logits for c in caches]
        for t in range(4, prompt.shape[1]):
            step = [model(input_ids=prompt[:, t : t + 1], use_cache=True, **{kw: c}).logits for c in caches]
            logits = [torch.cat([a, b], 1) for a, b in zip(logits, step)]
    assert torch.equal(*logits)


def test_beam_search_reorders_the_packed_cache(model, prompt):
    ref = _generate(model, prompt, new=12, num_beams=2)
    out = _generate(model, prompt, CompressedCache("none", config=model.config), new=12, num_beams=2)
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_q8_0_generate_equals_prefill_emulation(model, model64, prompt, dynamic_tokens):
    """q8_0 through the real cache, in float64, gives exactly the tokens of kvlab.hooks' prefill emulation.

    The emulation runs once over the generated sequence (teacher forcing): its argmax at every position
    must be the next generated token. That is the greedy loop over the growing sequence, by induction on
    the first position where the two would part (each query sees the cache as it stood at its step)."""
    out = _generate(model64, prompt, CompressedCache("q8_0", config=model64.config))
    seq = torch.cat([prompt, out], dim=1)
    with torch.no_grad(), hooks.compress(model64, "q8_0"):
        logits = model64(input_ids=seq[:, :-1], use_cache=False).logits
    emulated = logits[:, prompt.shape[1] - 1 :].argmax(-1)
    assert torch.equal(emulated, out)
    # how far q8_0 follows the unquantized cache, float64 and float32 (fp32 GEMM-order noise gets amplified)
    agree64 = _agreement(out, _generate(model64, prompt))
    agree32 = _agreement(_generate(model, prompt, CompressedCache("q8_0", config=model.config)), dynamic_tokens)
    print(f"\nq8_0 vs DynamicCache, {NEW} greedy tokens (equal, common prefix): float64 {agree64}, float32 {agree32}")
    assert agree64[1] >= 1 and agree32[1] >= 1


@pytest.mark.slow
def test_kivi2_generate_runs_and_stores_codes(model, tokenizer):
    from kvlab.evaluation.evaluate import load_windows

    _, w = load_windows(tokenizer, "pydoc", ctx=160, windows=1)  # past KIVI's 128-token window
    cache = CompressedCache("kivi:bits=2", config=model.config)
    out = _generate(model, w, cache)
    ref = _generate(model, w)
    nb = cache.nbytes()
    L = w.shape[1] + NEW - 1
    assert nb["codes"] > 0 and nb["total"] == parse_policy("kivi:bits=2").bytes_per_token(30, 3, L, 64) * L
    print(f"\nkivi-2, {NEW} tokens after a {w.shape[1]}-token pydoc prompt ((equal, common prefix) with "
          f"DynamicCache's: {_agreement(out, ref)}):\n{tokenizer.decode(out[0])!r}\nDynamicCache:\n{tokenizer.decode(ref[0])!r}")


# ---------------------------------------------------------------------------------------------------
# the stored bytes
# ---------------------------------------------------------------------------------------------------
def _stored_tensors(cache: CompressedCache):
    for layer in cache.layers:
        for streams in layer.streams.values():
            for s in streams:
                yield from (t for t in (s.sinks, s.window) if t is not None)
                for p in s.runs.packs():
                    yield from p.tensors.values()


BYTE_POLICIES = ["kivi:bits=2", "kivi:bits=4", "q4_0", "q8_0", "int:bits=4", "fp16", "kv=q4_0;keep_first=1"]


@pytest.mark.parametrize("spec", BYTE_POLICIES)
def test_nbytes_matches_storage_and_bit_accounting(spec):
    """At lengths across group and window edges, written as a prefill then token by token."""
    n_layers, H, D = 3, 3, 64
    cfg = _config(n_layers, H, D)
    policy = parse_policy(spec)
    gen = torch.Generator().manual_seed(0)
    for T in (1, 31, 32, 127, 128, 129, 300):
        cache = CompressedCache(spec, config=cfg)
        for t in [T // 2] + [1] * (T - T // 2):
            if t:
                for layer in range(n_layers):
                    cache.update(*torch.randn(2, 1, H, t, D, generator=gen), layer)
        nb = cache.nbytes()
        assert nb["total"] == sum(t.numel() * t.element_size() for t in _stored_tensors(cache))
        assert nb["total"] == nb["codes"] + nb["metadata"] + nb["fp16"]
        assert nb["total"] == pytest.approx(policy.bytes_per_token(n_layers, H, T, D) * T, abs=0), (spec, T)
        room_64_tokens = 64 * n_layers * 2 * H * D * 2  # at fp16's 2 bytes a value, the most any scheme takes
        assert 0 <= nb["reserved"] <= nb["total"] // 8 + room_64_tokens  # room: an eighth, or 64 tokens
        if spec != "fp16" and T >= 129:
            assert nb["codes"] > nb["metadata"] > 0


@pytest.mark.parametrize("spec", ["kivi:bits=2", "q4_0"])
def test_bytes_vs_fp16_by_length(spec):
    """One layer of the embedded model's geometry (3 kv heads, head_dim 64), synthetic K/V."""
    q = kq.get(spec)
    ratios = []
    for T in (128, 512, 1024, 2048):
        cache = CompressedCache(spec)
        cache.update(torch.randn(1, 3, T, 64), torch.randn(1, 3, T, 64), 0)
        ratio = 2 * 3 * T * 64 * 2 / cache.nbytes()["total"]
        bits = (q.for_tensor("k").bits_per_value(T, 64) + q.for_tensor("v").bits_per_value(T, 64)) / 2
        assert ratio == pytest.approx(16 / bits)
        ratios.append(ratio)
    if spec == "q4_0":
        assert ratios == pytest.approx([16 / 4.5] * 4)
    else:  # the fp16 window weighs less as the sequence grows
        assert ratios == sorted(ratios) and ratios[0] < 2 < 4.5 < ratios[-1] < 16 / 3


# ---------------------------------------------------------------------------------------------------
# exactness of the cache's own paths (readers, joined storage, K and V quantized together)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["q4_0", "q4_1", "q8_0", "kivi:bits=2", "kivi:bits=4,group=64", "fp16", "bf16"])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_read_packed_is_bit_identical_to_dequantize(spec, which, dtype):
    q = kq.get(spec).for_tensor(which)
    x = (3 * torch.randn(2, 3, 256, 64, generator=torch.Generator().manual_seed(1))).to(dtype)
    packed = q.quantize_all(x)
    big = torch.full((2, 5, 300, 64), float("nan"), dtype=dtype)
    out = big[:, 1:4, 20:276]  # a strided view, as the cache writes into its output
    read_packed(q, packed, out)
    assert torch.equal(out, q.dequantize(packed))
    assert big[:, :, :20].isnan().all() and big[:, 4].isnan().all()


def _reference_outputs(spec: str, steps: list[torch.Tensor], which: str) -> list[torch.Tensor]:
    """What the cache must return after each update, from the scheme's rule alone: every run of tokens
    that left the fp16 window, quantized on its own (``quantize_all``) and dequantized, then the window."""
    q = parse_policy(spec).quantizer(0, 0, which, 1)
    x, outs, bounds = None, [], [0]
    for step in steps:
        x = step if x is None else torch.cat([x, step], dim=2)
        x16 = x.to(torch.float16).to(x.dtype)
        n_q = int((~q.fp16_tokens(x.shape[2])).sum())
        if n_q > bounds[-1]:
            bounds.append(n_q)
        runs = [q.dequantize(q.quantize_all(x16[:, :, a:b])) for a, b in zip(bounds, bounds[1:])]
        outs.append(torch.cat([*runs, x16[:, :, n_q:]], dim=2))
    return outs


@pytest.mark.parametrize("spec", ["q4_0", "q8_0", "kivi:bits=2,group=32,residual=64", "int:bits=4,group=32", "fp16",
                                  "q4_0:rotate=hadamard"])
def test_cache_outputs_equal_the_scheme_rule(spec):
    gen = torch.Generator().manual_seed(2)
    sizes = [37, 1, 1, 90, *[1] * 70, 5, *[1] * 30]
    ks = [torch.randn(2, 3, t, 64, generator=gen) for t in sizes]
    vs = [torch.randn(2, 3, t, 64, generator=gen) for t in sizes]
    cache = CompressedCache(spec)
    got = [cache.update(k, v, 0) for k, v in zip(ks, vs)]
    for which, steps, i in (("k", ks, 0), ("v", vs, 1)):
        for n, (g, r) in enumerate(zip(got, _reference_outputs(spec, steps, which))):
            assert torch.equal(g[i], r), (which, n)


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown scheme 'no-such-scheme'"):
        CompressedCache("no-such-scheme")
    with pytest.raises(ValueError, match="allowed keys"):
        CompressedCache("kv=q4_0;bogus=1")


@pytest.mark.parametrize("make, sliding", [
    (lambda: transformers.MistralConfig(num_hidden_layers=4), 4),
    (lambda: transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2), 2),
    (lambda: transformers.Gemma2Config(num_hidden_layers=4), 2),
])
def test_sliding_window_models_get_sliding_layers(make, sliding):
    """Sliding-window layers are stored with the model's semantics (tests/storage/test_sliding.py)."""
    cache = CompressedCache("q4_0", config=make())
    assert sum(w is not None for w in cache._windows) == sliding


@pytest.mark.parametrize("make", [
    lambda: transformers.MistralConfig(num_hidden_layers=4, sliding_window=None),
    lambda: transformers.Qwen2Config(num_hidden_layers=4),
    lambda: transformers.LlamaConfig(num_hidden_layers=4),
])
def test_full_attention_models_are_accepted(make):
    assert CompressedCache("q4_0", config=make()).n_layers == 4


@pytest.mark.parametrize("spec, match", [
    ("kv=int:bits=8;recent=16;old=int:bits=2", "recency policies"),
    ("int:bits=4,axis=channel", "not causal"),
    ("fp8:scale=tensor", "not causal"),
    ("kvquant", "not causal"),
])
def test_policies_a_cache_cannot_store_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        CompressedCache(spec)


def test_policy_checked_against_the_model():
    with pytest.raises(ValueError, match="keep_last needs the model's layer count"):
        CompressedCache("kv=q4_0;keep_last=2")
    with pytest.raises(ValueError, match="head 7"):
        CompressedCache("kv=q4_0;keep_heads=1.7", config=_config())


# ---- padded batches, the config against the model, values beyond fp16 (issue 17) ------------------------
PAD_POLICY = "kivi:bits=2,group=4,residual=4"  # small groups and window: a 5-token prompt quantizes K and V


def _padded_batch(pad_id: int):
    """Row 0: 12 tokens; row 1: 5 tokens left-padded with ``pad_id``; the mask and the position ids generate()
    derives from it."""
    ids = torch.tensor([list(range(5, 17)), [pad_id] * 7 + [21, 22, 23, 24, 25]])
    mask = (torch.arange(12) >= torch.tensor([[0], [7]])).long()
    return ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


#: transformers before 5.24 hand the cache no position_ids, so it cannot see left padding (CompressedCache warns)
NEEDS_POSITION_IDS = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.24"),
    reason=f"transformers {transformers.__version__} passes no position_ids to Cache.update: padded batches "
           "store their pads (a stated limitation below 5.24, warned by CompressedCache)")


@NEEDS_POSITION_IDS
@pytest.mark.parametrize("policy", [PAD_POLICY, "q4_0", "k=kivi:bits=2,group=4,residual=4;v=q8_0;keep_first=1"])
def test_masked_pad_token_does_not_move_any_logit(model64, policy):
    """Changing only the masked pad token id leaves every real position's logits bit-identical."""
    logits = []
    for pad in (2, 0, 13):
        ids, mask, pos = _padded_batch(pad)
        cache = CompressedCache(policy, config=model64.config)
        with torch.no_grad():
            out = model64(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                          **{cache_kwarg(model64): cache}).logits
        logits.append(torch.cat([out[0], out[1, 7:]]))
        assert cache._pads == [0, 7]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


@NEEDS_POSITION_IDS
def test_padded_row_in_generate_equals_the_prompt_alone(model64):
    ids, mask, _ = _padded_batch(0)
    with torch.no_grad():
        batch = model64.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                                 **{cache_kwarg(model64): CompressedCache(PAD_POLICY, config=model64.config)})
        for row, start in ((0, 0), (1, 7)):
            alone = model64.generate(ids[row : row + 1, start:], max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                     pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                                     **{cache_kwarg(model64): CompressedCache(PAD_POLICY, config=model64.config)})
            assert torch.equal(batch.sequences[row, 12:], alone.sequences[0, 12 - start:])
            for a, b in zip(batch.scores, alone.scores):
                torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-9)


def test_padded_batch_bytes_count_real_tokens_only():
    cfg = _config(layers=1, kv_heads=1)
    cache = CompressedCache("q8_0", config=cfg)
    k = torch.randn(2, 1, 8, 64)
    pos = torch.tensor([list(range(8)), [0, 0, 0, 0, 0, 1, 2, 3]])
    k_out, _ = cache.update(k, k, 0, kwargs={"position_ids": pos})
    assert torch.equal(k_out[1, :, :4], torch.zeros(1, 4, 64))  # the pads: zeros, hidden by the mask
    ref = CompressedCache("q8_0", config=cfg)
    ref.update(k[:1], k[:1], 0)
    assert cache.nbytes()["total"] == ref.nbytes()["total"] * 12 // 8  # 8 + 4 real tokens
    cache.reorder_cache(torch.tensor([1, 1]))  # beam search: a row copied, not shared
    k2, _ = cache.update(torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64), 0)
    assert k2.shape == (2, 1, 9, 64) and cache.layers[0].pads == [4, 4]


def test_config_that_is_not_a_config_is_refused():
    with pytest.raises(ValueError, match="config='abc' is not a model config"):
        CompressedCache("q4_0", config="abc")


def test_config_with_more_layers_than_the_model_is_refused(model):
    """A 40-layer config on the 30-layer model would move keep_last=2 to layers 38-39."""
    cfg = model.config.__class__.from_dict({**model.config.to_dict(), "num_hidden_layers": 40})
    cache = CompressedCache("kv=q4_0;keep_last=2", config=cfg)
    ids = torch.arange(5, 10)[None]
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
        with pytest.raises(ValueError, match="has 40 layers, but the model updated only layers 0..29"):
            model(input_ids=ids[:, :1], use_cache=True, **{cache_kwarg(model): cache})


@pytest.mark.parametrize("change, match", [({"num_hidden_layers": 20}, "updates layer 20, but the config"),
                                           ({"num_key_value_heads": 1, "num_attention_heads": 9}, "says 1 x 64"),
                                           ({"head_dim": 32}, "says 3 x 32")])
def test_config_that_does_not_match_the_model_is_refused(model, change, match):
    cfg = model.config.__class__.from_dict({**model.config.to_dict(), **change})
    cache = CompressedCache("q4_0", config=cfg)
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        model(input_ids=torch.arange(5, 10)[None], use_cache=True, **{cache_kwarg(model): cache})


def test_values_beyond_fp16_are_refused_by_the_cache():
    cache = CompressedCache("kivi:bits=2", config=_config(layers=1, kv_heads=1))
    k = torch.randn(1, 1, 4, 64, dtype=torch.bfloat16)
    k[0, 0, 2, 5] = 2e5
    with pytest.raises(ValueError, match=r"value of 199680 is beyond torch.float16.*\|x\| <= 65504"):
        cache.update(k, k, 0)
