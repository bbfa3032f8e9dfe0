"""Triton kernels against their pure-torch references (kvlab.kernels).

Without CUDA the kernels run on the CPU through Triton's interpreter: TRITON_INTERPRET=1 must be set
before triton (and so kvlab.kernels) is imported, hence the set-up at the top. With CUDA they run on the
GPU for real. Every kernel is compared with its reference on fresh random inputs, outputs are poisoned
first (NaN / 0xAB bytes) so that an unwritten element shows, and the quantizers must match byte for byte.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    # conftest.py sets the variable before any module imports triton; running this file some other way
    # without it would compile for a GPU that is not there
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kvlab.kernels as K  # noqa: E402
from kvlab.kernels import layout  # noqa: E402
from kvlab.kernels._common import div_correct  # noqa: E402
from kvlab.quant.packing import pack_bits  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
# Triton's interpreter computes bf16 dots on raw bits (and casts to bf16 by truncation): bf16 runs on GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def tol(dtype: torch.dtype) -> float:
    """Allowed |kernel - reference| relative to max |reference|. Half types: dequantized K and V, the
    probabilities and the output are each rounded once to the dtype (about eps/2 each), so 4 eps. fp32:
    summation order over up to a few hundred tokens and exp2 vs exp; 2e-5 (about 170 eps)."""
    return 2e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "the kernel left unwritten (NaN) or non-finite outputs"
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= tol(dtype) * max(scale, 1.0), f"max error {err:.3g} > {tol(dtype):.3g} x {scale:.3g}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def fresh_seed() -> int:
    """A new seed per call (fresh inputs each run), printed by pytest on failure through the test id."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


# ---- KIVI cache with random content -------------------------------------------------------------------


def random_kivi(B, H, D, bits, group, residual, cap, g, win_dtype=torch.float16):
    """Random codes (every value reachable), positive fp16 scales and random minima and windows, in the cache
    layout of :mod:`kvlab.kernels.layout`."""
    shapes = layout.kivi_shapes(B, H, D, bits=bits, group=group, residual=residual, cap_k=cap)
    cache = {}
    for name, (shape, dtype) in shapes.items():
        if dtype == torch.uint8:
            cache[name] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(DEV)
        elif name.endswith("_scale"):
            cache[name] = (torch.rand(*shape, generator=g) * 0.2 + 0.01).to(device=DEV, dtype=torch.float16)
        else:
            cache[name] = randn(*shape, g=g, dtype=win_dtype if name.endswith("_fp16") else dtype)
    return cache


def empty_kivi(B, H, D, bits, group, residual, cap):
    """Zeroed cache buffers in the kernels' layout, for the pack kernels to fill."""
    return layout.kivi_empty(B, H, D, bits=bits, group=group, residual=residual, cap_k=cap, device=DEV,
                             zero=True)._asdict()


def kivi_args(q, cache, lengths):
    return (q, *[cache[n] for n in layout.KIVI_BUFFERS], lengths)


LENGTHS = [37, 100, 300]  # not multiples of the block, group or residual; one batch of unequal sequences
# KIVI attention backends: the Triton kernel everywhere, the CUDA C++ one (kvlab/kernels/csrc) on a GPU, in its
# automatic choice and in each of its three variants
BACKENDS = ["triton"] + (["cuda", "cuda-registers", "cuda-staged", "cuda-folded"] if CUDA else [])


def backend_kw(backend: str) -> dict:
    if backend.startswith("cuda-"):
        return dict(backend="cuda", cuda_variant=backend[5:])
    return dict(backend=backend)


def cuda_serves(backend, dtype, rows=1, group=32):
    if backend.startswith("cuda") and dtype != torch.float16:
        pytest.skip("the CUDA kernel takes fp16 queries")
    if backend == "cuda-staged" and rows > 8:
        pytest.skip("the staged CUDA variant takes at most 8 query rows per kv head")
    if backend == "cuda-folded" and rows > min(group, 64) // 8:
        pytest.skip("the folded CUDA variant takes at most min(group, 64) / 8 query rows per kv head")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_decode_attention(bits, D, gqa, nq, dtype, backend):
    cuda_serves(backend, dtype, gqa * nq)
    g = gen(fresh_seed())
    B, H, group, residual, cap = len(LENGTHS), 2, 32, 64, 320
    cache = random_kivi(B, H, D, bits, group, residual, cap, g)
    q = randn(B, H * gqa, nq, D, g=g, dtype=dtype, scale=2.0)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32, device=DEV)
    args = kivi_args(q, cache, lengths)
    ref = K.kivi_decode_attention_ref(*args, bits=bits, group=group, residual=residual)
    out = torch.full_like(q, float("nan"))
    # automatic (several splits for Triton here; one CTA per sequence and head for CUDA, whose quantized
    # region is at most 3 of its 64-token blocks: tests/test_kernels.py::test_kivi_cuda_long_sequences_gpu
    # covers its splits), and the single-split path
    splits = None if nq == 1 else 1
    K.kivi_decode_attention(*args, bits=bits, group=group, residual=residual, out=out, num_splits=splits,
                            **backend_kw(backend))
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("group", "block_n", "residual", "D"), [(16, 64, 32, 64), (64, 32, 128, 64),
                                                                (128, 64, 128, 128)])
def test_kivi_decode_attention_group_vs_block(group, block_n, residual, D, backend):
    """Blocks spanning several K groups, and groups spanning several blocks; an fp32 window."""
    cuda_serves(backend, torch.float16, 2, group)
    g = gen(fresh_seed())
    B, H, bits, cap = 2, 2, 4, 512
    cache = random_kivi(B, H, D, bits, group, residual, cap, g, win_dtype=torch.float32)
    q = randn(B, 2 * H, 1, D, g=g, dtype=torch.float16, scale=2.0)
    lengths = torch.tensor([300, 401], dtype=torch.int32, device=DEV)
    args = kivi_args(q, cache, lengths)
    ref = K.kivi_decode_attention_ref(*args, bits=bits, group=group, residual=residual, sm_scale=0.2)
    out = torch.full_like(q, float("nan"))
    K.kivi_decode_attention(*args, bits=bits, group=group, residual=residual, sm_scale=0.2, out=out,
                            block_n=block_n, num_splits=2, **backend_kw(backend))
    assert_close(out, ref, torch.float16)


def test_kivi_cuda_plan():
    """The CUDA kernel's split plan covers the quantized region in whole warp-blocks, one wave at most; one more
    split without a block (for the window units) exactly where the wave has room and each warp >= 4 blocks."""
    from kvlab.kernels.kivi_cuda import BLOCK, WARPS, plan

    step = WARPS * BLOCK
    extra = 0
    for bh, L, R, resident in [(64, 32768, 128, 2), (8, 32768, 128, 2), (1, 300, 128, 3), (4, 100, 128, 2),
                               (2, 5000, 64, 1), (1, 7168, 128, 2), (1, 4224, 128, 2)]:
        n, split_len = plan(bh, L, R, torch.device("cpu"), resident)
        region = max(0, (L - R) // BLOCK * BLOCK)
        assert n >= 1 and split_len % step == 0 and n * split_len >= region
        # no CTA without a block of its own (but the first), except one window-units split where it fits
        blocks = -(-max(region, 1) // split_len)
        room = split_len >= 4 * step and (blocks + 1) * bh <= 4 * resident
        assert n == blocks + room, (bh, L, n, split_len)
        extra += room
        assert n <= max(1, 4 * resident // bh)  # 4 SMs stand for a CPU device
    assert extra == 1  # (1, 7168): 7 splits of 1024 tokens and the window split; (1, 4224): 8 of 512, no room
    assert plan(64, 32768, 128, torch.device("cpu"), 2, num_splits=3)[0] == 3
    with pytest.raises(ValueError, match="num_splits"):
        plan(64, 32768, 128, torch.device("cpu"), 2, num_splits=0)


@pytest.mark.parametrize(("bits", "D"), [(4, 128), (2, 64)])
def test_kivi_cuda_alignment_check(bits, D):
    """The CUDA kernel's alignment check (device-independent): an aligned cache passes; a tensor whose data
    starts off its vector-load alignment is named with its offset and the alignment allowed."""
    from kvlab.kernels.kivi_cuda import misaligned

    g = gen(1)
    cache = random_kivi(2, 2, D, bits, 32, 64, 256, g)
    t = dict(q=randn(2, 8, 1, D, g=g, dtype=torch.float16), lengths=torch.tensor([200, 100], dtype=torch.int32),
             **cache)
    assert misaligned(t, bits, D) is None
    for name in ("q", "k_codes", "k_scale", "v_codes"):
        x = t[name]
        off = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape)  # one element off
        bad = misaligned({**t, name: off}, bits, D)
        assert bad is not None and bad.startswith(f"{name} (data_ptr % ") and "multiples of" in bad, bad
    odd = torch.tensor([200, 100, 0, 0], dtype=torch.int32)[::2]
    assert "lengths is not contiguous" in misaligned({**t, "lengths": odd}, bits, D)


def test_kivi_cuda_staged_variant_conditions():
    """When the staged CUDA variant cannot serve a call (device-independent): too many query rows, a group
    with head_dim / group outside 1, 2, 4, 8, K rows or scales not 16-byte aligned, V scales not contiguous."""
    from kvlab.kernels.kivi_cuda import staged_unsupported

    g = gen(2)

    def why(gqa=4, nq=1, D=128, bits=4, group=32, cap=256, **swap):
        c = {**random_kivi(1, 2, D, bits, group, 128, cap, g), **swap}
        q = randn(1, 2 * gqa, nq, D, g=g, dtype=torch.float16)
        return staged_unsupported(q, c["k_codes"], c["k_scale"], c["k_min"], c["v_scale"], c["v_min"], group)

    assert why() is None and why(gqa=8, D=64, bits=2, group=8) is None and why(group=128) is None
    assert "12 query rows" in why(gqa=4, nq=3)
    assert "head_dim / group = 128/256" in why(group=256)
    assert why(bits=2, cap=96).startswith("k_codes rows are not 16-byte aligned")  # 24-byte rows
    wide = torch.zeros(1, 2, 256, 8, dtype=torch.float16, device=DEV)[..., :4]  # stride 8 per token
    assert "v_scale is not contiguous per token (stride 8, allowed 4)" in why(v_scale=wide)


def test_kivi_cuda_folded_variant_conditions():
    """When the folded CUDA variant cannot serve a call (device-independent): more query rows than its column
    slots (min(group, 64) / 8), a group other than 16, 32 or a multiple of 64, what the staged variant
    refuses, V codes not contiguous per token."""
    from kvlab.kernels.kivi_cuda import folded_unsupported

    g = gen(2)

    def why(gqa=4, nq=1, D=128, bits=2, group=32, cap=256, **swap):
        c = {**random_kivi(1, 2, D, bits, group, 128, cap, g), **swap}
        q = randn(1, 2 * gqa, nq, D, g=g, dtype=torch.float16)
        return folded_unsupported(q, c["k_codes"], c["k_scale"], c["k_min"], c["v_codes"], c["v_scale"],
                                  c["v_min"], bits, group)

    assert why() is None and why(gqa=2, group=16, D=64) is None and why(gqa=8, group=128, bits=4) is None
    assert "4 query heads per kv head x 2 query tokens = 8 rows" in why(nq=2)
    assert "at most min(group, 64) / 8 = 2 at group=16" in why(group=16)
    assert why(group=48) == "group=48; the folded variant takes 16, 32 or a multiple of 64"
    assert "head_dim / group = 128/256" in why(group=256)
    wide = torch.zeros(1, 2, 256, 64, dtype=torch.uint8, device=DEV)[..., :32]  # 64-byte rows, 32 used
    assert "v_codes is not contiguous per token (stride 64, allowed 32)" in why(v_codes=wide)
    c4 = random_kivi(1, 2, 128, 4, 32, 128, 256, g)["v_codes"]
    off = torch.empty(c4.numel() + 8, dtype=torch.uint8, device=DEV)[8:].view(c4.shape)  # rows 8 bytes off 16
    off.copy_(c4)
    assert "stages int4 V codes by 16-byte copies at head_dim 128, group=32" in why(bits=4, v_codes=off)
    assert why(gqa=2, bits=4, group=16, v_codes=off) is None  # group 16 keeps V codes in registers (v14)


def test_kivi_cuda_auto_variant_choice():
    """What cuda_variant="auto" runs: folded, else staged, else registers, for int2 and int4 alike (the order of
    their speed on the H200, run s10-1); a named variant that cannot serve is refused with the reason."""
    from kvlab.kernels.kivi_cuda import choose_variant

    g = gen(4)

    def pick(bits, group, gqa=4, variant="auto"):
        c = random_kivi(1, 2, 128, bits, group, 128, 256, g)
        q = randn(1, 2 * gqa, 1, 128, g=g, dtype=torch.float16)
        return choose_variant(q, c["k_codes"], c["k_scale"], c["k_min"], c["v_codes"], c["v_scale"], c["v_min"],
                              bits, group, variant)

    assert [pick(2, 32), pick(2, 16), pick(2, 32, gqa=16)] == ["folded", "staged", "registers"]
    assert [pick(4, 32), pick(4, 64), pick(4, 128), pick(4, 16), pick(4, 64, gqa=16)] == [
        "folded", "folded", "folded", "staged", "registers"]
    with pytest.raises(ValueError, match="cuda_variant='folded' cannot serve this call: .* 16 rows"):
        pick(4, 64, gqa=16, variant="folded")


def test_kivi_decode_attention_without_query_tokens():
    """q with no query tokens (n=0): an empty result, no launch."""
    g = gen(3)
    cache = random_kivi(2, 2, 64, 4, 32, 32, 64, g)
    q = torch.empty(2, 4, 0, 64, dtype=torch.float16, device=DEV)
    out = K.kivi_decode_attention(*kivi_args(q, cache, torch.tensor([50, 40], dtype=torch.int32, device=DEV)),
                                  bits=4, group=32, residual=32)
    assert out.shape == (2, 4, 0, 64)


def test_kivi_cuda_backend_refuses_with_the_reason():
    """backend='cuda' names why it cannot serve a call; 'auto' falls back to Triton for the same call."""
    g = gen(0)
    cache = random_kivi(1, 1, 64, 4, 32, 32, 64, g)
    q = randn(1, 1, 1, 64, g=g, dtype=torch.float32)
    args = kivi_args(q, cache, torch.tensor([50], dtype=torch.int32, device=DEV))
    why = "not on a CUDA device" if not CUDA else "takes float16"
    with pytest.raises(ValueError, match=why):
        K.kivi_decode_attention(*args, bits=4, group=32, residual=32, backend="cuda")
    out = K.kivi_decode_attention(*args, bits=4, group=32, residual=32, backend="auto")
    assert_close(out, K.kivi_decode_attention_ref(*args, bits=4, group=32, residual=32), torch.float32)
    with pytest.raises(ValueError, match="backend"):
        K.kivi_decode_attention(*args, bits=4, group=32, residual=32, backend="cutlass")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("nq", [1, 2])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("fmts", [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0")], ids="-".join)
def test_ggml_decode_attention(fmts, D, gqa, nq, dtype):
    g = gen(fresh_seed())
    B, H, cap = len(LENGTHS), 2, 320
    x = {n: randn(B, H, cap, D, g=g) for n in "kv"}
    bufs = {}
    for n, fmt in zip("kv", fmts):
        shapes = K.ggml_shapes(fmt, B, H, cap, D)
        codes = torch.empty(shapes["codes"][0], dtype=shapes["codes"][1], device=DEV)
        d = torch.empty(shapes["d"][0], dtype=torch.float16, device=DEV)
        K.ggml_pack_ref(x[n], codes, d, 0, fmt=fmt)
        bufs[n] = (codes, d)
    q = randn(B, H * gqa, nq, D, g=g, dtype=dtype, scale=2.0)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32, device=DEV)
    args = (q, *bufs["k"], *bufs["v"], lengths)
    ref = K.ggml_decode_attention_ref(*args, k_fmt=fmts[0], v_fmt=fmts[1])
    out = torch.full_like(q, float("nan"))
    K.ggml_decode_attention(*args, k_fmt=fmts[0], v_fmt=fmts[1], out=out, num_splits=None if nq == 1 else 1)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(("nq", "window"), [(1, 1), (1, 45), (3, 70), (2, 129), (1, 1000)])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_decode_attention_sliding_window(bits, nq, window, dtype):
    """A sliding window (the fused cache's sliding layers): row i sees only the last ``window`` tokens up to its
    own, inside the unmasked main loop's blocks (long sequences, several splits) and in the masked tail; a
    window of 1 (each row its own token), windows shorter and longer than the residual, and one longer than
    every sequence (= full attention). "auto" takes the Triton kernel (the CUDA one has no window)."""
    g = gen(fresh_seed())
    B, H, gqa, D, group, residual, cap = len(LENGTHS), 2, 2, 64, 32, 64, 320
    cache = random_kivi(B, H, D, bits, group, residual, cap, g)
    q = randn(B, H * gqa, nq, D, g=g, dtype=dtype, scale=2.0)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32, device=DEV)
    args = kivi_args(q, cache, lengths)
    ref = K.kivi_decode_attention_ref(*args, bits=bits, group=group, residual=residual, window=window)
    for splits in (None, 1):
        out = torch.full_like(q, float("nan"))
        K.kivi_decode_attention(*args, bits=bits, group=group, residual=residual, out=out, num_splits=splits,
                                window=window, block_n=32)
        assert_close(out, ref, dtype)
    full = K.kivi_decode_attention_ref(*args, bits=bits, group=group, residual=residual)
    if window >= max(LENGTHS):
        assert torch.equal(ref, full)
    else:  # the window changes the answer: ignoring it would fail assert_close above by 10x its bound (a fixed
        # 100 x tol was above what a window of 129 over these lengths moves an fp16 output: 0.28 < 0.39, s15-1)
        bound = tol(dtype) * max(ref.float().abs().max().item(), 1.0)
        assert (ref.float() - full.float()).abs().max().item() > 10 * bound


def test_sliding_window_cuda_backend_refused_and_bad_windows():
    g = gen(0)
    cache = random_kivi(1, 1, 64, 4, 32, 64, 128, g)
    q = randn(1, 1, 1, 64, g=g, dtype=torch.float16)
    args = kivi_args(q, cache, torch.tensor([100], dtype=torch.int32, device=DEV))
    if CUDA:
        with pytest.raises(ValueError, match="sliding window"):
            K.kivi_decode_attention(*args, bits=4, group=32, residual=64, window=16, backend="cuda")
    for bad in (0, -3, 2.5, True, "16"):
        with pytest.raises(ValueError, match=r"window=.* is not allowed; allowed: None .* or an int >= 1"):
            K.kivi_decode_attention(*args, bits=4, group=32, residual=64, window=bad)


@pytest.mark.parametrize(("nq", "window"), [(1, 1), (1, 50), (2, 77), (1, 1000)])
@pytest.mark.parametrize("fmts", [("q8_0", "q8_0"), ("q4_0", "q4_0")], ids="-".join)
def test_ggml_decode_attention_sliding_window(fmts, nq, window):
    g = gen(fresh_seed())
    B, H, D, cap = len(LENGTHS), 2, 64, 320
    bufs = {}
    for n, fmt in zip("kv", fmts):
        shapes = K.ggml_shapes(fmt, B, H, cap, D)
        codes = torch.empty(shapes["codes"][0], dtype=shapes["codes"][1], device=DEV)
        d = torch.empty(shapes["d"][0], dtype=torch.float16, device=DEV)
        K.ggml_pack_ref(randn(B, H, cap, D, g=g), codes, d, 0, fmt=fmt)
        bufs[n] = (codes, d)
    q = randn(B, H * 2, nq, D, g=g, dtype=torch.float32, scale=2.0)
    args = (q, *bufs["k"], *bufs["v"], torch.tensor(LENGTHS, dtype=torch.int32, device=DEV))
    ref = K.ggml_decode_attention_ref(*args, k_fmt=fmts[0], v_fmt=fmts[1], window=window)
    for splits in (None, 1):
        out = torch.full_like(q, float("nan"))
        K.ggml_decode_attention(*args, k_fmt=fmts[0], v_fmt=fmts[1], out=out, num_splits=splits, window=window)
        assert_close(out, ref, torch.float32)
    full = K.ggml_decode_attention_ref(*args, k_fmt=fmts[0], v_fmt=fmts[1])
    assert torch.equal(ref, full) if window >= max(LENGTHS) else (ref - full).abs().max() > 100 * tol(torch.float32)


# ---- quantize-and-pack on append: byte-identical to the references -------------------------------------


def poisoned(*shapes_dtypes):
    out = []
    for shape, dtype in shapes_dtypes:
        if dtype.is_floating_point:
            out.append(torch.full(shape, float("nan"), dtype=dtype, device=DEV))
        else:
            out.append(torch.full(shape, 0xAB, dtype=torch.uint8, device=DEV).view(dtype))
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# (group, Tn): two groups in one tile, and several 256-token tiles with a partial last one
@pytest.mark.parametrize(("group", "Tn"), [(8, 16), (8, 584), (16, 592), (32, 64), (32, 608), (64, 128),
                                           (64, 640), (128, 256), (128, 640)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_pack_k(bits, D, dtype, group, Tn):
    g = gen(fresh_seed())
    B, H = 3, 2
    o0, o2 = group, 3 * group  # odd multiples of the group: code bytes start at any group boundary
    cap = o2 + Tn + group
    shapes = [((B, H, D, cap * bits // 8), torch.uint8), ((B, H, cap // group, D), torch.float16),
              ((B, H, cap // group, D), torch.float16)]
    x = randn(B, H, Tn, D, g=g, dtype=dtype, scale=3.0)
    offset = torch.tensor([o0, -1, o2], dtype=torch.int32, device=DEV)  # -1: sequence skipped
    bufs, refs = poisoned(*shapes), poisoned(*shapes)
    K.kivi_pack_k(x, *bufs, offset, bits=bits, group=group)
    K.kivi_pack_k_ref(x, *refs, offset, bits=bits, group=group)
    for a, r in zip(bufs, refs):
        assert same_bytes(a, r)
    # what was written is the whole appended region and nothing else
    c0, c1 = o0 * bits // 8, (o0 + Tn) * bits // 8
    assert (bufs[0][0, :, :, c0:c1] != 0xAB).any(dim=-1).all()
    assert (bufs[0][1] == 0xAB).all() and (bufs[0][0, :, :, :c0] == 0xAB).all()
    assert (bufs[0][0, :, :, c1:] == 0xAB).all()
    g0, g1 = o0 // group, (o0 + Tn) // group
    assert not torch.isnan(bufs[1][0, :, g0:g1]).any() and torch.isnan(bufs[1][1]).all()
    assert torch.isnan(bufs[1][0, :, :g0]).all() and torch.isnan(bufs[1][0, :, g1:]).all()


@pytest.mark.parametrize("Tn", [1, 5])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_pack_v(bits, D, group, Tn):
    g = gen(fresh_seed())
    B, H, cap = 3, 2, 40
    shapes = [((B, H, cap, D * bits // 8), torch.uint8), ((B, H, cap, D // group), torch.float16),
              ((B, H, cap, D // group), torch.float16)]
    x = randn(B, H, Tn, D, g=g, dtype=torch.float32, scale=3.0)
    offset = torch.tensor([7, 30, -1], dtype=torch.int32, device=DEV)
    bufs, refs = poisoned(*shapes), poisoned(*shapes)
    K.kivi_pack_v(x, *bufs, offset, bits=bits, group=group)
    K.kivi_pack_v_ref(x, *refs, offset, bits=bits, group=group)
    for a, r in zip(bufs, refs):
        assert same_bytes(a, r)
    assert not torch.isnan(bufs[1][0, :, 7 : 7 + Tn]).any() and torch.isnan(bufs[1][2]).all()


def test_kivi_pack_rounds_ties_to_even():
    """(x - min) / scale = k + 0.5 exactly: round half to even, as torch.round and the torch quantizers."""
    B, H, D, bits, group = 1, 1, 16, 4, 16
    col = torch.tensor([0.0, 15.0, 2.5, 3.5, 4.5, 5.5] + [1.0] * 10)  # scale 1, min 0 in every channel
    x = col[:, None].expand(group, D).reshape(B, H, group, D).contiguous().to(DEV)
    codes, scale, zero = poisoned(((B, H, D, group * bits // 8), torch.uint8), ((B, H, 1, D), torch.float16),
                                  ((B, H, 1, D), torch.float16))
    K.kivi_pack_k(x, codes, scale, zero, 0, bits=bits, group=group)
    expect = torch.tensor([0, 15, 2, 4, 4, 6] + [1] * 10, dtype=torch.uint8)
    assert torch.equal(codes[0, 0, 0].cpu(), pack_bits(expect, bits))
    assert (scale == 1).all() and (zero == 0).all()


@pytest.mark.parametrize("Tn", [1, 6])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_ggml_pack(fmt, D, Tn):
    g = gen(fresh_seed())
    B, H, cap = 3, 2, 12
    shapes = K.ggml_shapes(fmt, B, H, cap, D)
    x = randn(B, H, Tn, D, g=g, dtype=torch.float16, scale=3.0)
    offset = torch.tensor([0, -1, 5], dtype=torch.int32, device=DEV)
    bufs = poisoned(shapes["codes"], shapes["d"])
    refs = poisoned(shapes["codes"], shapes["d"])
    K.ggml_pack(x, *bufs, offset, fmt=fmt)
    K.ggml_pack_ref(x, *refs, offset, fmt=fmt)
    for a, r in zip(bufs, refs):
        assert same_bytes(a, r)
    assert not torch.isnan(bufs[1][0, :, :Tn]).any() and torch.isnan(bufs[1][1]).all()


def test_ggml_pack_edge_cases():
    """Ties of C roundf (half away from zero), +-max ties in q4_0 (the first wins), all-zero blocks."""
    D = 64
    rows = torch.zeros(4, D)
    rows[0, :32] = torch.linspace(-127, 127, 32)
    rows[0, 1], rows[0, 2], rows[0, 3] = 2.5, -2.5, 0.5  # amax 127: d = 1, x * id = x exactly
    rows[0, 32:] = 0.0  # an all-zero block
    rows[1, :32] = torch.linspace(-1, 1, 32)
    rows[1, 0], rows[1, 5] = -4.0, 4.0  # -4 comes first: m = -4
    rows[2, :32] = torch.linspace(-1, 1, 32)
    rows[2, 0], rows[2, 5] = 4.0, -4.0  # +4 comes first: m = +4
    rows[3] = torch.randn(D) * 1e-3
    x = rows.reshape(1, 1, 4, D).to(DEV)
    for fmt in ("q4_0", "q8_0"):
        shapes = K.ggml_shapes(fmt, 1, 1, 4, D)
        bufs, refs = poisoned(shapes["codes"], shapes["d"]), poisoned(shapes["codes"], shapes["d"])
        K.ggml_pack(x, *bufs, 0, fmt=fmt)
        K.ggml_pack_ref(x, *refs, 0, fmt=fmt)
        for a, r in zip(bufs, refs):
            assert same_bytes(a, r), fmt
    q8, _ = poisoned(K.ggml_shapes("q8_0", 1, 1, 4, D)["codes"], K.ggml_shapes("q8_0", 1, 1, 4, D)["d"])
    d8 = torch.empty(1, 1, 4, D // 32, dtype=torch.float16, device=DEV)
    K.ggml_pack(x, q8, d8, 0, fmt="q8_0")
    assert q8[0, 0, 0, 1:4].tolist() == [3, -3, 1]  # roundf(2.5) = 3, roundf(-2.5) = -3, roundf(0.5) = 1
    q4, d4 = poisoned(*K.ggml_shapes("q4_0", 1, 1, 4, D).values())
    K.ggml_pack(x, q4, d4, 0, fmt="q4_0")
    assert d4[0, 0, 1, 0].item() == 0.5 and d4[0, 0, 2, 0].item() == -0.5  # d = m / -8
    assert d4[0, 0, 0, 1].view(torch.int16).item() == -32768  # all zero: d = +0 / -8 = -0.0, as ggml
    assert (q4[0, 0, 0, 16:] == 0x88).all()  # ... and every code 8


def test_ggml_pack_ref_matches_gguf():
    """The reference against gguf-py's numpy quantizers (bit-exact to ggml-quants.c by their own tests)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    g = gen(fresh_seed())
    D, T = 128, 16
    x = torch.randn(1, 1, T, D, generator=g) * 2
    for fmt, qtype in (("q4_0", gguf.GGMLQuantizationType.Q4_0), ("q8_0", gguf.GGMLQuantizationType.Q8_0)):
        shapes = K.ggml_shapes(fmt, 1, 1, T, D)
        codes = torch.empty(shapes["codes"][0], dtype=shapes["codes"][1])
        d = torch.empty(shapes["d"][0], dtype=torch.float16)
        K.ggml_pack_ref(x, codes, d, 0, fmt=fmt)
        blocks = gguf.quants.quantize(x[0, 0].numpy().astype(np.float32), qtype).reshape(T, D // 32, -1)
        ours = np.concatenate([d[0, 0].numpy().view(np.uint8).reshape(T, D // 32, 2),
                               codes[0, 0].numpy().view(np.uint8).reshape(T, D // 32, -1)], axis=-1)
        assert np.array_equal(blocks, ours), fmt


# ---- the pieces together: a cache filled by appends, then decoded ---------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_streaming_cache(bits):
    """A cache filled as a cache class would: prefill, then one token at a time under the streaming rule
    (K appended a whole residual chunk at a time, V one token), per-sequence offsets (-1 = no append).
    The fused attention equals attention over the dequantized cache, and the cache holds the tokens."""
    g = gen(fresh_seed())
    B, H, D, group, R, cap, steps = 2, 2, 64, 32, 64, 256, 4
    prefill = [62, 126]  # both cross a residual boundary (64, 128) during the steps
    cache = empty_kivi(B, H, D, bits, group, R, cap)
    T = max(prefill) + steps
    k_all = randn(B, H, T, D, g=g, dtype=torch.float16)
    v_all = randn(B, H, T, D, g=g, dtype=torch.float16)
    pk = cache["k_codes"], cache["k_scale"], cache["k_min"]
    pv = cache["v_codes"], cache["v_scale"], cache["v_min"]

    def counts(L):
        return L // R * R, max(0, L - R)

    for b, L in enumerate(prefill):  # prefill one sequence at a time: offset -1 skips the other
        nk, nv = counts(L)
        off = torch.full((B,), -1, dtype=torch.int32, device=DEV)
        off[b] = 0
        K.kivi_pack_k(k_all[:, :, :nk].contiguous(), *pk, off, bits=bits, group=group)
        K.kivi_pack_v(v_all[:, :, :nv].contiguous(), *pv, off, bits=bits, group=group)
    lengths = list(prefill)
    for _ in range(steps):  # decode: token L arrives in every sequence
        for b, L in enumerate(lengths):
            (nk0, nv0), (nk1, nv1) = counts(L), counts(L + 1)
            for n0, n1, src, dst, fn in ((nk0, nk1, k_all, pk, K.kivi_pack_k),
                                         (nv0, nv1, v_all, pv, K.kivi_pack_v)):
                if n1 > n0:
                    off = torch.full((B,), -1, dtype=torch.int32, device=DEV)
                    off[b] = n0
                    new = torch.zeros(B, H, n1 - n0, D, dtype=torch.float16, device=DEV)
                    new[b] = src[b, :, n0:n1]
                    fn(new, *dst, off, bits=bits, group=group)
        lengths = [L + 1 for L in lengths]
    for b, L in enumerate(lengths):  # the windows hold the tokens that are not quantized
        nk, nv = counts(L)
        cache["k_fp16"][b, :, : L - nk] = k_all[b, :, nk:L]
        cache["v_fp16"][b, :, : L - nv] = v_all[b, :, nv:L]
    lens_t = torch.tensor(lengths, dtype=torch.int32, device=DEV)
    q = randn(B, 2 * H, 1, D, g=g, dtype=torch.float16)
    args = kivi_args(q, cache, lens_t)
    out = K.kivi_decode_attention(*args, bits=bits, group=group, residual=R, num_splits=2)
    ref = K.kivi_decode_attention_ref(*args, bits=bits, group=group, residual=R)
    assert_close(out, ref, torch.float16)
    for b, L in enumerate(lengths):  # the layout means what it should: each value within half a step
        nk, nv = counts(L)
        k_hat = K.kivi_dequantize_k_ref(cache["k_codes"][b], cache["k_scale"][b], cache["k_min"][b], nk,
                                        bits=bits, group=group)
        v_hat = K.kivi_dequantize_v_ref(cache["v_codes"][b], cache["v_scale"][b], cache["v_min"][b], nv,
                                        bits=bits, group=group)
        k_step = cache["k_scale"][b, :, : nk // group].float().repeat_interleave(group, dim=1)
        v_step = cache["v_scale"][b, :, :nv].float().repeat_interleave(group, dim=-1)
        # half a step, plus the fp16 rounding of the minimum (and of the step) times up to 2**bits - 1
        slack = 2.0**-10 * (k_all[b].float().abs().amax() * 2**bits)
        assert ((k_hat - k_all[b, :, :nk].float()).abs() <= 0.5 * k_step + slack).all()
        assert ((v_hat - v_all[b, :, :nv].float()).abs() <= 0.5 * v_step + slack).all()


def test_merge_splits():
    g = gen(fresh_seed())
    o = randn(3, 5, 7, 64, g=g)
    lse = randn(3, 5, 7, g=g, scale=4.0)
    lse[0, 0, :3] = float("-inf")  # empty splits
    out = torch.full((3, 5, 64), float("nan"), device=DEV)
    K.merge_splits(o, lse, out)
    assert_close(out, K.merge_splits_ref(o, lse, torch.empty_like(out)), torch.float32)


def test_plan_splits():
    """Splits cover the sequence, start on block boundaries, and fill one wave when occupancy is known."""
    for bh, max_len, block_n, resident in [(64, 32768, 64, 4), (8, 4096, 64, None), (256, 300, 32, 2),
                                           (3, 1, 64, 4)]:
        splits, split_len = K.plan_splits(bh, max_len, block_n, DEV, None, resident)
        assert split_len % block_n == 0 and splits * split_len >= max_len > (splits - 1) * split_len
        assert bh * splits <= max(bh, K.splitk.num_sms(DEV) * (resident or 2))
    assert K.plan_splits(4, 1000, 64, DEV, 3) == (3, 384)
    with pytest.raises(ValueError, match="num_splits=0"):
        K.plan_splits(4, 1000, 64, DEV, 0)


@triton.jit
def _div_kernel(y_ptr, s_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + i)
    s = tl.load(s_ptr + i).to(tl.float32)
    tl.store(out_ptr + i, div_correct(y, s, tl.math.div_rn(1.0, s)))


def test_div_correct_is_ieee_division():
    """The reciprocal-and-one-FMA quotient of the KIVI packers equals IEEE division (torch's ``/``)."""
    g = gen(fresh_seed())
    n = 1 << (20 if CUDA else 14)
    s = (torch.rand(n, generator=g) * 2.0 ** torch.randint(-14, 8, (n,), generator=g)).half().clamp_min(2**-14)
    y = torch.randn(n, generator=g) * 2.0 ** torch.randint(-6, 10, (n,), generator=g)
    y, s = y.to(DEV), s.to(DEV)
    out = torch.full_like(y, float("nan"))
    _div_kernel[(n // 1024,)](y, s, out, BLOCK=1024, enable_fp_fusion=False)
    assert torch.equal(out, y / s.float())


# ---- bad inputs ----------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    g = gen(0)
    B, H, D, bits, group, residual, cap = 2, 2, 64, 4, 32, 64, 128
    cache = random_kivi(B, H, D, bits, group, residual, cap, g)
    q = randn(B, H, 1, D, g=g, dtype=torch.float16)
    lengths = torch.tensor([10, 100], dtype=torch.int32, device=DEV)
    kw = dict(bits=bits, group=group, residual=residual)
    fn = K.kivi_decode_attention

    def bad(**changes):
        c = {**cache, **{k: v for k, v in changes.items() if k in cache}}
        return kivi_args(changes.get("q", q), c, changes.get("lengths", lengths))

    with pytest.raises(ValueError, match="bits=3"):
        fn(*bad(), **{**kw, "bits": 3})
    with pytest.raises(ValueError, match="dtype int32"):
        fn(*bad(q=q.to(torch.int32)), **kw)
    with pytest.raises(ValueError, match="contiguous"):
        fn(*bad(q=q.transpose(0, 1).contiguous().transpose(0, 1)), **kw)
    with pytest.raises(ValueError, match="k_scale has shape"):
        fn(*bad(k_scale=cache["k_scale"][:, :, :2].contiguous()), **kw)
    with pytest.raises(ValueError, match="lengths has dtype int64"):
        fn(*bad(lengths=lengths.long()), **kw)
    with pytest.raises(ValueError, match="Hq must be a positive multiple"):
        fn(*bad(q=randn(B, 3, 1, D, g=g, dtype=torch.float16)), **kw)
    with pytest.raises(ValueError, match="residual=48"):
        fn(*bad(), **{**kw, "residual": 48})
    with pytest.raises(ValueError, match="group=24"):
        K.kivi_decode_attention_ref(*bad(), **{**kw, "group": 24})
    with pytest.raises(ValueError, match="bits=8"):
        K.kivi_pack_k(q, cache["k_codes"], cache["k_scale"], cache["k_min"], 0, bits=8, group=group)
    with pytest.raises(ValueError, match="multiple of group"):
        K.kivi_pack_k(randn(B, H, 20, D, g=g), cache["k_codes"], cache["k_scale"], cache["k_min"], 0,
                      bits=bits, group=group)
    with pytest.raises(ValueError, match="offset=16"):
        K.kivi_pack_k(randn(B, H, 32, D, g=g), cache["k_codes"], cache["k_scale"], cache["k_min"], 16,
                      bits=bits, group=group)
    with pytest.raises(ValueError, match="v_codes has dtype int8"):
        K.kivi_pack_v(q, cache["v_codes"].view(torch.int8), cache["v_scale"], cache["v_min"], 0, bits=bits,
                      group=group)
    shapes = K.ggml_shapes("q8_0", B, H, 8, D)
    c8 = torch.empty(shapes["codes"][0], dtype=torch.int8, device=DEV)
    d8 = torch.empty(shapes["d"][0], dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="fmt='q5_0'"):
        K.ggml_pack(q, c8, d8, 0, fmt="q5_0")
    with pytest.raises(ValueError, match="codes has dtype int8"):
        K.ggml_pack(q, c8, d8, 0, fmt="q4_0")
    with pytest.raises(ValueError, match="k_d has shape"):
        K.ggml_decode_attention(q, c8, d8[:, :, :4].contiguous(), c8, d8, lengths)
    if CUDA:
        with pytest.raises(ValueError, match="on cpu"):
            fn(*kivi_args(q.cpu(), {k: v.cpu() for k, v in cache.items()}, lengths.cpu()), **kw)


def test_kivi_checks_are_remembered_per_geometry_only(monkeypatch):
    """A decode loop calls kivi_decode_attention on the same buffers every step: the argument checks run once
    per geometry (shapes, strides, dtypes, device, pointer alignment, the other arguments) and are skipped after,
    with the same output; anything that changes what the checks read is checked again and refused."""
    from kvlab.kernels import kivi_attention as KA

    g = gen(1)
    B, H, D, bits, group, residual, cap = 2, 2, 64, 2, 32, 64, 128
    cache = random_kivi(B, H, D, bits, group, residual, cap, g)
    q = randn(B, 2 * H, 1, D, g=g, dtype=torch.float16)
    lengths = torch.tensor([70, 128], dtype=torch.int32, device=DEV)
    kw = dict(bits=bits, group=group, residual=residual)
    checks = []
    real = KA._validate
    monkeypatch.setattr(KA, "_validate", lambda *a: checks.append(1) or real(*a))
    KA._VALIDATED.clear()
    first = K.kivi_decode_attention(*kivi_args(q, cache, lengths), **kw)
    again = K.kivi_decode_attention(*kivi_args(q.clone(), cache, lengths), **kw)  # a new q of the same geometry
    assert len(checks) == 1 and torch.equal(first, again)
    K.kivi_decode_attention(*kivi_args(q, cache, lengths), **kw, backend="triton")  # another argument: checked
    assert len(checks) == 2
    with pytest.raises(ValueError, match="residual=64.0"):
        K.kivi_decode_attention(*kivi_args(q, cache, lengths), **{**kw, "residual": 64.0})
    with pytest.raises(ValueError, match="contiguous"):
        K.kivi_decode_attention(*kivi_args(q.transpose(0, 1).contiguous().transpose(0, 1), cache, lengths), **kw)
    with pytest.raises(ValueError, match="out has shape"):
        K.kivi_decode_attention(*kivi_args(q, cache, lengths), **kw, out=torch.empty_like(q)[:1])
    with pytest.raises(ValueError, match="lengths has dtype int64"):
        K.kivi_decode_attention(*kivi_args(q, cache, lengths.long()), **kw)
    assert len(checks) == 6
    with pytest.raises(ValueError, match=r"bits=\[2\] is not allowed"):  # unhashable: checked, not remembered
        K.kivi_decode_attention(*kivi_args(q, cache, lengths), **{**kw, "bits": [2]})
    if not CUDA:  # the same CPU call once Triton no longer runs interpreted: refused, not remembered
        from kvlab.kernels import _common

        monkeypatch.setattr(_common, "interpreted", lambda: False)
        with pytest.raises(ValueError, match="tensors are on cpu"):
            K.kivi_decode_attention(*kivi_args(q, cache, lengths), **kw)


def test_kivi_named_variant_refused_only_on_the_cuda_path(monkeypatch):
    """A cuda_variant that cannot serve the call is refused when the call goes to the CUDA kernel, and not when
    backend="auto" falls back to Triton because the extension is not there (remembered checks or not)."""
    from kvlab.kernels import kivi_attention as KA
    from kvlab.kernels import kivi_cuda

    g = gen(3)
    B, H, D, bits, group, residual, cap = 1, 1, 64, 2, 32, 64, 128
    cache = random_kivi(B, H, D, bits, group, residual, cap, g)
    q = randn(B, 16 * H, 1, D, g=g, dtype=torch.float16)  # 16 query rows: neither staged nor folded can serve
    lengths = torch.tensor([100], dtype=torch.int32, device=DEV)
    kw = dict(bits=bits, group=group, residual=residual, cuda_variant="staged")
    monkeypatch.setattr(kivi_cuda, "unsupported", lambda *a: None)  # as if on a GPU the kernel serves
    KA._VALIDATED.clear()
    monkeypatch.setattr(kivi_cuda, "ops", lambda: None)  # ... but the extension did not build
    ref = K.kivi_decode_attention_ref(*kivi_args(q, cache, lengths), bits=bits, group=group, residual=residual)
    for _ in range(2):
        assert_close(K.kivi_decode_attention(*kivi_args(q, cache, lengths), **kw), ref, torch.float16)
    with pytest.raises(ValueError, match="the CUDA extension is not available"):
        K.kivi_decode_attention(*kivi_args(q, cache, lengths), **kw, backend="cuda")
    monkeypatch.setattr(kivi_cuda, "ops", lambda: object())  # the extension is there: the variant is refused
    for _ in range(2):
        with pytest.raises(ValueError, match="cuda_variant='staged' cannot serve this call: 16 query rows"):
            K.kivi_decode_attention(*kivi_args(q, cache, lengths), **kw)


def test_ggml_checks_are_remembered_per_geometry_only(monkeypatch):
    """As for KIVI: ggml_decode_attention checks its arguments once per geometry; a changed one is checked."""
    from kvlab.kernels import ggml_attention as GA

    g = gen(2)
    B, H, D, T = 2, 2, 64, 64
    shapes = K.ggml_shapes("q8_0", B, H, T, D)
    codes = torch.randint(-127, 128, shapes["codes"][0], generator=g).to(device=DEV, dtype=torch.int8)
    d = (torch.rand(shapes["d"][0], generator=g) * 0.01).to(device=DEV, dtype=torch.float16)
    q = randn(B, 2 * H, 1, D, g=g, dtype=torch.float16)
    lengths = torch.tensor([40, 64], dtype=torch.int32, device=DEV)
    checks = []
    real = GA._validate
    monkeypatch.setattr(GA, "_validate", lambda *a: checks.append(1) or real(*a))
    GA._VALIDATED.clear()
    first = K.ggml_decode_attention(q, codes, d, codes, d, lengths)
    again = K.ggml_decode_attention(q.clone(), codes, d, codes, d, lengths)
    assert len(checks) == 1 and torch.equal(first, again)
    with pytest.raises(ValueError, match="k_fmt='q4_1'"):
        K.ggml_decode_attention(q, codes, d, codes, d, lengths, k_fmt="q4_1")
    with pytest.raises(ValueError, match="block_n=48"):
        K.ggml_decode_attention(q, codes, d, codes, d, lengths, block_n=48)
    assert len(checks) == 3


# ---- on the GPU only -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_llama3_geometry_gpu(bits):
    """Llama-3-8B heads (32 query, 8 kv, head_dim 128), long unequal sequences, default planning."""
    g = gen(fresh_seed())
    B, H, D, group, residual, cap = 2, 8, 128, 32, 128, 8192
    cache = random_kivi(B, H, D, bits, group, residual, cap, g)
    q = randn(B, 32, 1, D, g=g, dtype=torch.float16, scale=2.0)
    lengths = torch.tensor([8191, 5000], dtype=torch.int32, device=DEV)
    args = kivi_args(q, cache, lengths)
    ref = K.kivi_decode_attention_ref(*args, bits=bits, group=group, residual=residual)
    out = torch.full_like(q, float("nan"))
    K.kivi_decode_attention(*args, bits=bits, group=group, residual=residual, out=out, max_len=8191)
    assert_close(out, ref, torch.float16)
    assert K.available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["staged", "registers", "folded"])
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize(("gqa", "nq", "group"), [(4, 1, 32), (8, 1, 16), (4, 4, 32), (1, 2, 64), (2, 1, 16),
                                                   (8, 1, 64)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_cuda_long_sequences_gpu(bits, D, gqa, nq, group, splits, variant):
    """The CUDA kernel's main (mma) path over many blocks, warps and splits, in every variant: long unequal
    sequences, up to 16 query rows per kv head (two mma column tiles; registers variant only), groups of 16 to
    64 tokens (the folded variant with as many rows as its column slots allow: 2 at group 16, 4 at 32, 8 at
    64), against the reference; also equal to Triton's kernel, and deterministic."""
    g = gen(fresh_seed())
    B, H, residual, cap = 3, 2, 128, 4096
    cache = random_kivi(B, H, D, bits, group, residual, cap, g)
    q = randn(B, H * gqa, nq, D, g=g, dtype=torch.float16, scale=2.0)
    lengths = torch.tensor([4096, 1000, 129], dtype=torch.int32, device=DEV)
    args = kivi_args(q, cache, lengths)
    kw = dict(bits=bits, group=group, residual=residual)
    if variant == "staged" and gqa * nq > 8:
        with pytest.raises(ValueError, match="cuda_variant='staged' cannot serve this call: 16 query rows"):
            K.kivi_decode_attention(*args, **kw, backend="cuda", cuda_variant="staged")
        return
    if variant == "folded" and gqa * nq > min(group, 64) // 8:
        with pytest.raises(ValueError, match=f"cuda_variant='folded' cannot serve this call: .* = {gqa * nq} rows"):
            K.kivi_decode_attention(*args, **kw, backend="cuda", cuda_variant="folded")
        return
    ref = K.kivi_decode_attention_ref(*args, **kw)
    out = torch.full_like(q, float("nan"))
    K.kivi_decode_attention(*args, **kw, out=out, num_splits=splits, backend="cuda", cuda_variant=variant)
    assert_close(out, ref, torch.float16)
    tri = K.kivi_decode_attention(*args, **kw, backend="triton")
    assert_close(out, tri, torch.float16)
    again = K.kivi_decode_attention(*args, **kw, num_splits=splits, backend="cuda", cuda_variant=variant)
    assert torch.equal(out, again), "the CUDA kernel is not deterministic"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_cuda_folded_accuracy_gpu(bits):
    """The folded variant rounds q * scale and p * scale instead of the dequantized values, and keeps the
    minima term apart from the code term within a block: over a 32k-token split its error against the fp32
    reference must stay within 3x of the registers variant's (random normal K and V quantized by the pack
    kernels, Llama-3-8B heads). Measured on an H100 at B=8 (benchmarks/bench_decode_attention.py --cuda-sweep):
    7.6e-4 (int2) / 7.8e-4 (int4) against 3.9e-4 / 4.3e-4; accumulating the two terms over the whole split gave
    2.0e-3 (5x)."""
    g = gen(fresh_seed())
    B, H, D, group, residual, T = 1, 8, 128, 32, 128, 32768
    k, v = randn(B, H, T, D, g=g, dtype=torch.float16), randn(B, H, T, D, g=g, dtype=torch.float16)
    q = randn(B, 4 * H, 1, D, g=g, dtype=torch.float16)
    nk, nv = T // residual * residual, T - residual  # quantized with the pack kernels, as the cache does
    cache = empty_kivi(B, H, D, bits, group, residual, T)
    cache["k_fp16"][:, :, : T - nk] = k[:, :, nk:]
    cache["v_fp16"][:, :, : T - nv] = v[:, :, nv:]
    K.kivi_pack_k(k[:, :, :nk].contiguous(), cache["k_codes"], cache["k_scale"], cache["k_min"], 0, bits=bits,
                  group=group)
    K.kivi_pack_v(v[:, :, :nv].contiguous(), cache["v_codes"], cache["v_scale"], cache["v_min"], 0, bits=bits,
                  group=group)
    lengths = torch.tensor([T], dtype=torch.int32, device=DEV)
    args = kivi_args(q, cache, lengths)
    kw = dict(bits=bits, group=group, residual=residual)
    ref = K.kivi_decode_attention_ref(*args, **kw).float()

    def err(variant):
        out = K.kivi_decode_attention(*args, **kw, backend="cuda", cuda_variant=variant, num_splits=1).float()
        return ((out - ref).norm() / ref.norm()).item()

    e_folded, e_registers = err("folded"), err("registers")
    assert e_folded <= 3 * e_registers, f"folded {e_folded:.2e} against registers {e_registers:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize(("bits", "group"), [(2, 16), (4, 32)])
def test_kivi_cuda_staged_on_a_second_device_gpu(bits, group):
    """The staged variant on cuda:1 while cuda:0 is current (its shared memory above 48 KiB must be allowed on
    the device that runs it), against the reference on the same device."""
    dev = torch.device("cuda:1")
    g = gen(fresh_seed())
    B, H, D, residual, cap = 2, 2, 128, 128, 2048
    cache = {k: v.to(dev) for k, v in random_kivi(B, H, D, bits, group, residual, cap, g).items()}
    q = randn(B, 4 * H, 1, D, g=g, dtype=torch.float16, scale=2.0).to(dev)
    lengths = torch.tensor([2000, 700], dtype=torch.int32, device=dev)
    args = kivi_args(q, cache, lengths)
    ref = K.kivi_decode_attention_ref(*args, bits=bits, group=group, residual=residual)
    with torch.cuda.device(0):
        out = K.kivi_decode_attention(*args, bits=bits, group=group, residual=residual, backend="cuda",
                                      cuda_variant="staged")
    assert out.device == dev
    assert_close(out, ref, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_kivi_auto_backend_takes_cuda_and_refuses_misaligned_gpu(monkeypatch):
    """backend='auto' runs the CUDA kernel for an fp16 cache it can serve; a misaligned q is refused by
    backend='cuda' with the tensor named, and 'auto' then falls back to Triton with the same result."""
    from kvlab.kernels import kivi_cuda

    calls = []
    real = kivi_cuda.kivi_decode_attention_cuda
    monkeypatch.setattr(kivi_cuda, "kivi_decode_attention_cuda", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = gen(fresh_seed())
    B, H, D, bits, group, residual, cap = 2, 2, 128, 4, 32, 64, 1024
    cache = random_kivi(B, H, D, bits, group, residual, cap, g)
    q = randn(B, 4 * H, 1, D, g=g, dtype=torch.float16, scale=2.0)
    lengths = torch.tensor([1000, 700], dtype=torch.int32, device=DEV)
    ref = K.kivi_decode_attention_ref(*kivi_args(q, cache, lengths), bits=bits, group=group, residual=residual)
    out = K.kivi_decode_attention(*kivi_args(q, cache, lengths), bits=bits, group=group, residual=residual)
    assert calls == [1]
    assert_close(out, ref, torch.float16)
    shifted = torch.empty(q.numel() + 1, device=DEV, dtype=q.dtype)[1:].view(q.shape)  # contiguous, 2 bytes off
    shifted.copy_(q)
    with pytest.raises(ValueError, match="q \\(data_ptr % 8 = 2"):
        K.kivi_decode_attention(*kivi_args(shifted, cache, lengths), bits=bits, group=group, residual=residual,
                                backend="cuda")
    out = K.kivi_decode_attention(*kivi_args(shifted, cache, lengths), bits=bits, group=group, residual=residual)
    assert calls == [1]  # the Triton kernel served it
    assert_close(out, ref, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("tune", ["r-b2s2", "b3s2", "b2s3", "loads", "compute", "v-b2s2", "v-b2s3", "v-b3s2", "v-loads",
                                  "m-b2s2", "mk-b2s2", "ca-b2s2", "mca-b2s2", "ca-loads", "m-loads", "m-loads-notail", "m-b2s3",
                                  "m-compute", "ws-b2s2", "ws-b2s3"])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_cuda_folded_tunes_gpu(bits, group, tune):
    """The folded kernel's experimental tunings (kivi_cuda.TUNES: CTAs per SM, cp.async stages, ldmatrix operands)
    compute the same attention as the default one within the same tolerance against the fp32 reference, over many
    blocks, warps and splits of long unequal sequences; the loads-only and compute-only modes (timing
    experiments, no attention) launch and write every output row (the one without window units: launch); the
    int2-only tunings refuse int4."""
    from kvlab.kernels import kivi_cuda
    from kvlab.kernels.kivi_attention import LOG2E

    if tune in kivi_cuda.WS_TUNES and not kivi_cuda.WS_BUILT:
        pytest.skip("v16's warp-specialised prototype: built with KVLAB_CUDA_CFLAGS=-DKVLAB_KIVI_WS=1 only")
    g = gen(fresh_seed())
    if tune in kivi_cuda.INT2_ONLY_TUNES and bits != 2:
        B, H, D, residual, cap = 1, 2, 128, 128, 1024
        cache = random_kivi(B, H, D, bits, group, residual, cap, g)
        q = randn(B, H * 4, 1, D, g=g, dtype=torch.float16)
        lengths = torch.tensor([1000], dtype=torch.int32, device=DEV)
        with pytest.raises(ValueError, match="exists for int2 only"):
            kivi_cuda.kivi_decode_attention_cuda(*kivi_args(q, cache, lengths), bits=bits, group=group,
                                                 residual=residual, qk_scale=D**-0.5 * LOG2E, out=torch.empty_like(q),
                                                 max_len=1000, variant="folded", chosen=True, tune=tune)
        return
    B, H, D, gqa, residual, cap = 3, 2, 128, 4, 128, 4096
    cache = random_kivi(B, H, D, bits, group, residual, cap, g)
    q = randn(B, H * gqa, 1, D, g=g, dtype=torch.float16, scale=2.0)
    lengths = torch.tensor([4096, 1000, 129], dtype=torch.int32, device=DEV)
    args = kivi_args(q, cache, lengths)
    kw = dict(bits=bits, group=group, residual=residual)
    for splits in (None, 3):
        out = torch.full_like(q, float("nan"))
        kivi_cuda.kivi_decode_attention_cuda(*args, **kw, qk_scale=D**-0.5 * LOG2E, out=out, max_len=4096, num_splits=splits,
                                             variant="folded", chosen=True, tune=tune)
        torch.cuda.synchronize()
        if kivi_cuda.COMPUTES_ATTENTION[tune]:
            assert_close(out, K.kivi_decode_attention_ref(*args, **kw), torch.float16)
        elif tune != "m-loads-notail":  # without the window units a sequence of 129 tokens sees no token at all
            assert not torch.isnan(out).all(dim=-1).any(), "an output row was not written"
    with pytest.raises(ValueError, match="tune='b9s9' is not allowed"):
        kivi_cuda.kivi_decode_attention_cuda(*args, **kw, qk_scale=D**-0.5 * LOG2E, out=out, max_len=4096,
                                             variant="folded", chosen=True, tune="b9s9")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("tune", ["m-b2s2", "mk-b2s2", "ca-b2s2", "mca-b2s2", "m-b2s3", "ws-b2s2", "ws-b2s3"])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_cuda_folded_ldsm_tunes_gqa_gpu(bits, group, tune):
    """The tunings of v13, v14 and v15 (K and V code operands read by ldmatrix from a permuted stage layout, int2 and
    int4; K codes copied through L1, int2; 3 stages, int2) against the fp32 reference on fresh random caches for every query-row
    shape the folded variant takes at this group (GQA 1, 2, 4, 8 where the column slots allow, 2 query tokens),
    unequal lengths (inside the residual window, across block and group boundaries, long), poisoned outputs,
    automatic and forced splits."""
    from kvlab.kernels import kivi_cuda
    from kvlab.kernels.kivi_attention import LOG2E

    if tune in kivi_cuda.WS_TUNES and not kivi_cuda.WS_BUILT:
        pytest.skip("v16's warp-specialised prototype: built with KVLAB_CUDA_CFLAGS=-DKVLAB_KIVI_WS=1 only")
    if tune in kivi_cuda.INT2_ONLY_TUNES and bits != 2:
        pytest.skip(f"{tune} exists for int2 only")
    slots = min(group, 64) // 8
    shapes = [(gqa, nq) for gqa, nq in ((1, 1), (2, 1), (4, 1), (8, 1), (2, 2)) if gqa * nq <= slots]
    for gqa, nq in shapes:
        g = gen(fresh_seed())
        B, H, D, residual, cap = 4, 2, 128, 128, 3072
        cache = random_kivi(B, H, D, bits, group, residual, cap, g)
        q = randn(B, H * gqa, nq, D, g=g, dtype=torch.float16, scale=2.0)
        lengths = torch.tensor([3072, 2111, 200, 100], dtype=torch.int32, device=DEV)
        args = kivi_args(q, cache, lengths)
        kw = dict(bits=bits, group=group, residual=residual)
        ref = K.kivi_decode_attention_ref(*args, **kw)
        for splits in (None, 5):
            out = torch.full_like(q, float("nan"))
            kivi_cuda.kivi_decode_attention_cuda(*args, **kw, qk_scale=D**-0.5 * LOG2E, out=out, max_len=3072,
                                                 num_splits=splits, variant="folded", chosen=True, tune=tune)
            torch.cuda.synchronize()
            assert_close(out, ref, torch.float16)
