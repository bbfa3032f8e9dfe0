"""The CUDA C++ KIVI kernel (kvlab/csrc/kivi_attention_cuda.cuh) compiles, without a GPU.

Its numerical tests need a GPU (tests/test_kernels.py, tests/test_fused_cache.py, run through the device
tool). This one runs wherever ``nvcc`` is installed, CI included: it builds every template instance the
binding launches for sm_90 (device code only, no torch headers) and reads ptxas's resource report, so a
change that breaks the build or makes the common configuration spill to local memory fails here first.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "kvlab" / "csrc"
INSTANCES = [(bits, d, nt) for bits in (4, 2) for d in (128, 64) for nt in (1, 2)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs the CUDA compiler nvcc")
def test_cuda_kivi_kernel_compiles_without_spills(tmp_path):
    src = tmp_path / "instances.cu"
    lines = [f'#include "{CSRC / "kivi_attention_cuda.cuh"}"']
    lines += [f"template __global__ void kvlab::kivi_decode_kernel<{b}, {d}, {n}>(const kvlab::KiviParams);"
              for b, d, n in INSTANCES]
    lines += [f"template __global__ void kvlab::kivi_merge_kernel<{d}>(const float*, const float*, __half*, int);"
              for d in (64, 128)]
    src.write_text("\n".join(lines) + "\n")
    cmd = ["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-cubin", "-Xptxas", "-v",
           "-o", str(tmp_path / "instances.cubin"), str(src)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.stdout + run.stderr
    # ptxas -v: per entry function, "Compiling entry function '<mangled>'", then spills, then registers
    entries = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) registers",
                         report, flags=re.S)
    decode = {name: (int(spill), int(regs)) for name, spill, regs in entries if "kivi_decode_kernel" in name}
    print({n[-32:]: v for n, v in decode.items()})  # (spill bytes, registers), shown with -s
    assert len(decode) == len(INSTANCES), report[-3000:]
    for (bits, d, nt) in INSTANCES:
        name = f"_ZN5kvlab18kivi_decode_kernelILi{bits}ELi{d}ELi{nt}EEEvNS_10KiviParamsE"
        spill, regs = decode[name]
        if nt == 1:  # up to 8 query rows per kv head (GQA 4 or 8, one query token): the configuration timed
            assert spill == 0, f"kivi_decode_kernel<{bits}, {d}, {nt}> spills {spill} bytes to local memory"
