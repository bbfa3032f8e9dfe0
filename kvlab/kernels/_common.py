"""Shared pieces of the kernel modules: argument checks, exact rounding and code-to-float helpers.

The ``@triton.jit`` helpers here are inlined into the kernels that call them. Division and rounding are
written so that the kernels produce exactly the codes of the torch references on any device and under
``TRITON_INTERPRET=1``; the quantizing kernels are launched with ``enable_fp_fusion=False`` so that no
multiply-add is contracted into an FMA behind our back (which would change ties).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether the Triton kernels can run for real: Triton imported and a CUDA device is present."""
    return torch.cuda.is_available() and not interpreted()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints (``triton.cdiv`` is a jitted function: slow to call from Python)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


# ---- argument checks (shared by the kernels and their references) ---------------------------------


def check_arg(name: str, t, dtypes, shape: tuple | None = None, what: str = "") -> torch.Tensor:
    """Raise ValueError unless ``t`` is a contiguous tensor of one of ``dtypes`` and (if given) ``shape``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; allowed: {allowed}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}{' ' + what if what else ''}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                         "call .contiguous() first")
    return t


def check_rank(name: str, t, rank: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {what}, got shape {tuple(t.shape)}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")


def check_pow2(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{name}={value!r} is not allowed; allowed: a power of two in [{lo}, {hi}]")


def check_window(window) -> None:
    """A sliding window for the decode kernels: None (full attention) or an int >= 1."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} is not allowed; allowed: None (full attention) or an int >= 1 "
                         "(a sliding-window layer's sliding_window)")


def check_devices(tensors: dict[str, torch.Tensor]) -> torch.device:
    """All tensors on one device, and that device one the kernels can run on (CUDA, or CPU when interpreted)."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; all tensors must share a device")
    if first.type == "cuda" or (first.type == "cpu" and interpreted()):
        return first
    raise ValueError(f"tensors are on {first}; the Triton kernels need a CUDA device "
                     "(or CPU tensors with TRITON_INTERPRET=1); use the *_ref functions elsewhere")


def call_signature(tensors, scalars) -> tuple | None:
    """Everything the argument checks of a kernel wrapper read: each tensor's shape, strides, dtype, device and
    data pointer modulo 16 (the widest alignment any kernel asks for), the other arguments with their types, and
    whether Triton runs interpreted; None (do not memoize) when one of ``tensors`` is neither a tensor nor None
    or an argument is unhashable. Computing it costs a fraction of the checks, so a wrapper called again on the
    same buffers (a decode loop) skips them (:func:`checked_once`)."""
    sig = []
    for t in tensors:
        if t is None:
            sig.append(None)
        elif isinstance(t, torch.Tensor):
            sig.append((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16))
        else:
            return None
    key = (*sig, interpreted(), *((type(x), x) for x in scalars))
    try:
        hash(key)
    except TypeError:  # e.g. a list passed for an int: the checks will say what is allowed
        return None
    return key


def checked_once(memo: dict, key, check, *args, limit: int = 4096):
    """``check(*args)`` (the argument checks of a call, raising ValueError) the first time ``key``
    (:func:`call_signature`) is seen, its remembered result after; a None key is checked every time. The memo
    forgets everything past ``limit`` entries."""
    found = None if key is None else memo.get(key)
    if found is None:
        found = check(*args)
        if key is not None:
            if len(memo) >= limit:
                memo.clear()
            memo[key] = found
    return found


def offsets_tensor(offset, B: int, device: torch.device, name: str = "offset") -> torch.Tensor:
    """``offset`` as a (B,) int32 tensor: an int is the same offset for every sequence."""
    if isinstance(offset, int):
        if offset < 0:
            raise ValueError(f"{name}={offset} is negative; allowed: an int >= 0 or a (B,) int32 tensor")
        return torch.full((B,), offset, dtype=torch.int32, device=device)
    check_arg(name, offset, (torch.int32,), (B,), "(B,): one token offset per sequence")
    return offset


def torch_to_tl(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


# ---- device helpers ----------------------------------------------------------------------------------


@triton.jit
def div_correct(y, s, inv):
    """``y / s`` correctly rounded (as IEEE division, ``torch``'s ``/``), given ``inv = 1 / s`` correctly
    rounded: a product and one FMA-corrected step (Markstein's theorem: ``q = y * inv`` is within an ulp,
    ``y - q * s`` is exact in one FMA, and ``q + (y - q * s) * inv`` rounds to the IEEE quotient), outside
    the subnormal range, where the codes are 0 either way. Three instructions instead of a division."""
    q = y * inv
    return tl.fma(tl.fma(-q, s, y), inv, q)


@triton.jit
def round_to_code(q, QMAX: tl.constexpr):
    """Clamp fp32 ``q`` to [0, QMAX] and round it to the nearest integer, ties to even, as int32 codes.

    Equal to ``torch.round(q).clamp(0, QMAX)`` for every q: adding 2**23 leaves the rounding to one IEEE
    addition (ties to even), and the integer is then the low mantissa bits. Two compares, one add, one
    integer subtract; no conversion instruction.
    """
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
    return (q + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000


@triton.jit
def round_half_away(x):
    """Round fp32 ``x`` to the nearest integer, ties away from zero (as C ``roundf``), exactly."""
    a = tl.abs(x)
    f = tl.floor(a)
    r = tl.where(a - f >= 0.5, f + 1.0, f)
    return tl.where(x < 0, -r, r)
