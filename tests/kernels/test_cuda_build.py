"""The CUDA C++ KIVI kernels (kvlab/kernels/csrc/kivi_attention_*.cu) compile, without a GPU.

Their numerical tests need a GPU (tests/test_kernels.py, tests/test_fused_cache.py, run through the device
tool). This one runs wherever ``nvcc`` is installed, CI included: it compiles the kernels' translation unit
(every template instance the binding launches, and the launchers; no torch headers) for sm_90 and reads
ptxas's resource report, so that a change that breaks the build or makes the timed configurations spill to
local memory (or the staged variant lose its 3 CTAs per SM, the folded one its 2) fails here first. The units
(kivi_binding.cpp aside) are compiled one after another; the experimental tunings of the folded kernel must
build, and their register budgets hold (spills there are reported, not refused: they are for timing).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "kvlab" / "kernels" / "csrc"
REGISTERS = [(bits, d, nt) for bits in (4, 2) for d in (128, 64) for nt in (1, 2)]
STAGED = [(bits, d, dg) for bits in (4, 2) for d in (128, 64) for dg in (1, 2, 4, 8)]
FOLDED = STAGED  # same instances: (bits, D, D / group)
UNITS = ("kivi_attention_cuda.cu", "kivi_attention_folded.cu", "kivi_attention_tuned_int2.cu",
         "kivi_attention_tuned_int4.cu")
# experimental tunings of the folded kernel (kivi_attention_launch.cuh): (V codes staged, min blocks, stages, mode)
TUNES = [(8, 2, 2, 0), (0, 3, 2, 0), (0, 2, 3, 0), (0, 2, 2, 1), (0, 2, 2, 2), (1, 2, 2, 0), (1, 2, 3, 0), (1, 3, 2, 0), (1, 2, 2, 1)]
TUNES_INT2 = [(2, 2, 2, 0), (3, 2, 2, 0), (4, 2, 2, 0), (6, 2, 2, 0), (4, 2, 2, 1), (2, 2, 2, 1), (2, 2, 2, 3), (2, 2, 3, 0), (2, 2, 2, 2)]  # ldmatrix operands, K via L1 (v13); loads, 3 stages (v15); compute (v16)
TUNES_INT4 = [(2, 2, 2, 0), (3, 2, 2, 0), (2, 2, 2, 1), (2, 2, 2, 3), (2, 2, 2, 2)]  # ldmatrix operands (v14); loads alone (v15); compute (v16)
VSTAGE_DEFAULT = 0  # KVLAB_KIVI_FOLDED_VSTAGE; int2 at D = 128, int4 at D = 128 and groups >= 32: 2 (folded_default_vst, v13, v14)


def folded_name(bits, d, dg, minb=2, stages=2, mode=0, vst=None):
    if vst is None:
        vst = 2 if (bits == 2 and d % 128 == 0) or (bits == 4 and d == 128 and d // dg >= 32) else VSTAGE_DEFAULT
    return (f"_ZN5kvlab25kivi_decode_folded_kernelILi{bits}ELi{d}ELi{dg}ELi{minb}ELi{stages}ELi{mode}ELi{vst}EEEv"
            "NS_10KiviParamsE")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA compiler nvcc")
def test_cuda_kivi_kernels_compile_without_spills(tmp_path):
    report = ""
    for unit in UNITS:
        cmd = ["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-c", "-Xptxas", "-v",
               "-I", str(CSRC), "-o", str(tmp_path / (unit + ".o")), str(CSRC / unit)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        report += run.stdout + run.stderr
    # ptxas -v: per entry function, "Compiling entry function '<mangled>'", then spills, then registers
    entries = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) registers",
                         report, flags=re.S)
    found = {name: (int(spill), int(regs)) for name, spill, regs in entries}
    print({n[-40:]: v for n, v in found.items()})  # (spill bytes, registers), shown with -s
    for bits, d, nt in REGISTERS:
        spill, regs = found[f"_ZN5kvlab18kivi_decode_kernelILi{bits}ELi{d}ELi{nt}EEEvNS_10KiviParamsE"]
        if nt == 1:  # up to 8 query rows per kv head (GQA 4 or 8, one query token): the configuration timed
            assert spill == 0, f"kivi_decode_kernel<{bits}, {d}, {nt}> spills {spill} bytes to local memory"
    for bits, d, dg in STAGED:
        spill, regs = found[f"_ZN5kvlab25kivi_decode_staged_kernelILi{bits}ELi{d}ELi1ELi{dg}EEEvNS_10KiviParamsE"]
        assert spill == 0, f"kivi_decode_staged_kernel<{bits}, {d}, 1, {dg}> spills {spill} bytes"
        assert regs <= 168, f"kivi_decode_staged_kernel<{bits}, {d}, 1, {dg}> uses {regs} registers (3 CTAs: 168)"
    for bits, d, dg in FOLDED:
        spill, regs = found[folded_name(bits, d, dg)]
        assert spill == 0, f"kivi_decode_folded_kernel<{bits}, {d}, {dg}> spills {spill} bytes"
        assert regs <= 255, f"kivi_decode_folded_kernel<{bits}, {d}, {dg}> uses {regs} registers (2 CTAs: 255)"
    for bits in (2, 4):
        for dg in (4, 1):  # groups 32 and 128 at D = 128
            for vst, minb, stages, mode in TUNES + (TUNES_INT2 if bits == 2 else TUNES_INT4):
                spill, regs = found[folded_name(bits, 128, dg, minb, stages, mode, vst)]
                print(f"tuned folded<{bits}, 128, {dg}, {minb}, {stages}, {mode}, {vst}>: {regs} registers, "
                      f"{spill} B spilled")
                assert regs <= 65536 // (128 * minb), f"tuned folded {minb} CTAs: {regs} registers"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA compiler nvcc")
def test_cuda_kivi_ws_prototype_compiles_for_sm90a(tmp_path):
    """v16's warp-specialised prototype (-DKVLAB_KIVI_WS=1, int2 unit) builds for sm_90a, where setmaxnreg hands the
    producer warps' registers to the consumers: 128 registers at entry (256 threads, 2 CTAs an SM) and almost no
    spills (the default instance, 4 warps, needs ~224); for plain sm_90 it would spill hundreds of bytes."""
    unit = "kivi_attention_tuned_int2.cu"
    cmd = ["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-DKVLAB_KIVI_WS=1", "-c", "-Xptxas",
           "-v", "-I", str(CSRC), "-o", str(tmp_path / (unit + ".o")), str(CSRC / unit)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    entries = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) registers",
                         run.stdout + run.stderr, flags=re.S)
    found = {name: (int(spill), int(regs)) for name, spill, regs in entries}
    for dg in (4, 1):
        for stages in (2, 3):
            spill, regs = found[folded_name(2, 128, dg, 2, stages, 0, 34)]
            print(f"ws folded<2, 128, {dg}, 2, {stages}, 0, 34> (sm_90a): {regs} registers, {spill} B spilled")
            assert regs == 128, f"ws prototype: {regs} registers at entry (256 threads x 2 CTAs: 128)"
            assert spill <= 16, f"ws prototype spills {spill} bytes: setmaxnreg did not take"
