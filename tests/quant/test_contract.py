"""One contract for every registered quantizer (the shared matrix of kvpress' tests/default_presses.py).

Each case is a spec and the tensor it is used for (K or V, through ``for_tensor``), optionally calibrated.
Tensors come from hypothesis: shapes (B, H, T, D) with D in {32, 64, 128} and T not tied to any group,
Gaussian values at three scales, some with K-like outlier channels, zeroed tokens and channels, and a few
injected values (0 or |v| in [1e-3, 8] times the scale), in float32, float16 and bfloat16.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kvlab.quant as kq

SPECS = [
    "none",
    "fp16",
    "bf16",
    "int:bits=8",
    "int:bits=4,axis=channel,group=32,sym=false",
    "int:bits=2,group=32,sym=false",
    "int:bits=3,group=global",
    "int:bits=8,rounding=truncate",
    "int:bits=4,rotate=hadamard",
    "fp8",
    "fp8:fmt=e5m2,scale=tensor",
    "fp8:fmt=e4m3,scale=head",
    "fpmant:mantissa=0",
    "fpmant:mantissa=4",
    "fpmant:mantissa=9",
    "kivi:bits=2",
    "kivi:bits=2,residual=32",
    "kivi:bits=4,group=16,residual=32",
    "q8_0",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q4_0:rotate=hadamard",
    "q4_0:order=interleaved",
    "q4_1:order=interleaved,rotate=hadamard",
    "q5_0:compute=llama.cpp",
    "signmag:v=1",
    "signmag:v=2",
    "signmag:v=3",
    "signmag:v=4",
    "signmag:v=4,outliers=0",
    "kvquant:bits=2",
    "kvquant:bits=3,sinks=4",
    "kvquant:bits=4,outlier_frac=0.05",
    "kvquant:bits=2,rotate=hadamard",
    "kvquantc:bits=3",  # calibrated by make() on tensors of the drawn geometry
    "kvquantc:bits=2,sinks=0,outlier_frac=0.05",
    "turboquant:bits=1",
    "turboquant:bits=3",
    "turboquant:bits=2,qjl=true",
]
CALIBRATED = ["kvquant:bits=3", "kvquant:bits=2,sinks=2"]


def _has_tensor_field(spec: str) -> bool:
    return "tensor" in {f.name for f in dataclasses.fields(kq.get(spec))}


# (spec, which, calibrated): K and V variants only where the scheme treats them differently
CASES = [(s, w, False) for s in SPECS for w in (("k", "v") if _has_tensor_field(s) else ("k",))]
CASES += [(s, w, True) for s in CALIBRATED for w in ("k", "v")]
IDS = [f"{s}[{w}{',calib' if c else ''}]" for s, w, c in CASES]

# requantizing a dequantized tensor gives the same bytes (codes and metadata) for the integer-code schemes;
# not for truncation (q*s/s can land just below q in float32), nor codebook / sign schemes whose ranges move
REQUANT = [
    c for c in CASES
    if c[0].split(":")[0] in {"int", "kivi", "fp8", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"}
    and "truncate" not in c[0]
]

FAMILIES = {  # error must not grow as bits grow, in this order
    "int": [f"int:bits={b}" for b in (2, 3, 4, 5, 6, 8)],
    "int-asym-channel": [f"int:bits={b},axis=channel,group=32,sym=false" for b in (2, 4, 8)],
    "kivi": ["kivi:bits=2,residual=32", "kivi:bits=4,residual=32"],
    "ggml_0": ["q4_0", "q5_0", "q8_0"],
    "ggml_1": ["q4_1", "q5_1"],
    "kvquant": ["kvquant:bits=2", "kvquant:bits=3", "kvquant:bits=4"],
    "turboquant": [f"turboquant:bits={b}" for b in (1, 2, 3, 4)],
}

_CALIB_X = torch.randn(1, 2, 96, 64, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make(spec: str, which: str, calibrated: bool, x: torch.Tensor | None = None) -> kq.Quantizer:
    q = kq.get(spec).for_tensor(which)
    if q.name == "kvquantc":  # an offline calibration of one layer with x's kv heads and head_dim
        from kvlab.quant.kvquantc import fit_calibration

        H, D = (2, 64) if x is None else x.shape[1:2] + x.shape[3:]
        g = torch.Generator().manual_seed(H * 1000 + D)
        k = torch.randn(H, 96, D, generator=g) * (torch.rand(H, 1, D, generator=g) * 3 + 0.1) + torch.randn(H, 1, D, generator=g)
        cal = fit_calibration([k], [torch.randn(H, 96, D, generator=g)], q.bits, q.outlier_frac)
        return q.with_calibration(cal).for_layer(0)
    return q.calibrate(_CALIB_X) if calibrated else q


def test_cases_cover_every_registered_scheme():
    names = {s.split(":")[0] for s in SPECS}
    assert names >= set(kq.available()), set(kq.available()) - names
    assert {f.split(":")[0] for fam in FAMILIES.values() for f in fam} >= {"int", "kivi", "q4_0", "kvquant"}


@st.composite
def kv_tensors(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16), inject=True, scales=(1e-3, 1.0, 20.0),
               smallest=1e-3):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    T = draw(st.integers(1, 140))
    D = draw(st.sampled_from([32, 64, 128]))
    scale = draw(st.sampled_from(scales))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(B, H, T, D, generator=g) * scale
    if draw(st.booleans()):  # K-like: a few channels with large offsets
        x = x + (torch.randn(D, generator=g) * (torch.rand(D, generator=g) < 0.1)) * 5 * scale
    for t in draw(st.lists(st.integers(0, T - 1), max_size=2)):
        x[..., t, :] = 0
    for c in draw(st.lists(st.integers(0, D - 1), max_size=2)):
        x[..., c] = 0
    if inject:
        magnitude = st.one_of(st.just(0.0), st.floats(smallest, 8.0), st.sampled_from([0.5, 1.5, 7.5, 8.0]))
        for i, v, neg in draw(st.lists(st.tuples(st.integers(0, x.numel() - 1), magnitude, st.booleans()),
                                       max_size=4)):
            x.view(-1)[i] = (-v if neg else v) * scale
    if draw(st.integers(0, 9)) == 0:
        x.zero_()
    return x.to(draw(st.sampled_from(dtypes)))


def _output_tol(y: torch.Tensor) -> torch.Tensor:
    """Rounding of the dequantized value to the caller's dtype (not the quantizer's error)."""
    fi = torch.finfo(y.dtype)
    return y.float().abs() * fi.eps / 2 + fi.smallest_normal * fi.eps + 1e-30


def _held_bytes(packed: kq.Packed) -> int:
    return sum(t.numel() * t.element_size() for t in packed.tensors.values())


@pytest.mark.parametrize("spec,which,calibrated", CASES, ids=IDS)
@settings(max_examples=25, deadline=None)
@given(x=kv_tensors())
def test_contract(spec, which, calibrated, x):
    q = make(spec, which, calibrated, x)
    x_before = x.clone()
    packed = q.quantize(x)
    y = q.dequantize(packed)
    assert torch.equal(x, x_before)  # the input is not modified

    # shape, dtype, finite
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()

    # |x - x_hat| <= error_bound, in the basis the scheme quantizes in
    xf = x.float()
    xr, yr = q.rotated(xf), q.rotated(y.float())  # the scheme's basis: rotated, channels reordered where it does
    if q.rotate == "hadamard":
        row = lambda t: t.float().norm(dim=-1, keepdim=True)  # noqa: E731
        # output rounding r spreads over the rotated row: |(H r)_i| <= ||r||_2
        tol = torch.finfo(y.dtype).eps / 2 * row(y) + 1e-5 * (row(xf) + row(y)) + 1e-30
    else:  # a reordering at most: the output rounding of each value moves with it
        tol = q.rotated(_output_tol(y))
    err, bound = (xr - yr).abs(), q.error_bound(xr)
    assert bound.shape == x.shape
    bad = err > bound + tol
    assert not bad.any(), f"{int(bad.sum())} values over the bound; worst excess {(err - bound - tol).max():.3g}"

    # bytes: what is held, and what bits_per_value promises
    B, H, T, D = x.shape
    assert packed.nbytes() == q.nbytes(packed) == _held_bytes(packed)
    if not (spec == "none" and x.dtype != torch.float32):  # 'none' keeps the caller's dtype, counted as fp32
        slice_bits = q.bits_per_value(T, D) * T * D  # a whole number, up to float division
        assert abs(slice_bits - round(slice_bits)) < 1e-6
        assert packed.nbytes() * 8 == round(slice_bits) * B * H

    # deterministic
    again = q.quantize(x.clone())
    assert again.tensors.keys() == packed.tensors.keys()
    for name, t in packed.tensors.items():
        assert torch.equal(again.tensors[name], t), name

    # tokens declared fp16 read back as their fp16 value (rotation aside)
    keep = q.fp16_tokens(T)
    assert keep.shape == (T,) and keep.dtype == torch.bool
    if keep.any() and q.rotate == "none" and x.dtype != torch.bfloat16:
        assert torch.equal(y[..., keep, :].half(), x[..., keep, :].half())


@pytest.mark.parametrize("spec,which,calibrated", REQUANT, ids=[f"{s}[{w}]" for s, w, _ in REQUANT])
@settings(max_examples=20, deadline=None)
@given(x=kv_tensors(dtypes=(torch.float32,), scales=(1.0, 20.0), smallest=0.25))
def test_requantize_gives_same_bytes(spec, which, calibrated, x):
    q = make(spec, which, calibrated)
    first = q.quantize(x)
    y = q.dequantize(first)
    # Out of scope, both only for groups of nearly equal values (the data keep every block well away):
    # an fp16 scale in the subnormal range is too coarse to be found again from x_hat; and a step finer
    # than the fp16 resolution of the group minimum lets the minimum's code be nonzero, so x_hat's
    # minimum rounds to another fp16 minimum.
    fi = torch.finfo(torch.float16)
    scale, lo = first.tensors.get("scale"), first.tensors.get("min")
    if scale is not None and scale.dtype == torch.float16:
        assume(not ((scale != 0) & (scale.abs() < fi.smallest_normal)).any())
        if lo is not None:
            assume(bool((scale.float() >= lo.float().abs() * fi.eps).all()))
    second = q.quantize(y)
    for name, t in first.tensors.items():
        assert torch.equal(second.tensors[name], t), name


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("which", ["k", "v"])
@settings(max_examples=15, deadline=None)
@given(x=kv_tensors(dtypes=(torch.float32,), inject=False, scales=(1.0, 20.0)))
def test_error_does_not_grow_with_bits(family, which, x):
    """Moderate ranges only: at 1e-3 the fp16 scales of the wide formats turn subnormal and coarse."""
    mses = [((kq.get(s).for_tensor(which).roundtrip(x) - x) ** 2).mean().item() for s in FAMILIES[family]]
    slack = 1e-6 * (x**2).mean().item()  # fp16 metadata rounding can differ by a hair between widths
    for lo_bits, hi_bits in zip(mses, mses[1:]):
        assert hi_bits <= lo_bits + slack, mses


@pytest.mark.parametrize("spec,which,calibrated", CASES, ids=IDS)
@settings(max_examples=10, deadline=None)
@given(x=kv_tensors(dtypes=(torch.float32, torch.float16)), cut=st.integers(1, 80))
def test_runs_join(spec, which, calibrated, x, cut):
    """The cache's path: ``quantize_all`` quantizes every token of a run; ``concat`` joins consecutive
    runs (or says it cannot), and decoding the joined runs equals decoding each."""
    q = make(spec, which, calibrated, x)
    if q.name == "kivi" and which == "k":  # K leaves KIVI's window in whole groups: two runs of one group
        x = x.repeat(1, 1, -(-2 * q.group // x.shape[-2]), 1)[..., : 2 * q.group, :]
        t = q.group
    else:
        x = x if x.shape[-2] > 1 else x.repeat(1, 1, 2, 1)
        t = min(cut, x.shape[-2] - 1)
    runs = [q.quantize_all(x[..., :t, :]), q.quantize_all(x[..., t:, :])]
    if q.fp16_tokens(x.shape[-2]).any() and q.rotate == "none":  # nothing held back in fp16
        assert all(not r.tensors.get("fp16", torch.empty(0, 0)).shape[-2] for r in runs)
    joined = q.concat(runs)
    if joined is not None:
        assert joined.shape == x.shape
        y_joined, y_runs = q.dequantize(joined), torch.cat([q.dequantize(r) for r in runs], dim=-2)
        if q.rotate == "none":
            assert torch.equal(y_joined, y_runs)
        else:  # the rotation back is a matmul, whose float rounding depends on the number of rows
            assert torch.allclose(y_joined.float(), y_runs.float(), rtol=1e-5, atol=1e-6 * x.abs().max().item())


@pytest.mark.parametrize("spec,which,calibrated", CASES, ids=IDS)
@pytest.mark.parametrize("big", [2e5, -2e5, 1e9, 3e38])
def test_values_beyond_the_stored_range_are_held_or_refused(spec, which, calibrated, big):
    """A finite value beyond fp16 (bf16/fp32 models produce them): the scheme gives it back within its
    error bound, or refuses naming the value, the scheme and the range it stores; never Inf, NaN or a
    silently saturated value."""
    q = make(spec, which, calibrated)
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    x[0, 1, 40, 5] = big
    try:
        y = q.roundtrip(x)
    except ValueError as e:
        msg = str(e)
        assert f"{abs(big):.6g}" in msg or f"{big:.6g}" in msg, msg
        assert q.spec.split(":")[0] in msg and ("<=" in msg or "at most" in msg), msg
        if q.max_abs < float("inf"):
            assert f"{q.max_abs:.6g}" in msg, msg
        return
    assert torch.isfinite(y).all()
    if q.rotate == "none":
        assert (err := (y.float() - x).abs()).max() <= abs(big) * 0.01, err.max()  # not saturated
        err = q.rotated(err)  # the scheme's basis (channels reordered where it does)
        assert (err <= q.error_bound(q.rotated(x)) * (1 + 1e-5) + q.rotated(_output_tol(y))).all()
    else:  # the bound holds in the rotated basis
        xr, yr = q.rotated(x), q.rotated(y.float())
        assert ((yr - xr).abs() <= q.error_bound(xr) * (1 + 1e-4) + 1e-3 * abs(big) * 2**-10).all()


@pytest.mark.parametrize("spec, match", [("kivi:bits=2,bits=4", "sets bits twice"),
                                         ("kivi:group=48", "group=48 does not divide residual=128")])
def test_spec_errors_name_the_key_the_user_wrote(spec, match):
    with pytest.raises(ValueError, match=match):
        kq.get(spec)


@pytest.mark.parametrize("spec, match", [("kv=q4_0;kv=q8_0", "sets k again"), ("k=q4_0;kv=q8_0", "sets k again"),
                                         ("keep_heads=0.0;keep_k_heads=1.0", "sets keep_k_heads again"),
                                         (";", "has no items"), (" ; ; ", "has no items"),
                                         ("kv=q4_0;keep_first=--1", "keep_first='--1' is not an integer"),
                                         ("kv=q4_0;keep_last=-1", "keep_last=-1 is not allowed")])
def test_policy_errors(spec, match):
    from kvlab.quant.policy import parse_policy

    with pytest.raises(ValueError, match=match):
        parse_policy(spec)


@pytest.mark.parametrize("spec", ["fp16", "q4_0", "kivi:bits=2", "bf16"])
def test_stored_input_refuses_values_an_fp16_deployment_cannot_hold(spec):
    """Emulation hands a scheme what an fp16 deployment holds; a bf16 value of 2e5 has no fp16 form."""
    x = torch.ones(1, 1, 4, 64, dtype=torch.bfloat16)
    x[0, 0, 1, 3] = 2e5
    with pytest.raises(ValueError, match=r"value of 199680 is beyond fp16 \(\|x\| <= 65504\)"):
        kq.get(spec).stored_input(x)
    assert torch.equal(kq.get("none").stored_input(x), x)
