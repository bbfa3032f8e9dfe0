"""Hand-checkable facts about the schemes: bit counts worked out by hand, ggml byte-exactness against the
gguf reference, KIVI's streaming rule and layout, KVQuant calibration, and the errors on bad input."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GGML
from hypothesis import given, settings
from hypothesis import strategies as st

import kvlab.quant as kq
from kvlab.quant.catalog import format_schemes, schemes_table

GGML_NAMES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- bits per value, by hand ----------------------------------------------------------------------------


@pytest.mark.parametrize("T,D", [(1, 32), (77, 64), (4096, 128)])
def test_ggml_bits_per_value(T, D):
    # per 32-value block: 32 codes + fp16 scale (+ fp16 min for _1); q5 adds a 32-bit qh
    assert kq.get("q4_0").bits_per_value(T, D) == (32 * 4 + 16) / 32 == 4.5
    assert kq.get("q8_0").bits_per_value(T, D) == (32 * 8 + 16) / 32 == 8.5
    assert kq.get("q4_1").bits_per_value(T, D) == (32 * 4 + 16 + 16) / 32 == 5.0
    assert kq.get("q5_0").bits_per_value(T, D) == (32 * 5 + 16) / 32 == 5.5
    assert kq.get("q5_1").bits_per_value(T, D) == (32 * 5 + 16 + 16) / 32 == 6.0


def test_kivi2_bits_per_value_by_hand():
    T, D, bits, group, residual = 4096, 128, 2, 32, 128
    q = kq.get("kivi:bits=2,group=32,residual=128")
    # K: floor(4096 / 128) * 128 = 4096 tokens quantized, no fp16 window.
    #   codes 4096 * 128 * 2 = 1,048,576 bits; fp16 scale + min per channel per 32 tokens:
    #   (4096 / 32) * 128 * 32 = 524,288 bits; total 1,572,864 / (4096 * 128 = 524,288) = 3.0
    k_bits = 4096 * 128 * 2 + (4096 // 32) * 128 * 32
    assert k_bits / (T * D) == 3.0
    assert q.for_tensor("k").bits_per_value(T, D) == 3.0
    # V: 4096 - 128 = 3968 tokens quantized, the last 128 in fp16.
    #   codes 3968 * 128 * 2 = 1,015,808; scale + min per token per 32 channels: 3968 * 4 * 32 = 507,904;
    #   window 128 * 128 * 16 = 262,144; total 1,785,856 / 524,288 = 3.40625
    v_bits = 3968 * 128 * 2 + 3968 * (128 // 32) * 32 + 128 * 128 * 16
    assert v_bits == 1_785_856 and v_bits / (T * D) == 3.40625
    assert q.for_tensor("v").bits_per_value(T, D) == 3.40625
    del bits, group, residual


def test_fp8_and_signmag_bits_by_hand():
    assert kq.get("fp8").bits_per_value(100, 64) == 8.0
    assert kq.get("fp8:scale=head").bits_per_value(100, 64) == 8 + 32 / (100 * 64)  # one fp32 scale
    # signmag v1: 128 sign bits + one fp16 magnitude per token
    assert kq.get("signmag:v=1").bits_per_value(10, 128) == (128 + 16) / 128
    # v2: + 4 outliers of (fp16 value + uint8 index)
    assert kq.get("signmag:v=2").bits_per_value(10, 128) == (128 + 16 + 4 * 24) / 128
    # v3: 128 / 16 = 8 group magnitudes; v4: 2 bits per value and two magnitudes
    assert kq.get("signmag:v=3").bits_per_value(10, 128) == (128 + 8 * 16 + 4 * 24) / 128
    assert kq.get("signmag:v=4").bits_per_value(10, 128) == (256 + 2 * 16 + 4 * 24) / 128


def test_kvquant_bits_by_hand():
    # V, 2 bits, T = 100 with 4 sinks, D = 128: 96 token vectors of 128 values, ceil(0.01 * 128) = 2
    # outliers each with a uint8 index; codes 96 * 32 bytes; scale + zero 96 * 32 bits; outliers
    # 96 * 2 * (16 + 8); a 4-level fp16 codebook 4 * 16; sinks 4 * 128 * 16
    total = 96 * 32 * 8 + 96 * 32 + 96 * 2 * 24 + 4 * 16 + 4 * 128 * 16
    q = kq.get("kvquant:bits=2,tensor=v,sinks=4")
    assert q.bits_per_value(100, 128) == total / (100 * 128)
    # K, 3 bits, T = 1000: 128 channel vectors of 1000 values (375 bytes each), ceil(10) = 10 outliers
    # with int16 indices (1000 > 256), an 8-level codebook
    total = 128 * 375 * 8 + 128 * 32 + 128 * 10 * (16 + 16) + 8 * 16
    assert kq.get("kvquant:bits=3,tensor=k").bits_per_value(1000, 128) == total / (1000 * 128)


# ---- rounding -------------------------------------------------------------------------------------------


def test_truncation_costs_about_four_times_the_mse():
    # uniform rounding error: truncation ~ U(-s, s) has variance s^2/3, round to nearest ~ U(-s/2, s/2)
    # has s^2/12: a ratio of 4
    x = torch.randn(2, 4, 512, 128, generator=torch.Generator().manual_seed(0))
    mse = {r: ((kq.get(f"int:bits=8,rounding={r}").roundtrip(x) - x) ** 2).mean().item()
           for r in ("nearest", "truncate")}
    assert 3.5 <= mse["truncate"] / mse["nearest"] <= 4.5


def test_q8_0_rounds_half_away_from_zero():
    # amax 127 gives d = 1, id = 1: x * id lands exactly on the .5 ties
    block = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 127.0] + [0.0] * 26)
    packed = kq.get("q8_0").quantize(block.reshape(1, 1, 1, 32))
    codes = packed.tensors["codes"].view(torch.int8).flatten()[:6].tolist()
    assert codes == [1, 2, 3, -1, -3, 127]  # torch.round would give 0, 2, 2, -0, -2


# ---- ggml: byte-exact against gguf.quants ----------------------------------------------------------------


def _ggml_bytes(packed: kq.Packed, D: int) -> np.ndarray:
    """Reassemble ggml blocks (d [, m] [, qh], qs) from the split tensors: (rows, D/32 * block_bytes)."""
    nb = D // 32
    t = packed.tensors
    parts = [t["scale"].view(torch.uint8).reshape(-1, nb, 2)]
    if "min" in t:
        parts.append(t["min"].view(torch.uint8).reshape(-1, nb, 2))
    if "qh" in t:
        parts.append(t["qh"].reshape(-1, nb, 4))
    parts.append(t["codes"].reshape(-1, nb, t["codes"].shape[-1] // nb))
    return torch.cat(parts, -1).reshape(-1, nb * sum(p.shape[-1] for p in parts)).numpy()


def _check_against_gguf(name: str, x: torch.Tensor) -> None:
    q = kq.get(name)
    packed = q.quantize(x)
    ref = gguf.quants.quantize(x.numpy().reshape(-1, x.shape[-1]), getattr(GGML, name.upper()))
    assert np.array_equal(_ggml_bytes(packed, x.shape[-1]), ref)
    ref_values = gguf.quants.dequantize(ref, getattr(GGML, name.upper())).reshape(x.shape)
    assert np.array_equal(q.dequantize(packed).numpy(), ref_values)


@pytest.mark.parametrize("name", GGML_NAMES)
def test_ggml_matches_gguf_on_ties_and_edges(name):
    d = 0.25  # q4_0: max = -8d = 2 gives id = -4 exactly; (n + 0.5) * d lands on the truncation ties
    ties = torch.tensor([(n + 0.5) * d for n in range(-8, 8)] * 2)
    ties[0] = 2.0
    rows = [
        ties,
        torch.zeros(32),  # d = 0, id = 0
        torch.tensor([1.0, -1.0] * 16),  # + and - of the same |max|: the first one wins
        torch.tensor([-1.0, 1.0] * 16),
        torch.arange(32.0) - 15.5,  # q8_0: amax 16.5
        torch.full((32,), 3.0),  # constant block: d = 0 for the _1 formats
        torch.tensor([float(k) for k in range(-16, 16)]),  # amax 16 at the start, negative
        torch.linspace(-1e-3, 2e-3, 32),
    ]
    _check_against_gguf(name, torch.stack(rows).reshape(1, 2, 4, 32))


@pytest.mark.parametrize("name", GGML_NAMES)
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    D=st.sampled_from([32, 64, 128]),
    T=st.integers(1, 20),
    scale=st.sampled_from([1e-4, 1.0, 300.0]),
    grid=st.booleans(),
)
def test_ggml_matches_gguf(name, seed, D, T, scale, grid):
    x = torch.randn(2, 2, T, D, generator=torch.Generator().manual_seed(seed)) * scale
    if grid:  # values on a coarse grid: many exact ties and repeated maxima
        x = (x * 4 / scale).round() / 4
    _check_against_gguf(name, x)


def test_ggml_layout():
    # q4_0 byte j of a block holds q[j] (low nibble) and q[j + 16] (high nibble); q5's qh bit j is the
    # fifth bit of q[j]. The block [-8, -7, ..., 7] * 2 (max -8 -> d = 1, codes x + 8) is hand-checkable.
    block = torch.tensor([float(v) for v in range(-8, 8)] * 2).reshape(1, 1, 1, 32)
    p = kq.get("q4_0").quantize(block)
    assert p.tensors["codes"].shape == (1, 1, 1, 16)
    assert p.tensors["codes"].flatten().tolist() == [c | c << 4 for c in range(16)]
    assert p.tensors["scale"].item() == 1.0
    p5 = kq.get("q5_0").quantize(block * 2)  # max -16 -> d = 1, codes 2v + 16: fifth bit set for v >= 0
    assert p5.tensors["qh"].flatten().tolist() == [0x00, 0xFF, 0x00, 0xFF]
    assert kq.get("q4_1").quantize(block).tensors["min"].item() == -8.0


# ---- KIVI: streaming rule and layout ----------------------------------------------------------------------


@pytest.mark.parametrize("L,k_fp16,v_fp16", [
    (1, 1, 1), (100, 100, 100), (128, 0, 128), (129, 1, 128), (300, 44, 128), (4096, 0, 128),
])
def test_kivi_fp16_tokens(L, k_fp16, v_fp16):
    q = kq.get("kivi:bits=2,group=32,residual=128")
    for which, n in (("k", k_fp16), ("v", v_fp16)):
        keep = q.for_tensor(which).fp16_tokens(L)
        assert keep.shape == (L,) and int(keep.sum()) == n
        assert keep[L - n:].all() and not keep[: L - n].any()  # the window is the most recent tokens


def test_kivi_layout_and_window():
    B, H, T, D = 2, 3, 300, 64
    x = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(1))
    k, v = kq.get("kivi:bits=2").for_tensor("k"), kq.get("kivi:bits=2").for_tensor("v")
    pk, pv = k.quantize(x), v.quantize(x)
    assert {n: tuple(t.shape) for n, t in pk.tensors.items()} == {
        "codes": (B, H, D, 256 * 2 // 8), "scale": (B, H, 256 // 32, D), "min": (B, H, 256 // 32, D),
        "fp16": (B, H, 44, D)}
    assert {n: tuple(t.shape) for n, t in pv.tensors.items()} == {
        "codes": (B, H, 172, D * 2 // 8), "scale": (B, H, 172, D // 32), "min": (B, H, 172, D // 32),
        "fp16": (B, H, 128, D)}
    assert pk.tensors["scale"].dtype == pk.tensors["fp16"].dtype == torch.float16
    # the fp16 window reads back as the fp16 input
    assert torch.equal(k.dequantize(pk)[..., 256:, :], x[..., 256:, :].half().float())
    assert torch.equal(v.dequantize(pv)[..., 172:, :], x[..., 172:, :].half().float())


def test_kivi_k_codes_run_along_tokens():
    # channel 0 holds t % 4 over 128 tokens: per 32-token group min 0, max 3, scale 1, codes t % 4;
    # packed along tokens, 4 codes per byte: 0 | 1 << 2 | 2 << 4 | 3 << 6 = 228 in every byte
    x = torch.zeros(1, 1, 128, 2)
    x[0, 0, :, 0] = torch.arange(128.0) % 4
    p = kq.get("kivi:bits=2").quantize(x)
    assert p.tensors["codes"][0, 0, 0].tolist() == [228] * 32
    assert p.tensors["scale"][0, 0, :, 0].tolist() == [1.0] * 4
    assert p.tensors["min"][0, 0, :, 0].tolist() == [0.0] * 4


def test_kivi_runs_join_in_the_kernel_layout():
    x = torch.randn(1, 2, 96, 64, generator=torch.Generator().manual_seed(2))
    for which in ("k", "v"):
        q = kq.get("kivi:bits=2").for_tensor(which)
        joined = q.concat([q.quantize_all(x[..., :32, :]), q.quantize_all(x[..., 32:, :])])
        whole = q.quantize_all(x)
        for name, t in whole.tensors.items():
            assert torch.equal(joined.tensors[name], t), (which, name)
    with pytest.raises(ValueError, match="T=40"):
        kq.get("kivi").quantize_all(x[..., :40, :])


# ---- signmag, kvquant, fp8 --------------------------------------------------------------------------------


def test_signmag_v1_by_hand():
    row = torch.tensor([1.0, -3.0, 0.0, 2.0] * 8).reshape(1, 1, 1, 32)  # mean |x| = 6 / 4 = 1.5
    y = kq.get("signmag:v=1").roundtrip(row)
    assert y.flatten()[:4].tolist() == [1.5, -1.5, 1.5, 1.5]  # zero reads back as +magnitude


def test_signmag_outliers_are_exact():
    x = torch.randn(1, 1, 5, 64, generator=torch.Generator().manual_seed(3))
    x[..., 7] = 40.0
    for v in (2, 3, 4):
        y = kq.get(f"signmag:v={v}").roundtrip(x)
        assert torch.equal(y[..., 7], x[..., 7])


def test_kvquant_calibration():
    g = torch.Generator().manual_seed(4)
    calib = torch.randn(2, 2, 256, 64, generator=g)
    q = kq.get("kvquant:bits=3,tensor=v")
    assert not q.causal and not q.prerope and q.for_tensor("k").prerope
    cal = q.calibrate(calib)
    assert q.codebook is None and cal.codebook.shape == (8,) and cal.codebook.dtype == torch.float16
    assert cal.spec == q.spec and "codebook" not in cal.spec
    assert cal.causal and cal.for_tensor("v") is cal  # the same tensor keeps its codebook
    assert cal.for_tensor("k").codebook is None  # a codebook fits one tensor
    x = torch.randn(1, 2, 64, 64, generator=g)
    p = cal.quantize(x)
    assert torch.equal(p.tensors["codebook"][0, 0], cal.codebook)
    # calibrated on the same distribution: close to the self-fit error
    mse_cal = ((cal.dequantize(p) - x) ** 2).mean()
    mse_self = ((q.roundtrip(x) - x) ** 2).mean()
    assert mse_cal < 1.5 * mse_self


def test_kvquant_outliers_and_sinks_are_fp16():
    x = torch.randn(1, 1, 50, 64, generator=torch.Generator().manual_seed(5))
    x[0, 0, 10, 3] = 100.0
    q = kq.get("kvquant:bits=2,tensor=v,sinks=4")
    y = q.roundtrip(x)
    assert q.fp16_tokens(50).tolist() == [True] * 4 + [False] * 46
    assert torch.equal(y[..., :4, :], x[..., :4, :].half().float())
    assert y[0, 0, 10, 3] == 100.0


def test_fp8_is_vllm_style():
    x = torch.randn(1, 2, 16, 64, generator=torch.Generator().manual_seed(6)) * 1000
    p = kq.get("fp8:scale=head").quantize(x)
    scale = x.abs().amax(dim=(-2, -1), keepdim=True) / 448
    assert torch.equal(p.tensors["scale"], scale)
    assert torch.equal(p.tensors["codes"], (x / scale).to(torch.float8_e4m3fn).view(torch.uint8))
    assert kq.get("fp8:scale=tensor").causal is False and kq.get("fp8").causal is True


# ---- bad input ------------------------------------------------------------------------------------------


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("spec", ["int:bits=4", "kivi:bits=2,residual=32", "q4_0", "signmag:v=4", "kvquant", "fp8"])
def test_bad_tensors(spec):
    q = kq.get(spec)
    x = _x(1, 2, 40, 64)
    x[0, 1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        q.quantize(x)
    x[0, 1, 3, 5] = float("inf")
    with pytest.raises(ValueError, match="1 Inf"):
        q.quantize(x)
    with pytest.raises(ValueError, match=r"rank 4.*\(40, 64\)"):
        q.quantize(_x(40, 64))
    with pytest.raises(ValueError, match=r"empty.*\(1, 2, 0, 64\)"):
        q.quantize(torch.zeros(1, 2, 0, 64))
    with pytest.raises(ValueError, match="torch.int64"):
        q.quantize(torch.zeros(1, 2, 4, 64, dtype=torch.long))


@pytest.mark.parametrize("spec,D,match", [
    ("q4_0", 48, "D=48.*multiple of the block size 32"),
    ("q8_0", 100, "D=100"),
    ("kivi:tensor=v,group=32", 48, "group=32.*D=48"),
    ("signmag:v=3,group=16", 40, "group=16.*D=40"),
    ("signmag:v=2,outliers=32", 32, "outliers=32.*D=32"),
    ("int:bits=4,group=32", 48, "group=32.*D=48"),
])
def test_head_dim_not_divisible(spec, D, match):
    q = kq.get(spec)
    with pytest.raises(ValueError, match=match):
        q.quantize(_x(1, 1, 8, D))
    with pytest.raises(ValueError, match=match):
        q.bits_per_value(8, D)


@pytest.mark.parametrize("spec,match", [
    ("kivi:bits=3", "bits=3.*allowed: 2, 4"),
    ("kivi:residual=100", "residual=100.*multiple of group=32"),
    ("kivi:tensor=q", "tensor='q'.*allowed: k, v"),
    ("int:bits=7", "bits=7"),
    ("kvquant:bits=5", "bits=5.*allowed: 2, 3, 4"),
    ("kvquant:outlier_frac=1.5", "outlier_frac=1.5"),
    ("kvquant:sinks=-1", "sinks=-1"),
    ("signmag:v=5", "v=5.*allowed: 1, 2, 3, 4"),
    ("signmag:outliers=-2", "outliers=-2"),
    ("fp8:fmt=e3m4", "fmt='e3m4'.*allowed: e4m3, e5m2"),
    ("fp8:scale=channel", "scale='channel'"),
    ("q4_0:rotate=random", "rotate='random'.*allowed: none, hadamard"),
    ("q4_0:bits=4", "unknown key.*bits"),
    ("kivi:foo=1", "unknown key.*foo"),
    ("kvquant:codebook=1", "unknown key.*codebook"),  # fitted state is not a spec key
    ("kivi:bits=two", "bits='two' is not an integer"),
    ("q9_9", "unknown scheme 'q9_9'"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        kq.get(spec)


@pytest.mark.parametrize("name", kq.available())
@pytest.mark.parametrize("which", ["k", "v"])
def test_all_zero_gives_zeros(name, which):
    if name == "kvquantc":
        pytest.skip("needs a calibration of the tensor's geometry, and its K range is the calibration's, which need "
                    "not hold 0 exactly (V: tests/quant/test_kvquantc.py)")
    q = kq.get(name).for_tensor(which)
    for x in (torch.zeros(2, 2, 150, 64), torch.zeros(1, 1, 3, 32, dtype=torch.float16)):
        y = q.roundtrip(x)
        assert not y.isnan().any() and torch.equal(y, torch.zeros_like(x))


@pytest.mark.parametrize("name", kq.available())
def test_spec_round_trips(name):
    q = kq.get(name)
    assert kq.get(q.spec) == q and kq.get(q.spec).spec == q.spec


# ---- catalog -------------------------------------------------------------------------------------------


def test_catalog():
    rows = schemes_table()
    assert [r["name"] for r in rows] == kq.available()
    by = {r["name"]: r for r in rows}
    assert by["q4_0"]["bits"]["D=128,T=4096"] == 4.5
    assert by["kivi"]["bits_k"]["D=128,T=4096"] == 3.0
    assert by["kivi"]["bits_v"]["D=128,T=4096"] == 3.40625
    assert by["kivi"]["bits"]["D=128,T=4096"] == (3.0 + 3.40625) / 2 and by["kivi"]["kv_differ"]
    params = {p["name"]: p for p in by["kivi"]["params"]}
    assert params["bits"] == {"name": "bits", "default": 2, "allowed": [2, 4]}
    assert params["rotate"]["allowed"] == ["none", "hadamard"]
    assert by["kvquant"]["prerope"] == {"k": True, "v": False} and not by["kvquant"]["causal"]
    assert by["fp8"]["summary"].startswith("FP8")
    json.dumps(rows)  # the --json output
    text = format_schemes(rows)
    for name in kq.available():
        assert name in text
    assert "kivi [K]" in text and "kivi [V]" in text and "3.4062" in text
