"""kvlab.emulation.hooks: schemes inside the real model, decode-exact emulation, policies, dumps, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from kvlab.emulation import hooks
from kvlab.evaluation.dump import dump, load_dump
from kvlab.evaluation.evaluate import load_windows
from kvlab.evaluation.ppl import nll_per_window
from kvlab.metrics import cosine, kl_div, logits_kl, mse, nmse, paired_delta_ci
from kvlab.quant.policy import parse_policy
from kvlab.storage.cache import CompressedCache, cache_kwarg


@pytest.fixture(scope="module")
def seq(tokenizer):
    _, w = load_windows(tokenizer, "pydoc", ctx=300, windows=1)
    return w  # (1, 300)


def _prefill_nll(model, ids, spec, emulation="prefill"):
    with torch.no_grad(), hooks.compress(model, spec, emulation=emulation):
        return nll_per_window(model(input_ids=ids, use_cache=False).logits, ids)


def _decode_nll(model, ids, spec):
    """Token-by-token decoding through a real CompressedCache."""
    cache = CompressedCache(spec, config=model.config)
    logits = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{cache_kwarg(model): cache})
            logits.append(out.logits)
    return nll_per_window(torch.cat(logits, dim=1), ids)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["kivi:bits=2,group=32,residual=128", "q4_0", "int:bits=4,group=32",
                                  "kv=kivi:bits=4;keep_first=2;keep_heads=5.1"])
def test_prefill_emulation_equals_token_by_token_decode(model64, seq, spec):
    # float64: in fp32 the K/V of a 1-token step and of a full pass differ in the last bits (GEMM
    # order), and rounding quantizers amplify that chaotically (q4_0: ~3% NLL between batch 1 and 3)
    pre = _prefill_nll(model64, seq, spec)
    dec = _decode_nll(model64, seq, spec)
    assert torch.allclose(pre, dec, rtol=1e-4, atol=0), (pre, dec)
    fp = _prefill_nll(model64, seq, "fp16")
    assert not torch.allclose(pre, fp, rtol=1e-4, atol=0)  # the scheme really acted


def test_kivi_static_prefill_differs_from_decode_exact(model, seq):
    spec = "kivi:bits=2,group=32,residual=128"
    exact = _prefill_nll(model, seq, spec)
    static = _prefill_nll(model, seq, spec, emulation="static")
    assert abs(float(exact - static)) > 1e-4 * float(exact)


def test_none_is_bit_identical_and_fp16_only_rounds(model, seq):
    with torch.no_grad():
        ref = model(input_ids=seq).logits
        with hooks.compress(model, "none"):
            same = model(input_ids=seq).logits
        with hooks.compress(model, "fp16"):
            half = model(input_ids=seq).logits
    assert torch.equal(ref, same)
    diff = (half - ref).abs().max().item()
    assert 0 < diff < 0.1
    assert model.config._attn_implementation == "sdpa"


def test_hooks_restore_after_exception(model, seq):
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"), hooks.compress(model, "q4_0"):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, "_kvlab") for m in model.modules())


@pytest.mark.parametrize("spec, match", [
    ("int:bits=4,group=48", "group=48 does not divide head_dim D=64"),
    ("kv=q4_0;keep_heads=40.0", "layer 40"),
    ("kv=q4_0;keep_heads=1.7", "head 7"),
    ("no-such-scheme", "unknown scheme"),
])
def test_bad_policy_leaves_model_unmodified(model, seq, spec, match):
    with torch.no_grad():
        ref = model(input_ids=seq[:, :32]).logits
    with pytest.raises(ValueError, match=match):
        with hooks.compress(model, spec):
            model(input_ids=seq[:, :32])
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(input_ids=seq[:, :32]).logits, ref)


def test_unhookable_model_is_refused():
    with pytest.raises(ValueError, match="cannot be hooked"):
        with hooks.compress(torch.nn.Linear(2, 2), "q4_0"):
            pass


def test_capture_layer_out_of_range(model):
    with pytest.raises(ValueError, match="layer index 30 out of range"):
        with hooks.capture(model, layers=[0, 30]):
            pass


def test_capture_pre_rope_inverts_post(model, seq):
    from kvlab.model.rope import apply_rope, rope_cos_sin

    with torch.no_grad(), hooks.capture(model, layers=[2]) as caps:
        model(input_ids=seq[:, :64])
    k_pre, k_post = caps[(2, "k_pre")], caps[(2, "k_post")]
    assert k_pre.shape == (1, model.config.num_key_value_heads, 64, 64)
    cos, sin = rope_cos_sin(model, k_pre, torch.arange(64).unsqueeze(0))
    assert torch.allclose(apply_rope(k_pre, cos, sin), k_post, atol=1e-4)
    assert not torch.allclose(k_pre, k_post, atol=1e-2)


def test_per_head_policy_keeps_listed_heads_exact(model, seq):
    spec = "kv=int:bits=2;keep_heads=0.1;keep=none"
    with torch.no_grad(), hooks.measure(model, spec) as rows:
        model(input_ids=seq[:, :64])
    by = {(r["layer"], r["head"]): r for r in rows}
    assert by[(0, 1)]["k_mse"] == 0 and by[(0, 1)]["v_mse"] == 0
    assert by[(0, 0)]["k_mse"] > 0 and by[(1, 1)]["k_mse"] > 0


def test_policy_first_last_layers_and_bytes(model):
    p = parse_policy("kv=q4_0;keep_first=2;keep_last=1")
    n, h, d = model.config.num_hidden_layers, model.config.num_key_value_heads, 64
    assert p.quantizer(0, 0, "k", n).name == "fp16" and p.quantizer(29, 0, "v", n).name == "fp16"
    assert p.quantizer(5, 2, "k", n).name == "q4_0"
    bpv = (3 * 16 + 27 * 4.5) / 30
    assert p.bits_per_value(n, h, 4096, d) == pytest.approx(bpv)
    assert p.bytes_per_token(n, h, 4096, d) == pytest.approx(bpv * n * h * 2 * d / 8)


def test_recency_policy_uses_old_scheme_for_old_tokens(model, seq):
    spec = "kv=int:bits=8;recent=16;old=int:bits=2"
    p = parse_policy(spec)
    assert p.bits_per_value(30, 3, 64, 64) < parse_policy("int:bits=8").bits_per_value(30, 3, 64, 64)
    ids = seq[:, :64]
    nll8 = _prefill_nll(model, ids, "int:bits=8")
    nll_rec = _prefill_nll(model, ids, spec)
    nll2 = _prefill_nll(model, ids, "int:bits=2")
    assert nll8 < nll_rec < nll2


def test_measure_rows_and_passthrough(model, seq):
    ids = seq[:, :64]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with hooks.measure(model, "q4_0") as rows:
            out = model(input_ids=ids).logits
    assert torch.equal(ref, out)  # measuring does not change the model's output
    assert len(rows) == model.config.num_hidden_layers * model.config.num_key_value_heads
    for r in rows:
        assert 0 < r["k_nmse"] < 0.1 and 0.9 < r["k_cos"] <= 1 and r["attn_kl"] >= 0


def test_dump_roundtrip_and_tamper_detection(model, seq, tmp_path):
    out = dump(model, seq[:, :32], tmp_path / "d", layers=[0, 3], corpus="pydoc")
    manifest, tensors = load_dump(out)
    assert sorted(tensors) == [0, 3] and manifest["ctx"] == 32
    assert tensors[3]["k_post"].shape == (1, 3, 32, 64) and tensors[3]["k_post"].dtype == torch.float16
    assert set(tensors[0]) == {"q_pre", "q_post", "k_pre", "k_post", "v"}
    f = out / "layer_003.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its checksum"):
        load_dump(out)
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match="truncated or modified"):
        load_dump(out)
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no dump manifest"):
        load_dump(out)
    json.dumps(manifest)


def test_metric_definitions():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    y = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    assert mse(x, y).item() == pytest.approx(16 / 4)
    assert nmse(x, y).item() == pytest.approx(16 / 25)
    assert cosine(x, y).tolist() == pytest.approx([0.6, 1.0])
    p = torch.tensor([0.5, 0.5])
    assert kl_div(p, p).item() == 0
    import math

    assert kl_div(p, torch.tensor([0.25, 0.75])).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    lg = torch.randn(3, 5)
    assert logits_kl(lg, lg).abs().max().item() < 1e-12


def test_paired_bootstrap_ci():
    gen = torch.Generator().manual_seed(0)
    a = (3 + 0.1 * torch.randn(24, generator=gen, dtype=torch.float64)).tolist()
    b = [v + 0.05 for v in a]  # b is uniformly worse
    d, lo, hi = paired_delta_ci(a, b, seed=0)
    assert lo <= d <= hi and lo > 0
    assert paired_delta_ci(a, b, seed=0) == (d, lo, hi)  # fixed seed: identical
    assert paired_delta_ci(a, a, seed=0) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal-length"):
        paired_delta_ci(a, b[:3])


def _rope(B, T, D):
    angle = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
    emb = torch.cat([angle, angle], dim=-1).expand(B, T, D)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("spec, emulation", [
    ("kivi:bits=2,group=32,residual=128", "prefill"),
    ("kivi:bits=2,group=16,residual=32", "static"),
    ("k=kivi:bits=2,group=16,residual=32;v=q4_0", "prefill"),
    ("kv=kivi:bits=2,group=16,residual=32;keep_heads=1.1", "prefill"),
    ("kv=int:bits=8;recent=24;old=int:bits=2", "prefill"),
    ("kv=kivi:bits=4,group=16,residual=32;recent=40;old=int:bits=2;keep_k_heads=1.0", "prefill"),
    ("kvquant:bits=3,sinks=4", "prefill"),
])
@pytest.mark.parametrize("n_rep, padded", [(1, False), (3, False), (3, True)])
def test_blockwise_attention_equals_reference(spec, emulation, n_rep, padded):
    # the blockwise SDPA path against the straightforward per-(query, key) selection, on random tensors
    # (float64: only summation order differs), with GQA, per-head and recency policies, and queries
    # that are only the last tokens of the keys under a padding mask
    gen = torch.Generator().manual_seed(0)
    B, Hkv, Tk, D = 2, 2, 300, 32
    Tq = Tk - 37 if padded else Tk
    state = hooks._State(None, 3, parse_policy(spec), emulation)
    cos, sin = _rope(B, Tk, D)
    for layer in range(3):
        q = torch.randn(B, Hkv * n_rep, Tq, D, generator=gen, dtype=torch.float64)
        k = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64)
        v = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64)
        mask = None
        if padded:  # row 1 is padded after 250 tokens
            mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq).expand(B, 1, Tq, Tk).clone()
            mask[1, :, :, 250:] = False
            if layer == 2:  # the additive form
                mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -torch.inf)
        kv, k_keys = hooks._versions(state, layer, "k", k, Tq, lambda: (cos, sin))
        vv, v_keys = hooks._versions(state, layer, "v", v, Tq, lambda: (cos, sin))
        assert not (hooks._plain(state, k_keys) and hooks._plain(state, v_keys))
        fast = hooks._attend(state, q, kv, k_keys, vv, v_keys, mask, D**-0.5)  # (B, Tq, Hq, D)
        ref, _ = hooks._attend_reference(q, *hooks._reference_inputs(state, kv, k_keys),
                                         *hooks._reference_inputs(state, vv, v_keys), mask, D**-0.5)
        torch.testing.assert_close(fast, ref.transpose(1, 2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", ["kivi:bits=2,group=16,residual=32", "kv=int:bits=8;recent=24;old=int:bits=2"])
@pytest.mark.parametrize("mask_kind", ["none", "padded", "additive", "shows_later_key"])
def test_error_blocks_equal_one_whole_map(spec, mask_kind, monkeypatch):
    # measure's reference and compressed attention by blocks of query rows over their visible keys, against
    # the same computed in one block over every key (float64): outputs and per-row KL agree, whatever the mask
    gen = torch.Generator().manual_seed(1)
    B, Hkv, n_rep, Tk, D = 2, 2, 3, 300, 32
    Tq = Tk - 37 if mask_kind != "none" else Tk
    state = hooks._State(None, 1, parse_policy(spec), "prefill")
    cos, sin = _rope(B, Tk, D)
    q = torch.randn(B, Hkv * n_rep, Tq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64)
    mask = None
    if mask_kind != "none":
        mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq).expand(B, 1, Tq, Tk).clone()
        mask[1, :, :, 250:] = False
        if mask_kind == "shows_later_key":  # not causal: early queries see the last key
            mask[:, :, :10, -1] = True
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -torch.inf)
    kv, k_keys = hooks._versions(state, 0, "k", k, Tq, lambda: (cos, sin))
    vv, v_keys = hooks._versions(state, 0, "v", v, Tq, lambda: (cos, sin))
    args = (q, q, k, v, *hooks._reference_inputs(state, kv, k_keys), *hooks._reference_inputs(state, vv, v_keys),
            mask, D**-0.5)
    monkeypatch.setattr(hooks, "_ERROR_BLOCK_ELEMENTS", 1 << 40)
    whole = hooks._reference_errors(*args)
    monkeypatch.setattr(hooks, "_ERROR_BLOCK_ELEMENTS", 1)  # blocks of 16 rows
    blocks = hooks._reference_errors(*args)
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert whole[2].shape == (B, Hkv * n_rep, Tq) and bool((whole[2] > 0).any())


# ---- llama.cpp's channel order and compute path (kvlab.quant.ggml: order=, compute=) -------------------
def test_interleaved_order_blocks_the_gguf_layout():
    """order=interleaved quantizes K as ggml would in llama.cpp's channel order: the same codes as the
    contiguous scheme on the reordered tensor, read back in the model's order."""
    import kvlab.quant as kq
    from kvlab.quant.ggml import interleave_order

    x = torch.randn(2, 3, 17, 64, generator=torch.Generator().manual_seed(0))
    x[..., 60:64] *= 30  # outlier channels: which channels share a block now matters
    perm = interleave_order(64)
    assert perm[:4].tolist() == [0, 32, 1, 33]
    for spec in ("q4_0", "q4_1", "q5_0", "q8_0", "q4_0:rotate=hadamard"):
        name, _, rest = spec.partition(":")
        inter = kq.get(f"{name}:order=interleaved" + (f",{rest}" if rest else ""))
        ref = kq.get(spec).roundtrip(x[..., perm])[..., perm.argsort()]
        assert torch.equal(inter.roundtrip(x), ref), spec
    assert not torch.equal(kq.get("q4_0:order=interleaved").roundtrip(x), kq.get("q4_0").roundtrip(x))


def test_llama_cpp_compute_rounds_the_query_as_q8_0_in_k_basis():
    """compute=llama.cpp: the query is rounded to int8 blocks of 32 with an fp16 scale (ggml's q8_0/q8_1 vec-dot
    types) in K's basis (reordered and rotated like K): exactly what q8_0 would store for it there."""
    import kvlab.quant as kq

    q = torch.randn(1, 6, 9, 64, generator=torch.Generator().manual_seed(1)) * 3
    for opts in ("", ",order=interleaved", ",rotate=hadamard", ",order=interleaved,rotate=hadamard"):
        for t in ("q4_0", "q4_1", "q8_0"):
            s = kq.get(f"{t}:compute=llama.cpp{opts}")
            assert not s.query_is_identity and s.layout() is None
            assert torch.equal(s.query(q), kq.get(f"q8_0:{opts[1:] or 'rotate=none'}").roundtrip(q)), (t, opts)
        assert kq.get(f"q4_0:{opts[1:] or 'rotate=none'}").query_is_identity
    assert kq.get("q4_0").spec == "q4_0:rotate=none"  # the added options keep every earlier result key


def test_compress_hands_the_rounded_query_to_the_attention_of_the_heads_it_names(model, seq, monkeypatch):
    """Inside compress, a K scheme with compute=llama.cpp changes the query of its own heads' attention
    (GQA: the query heads of that kv head) and nothing else; without it the query passes unchanged."""
    import kvlab.quant as kq

    seen = []
    real = hooks._sdpa
    monkeypatch.setattr(hooks, "_sdpa", lambda module, query, key, value, mask, **kw: (
        seen.append((module.layer_idx, query.detach().clone())), real(module, query, key, value, mask, **kw))[1])
    ids = seq[:, :40]
    spec = "k=q4_0:compute=llama.cpp;v=q4_0;keep_k_heads=1.0"
    seen.clear()
    with torch.no_grad(), hooks.compress(model, spec):
        model(input_ids=ids)
    _, q1 = next(s for s in seen if s[0] == 1)
    n_rep = model.config.num_attention_heads // model.config.num_key_value_heads
    # layer 1: kv head 0 keeps fp16 K (its queries pass as they are); heads 1, 2 get q8_0-rounded queries
    rounded = kq.get("q8_0").roundtrip(q1.float())
    assert torch.equal(q1[:, n_rep:], rounded[:, n_rep:].to(q1.dtype))
    assert not torch.equal(q1[:, :n_rep], rounded[:, :n_rep].to(q1.dtype))
    seen.clear()
    with torch.no_grad(), hooks.compress(model, "q4_0"):
        model(input_ids=ids)
    _, q_plain = next(s for s in seen if s[0] == 1)
    assert not torch.equal(q_plain[:, n_rep:], kq.get("q8_0").roundtrip(q_plain.float())[:, n_rep:].to(q_plain.dtype))


def test_cache_refuses_a_scheme_that_changes_the_query(model):
    with pytest.raises(ValueError, match="changes the query.*compute=llama.cpp"):
        CompressedCache("k=q4_0:compute=llama.cpp;v=q4_0", config=model.config)
