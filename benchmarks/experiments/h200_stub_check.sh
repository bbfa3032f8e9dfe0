#!/usr/bin/env bash
# Run s15-3 (KERNEL_NOTES.md, v13, "Outcome, final run"): does the folded "m-b2s2" tuning crash when int2's default
# folded instance at D = 128 (the same template instance since v13, compiled in two translation units) runs in the
# same process, before or after it? The tree before the fix is carried under .old/ (`git archive <commit> kvlab
# tests pyproject.toml`, ignored by git); this tree has the launch plumbing in an unnamed namespace
# (kivi_attention_launch.cuh). Each order runs in a fresh process: test_kivi_cuda_folded_tunes_gpu with "b2s2"
# (= the default instance, tune id 0) and "m-b2s2", group 32 (56.8 KB of shared memory: above the 48 KB that needs
# the attribute) and group 128 (46.3 KB). A crash is re-run under cuda-gdb for the host backtrace.
# Usage (on the device): bash benchmarks/experiments/h200_stub_check.sh; logs under $OUT.
set -u -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=8 KVLAB_ALLOW_NO_MODEL=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
build='import kvlab.kernels.kivi_cuda as k; assert k.ops() is not None; print("built", k.__file__)'
(cd .old && TORCH_EXTENSIONS_DIR=/tmp/ext_old PYTHONPATH=$PWD python3 -c "$build") > "$OUT/build_old.log" 2>&1 &
TORCH_EXTENSIONS_DIR=/tmp/ext PYTHONPATH=$PWD python3 -c "$build" > "$OUT/build_new.log" 2>&1 &
wait
tail -1 "$OUT/build_old.log"; tail -1 "$OUT/build_new.log"
order() {  # $1: tree (. or .old), $2: extensions dir, $3: group, $4 $5: the two tunes in order
  (cd "$1" && TORCH_EXTENSIONS_DIR=$2 PYTHONPATH=$PWD:$PWD/tests/kernels timeout 120 python3 -X faulthandler -c "
import test_triton as t
for tune in ('$4', '$5'):
    try:
        t.test_kivi_cuda_folded_tunes_gpu(2, $3, tune); print('$3', tune, 'passed')
    except Exception as e:
        print('$3', tune, 'raised', type(e).__name__, str(e)[:300])
")
}
crashed=""
for tree in old new; do
  dir=.; ext=/tmp/ext
  [ $tree = old ] && dir=.old && ext=/tmp/ext_old
  for group in 32 128; do
    for pair in "b2s2 m-b2s2" "m-b2s2 b2s2"; do
      order $dir $ext $group $pair > "$OUT/order.log" 2>&1; rc=$?
      echo "$tree tree, group $group, order $pair: rc=$rc; $(grep -E 'passed|raised' "$OUT/order.log" | tr '\n' ';')" \
        | tee -a "$OUT/stub_check.txt"
      grep -A12 'Fatal Python error' "$OUT/order.log" | head -14 >> "$OUT/stub_check.txt"
      [ $rc -ne 0 ] && [ -z "$crashed" ] && crashed="$dir $ext $group $pair"
    done
  done
done
if [ -n "$crashed" ] && command -v cuda-gdb >/dev/null; then
  set -- $crashed
  echo "cuda-gdb backtrace: $crashed" >> "$OUT/stub_check.txt"
  (cd "$1" && TORCH_EXTENSIONS_DIR=$2 PYTHONPATH=$PWD:$PWD/tests/kernels timeout 150 cuda-gdb -q -batch \
    -ex 'set pagination off' -ex run -ex bt --args python3 -c "
import test_triton as t
for tune in ('$4', '$5'):
    t.test_kivi_cuda_folded_tunes_gpu(2, $3, tune)
") 2>&1 | grep -vE '^\[(New|Thread|Detaching)' | tail -40 >> "$OUT/stub_check.txt"
fi
cat "$OUT/stub_check.txt"
