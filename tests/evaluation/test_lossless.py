"""Lossless codecs (kvlab.lossless), the fpmant scheme, and the pricing of mixed lossless/lossy policies.

Synthetic tensors throughout, plus a dump of a tiny random Llama (no weights to load) for the tables and
the in-model policy evaluation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvlab.evaluation.lossless as L
import kvlab.quant as kq
from kvlab.evaluation.dump import dump
from kvlab.quant.fpmant import max_value

DTYPES = (torch.float16, torch.bfloat16)


def edge_values(dtype: torch.dtype) -> torch.Tensor:
    """+-0, the smallest and largest subnormal, the smallest normal, 1, the largest finite value."""
    fi = torch.finfo(dtype)
    v = torch.tensor([0.0, fi.smallest_normal * fi.eps, fi.smallest_normal * (1 - fi.eps), fi.smallest_normal,
                      1.0, fi.max], dtype=torch.float64)
    return torch.cat([v, -v]).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


@st.composite
def tensors16(draw):
    """fp16 / bf16 tensors of rank 0..4 (small dims, some 1 or 0), random finite bit patterns mixed with
    smooth-along-tokens values and injected edge values."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=4)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = int(np.prod(shape, dtype=np.int64))
    if draw(st.booleans()):  # arbitrary bit patterns, NaN/Inf replaced by 0
        x = torch.randint(-(2**15), 2**15, (n,), generator=g, dtype=torch.int32).to(torch.int16).view(dtype)
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    else:  # K/V-like: a random walk along the token dim
        x = (torch.randn(n, generator=g).cumsum(0) * draw(st.sampled_from([1e-4, 1.0, 100.0]))).to(dtype)
    if n:
        edges = edge_values(dtype)
        for i, e in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, len(edges) - 1)), max_size=6)):
            x[i] = edges[e]
    return x.reshape(shape)


# ---- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", list(L.CODECS))
@settings(max_examples=30, deadline=None)
@given(x=tensors16())
def test_round_trip_is_bit_exact(codec, x):
    blob = L.encode(x, codec)
    assert same_bits(L.decode(blob), x)
    assert L.encode(x.clone(), codec) == blob  # deterministic


@pytest.mark.parametrize("codec", list(L.CODECS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_edge_values_round_trip(codec, dtype):
    edges = edge_values(dtype)
    x = edges[torch.randint(0, len(edges), (2, 3, 40, 16), generator=torch.Generator().manual_seed(1))]
    y = L.decode(L.encode(x, codec))
    assert same_bits(y, x)
    assert (y.view(torch.int16) == torch.tensor(-32768, dtype=torch.int16)).any()  # -0.0 kept as -0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="float16 / bfloat16.*float32"):
        L.encode(torch.zeros(2, 3), "zstd")
    with pytest.raises(ValueError, match="unknown codec 'gzip'; allowed: store, zstd, bytes\\+zstd"):
        L.encode(torch.zeros(2, 3, dtype=torch.float16), "gzip")
    with pytest.raises(ValueError, match="split='nibbles' is not allowed; allowed: none, bytes, fields"):
        L.Codec(split="nibbles")
    with pytest.raises(ValueError, match="level=99"):
        L.encode(torch.zeros(2, 3, dtype=torch.float16), "zstd", level=99)


# ---- corruption ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blob_and_tensor():
    x = (torch.randn(1, 2, 64, 32, generator=torch.Generator().manual_seed(0)) * 3).half()
    return L.encode(x, "xor+bytes+zstd"), x


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_flipped_byte_is_rejected(blob_and_tensor, data):
    blob, _ = blob_and_tensor
    i = data.draw(st.integers(0, len(blob) - 1), label="byte")
    bad = bytearray(blob)
    bad[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(ValueError, match="not a kvlab lossless blob|corrupted|version"):
        L.decode(bytes(bad))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_truncated_or_extended_blob_is_rejected(blob_and_tensor, data):
    blob, _ = blob_and_tensor
    n = data.draw(st.integers(0, len(blob) - 1), label="keep")
    with pytest.raises(ValueError, match="corrupted kvlab lossless blob: .*truncated|not a kvlab"):
        L.decode(blob[:n])
    with pytest.raises(ValueError, match="header describes"):
        L.decode(blob + b"\0")


def test_clear_errors_for_foreign_data(blob_and_tensor):
    blob, x = blob_and_tensor
    with pytest.raises(ValueError, match="not a kvlab lossless blob: magic b'PK"):
        L.decode(b"PK\x03\x04" + blob[4:])
    with pytest.raises(ValueError, match="version 9 is not supported"):
        L.decode(blob[:4] + b"\x09" + blob[5:])
    with pytest.raises(ValueError, match="expected bytes"):
        L.decode(x)
    bad = bytearray(blob)
    bad[-20] ^= 0xFF  # inside the last coded plane
    with pytest.raises(ValueError, match="crc32 mismatch"):
        L.decode(bytes(bad))
    assert same_bits(L.decode(bytearray(blob)), x)  # bytes-like is fine


# ---- entropy and byte accounting ----------------------------------------------------------------
def test_entropy_of_constant_and_uniform_planes():
    assert L.entropy_bits(np.full(1000, 7, dtype=np.uint8)) == 0.0
    assert L.entropy_bits(np.tile(np.arange(256, dtype=np.uint8), 10)) == pytest.approx(8.0, abs=1e-12)
    rng = np.random.default_rng(0)
    assert L.entropy_bits(rng.integers(0, 256, 1_000_000, dtype=np.uint8)) == pytest.approx(8.0, abs=1e-3)
    assert L.entropy_bits(np.array([0, 1] * 50, dtype=np.uint8)) == pytest.approx(1.0)


def test_planes_and_delta():
    x = torch.full((1, 2, 5, 4), 1.5, dtype=torch.float16)  # constant along tokens
    for codec in ("xor+bytes+zstd", "sub+bytes+zstd"):
        _, _, hi = L.planes(x, codec)[0]
        hi = hi.reshape(1, 2, 5, 4)
        assert (hi[:, :, 0] == 0x3E).all() and (hi[:, :, 1:] == 0).all()  # 1.5 = 0x3E00
    names = [(n, b) for n, b, _ in L.planes(x, "fields+zstd")]
    assert names == [("sign_exp", 6), ("mant_hi", 2), ("mant_lo", 8)]
    names = [(n, b) for n, b, _ in L.planes(x.bfloat16(), "fields+zstd")]
    assert names == [("sign_exp_hi", 1), ("sign_exp_lo", 8), ("mant", 7)]
    assert L.entropy_bound_bytes(x, "zstd") == 0.0  # one 16-bit symbol: no information


def test_store_codec_counts_its_header():
    x = torch.randn(1, 3, 16, 8).half()
    blob = L.encode(x, "store")
    header = 12 + 4 * x.dim() + 4 * 1 + 4 + 4  # fixed fields, shape, one plane length, two crc32s
    assert len(blob) == x.numel() * 2 + header


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_dump(tiny_model, tmp_path_factory):
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    return dump(tiny_model, tokens, tmp_path_factory.mktemp("dump"), which=("k", "v"), corpus="random")


def test_ratio_table_counts_every_byte(tiny_dump):
    from kvlab.evaluation.dump import load_dump

    table = L.ratio_table(tiny_dump)
    assert len(table) == 3 * 3 * len(L.CODECS)
    assert set(table["tensor"]) == {"k_pre", "k_post", "v"}
    _, held = load_dump(tiny_dump)
    for r in table.itertuples():
        t = held[r.layer][r.tensor]
        assert r.bytes_in == t.numel() * 2
        assert r.bytes_out == len(L.encode(t, r.codec))
        assert r.ratio == r.bytes_in / r.bytes_out
        assert r.entropy_ratio == pytest.approx(r.bytes_in / L.entropy_bound_bytes(t, r.codec))
    assert (table.loc[table.codec == "store", "ratio"] < 1).all()  # the header is counted
    s = L.summarize(table)
    row = s[(s.tensor == "v") & (s.codec == "zstd")].iloc[0]
    v = table[(table.tensor == "v") & (table.codec == "zstd")]
    assert row.ratio == pytest.approx(v.bytes_in.sum() / v.bytes_out.sum())
    planes = L.plane_table(tiny_dump, layers=[1], codecs=["bytes+zstd"])
    assert list(planes["plane"]) == ["hi", "lo"] * 3 and (planes["entropy_bits"] <= 8).all()
    with pytest.raises(ValueError, match="no 'q_pre'"):
        L.ratio_table(tiny_dump, tensors=("q_pre",))


# ---- fpmant -------------------------------------------------------------------------------------
def _reference_round(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Every finite fp16 value and its nearest finite value with an m-bit mantissa (ties: even code),
    found by search over the representable set: independent of the bit trick."""
    pat = np.arange(0x7C00, dtype=np.uint16)  # non-negative finite patterns
    vals = pat.view(np.float16).astype(np.float64)
    shift = 10 - m
    rep = pat[pat % (1 << shift) == 0]
    rv = rep.view(np.float16).astype(np.float64)
    j = np.clip(np.searchsorted(rv, vals), 1, len(rv) - 1)
    lo, hi = rv[j - 1], rv[j]
    pick_hi = (hi - vals < vals - lo) | ((hi - vals == vals - lo) & ((rep[j] >> shift) % 2 == 0))
    out = np.where(vals >= rv[-1], rv[-1], np.where(pick_hi, hi, lo))
    return vals, out


@pytest.mark.parametrize("m", range(10))
def test_fpmant_is_round_to_nearest_even_on_every_fp16(m):
    vals, ref = _reference_round(m)
    x = torch.from_numpy(np.concatenate([vals, -vals])).float().reshape(1, 1, -1, 64)
    y = kq.get(f"fpmant:mantissa={m}").roundtrip(x)
    assert torch.equal(y.double().flatten(), torch.from_numpy(np.concatenate([ref, -ref])))


@pytest.mark.parametrize("m", range(10))
def test_fpmant_bits_are_packed_codes(m):
    q = kq.get(f"fpmant:mantissa={m}")
    assert q.bits_per_value(100, 64) == 6 + m
    x = torch.randn(2, 3, 100, 64)
    assert q.quantize(x).nbytes() * 8 == (6 + m) * x.numel()
    assert q.bits_per_value(5, 3) * 15 >= (6 + m) * 15  # row padding to whole bytes is counted


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 9), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-6, 1e-2, 1.0, 300.0, 1e4]))
def test_fpmant_error_within_bound(m, seed, scale):
    x = (torch.randn(1, 2, 33, 32, generator=torch.Generator().manual_seed(seed)) * scale).clamp(-6e4, 6e4)
    x[0, 0, 0, :3] = torch.tensor([0.0, 65504.0, -65504.0])  # zero, fp16 max: rounds up past the format, saturates
    q = kq.get(f"fpmant:mantissa={m}")
    y = q.roundtrip(x)
    assert torch.isfinite(y).all()
    assert ((x - y).abs() <= q.error_bound(x)).all()
    assert y[0, 0, 0, 1] == max_value(m) == -y[0, 0, 0, 2]
    x[0, 0, 0, 2] = 1e6  # beyond what an fp16 deployment holds: refused, not clipped
    with pytest.raises(ValueError, match="beyond the range"):
        q.roundtrip(x)


def test_fpmant_error_shrinks_as_mantissa_grows():
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).half().float()  # no cast error
    mse = [((kq.get(f"fpmant:mantissa={m}").roundtrip(x) - x) ** 2).mean().item() for m in range(10)]
    assert all(b < a / 3 for a, b in zip(mse, mse[1:])), mse  # ~4x per bit


@pytest.mark.parametrize("bad", ["10", "-1", "4.5"])
def test_fpmant_validates_mantissa(bad):
    with pytest.raises(ValueError, match=f"mantissa={bad}|mantissa='{bad}'"):
        kq.get(f"fpmant:mantissa={bad}")
    with pytest.raises(ValueError, match="allowed: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"):
        kq.get("fpmant:mantissa=10")


# ---- mixed policies -----------------------------------------------------------------------------
def test_mixed_bits_per_value():
    ratios = {(layer, w): 2.0 for layer in range(4) for w in "kv"}
    assert L.mixed_bits_per_value("fp16", ratios, 4, 2, 128, 64) == 8.0
    assert L.mixed_ratio("fp16", ratios, 4, 2, 128, 64) == 2.0
    assert L.mixed_bits_per_value("fpmant:mantissa=4", {}, 4, 2, 128, 64) == 10.0
    # one lossless layer of four, K at 4x and V at 2x, the rest at 10 bits
    r = {(0, "k"): 4.0, (0, "v"): 2.0}
    bpv = L.mixed_bits_per_value("kv=fpmant:mantissa=4;keep_first=1;keep=fp16", r, 4, 2, 128, 64)
    assert bpv == pytest.approx((4 + 8 + 2 * 3 * 10) / 8)
    bpv = L.mixed_bits_per_value("kv=int:bits=8;keep_first=1;keep=fp16", r, 4, 2, 128, 64)
    assert bpv == pytest.approx((4 + 8 + 2 * 3 * (8 + 16 / 64)) / 8)
    with pytest.raises(ValueError, match="no measured lossless ratio for layer 1 K"):
        L.mixed_bits_per_value("kv=fpmant:mantissa=4;keep_first=2;keep=fp16", r, 4, 2, 128, 64)
    assert L.mixed_bits_per_value("fp16", r, 2, 2, 128, 64, unmeasured=1.0) == pytest.approx((4 + 8 + 16 + 16) / 4)
    with pytest.raises(ValueError, match="recency"):
        L.mixed_bits_per_value("kv=fp16;recent=8;old=fpmant:mantissa=2", r, 4, 2, 128, 64)


def test_layer_ratios_best_and_fixed(tiny_dump):
    table = L.ratio_table(tiny_dump, codecs=["zstd", "bytes+zstd"])
    best = L.layer_ratios(table)
    fixed = L.layer_ratios(table, "zstd")
    assert set(best) == {(la, w) for la in range(3) for w in "kv"}
    assert all(best[k] >= fixed[k] for k in best)
    row = table[(table.layer == 1) & (table.tensor == "k_post") & (table.codec == "zstd")].iloc[0]
    assert fixed[(1, "k")] == row.ratio


def test_evaluate_policies_in_model(tiny_model, tiny_dump):
    ratios = L.layer_ratios(L.ratio_table(tiny_dump, codecs=["bytes+zstd"]))
    windows = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(1))
    policies = ["kv=fpmant:mantissa=4;keep_first=1;keep=fp16", "fpmant:mantissa=0"]
    res = L.evaluate_policies(tiny_model, windows, policies, ratios)
    assert list(res["policy"]) == ["fp16"] + policies
    base = res.iloc[0]
    assert base.delta_ppl == 0 and base.ratio == pytest.approx(L.mixed_ratio("fp16", ratios, 3, 2, 16, 16))
    assert res.iloc[1].bits_per_value < base.bits_per_value or base.ratio < 1.6
    assert (res.ci_lo <= res.delta_ppl + 1e-12).all() and (res.delta_ppl <= res.ci_hi + 1e-12).all()
    assert res.iloc[2].ppl != base.ppl  # a 6-bit float does change the model


def test_notebook_06_report_and_figures(tiny_model, tiny_dump):
    """kvlab.lossless_report and the 06 figures on real tables of the tiny dump: the numbers in the text and
    the metrics are those of the tables."""
    import matplotlib.pyplot as plt

    import kvlab.study.lossless_report as LR
    from kvlab.study import plots

    table = L.ratio_table(tiny_dump)
    summary, summary_deep = L.summarize(table), L.summarize(table[table.layer > 0])
    planes = L.plane_table(tiny_dump, codecs=["bytes+zstd", "fields+zstd"])
    best = LR.best_codecs(summary)
    for t in LR.TENSORS:
        assert best[t].ratio == summary[summary.tensor == t].ratio.max()
    text = LR.findings_markdown(table, summary, summary_deep, planes)
    zstd_v = summary[(summary.tensor == "v") & (summary.codec == "zstd")].ratio.item()
    assert f"V {zstd_v:.3f}x" in text and f"`{best['k_post'].codec}` {best['k_post'].ratio:.3f}x" in text
    assert "of 3 layers" in text  # sub+bytes+zstd vs bytes+zstd counted over the 3 dumped layers

    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    res = L.evaluate_policies(tiny_model, windows, ["fpmant:mantissa=4"], L.layer_ratios(table))
    mixed = LR.mixed_markdown(res, 2, 16, 16)
    assert f"`fpmant:mantissa=4`: {res.ratio[1]:.3f}x" in mixed and f"perplexity {res.ppl[0]:.4f}" in mixed
    m = LR.metrics(table, summary, summary_deep, res)
    assert m["layers"] == [0, 1, 2] and m["fp16_ppl"] == res.ppl[0]
    assert m["ratio"]["v"]["zstd"] == zstd_v and m["best_codec"]["v"]["codec"] == best["v"].codec
    assert m["mixed"]["fpmant:mantissa=4"]["delta_ppl"] == res.delta_ppl[1]

    figs = [plots.lossless_by_layer(table, ["zstd", "bytes+zstd"]),
            plots.lossless_by_codec(summary, [c for c in L.CODECS if c != "store"]),
            plots.mixed_ratio_vs_ppl(res, "t")]
    assert [len(f.axes) for f in figs] == [6, 1, 1]  # per-layer: each tensor's panel split (layer 0 on top)
    assert figs[0].axes[-1].get_yscale() == "linear" and len(figs[2].axes[0].texts) == 2
    for f in figs:
        plt.close(f)


def test_mixed_policies_price_a_sweep_summary_like_evaluate_policies(tiny_dump):
    """06 takes the perplexity of its mixed policies from the sweep engine's summary; the storage is priced as
    evaluate_policies prices it, and the CI sentence follows the number of windows."""
    import pandas as pd

    import kvlab.study.lossless_report as LR

    ratios = L.layer_ratios(L.ratio_table(tiny_dump))
    policies = ["kv=fpmant:mantissa=4;keep_first=1;keep=fp16", "fpmant:mantissa=4"]
    summary = pd.DataFrame({"config": ["fpmant:mantissa=4", "fp16", policies[0]], "ppl": [10.1, 10.0, 10.05],
                            "delta_ppl": [0.1, 0.0, 0.05], "ci_lo": [0.05, 0.0, -0.01], "ci_hi": [0.15, 0.0, 0.1],
                            "windows": [24, 24, 24]})
    res = LR.mixed_policies(summary, policies, ratios, 3, 2, 16, 16)
    assert list(res.policy) == ["fp16", *policies] and res.windows.tolist() == [24] * 3
    for r in res.itertuples():
        assert r.bits_per_value == pytest.approx(L.mixed_bits_per_value(r.policy, ratios, 3, 2, 16, 16))
        assert r.ratio == pytest.approx(16 / r.bits_per_value)
    assert res.iloc[2].delta_ppl == 0.1 and res.iloc[1].ci_lo == -0.01
    with pytest.raises(ValueError, match=r"\['int:bits=8'\] have no row"):
        LR.mixed_policies(summary, ["int:bits=8"], ratios, 3, 2, 16, 16)
    assert "paired bootstraps over 24 windows" in LR.mixed_markdown(res, 24, 16, 16)
    assert "under-covers" in LR.mixed_markdown(res, 2, 16, 16)
