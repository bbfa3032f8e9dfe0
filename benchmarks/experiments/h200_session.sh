#!/usr/bin/env bash
# One device call (KERNEL_NOTES.md, v11-v12): build the CUDA extension (timed), then
#   sweep: the folded kernel's tunings and the variants at B=8, T=32k, then the CUDA-kernel GPU tests;
#   final: the GPU tests of the tree (tests/kernels, tests/storage), then the decode-attention benchmark.
# Wheels under .whl/ (carried: FlashInfer and its apache-tvm-ffi, which the device image lacks) are installed
# first; FlashInfer's JIT builds its decode kernels on the CPU while the GPU tests run.
#   tests: the GPU tests only, without FlashInfer's JIT beside them (s18-1: the proof of the tree in its own call);
#   bench: FlashInfer's JIT, then the benchmark, then (TUNES set) the folded kernel's tunings at B=8, T=32k
#     ($OUT/tunes.log), then (REPEAT, default 1) the B=8, T=32k point of SDPA and the CUDA kernel again
#     ($OUT/repeat_decode_attention_h200.txt: a second reading of the eager int2 figure, disturbed in s17-6); 7 files
#     under $OUT; run it on the warm machine right after `tests`;
#   ws: v16's warp-specialised prototype, built apart (TORCH_CUDA_ARCH_LIST=9.0a, -DKVLAB_KIVI_WS=1, its own
#     TORCH_EXTENSIONS_DIR): its GPU tests (a timeout: a wrong mbarrier phase would hang), then WS_TUNES (default
#     ws-b2s2,ws-b2s3) timed beside `auto` of the same sm_90a build at B=8, T=32k;
#   e2e: bench_fused_cache.py (DynamicCache, StaticCache, FusedCache kivi-4 / kivi-2; also after final with E2E=1).
# Usage (on the device): bash benchmarks/experiments/h200_session.sh sweep|final|tests|bench|ws|e2e; logs and results under $OUT.
# final with E2E=1 writes 10 files under $OUT and the device tool returns 8 (s15-4 lost its GPU test log): run e2e as
# its own call on the warm machine (the extension's build is then cached, about 7 s).
# PYTEST_TIMEOUT (default 420 s): s17-6's 300 s stopped the grown GPU suite at 96% while FlashInfer's JIT shared the CPUs.
set -u -o pipefail
mode=${1:-sweep}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/ext MAX_JOBS=16
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm --format=csv | tee "$OUT/smi_$mode.txt"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,utilization.gpu --format=csv -lms 1000 \
  >> "$OUT/smi_$mode.txt" &
smi=$!
t0=$(date +%s)
if [ "$mode" != ws ]; then  # ws builds its own
  python3 -c "import kvlab.kernels.kivi_cuda as k; assert k.ops() is not None; print('extension built')" \
    2>&1 | tee "$OUT/build_$mode.log"
  echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build_$mode.log"
fi
e2e() {  # the decode step end to end in generate()'s loop, eager and from CUDA graphs (issue 20)
  python3 benchmarks/bench_fused_cache.py --lengths ${E2E_LENGTHS:-4096 32768} --no-unfused \
    --caches "DynamicCache,StaticCache,FusedCache kivi-4,FusedCache kivi-2" --out "$OUT/fused_cache_h200.txt" \
    2>&1 | tee "$OUT/bench_fused.log" | tail -30
}
if [ "$mode" = e2e ]; then
  e2e
elif [ "$mode" = ws ]; then
  export TORCH_EXTENSIONS_DIR=/tmp/ext_ws TORCH_CUDA_ARCH_LIST=9.0a KVLAB_CUDA_CFLAGS="-DKVLAB_KIVI_WS=1 ${KVLAB_CUDA_CFLAGS:-}"
  t1=$(date +%s)
  python3 -c "import kvlab.kernels.kivi_cuda as k; assert k.ops() is not None and k.WS_BUILT; print('ws extension built')" \
    2>&1 | tee -a "$OUT/build_$mode.log"
  echo "ws build: $(( $(date +%s) - t1 )) s" | tee -a "$OUT/build_$mode.log"
  timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/kernels/test_triton.py -k "ws-b2s" 2>&1 \
    | grep -v -e PytestBenchmarkWarning -e "warner(Pytest" | tail -15 | tee "$OUT/ws_pytest.log"
  timeout 240 python3 benchmarks/bench_decode_attention.py --out /tmp/ws --cuda-tunes "${WS_TUNES:-ws-b2s2,ws-b2s3}" \
    --cuda-sweep-only --groups "" 2>&1 | tee "$OUT/ws_tunes.log" | tail -20
elif [ "$mode" = sweep ]; then
  # s10-1: TUNES=all, VARIANTS=registers,staged,folded; s10-2: the staged-V tunings, no variant sweep
  python3 benchmarks/bench_decode_attention.py --out "$OUT" --cuda-tunes "${TUNES:-all}" --cuda-sweep-only \
    ${VARIANTS:+--cuda-sweep --cuda-variants $VARIANTS --cuda-splits auto,8} --groups "" 2>&1 | tee "$OUT/sweep.log"
  timeout 200 python3 -m pytest -n 8 -q tests/kernels/test_triton.py tests/kernels/test_cpu.py \
    -k "${PYTEST_K:-cuda or gpu or shape_mismatches}" 2>&1 | tail -25 | tee "$OUT/pytest_cuda.log"
elif [ "$mode" = tests ]; then
  { echo "tree: ${TREE:-?} (this session's working tree of kvlab/kernels, tests, benchmarks), pytest -n 8"; date;
    KVLAB_ALLOW_NO_MODEL=1 timeout ${PYTEST_TIMEOUT:-420} python3 -m pytest -n 8 -q -rs -p no:cacheprovider \
      tests/kernels tests/storage; echo "pytest rc=$?"; date; } 2>&1 | grep -v -e PytestBenchmarkWarning -e "warner(Pytest" \
    | tee "$OUT/gpu_pytest_h200.log" | tail -15
elif [ "$mode" = bench ]; then
  python3 -c "
import sys, torch; sys.path.insert(0, 'benchmarks'); import bench_decode_attention as b
q = torch.randn(1, b.HQ, 1, b.D, device='cuda', dtype=torch.float16)
k = torch.randn(1, b.HKV, 256, b.D, device='cuda', dtype=torch.float16)
for dt in (torch.float16, torch.float8_e4m3fn):
    print(dt, 'built' if b.flashinfer_decode(q, k, k, dt) else b.FI.get('error'))
" 2>&1 | tail -5 | tee -a "$OUT/build_$mode.log"
  echo "flashinfer jit: $(( $(date +%s) - t0 )) s since start" | tee -a "$OUT/build_$mode.log"
  python3 benchmarks/bench_decode_attention.py --out "$OUT" --points 8:32768,8:131072,32:32768,1:32768 \
    --groups 32,128 --no-append 2>&1 | tee "$OUT/bench.log" | tail -45
  if [ -n "${TUNES:-}" ]; then  # the table in tunes.log; its json stays on the device (the tool returns 8 files)
    python3 benchmarks/bench_decode_attention.py --out /tmp/tunes --cuda-tunes "$TUNES" --cuda-sweep-only --groups "" \
      2>&1 | tee "$OUT/tunes.log" | tail -25
  fi
  if [ "${REPEAT:-1}" = 1 ]; then
    python3 benchmarks/bench_decode_attention.py --out /tmp/repeat --points 8:32768 --kernels cuda-int4,cuda-int2 \
      --groups "" --no-append 2>&1 | tail -14
    cp /tmp/repeat/decode_attention_*.txt "$OUT/repeat_decode_attention_h200.txt"
  fi
else
  # FlashInfer's JIT build of its fp16 and fp8 decode kernels (CPU work; tiny GPU calls), beside the tests
  ( python3 -c "
import sys, torch; sys.path.insert(0, 'benchmarks'); import bench_decode_attention as b
q = torch.randn(1, b.HQ, 1, b.D, device='cuda', dtype=torch.float16)
k = torch.randn(1, b.HKV, 256, b.D, device='cuda', dtype=torch.float16)
for dt in (torch.float16, torch.float8_e4m3fn):
    print(dt, 'built' if b.flashinfer_decode(q, k, k, dt) else b.FI.get('error'))
" > "$OUT/flashinfer_jit.log" 2>&1 ) &
  jit=$!
  { echo "tree: ${TREE:-?} (this session's working tree of kvlab/kernels, tests, benchmarks), pytest -n 8"; date;
    KVLAB_ALLOW_NO_MODEL=1 timeout ${PYTEST_TIMEOUT:-420} python3 -m pytest -n 8 -q -rs tests/kernels tests/storage; echo "pytest rc=$?"; date; } \
    2>&1 | tee "$OUT/gpu_pytest_h200.log" | tail -15
  wait $jit; echo "flashinfer jit: $(( $(date +%s) - t0 )) s since start"; cat "$OUT/flashinfer_jit.log" | tail -5
  [ "$mode" = tests ] || python3 benchmarks/bench_decode_attention.py --out "$OUT" --points 8:32768,8:131072,32:32768,1:32768 \
    --groups 32,128 --no-append 2>&1 | tee "$OUT/bench.log" | tail -60
  if [ -n "${E2E:-}" ]; then e2e; fi
fi
kill $smi
