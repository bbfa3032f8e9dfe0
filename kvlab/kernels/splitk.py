"""Flash-decoding plumbing: how to split the sequence, and the log-sum-exp merge of the splits.

A decode kernel runs one program per (sequence, kv head, split of the tokens). Each program writes its
split's softmax-normalised partial output ``o_s`` and its log-sum-exp ``lse_s`` (base 2, of the scaled
scores); the merge is ``out = sum_s w_s o_s`` with ``w_s = 2**(lse_s - max lse) / sum 2**(lse - max lse)``.
A split that saw no token has ``lse_s = -inf`` and weight 0.
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from kvlab.kernels._common import cdiv, next_pow2, num_sms

__all__ = ["merge_splits", "merge_splits_ref", "plan_splits", "split_decode"]


# CTAs of each compiled decode kernel that fit on one SM, learnt from the first launch of that kernel
_RESIDENT: dict[tuple, int] = {}


def _resident_ctas(compiled, device: torch.device) -> int | None:
    """How many CTAs of ``compiled`` one SM holds at once: registers, shared memory and warps."""
    try:
        n_regs, warps, smem = compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared
    except AttributeError:  # the interpreter launches nothing that has these
        return None
    props = torch.cuda.get_device_properties(device)
    regs_per_warp = -(-max(int(n_regs), 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = (getattr(props, "regs_per_multiprocessor", 65536) // regs_per_warp) // warps
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    by_smem = smem_sm // (smem + 1024) if smem else 32  # + the 1 KiB the driver reserves per CTA
    by_warps = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    return max(1, min(by_regs, by_smem, by_warps, 32))


def plan_splits(batch_heads: int, max_len: int, block_n: int, device: torch.device,
                num_splits: int | None = None, resident: int | None = None,
                min_blocks: int = 4) -> tuple[int, int]:
    """(num_splits, tokens per split). Automatic: as many splits as fill every CTA slot of the device
    once (``resident`` CTAs per SM, 2 when unknown), so that the programs run as one full wave, but no
    split shorter than ``min_blocks`` blocks. Split lengths are multiples of ``block_n`` so that every split
    starts on a block (and so a quantization group) boundary."""
    max_len = max(int(max_len), 1)
    if num_splits is None:
        slots = num_sms(device) * (resident or 2)
        num_splits = max(1, min(slots // batch_heads, cdiv(max_len, min_blocks * block_n)))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits={num_splits!r} is not allowed; allowed: an int >= 1 (or None: automatic)")
    split_len = cdiv(cdiv(max_len, num_splits), block_n) * block_n
    return cdiv(max_len, split_len), split_len


_PARAMS: dict = {}


def _runtime_params(kernel) -> list[str]:
    """Names of ``kernel``'s parameters before its first ``tl.constexpr`` one, in order."""
    if kernel not in _PARAMS:
        names = []
        for p in inspect.signature(kernel.fn).parameters.values():
            if "constexpr" in str(p.annotation):
                break
            names.append(p.name)
        _PARAMS[kernel] = names
    return _PARAMS[kernel]


def split_decode(kernel, q: torch.Tensor, out: torch.Tensor, batch_heads: int, max_len: int, block_n: int,
                 num_splits: int | None, args: dict, static: dict) -> torch.Tensor:
    """Plan the splits, launch ``kernel`` on a (batch_heads, splits) grid and merge the splits into ``out``.

    ``args``: the kernel's runtime arguments by name; ``static``: its constexprs and launch options.
    The kernel takes ``o_ptr``, ``lse_ptr``, ``SPLITS``, ``SPLIT_LEN`` and the constexpr ``ONE_SPLIT``
    (with one split it writes the normalised output straight into ``out``)."""
    key = (kernel.fn.__qualname__ if hasattr(kernel, "fn") else str(kernel), q.device,
           tuple(sorted((k, str(v)) for k, v in static.items())))
    splits, split_len = plan_splits(batch_heads, max_len, block_n, q.device, num_splits, _RESIDENT.get(key))
    B, Hq, NQ, D = q.shape
    if splits == 1:
        o, lse = out, out  # lse is not touched
    else:
        o = torch.empty((B, Hq, NQ, splits, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((B, Hq, NQ, splits), device=q.device, dtype=torch.float32)
    args = {**args, "o_ptr": o, "lse_ptr": lse, "SPLITS": splits, "SPLIT_LEN": split_len}
    # runtime arguments by position (Triton binds a long list of keyword arguments much more slowly)
    compiled = kernel[(batch_heads, splits)](*(args[n] for n in _runtime_params(kernel)), ONE_SPLIT=splits == 1,
                                             **static)
    if key not in _RESIDENT and q.device.type == "cuda":
        resident = _resident_ctas(compiled, q.device)
        if resident is not None:
            _RESIDENT[key] = resident
    if splits > 1:
        merge_splits(o, lse, out)
    return out


@triton.jit
def _merge_kernel(
    o_ptr,  # (R, S, D) fp32 per-split normalised outputs, R = B * Hq * n rows
    lse_ptr,  # (R, S) fp32 per-split log2-sum-exp2 of the scaled scores (-inf: empty split)
    out_ptr,  # (R, D) output (q's dtype)
    S,  # number of splits
    D: tl.constexpr,  # head_dim
    BLOCK_S: tl.constexpr,  # next power of two >= S
):
    r = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    sm = s < S
    lse = tl.load(lse_ptr + r * S + s, mask=sm, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    w = tl.where(sm & (lse > float("-inf")), tl.exp2(lse - mx), 0.0)
    o = tl.load(o_ptr + (r * S + s)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + r * D + d, out.to(out_ptr.dtype.element_ty))


def merge_splits(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Merge split partials ``o`` (..., S, D) fp32 and ``lse`` (..., S) into ``out`` (..., D)."""
    S, D = o.shape[-2:]
    rows = o.numel() // (S * D)
    _merge_kernel[(rows,)](o, lse, out, S, D=D, BLOCK_S=next_pow2(S))
    return out


def merge_splits_ref(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference of :func:`merge_splits`."""
    w = torch.softmax(lse * math.log(2.0), dim=-1)  # 2**lse normalised over splits
    out.copy_((o * w[..., None]).sum(-2))
    return out
