#!/usr/bin/env bash
# ncu on the default folded kernel at B=8, T=32k (KERNEL_NOTES.md, v15, run s17-4): for int2 and int4, the third
# decode call's warp states, scheduler and memory sections (text), and its per-instruction stall samples summarised
# by code region (ncu_source_summary.py). Clocks left alone (--clock-control none). Usage (on the device, after the
# extension is built): bash benchmarks/experiments/ncu_folded.sh; files under $OUT.
set -u -o pipefail
OUT=${OUT:-/tmp/out}
for bits in 2 4; do
  ncu --clock-control none -k regex:kivi_decode_folded --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SourceCounters -f -o /tmp/ncu_int$bits \
    python3 -c "
import sys, torch; sys.path.insert(0, 'benchmarks'); import bench_decode_attention as bd
B, T, bits = 8, 32768, $bits
k, v, q, lengths = bd.random_inputs(B, T, 6)
c = bd.kivi_cache(k, v, bits); del k, v
for _ in range(3): bd.fused_kivi(q, c, lengths, T, bits, backend='cuda')
torch.cuda.synchronize()
" > /tmp/ncu_run_$bits.log 2>&1 || tail -5 /tmp/ncu_run_$bits.log
  ncu --import /tmp/ncu_int$bits.ncu-rep --page details > "$OUT/ncu_folded_int${bits}_h200.txt" 2>&1
  ncu --import /tmp/ncu_int$bits.ncu-rep --page source --print-source sass --csv > /tmp/src_$bits.csv 2>/dev/null \
    && python3 benchmarks/experiments/ncu_source_summary.py /tmp/src_$bits.csv 20 >> "$OUT/ncu_folded_int${bits}_h200.txt" 2>&1
  grep -E "Duration|Issue Slots|No Eligible|Active Warps|Eligible Warps|Warp Cycles Per Issued|Memory Throughput|DRAM Throughput|Stall" \
    "$OUT/ncu_folded_int${bits}_h200.txt" | head -30
done
