"""The CUDA C++ KIVI decode attention (``kvlab/kernels/csrc/kivi_attention_*``): the same function as the Triton kernel
in :mod:`.kivi_attention`, on the same cache, written so that every packed code reaches the matrix unit's
operand registers with plain loads (the layout argument is in ``kivi_attention_cuda.cuh``). Three variants:
``"registers"`` (every code and scale loaded straight into registers, one block ahead), ``"staged"`` (the
next block's K codes and all scales copied into shared memory with cp.async, so that 3 CTAs fit an SM;
``kivi_attention_staged.cuh``) and ``"folded"`` (staged loads; the raw codes go to the matrix unit as fp16
subnormals and the scales are folded into the query and P operands, which halves the instructions per code;
``kivi_attention_folded.cuh``). ``"auto"`` takes the first of :func:`auto_variants` that can serve the call
(:func:`staged_unsupported`, :func:`folded_unsupported`).

Built on first use with ``torch.utils.cpp_extension.load`` (needs a CUDA build of torch, the CUDA compiler
``nvcc`` of the same major version, and ``ninja``; about a minute, then cached under ``TORCH_EXTENSIONS_DIR``).
``KVLAB_CUDA_CFLAGS`` adds nvcc flags (experiments, e.g. ``-DKVLAB_KIVI_MIN_BLOCKS=3``). Where it cannot be
built, or with ``KVLAB_CUDA_KERNELS=0``, :func:`ops` returns None (one warning) and
:func:`kvlab.kernels.kivi_decode_attention` uses the Triton kernel. :func:`unsupported` says which calls
it serves: fp16 queries, head_dim 64 or 128, at most 16 query rows per kv head (GQA x query tokens), a
group of at least head_dim / 8, aligned contiguous rows, compute capability 8.0 or newer.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

from kvlab.kernels._common import num_sms
from kvlab.kernels.splitk import plan_splits

__all__ = ["enabled", "ops", "reset", "unsupported", "staged_unsupported", "folded_unsupported", "misaligned",
           "choose_variant", "kivi_decode_attention_cuda", "BLOCK"]

_DIR = Path(__file__).resolve().parent / "csrc"
_state: dict = {}
BLOCK = 64  # tokens per warp-block of the kernel (KiviCfg::BN)
WARPS = 4
VARIANTS = {"registers": 6, "staged": 7, "folded": 8}  # kivi_attention_cuda.h: KIVI_VARIANT_*
# The extension's translation units (ninja compiles them in parallel): the binding, the registers and staged
# variants with the dispatch, the folded variant, and the folded variant's experimental tunings.
SOURCES = ("kivi_binding.cpp", "kivi_attention_cuda.cu", "kivi_attention_folded.cu", "kivi_attention_tuned_int2.cu",
           "kivi_attention_tuned_int4.cu")
# Experimental tunings of the folded kernel (kivi_attention_launch.cuh: KVLAB_KIVI_TUNES; D = 128, groups 32 and
# 128), by name: CTAs per SM of the register budget (b), cp.async stages (s), the V codes staged by cp.async with
# the rest of a block ("v-" prefix) instead of loaded into registers, and two modes that compute no attention:
# "loads" (every block's loads, no arithmetic) and "compute" (the arithmetic over the first block's data, no
# further loads). "m-" (V codes staged in ldmatrix's layout, the K and V code operands read by ldmatrix) and
# "mk-" (the K code operands by ldmatrix, V codes into registers): int2 (v13) and int4 (v14); for int2 only (v13):
# "ca-" (the K codes copied through L1, cp.async.ca; "ca-loads": its loads alone) and "mca-" ("m-" and "ca-");
# "m-loads": the "m-" layout's loads alone, "m-loads-notail": the same without the window units after the main blocks
# (v15: what the tail costs a call); "m-b2s3": the "m-" layout with 3 stages (int2 only: int4's would need more
# shared memory than 2 CTAs an SM have); "m-compute": the "m-" layout's arithmetic alone (v16: what the overlap of
# loads and arithmetic could buy).
# The benchmark's --cuda-tunes times them (benchmarks/KERNEL_NOTES.md, v11, v13, v14); the public API runs the
# default (TUNES["b2s2"] = 0), which at head_dim 128 is the "m-" layout for int2 since run s14-1 and for int4 at
# groups of 32 or more since s16-1; "r-b2s2" is v11's layout (V codes into registers, no ldmatrix), the default
# before, and the other tunings keep its V codes (in registers, or staged without ldmatrix).
TUNES = {"b2s2": 0, "r-b2s2": 8220, "b3s2": 320, "b2s3": 230, "loads": 221, "compute": 222, "v-b2s2": 1220,
         "v-b2s3": 1230, "v-b3s2": 1320, "v-loads": 1221, "m-b2s2": 2220, "mk-b2s2": 3220, "ca-b2s2": 4220,
         "mca-b2s2": 6220, "ca-loads": 4221, "m-loads": 2221, "m-loads-notail": 2223,
         "m-b2s3": 2230, "m-compute": 2222}
# v16's warp-specialised prototype of the "m-" layout (int2; 8 warps a CTA, 4 of them copying): built only with
# KVLAB_CUDA_CFLAGS=-DKVLAB_KIVI_WS=1, and fast only for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a: setmaxnreg); not yet run
# on a GPU (benchmarks/KERNEL_NOTES.md, v16).
WS_BUILT = "-DKVLAB_KIVI_WS=1" in os.environ.get("KVLAB_CUDA_CFLAGS", "").split()
WS_TUNES = {"ws-b2s2": 34220, "ws-b2s3": 34230}
if WS_BUILT:
    TUNES.update(WS_TUNES)
INT2_ONLY_TUNES = (frozenset(name for name, tune in TUNES.items() if (tune // 1000) & 4) | {"m-b2s3"}
                   | frozenset(WS_TUNES))
COMPUTES_ATTENTION = {name: tune % 10 == 0 for name, tune in TUNES.items()}
# What "auto" tries, in order, for each bit width (the first that can serve the call). On an H100 at B=8, T=32k
# (Llama-3-8B heads, benchmarks/KERNEL_NOTES.md, v8) int2 took 92.9 us folded, 103.7 staged, 115.5 registers
# (from CUDA graphs); int4 at group 32 took 130-132 us folded or registers and 137 staged; at groups of 64 and
# more folded was the fastest for int4 too (run s8-1). On the H200, where the project now measures (run s10-1,
# eager, L2 evicted), the order is the same for both widths at group 32: int4 99.0 us folded, 114.4 staged,
# 124.6 registers; int2 89.6 / 105.2 / 119.9. So "auto" tries folded, then staged, then registers (which
# serves every call) for int2 and int4 alike; the folded variant's rounding error is about twice the others'
# (7.6e-4 against 3.9e-4 for int4 there; tests/kernels hold it within 3x).
AUTO_VARIANTS = {2: ("folded", "staged", "registers"), 4: ("folded", "staged", "registers")}


def auto_variants(bits: int, group: int) -> tuple[str, ...]:
    """The variants "auto" tries for a call, fastest first (the comment above says where the order comes from)."""
    return AUTO_VARIANTS[bits]


def enabled() -> bool:
    """False when ``KVLAB_CUDA_KERNELS`` is set to 0/false/no/off."""
    return os.environ.get("KVLAB_CUDA_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def ops():
    """The compiled module (``decode``, ``occupancy``), or None where disabled, without CUDA, or not
    buildable (warned once). Decided at the first call; :func:`reset` forgets."""
    if "module" in _state:
        return _state["module"]
    module = None
    if enabled() and torch.cuda.is_available() and torch.version.cuda is not None:
        try:
            from torch.utils.cpp_extension import load

            print("kvlab: loading the CUDA KIVI attention kernel (compiled once, about a minute the first time)",
                  file=sys.stderr, flush=True)
            module = load(
                name="kvlab_kivi_cuda",
                sources=[str(_DIR / name) for name in SOURCES],
                extra_include_paths=[str(_DIR)],
                extra_cuda_cflags=["-O3", "-std=c++17", *os.environ.get("KVLAB_CUDA_CFLAGS", "").split()],
                verbose=False,
            )
        except Exception as e:  # no nvcc, a version mismatch, no ninja: the Triton kernel still works
            warnings.warn(f"kvlab: the CUDA KIVI attention kernel could not be built ({type(e).__name__}: "
                          f"{str(e)[:400]}); kivi_decode_attention uses the Triton kernel", stacklevel=2)
    _state["module"] = module
    return module


def reset() -> None:
    """Forget the decision of :func:`ops` and the learnt occupancies."""
    _state.clear()


def _aligned(t: torch.Tensor, nbytes: int, dims: int = 3) -> bool:
    """Data pointer and the leading ``dims`` strides (in bytes) multiples of ``nbytes``; last stride 1."""
    es = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % nbytes == 0
            and all((s * es) % nbytes == 0 for s in t.stride()[:dims]))


def unsupported(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths, bits,
                group) -> str | None:
    """Why the CUDA kernel cannot serve this (already validated) call, or None when it can."""
    _, Hq, NQ, D = q.shape
    H = k_codes.shape[1]
    if q.device.type != "cuda":
        return "tensors are not on a CUDA device"
    cap = torch.cuda.get_device_capability(q.device)
    if cap < (8, 0):
        return f"the device has compute capability {cap[0]}.{cap[1]}; the kernel needs 8.0 or newer (mma.sync)"
    if q.dtype != torch.float16:
        return f"q is {q.dtype}; the CUDA kernel takes float16"
    if D not in (64, 128):
        return f"head_dim D={D}; the CUDA kernel takes 64 or 128"
    if Hq // H * NQ > 16:
        return f"{Hq // H} query heads per kv head x {NQ} query tokens = {Hq // H * NQ} rows; at most 16"
    if group < D // 8:
        return f"group={group} < head_dim / 8 = {D // 8} (each lane's V channels must share one group)"
    return misaligned(dict(q=q, k_codes=k_codes, k_scale=k_scale, k_min=k_min, k_fp16=k_fp16, v_codes=v_codes,
                           v_scale=v_scale, v_min=v_min, v_fp16=v_fp16, lengths=lengths), bits, D)


def misaligned(t: dict, bits: int, D: int) -> str | None:
    """Which tensor of a call (names as :func:`unsupported`'s arguments) is not aligned for the kernel's
    vector loads, and what is allowed; None when all are."""
    need = dict(q=8, k_codes=4 if bits == 4 else 2, k_scale=8, k_min=8, v_codes=bits * D // 64, v_scale=2,
                v_min=2, k_fp16=t["k_fp16"].element_size(), v_fp16=t["v_fp16"].element_size())
    for name, nbytes in need.items():
        x = t[name]
        if not _aligned(x, nbytes):
            return (f"{name} (data_ptr % {nbytes} = {x.data_ptr() % nbytes}, strides {tuple(x.stride())}, "
                    f"{x.element_size()}-byte elements) is not aligned for the kernel's loads; allowed: last stride"
                    f" 1, pointer and leading strides multiples of {nbytes} bytes")
    if not t["lengths"].is_contiguous():
        return "lengths is not contiguous; allowed: a contiguous (B,) int32 tensor"
    return None


def staged_unsupported(q, k_codes, k_scale, k_min, v_scale, v_min, group: int) -> str | None:
    """Why the staged variant cannot serve a call that :func:`unsupported` accepts, or None when it can."""
    _, Hq, NQ, D = q.shape
    if Hq // k_codes.shape[1] * NQ > 8:
        return f"{Hq // k_codes.shape[1] * NQ} query rows per kv head; the staged variant takes at most 8"
    if D % group or D // group not in (1, 2, 4, 8):
        return f"head_dim / group = {D}/{group}; the staged variant takes 1, 2, 4 or 8"
    for name, t in dict(k_codes=k_codes, k_scale=k_scale, k_min=k_min, v_scale=v_scale, v_min=v_min).items():
        if not _aligned(t, 16, dims=2 if name.startswith("v_") else 3):
            return f"{name} rows are not 16-byte aligned (data_ptr % 16 = {t.data_ptr() % 16}, strides {tuple(t.stride())})"
    for name, t in dict(v_scale=v_scale, v_min=v_min).items():
        if t.stride(2) != D // group:
            return f"{name} is not contiguous per token (stride {t.stride(2)}, allowed {D // group})"
    return None


def folded_unsupported(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits: int, group: int) -> str | None:
    """Why the folded variant cannot serve a call that :func:`unsupported` accepts, or None when it can: what the
    staged variant needs (:func:`staged_unsupported`), V codes contiguous per token, and query rows per kv head
    that fit its mma column slots, ``min(group, 64) / 8`` (one copy of the query rows per K group of a 64-token
    block and per V group of 64 channels); at head_dim 128, for int2 and for int4 at groups of 32 or more, 16-byte
    aligned V code rows (the default instance stages them by 16-byte copies and reads the code operands by ldmatrix:
    KERNEL_NOTES.md, v13, v14)."""
    _, Hq, NQ, D = q.shape
    rows = Hq // k_codes.shape[1] * NQ
    if not (group in (16, 32) or group % 64 == 0):
        return f"group={group}; the folded variant takes 16, 32 or a multiple of 64"
    slots = min(group, 64) // 8
    if rows > slots:
        return (f"{Hq // k_codes.shape[1]} query heads per kv head x {NQ} query tokens = {rows} rows; the folded "
                f"variant takes at most min(group, 64) / 8 = {slots} at group={group}")
    why = staged_unsupported(q, k_codes, k_scale, k_min, v_scale, v_min, group)
    if why is not None:
        return why
    if v_codes.stride(2) != D * bits // 8:
        return f"v_codes is not contiguous per token (stride {v_codes.stride(2)}, allowed {D * bits // 8})"
    ldsm = (bits == 2 and D % 128 == 0) or (bits == 4 and D == 128 and group >= 32)  # folded_default_vst (v13, v14)
    if ldsm and not _aligned(v_codes, 16, dims=2):  # staged by 16-byte copies
        return (f"v_codes rows are not 16-byte aligned (data_ptr % 16 = {v_codes.data_ptr() % 16}, strides "
                f"{tuple(v_codes.stride())}); the folded variant stages int{bits} V codes by 16-byte copies at "
                f"head_dim {D}, group={group}")
    return None


def _occupancy(mod, bits: int, D: int, nt: int, variant: int, group: int, device: torch.device,
               tune: int = 0) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = ("occ", bits, D, nt, variant, group, index, tune)
    if key not in _state:
        _state[key] = max(1, int(mod.occupancy(bits, D, nt, variant, group, index, tune)))
    return _state[key]


def plan(batch_heads: int, max_len: int, residual: int, device: torch.device, resident: int,
         num_splits: int | None = None) -> tuple[int, int]:
    """(CTAs per (sequence, kv head) along the sequence, tokens of the quantized region per CTA). The region
    is the full ``BLOCK``s before the last ``residual`` tokens of the longest sequence; the CTAs also share
    the tokens after it. Automatic: one full wave (``resident`` CTAs per SM) and at least two blocks per warp;
    a CTA's tokens are a multiple of ``WARPS * BLOCK``. Where that wave leaves room for one more CTA per (sequence,
    kv head) and each warp has at least 4 blocks, one more split with no main block takes the tokens after the region
    (the window units; the kernel gives them to the splits with no block of a sequence: ``tail_units``), so that no
    warp carries them on top of its blocks (KERNEL_NOTES.md, v15)."""
    region = max(0, (max_len - residual) // BLOCK * BLOCK)
    n, split_len = plan_splits(batch_heads, region, WARPS * BLOCK, device, num_splits, resident, min_blocks=2)
    if num_splits is None and split_len >= 4 * WARPS * BLOCK and (n + 1) * batch_heads <= num_sms(device) * resident:
        n += 1
    return n, split_len


def choose_variant(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits: int, group: int,
                   variant: str = "auto") -> str:
    """The variant that serves a call :func:`unsupported` accepts: ``variant`` itself (ValueError saying why
    where :func:`staged_unsupported` / :func:`folded_unsupported` objects), or for "auto" the first of
    ``auto_variants(bits, group)`` that can."""
    why_not = dict(registers=lambda: None,
                   staged=lambda: staged_unsupported(q, k_codes, k_scale, k_min, v_scale, v_min, group),
                   folded=lambda: folded_unsupported(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, group))
    if variant == "auto":
        return next(v for v in auto_variants(bits, group) if why_not[v]() is None)
    why = why_not[variant]()
    if why is not None:
        raise ValueError(f"cuda_variant={variant!r} cannot serve this call: {why}; allowed: 'registers' or 'auto'")
    return variant


def kivi_decode_attention_cuda(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths, *,
                               bits: int, group: int, residual: int, qk_scale: float, out: torch.Tensor,
                               max_len: int, num_splits: int | None = None, variant: str = "auto",
                               chosen: bool = False, tune: str = "b2s2") -> torch.Tensor:
    """Run the CUDA kernel into ``out`` (arguments already validated, :func:`unsupported` returned None);
    ``variant`` as :func:`choose_variant` takes it, or (``chosen=True``) what it returned for this call's
    geometry. ``tune`` (experiments; a key of :data:`TUNES`, folded variant, D = 128, groups 32 and 128 only):
    an experimental instance of the folded kernel; "loads" and "compute" compute no attention."""
    mod = ops()
    if mod is None:
        raise RuntimeError("the CUDA KIVI kernel is not available (see the warning from its build)")
    B, Hq, NQ, D = q.shape
    H = k_codes.shape[1]
    nt = 1 if Hq // H * NQ <= 8 else 2
    if not chosen:
        variant = choose_variant(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, bits, group, variant)
    vid = VARIANTS[variant]
    if tune not in TUNES:
        raise ValueError(f"tune={tune!r} is not allowed; allowed: {', '.join(TUNES)}")
    tid = TUNES[tune]
    if tid and not (variant == "folded" and D == 128 and group in (32, 128) and nt == 1):
        raise ValueError(f"tune={tune!r} exists for the folded variant at head_dim 128, groups 32 and 128 only")
    if tune in INT2_ONLY_TUNES and bits != 2:
        raise ValueError(f"tune={tune!r} exists for int2 only (bits={bits})")
    if (tid // 1000) % 4 in (1, 2) and not _aligned(v_codes, 16, dims=2):
        raise ValueError(f"tune={tune!r} stages the V codes by 16-byte copies: v_codes rows must be 16-byte aligned")
    resident = _occupancy(mod, bits, D, nt, vid, group, q.device, tid)
    n_main, split_len = plan(B * H, max_len, residual, q.device, resident, num_splits)
    rows = B * Hq * NQ
    o_part = torch.empty((rows, n_main, D), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((rows, n_main), device=q.device, dtype=torch.float32)
    mod.decode(q, k_codes, k_scale, k_min, k_fp16, v_codes, v_scale, v_min, v_fp16, lengths, o_part, lse_part,
               out, bits, group, residual, n_main, split_len, qk_scale, vid, tid)  # out: contiguous (checked by the caller)
    return out
