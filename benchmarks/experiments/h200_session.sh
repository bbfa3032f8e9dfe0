#!/usr/bin/env bash
# One device call of the tenth session (KERNEL_NOTES.md, v11): build the CUDA extension (timed), then
#   sweep: the folded kernel's tunings and the variants at B=8, T=32k, then the CUDA-kernel GPU tests;
#   final: the GPU tests of the tree (tests/kernels, tests/storage), then the decode-attention benchmark.
# Usage (on the device): bash benchmarks/experiments/h200_session.sh sweep|final; logs and results under $OUT.
set -u -o pipefail
mode=${1:-sweep}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/ext MAX_JOBS=16
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm --format=csv | tee "$OUT/smi_$mode.txt"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu --format=csv -lms 1000 \
  >> "$OUT/smi_$mode.txt" &
smi=$!
t0=$(date +%s)
python3 -c "import kvlab.kernels.kivi_cuda as k; assert k.ops() is not None; print('extension built')" \
  2>&1 | tee "$OUT/build_$mode.log"
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build_$mode.log"
if [ "$mode" = sweep ]; then
  # s10-1: TUNES=all, VARIANTS=registers,staged,folded; s10-2: the staged-V tunings, no variant sweep
  python3 benchmarks/bench_decode_attention.py --out "$OUT" --cuda-tunes "${TUNES:-all}" --cuda-sweep-only \
    ${VARIANTS:+--cuda-sweep --cuda-variants $VARIANTS --cuda-splits auto,8} --groups "" 2>&1 | tee "$OUT/sweep.log"
  timeout 200 python3 -m pytest -n 8 -q tests/kernels/test_triton.py tests/kernels/test_cpu.py \
    -k "${PYTEST_K:-cuda or gpu or shape_mismatches}" 2>&1 | tail -25 | tee "$OUT/pytest_cuda.log"
else
  { echo "tree: ${TREE:-?} (this session's working tree of kvlab/kernels, tests, benchmarks), pytest -n 8"; date;
    timeout 240 python3 -m pytest -n 8 -q -rs tests/kernels tests/storage; echo "pytest rc=$?"; date; } \
    2>&1 | tee "$OUT/gpu_pytest_h200.log" | tail -15
  python3 benchmarks/bench_decode_attention.py --out "$OUT" --points 8:32768,8:131072,32:32768,1:32768 \
    --groups 32,128 --no-append 2>&1 | tee "$OUT/bench.log" | tail -60
fi
kill $smi
