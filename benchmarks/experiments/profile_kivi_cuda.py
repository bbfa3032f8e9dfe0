r"""Calls of the CUDA KIVI decode kernel at B=8, T=32k (Llama-3-8B heads), for a profiler to look at: three
int4 calls, then three int2 calls (kernel launches 0-2 and 3-5; each call also launches the split merge).

The command of run 11 (benchmarks/KERNEL_NOTES.md; it profiled launches 2-5: int4's third call and int2's
three, of which the first is int2's first ever call)::

    ncu --kernel-name regex:kivi_decode --launch-skip 2 --launch-count 4 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section SchedulerStats --section LaunchStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,dram__bytes_read.sum,\
    lts__t_sector_hit_rate.pct,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum" \
        python benchmarks/profile_kivi_cuda.py

An optional argument picks the CUDA variant (``auto``, ``staged``, ``registers``, ``folded``). Per-instruction stall
samples (where the time goes): ``ncu --kernel-name regex:kivi_decode --launch-skip 2 --launch-count 1
--section SourceCounters --section WarpStateStats --page source --print-source sass --csv python
benchmarks/profile_kivi_cuda.py staged > src.csv``, summarised by ``benchmarks/ncu_source_summary.py``.

To see only warmed-up calls use ``--launch-skip 2 --launch-count 1`` (int4) and ``--launch-skip 5
--launch-count 1`` (int2).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from bench_decode_attention import fused_kivi, kivi_cache, random_inputs  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_kivi_cuda: no CUDA device")
        return 0
    B, T = 8, 32768
    k, v, q, lengths = random_inputs(B, T, 3)
    caches = {bits: kivi_cache(k, v, bits) for bits in (4, 2)}
    variant = sys.argv[1] if len(sys.argv) > 1 else "auto"  # auto, staged, registers or folded
    for bits in (4, 2):
        for _ in range(3):
            fused_kivi(q, caches[bits], lengths, T, bits, backend="cuda", cuda_variant=variant)
    torch.cuda.synchronize()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
