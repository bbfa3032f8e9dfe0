"""kvlab/kernels/csrc/cache_cpu.cpp: the compiled CPU kernels of CompressedCache equal the torch quantizers bit for bit."""

from __future__ import annotations

import pytest
import torch

import kvlab.quant as kq
from kvlab.kernels import cpu as cpu_kernels
from kvlab.storage.cache import CompressedCache

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GGML = {"q4_0": (4, False), "q4_1": (4, True), "q8_0": (8, False)}


@pytest.fixture(scope="module")
def ops():
    m = cpu_kernels.ops()
    if m is None:
        pytest.fail("the CPU kernels did not build here (a C++ compiler and ninja are installed by make setup)")
    return m


def _hard_values(B, H, T, D, dtype, seed=0) -> torch.Tensor:
    """Random rows of very different scales, plus the cases rounding rules differ on: all-zero blocks,
    constant rows, ties of |max| with both signs, values at fp16's extremes, codes exactly halfway."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g) * torch.exp((2 * torch.randn(B, H, T, 1, generator=g)).clamp(-8, 4))
    if T >= 6:
        x[..., 0, :] = 0.0
        x[..., 1, :] = 1.5
        x[..., 2, :] = torch.arange(D) % 16 - 7.5  # exact halves between codes
        x[..., 3, :] = 0.1 * torch.randn(D, generator=g)
        x[..., 3, 5], x[..., 3, 6] = -7.0, 7.0  # equal |max|, first one negative
        x[..., 4, :] = 60000.0 * torch.sign(torch.randn(D, generator=g))
        x[..., 5, :] = 1e-7 * torch.randn(D, generator=g)  # fp16 subnormals
    return x.to(dtype)


@pytest.mark.parametrize("spec", list(GGML))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 3, 40, 64), (1, 2, 7, 128), (1, 1, 1, 32)])
def test_ggml_quantize_and_read_equal_torch(ops, spec, dtype, shape):
    q = kq.get(spec)
    x = _hard_values(*shape, dtype)
    ref = q.quantize_all(x).tensors
    got = ops.ggml_quantize(x, *GGML[spec])
    assert len(got) == len(ref)
    for name, t in zip(("codes", "scale", "min"), got):
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name
    B, H, T, D = shape
    big = torch.full((B, H + 2, T + 9, D), float("nan"))
    out = big[:, 1 : H + 1, 4 : T + 4]  # a strided view, as the cache writes
    ops.ggml_read(ref["codes"], ref["scale"], ref.get("min"), GGML[spec][0], out)
    assert torch.equal(out, q._dequantize(ref, shape).float())
    assert big[:, 0].isnan().all() and big[:, :, :4].isnan().all() and big[:, :, T + 4 :].isnan().all()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("group", [32, 64, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kivi_quantize_and_read_equal_torch(ops, bits, which, group, dtype):
    q = kq.get(f"kivi:bits={bits},group={group},residual={2 * group}").for_tensor(which)
    shape = (2, 3, 2 * group if which == "k" else 37, 64)
    x = _hard_values(*shape, dtype, seed=bits)
    ref = q.quantize_all(x).tensors
    got = ops.kivi_quantize(x, bits, group, which == "k")
    for name, t in zip(("codes", "scale", "min"), got):
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name
    B, H, T, D = shape
    big = torch.full((B, H, T + 5, D), float("nan"))
    out = big[:, :, 5:]
    ops.kivi_read(ref["codes"], ref["scale"], ref["min"], bits, group, which == "k", out)
    assert torch.equal(out, q._dequantize(ref, shape).float())
    assert big[:, :, :5].isnan().all()


def test_strided_input_and_non_finite_values(ops):
    x = _hard_values(1, 4, 64, 64, torch.float32)
    view = x[:, ::2]  # heads 0 and 2: not contiguous
    assert torch.equal(ops.ggml_quantize(view, 4, False)[0], kq.get("q4_0").quantize_all(view).tensors["codes"])
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[0, 3, 63, 63] = bad
        assert ops.ggml_quantize(y, 4, False) == []
        assert ops.kivi_quantize(y, 2, 32, True) == []
        assert ops.kivi_quantize(y, 2, 32, False) == []


def test_shape_mismatches_are_refused(ops):
    p = kq.get("q4_0").quantize_all(torch.randn(1, 2, 8, 64)).tensors
    with pytest.raises(RuntimeError, match="do not match"):
        ops.ggml_read(p["codes"], p["scale"], None, 4, torch.empty(1, 2, 9, 64))
    with pytest.raises(RuntimeError, match="out has dtype Half, expected Float"):
        ops.ggml_read(p["codes"], p["scale"], None, 4, torch.empty(1, 2, 8, 64, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="bits must be 2 or 4"):
        ops.kivi_quantize(torch.randn(1, 1, 32, 64), 3, 32, True)
    with pytest.raises(RuntimeError, match="not a multiple of group"):
        ops.kivi_quantize(torch.randn(1, 1, 30, 64), 2, 32, True)


@pytest.fixture
def kernels_off(monkeypatch):
    monkeypatch.setenv("KVLAB_CPU_KERNELS", "0")
    cpu_kernels.reset()
    yield
    monkeypatch.undo()
    cpu_kernels.reset()


def _cache_run(spec):
    gen = torch.Generator().manual_seed(3)
    sizes = [70, 1, 1, 33, *[1] * 40, 64, 1]
    cache = CompressedCache(spec)
    outs = [cache.update(torch.randn(1, 3, t, 64, generator=gen), torch.randn(1, 3, t, 64, generator=gen), 0)
            for t in sizes]
    return outs, cache.nbytes()


@pytest.mark.parametrize("spec", ["q4_0", "q4_1", "q8_0", "kivi:bits=2,group=32,residual=64", "kivi:bits=4"])
def test_cache_with_and_without_kernels_is_identical(ops, spec, request):
    with_kernels = _cache_run(spec)
    request.getfixturevalue("kernels_off")
    assert cpu_kernels.ops() is None
    without = _cache_run(spec)
    assert with_kernels[1] == without[1]
    for (k1, v1), (k2, v2) in zip(with_kernels[0], without[0]):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_nan_still_raises_the_scheme_error(ops):
    cache = CompressedCache("q4_0")
    k = torch.randn(1, 3, 4, 64)
    k[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cache.update(k, torch.randn(1, 3, 4, 64), 0)


def test_build_failure_falls_back_to_torch_with_a_warning(monkeypatch):
    import torch.utils.cpp_extension as ext

    def fail(**kwargs):
        raise OSError("no compiler here")

    monkeypatch.setattr(ext, "load", fail)
    cpu_kernels.reset()
    try:
        with pytest.warns(UserWarning, match="no compiler here"):
            assert cpu_kernels.ops() is None
        out = CompressedCache("q4_0").update(torch.ones(1, 1, 2, 32), torch.ones(1, 1, 2, 32), 0)
        assert torch.equal(out[0], torch.ones(1, 1, 2, 32))
    finally:
        monkeypatch.undo()
        cpu_kernels.reset()
