// Experimental tunings of the folded kernel for int4, D = 128, groups 32 and 128 (KVLAB_KIVI_TUNES in
// kivi_attention_launch.cuh): CTAs per SM of the register budget, cp.async stages, and the loads-only /
// compute-only modes that the benchmark's --cuda-tunes sweep times (benchmarks/KERNEL_NOTES.md, v11).

#include "kivi_attention_launch.cuh"

#define KV_TU_BITS 4

namespace kvlab {

KVLAB_KIVI_TUNED_TU(4)

}  // namespace kvlab
