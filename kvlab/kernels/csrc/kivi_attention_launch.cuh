// Launch plumbing shared by the translation units of the CUDA KIVI decode attention (kivi_attention_cuda.cu:
// registers and staged variants and the dispatch; kivi_attention_folded.cu: the folded variant's default
// instances; kivi_attention_tuned_int2.cu / _int4.cu: its experimental tunings). One file per group of
// instances, so that ninja compiles them in parallel.

#pragma once

#include <atomic>

#include "kivi_attention_cuda.h"
#include "kivi_attention_cuda.cuh"
#include "kivi_attention_staged.cuh"
#include "kivi_attention_folded.cuh"

namespace kvlab {

// Dynamic shared memory above 48 KiB must be allowed per kernel and device (the attribute belongs to the
// current device's context); carve-out: as much shared memory as possible. The bytes allowed so far are kept
// per instance and device, so that each device is asked once.
constexpr int kMaxDevices = 64;

// Internal linkage for Dynamic and its helpers, one copy per translation unit: nvcc gives the host stub of a
// __global__ template instance internal linkage (--static-global-template-stub, on by default), so one kernel
// instantiated in two units (int2's default folded instance at D = 128 is also the "m-b2s2" tuning since v13) is
// two kernels on the host side. With external linkage the linker kept one copy of Dynamic<...>::launch (calling
// one unit's kernel) and one `allowed` cache for both, while each unit's inlined occupancy() asked about its own
// kernel: the shared-memory attribute could be set on one of the two kernels while the cache said both. Run
// s15-1's GPU tests crashed a worker in test_kivi_cuda_folded_tunes_gpu[2-32-m-b2s2], whose 56.8 KB of shared
// memory need the attribute (KERNEL_NOTES.md, v13; benchmarks/experiments/h200_stub_check.sh).
namespace {

// The kernels with dynamic shared memory: the staged variant and the folded one, for (BITS, D, DG = D / group)
// and the folded one's tuning (MINB CTAs per SM, NSTAGE stages, MODE).
template <int VARIANT, int BITS, int D, int DG, int MINB = KVLAB_KIVI_FOLDED_MIN_BLOCKS, int NSTAGE = 2,
          int MODE = KIVI_MODE_FULL, int VST = folded_default_vst(BITS, D, D / DG)>
struct Dynamic {
  static constexpr auto kernel() {
    if constexpr (VARIANT == KIVI_VARIANT_FOLDED) {
      return kivi_decode_folded_kernel<BITS, D, DG, MINB, NSTAGE, MODE, VST>;
    } else {
      return kivi_decode_staged_kernel<BITS, D, 1, DG>;
    }
  }
  static constexpr int threads() { return VARIANT == KIVI_VARIANT_FOLDED ? folded_threads(VST) : 128; }
  static size_t bytes() {
    return VARIANT == KIVI_VARIANT_FOLDED ? folded_smem_bytes<BITS, D, NSTAGE, VST>(D / DG)
                                          : staged_smem_bytes<BITS, D, 1>(D / DG);
  }
  static cudaError_t prepare() {
    static std::atomic<size_t> allowed[kMaxDevices];  // zero-initialised (static storage)
    const size_t need = bytes();
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < kMaxDevices && need <= allowed[dev].load(std::memory_order_relaxed)) return cudaSuccess;
    err = cudaFuncSetAttribute(kernel(), cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(need));
    if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel(), cudaFuncAttributePreferredSharedMemoryCarveout, 100);
    if (err == cudaSuccess && dev >= 0 && dev < kMaxDevices) {
      size_t seen = allowed[dev].load(std::memory_order_relaxed);
      while (seen < need && !allowed[dev].compare_exchange_weak(seen, need)) {
      }
    }
    return err;
  }
  static int occupancy() {
    if (prepare() != cudaSuccess) return -1;
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel(), threads(), bytes()) != cudaSuccess) return -1;
    return n;
  }
  static cudaError_t launch(const KiviParams& p, dim3 grid, cudaStream_t stream) {
    cudaError_t err = prepare();
    if (err != cudaSuccess) return err;
    kernel()<<<grid, threads(), bytes(), stream>>>(p);
    return cudaSuccess;
  }
};

// The staged kernel exists for one query-row tile (NT = 1) and D / group in 1, 2, 4, 8; the folded one besides
// for groups of 16, 32 or a multiple of 64 (its column slots; the caller checks the rows against them).
inline bool staged_exists(int D, int nt, int group) {
  return nt == 1 && group > 0 && D % group == 0 && (D / group == 1 || D / group == 2 || D / group == 4 || D / group == 8);
}
inline bool folded_exists(int D, int nt, int group) {
  return staged_exists(D, nt, group) && (group == 16 || group == 32 || group % 64 == 0);
}

// Occupancy and launch of a Dynamic instance chosen by D / group at run time.
template <int VARIANT, int BITS, int D, int MINB = KVLAB_KIVI_FOLDED_MIN_BLOCKS, int NSTAGE = 2,
          int MODE = KIVI_MODE_FULL>
int dynamic_occupancy(int group) {
  switch (D / group) {
    case 1: return Dynamic<VARIANT, BITS, D, 1, MINB, NSTAGE, MODE>::occupancy();
    case 2: return Dynamic<VARIANT, BITS, D, 2, MINB, NSTAGE, MODE>::occupancy();
    case 4: return Dynamic<VARIANT, BITS, D, 4, MINB, NSTAGE, MODE>::occupancy();
    default: return Dynamic<VARIANT, BITS, D, 8, MINB, NSTAGE, MODE>::occupancy();
  }
}

template <int VARIANT, int BITS, int D, int MINB = KVLAB_KIVI_FOLDED_MIN_BLOCKS, int NSTAGE = 2,
          int MODE = KIVI_MODE_FULL>
cudaError_t dynamic_launch(const KiviParams& p, dim3 grid, cudaStream_t stream) {
  switch (D / p.group) {
    case 1: return Dynamic<VARIANT, BITS, D, 1, MINB, NSTAGE, MODE>::launch(p, grid, stream);
    case 2: return Dynamic<VARIANT, BITS, D, 2, MINB, NSTAGE, MODE>::launch(p, grid, stream);
    case 4: return Dynamic<VARIANT, BITS, D, 4, MINB, NSTAGE, MODE>::launch(p, grid, stream);
    default: return Dynamic<VARIANT, BITS, D, 8, MINB, NSTAGE, MODE>::launch(p, grid, stream);
  }
}

}  // namespace

// Folded instances of the default tuning, defined in kivi_attention_folded.cu.
int folded_occupancy(int bits, int D, int group);
cudaError_t folded_launch(const KiviParams& p, int bits, int D, dim3 grid, cudaStream_t stream);
// The experimental tunings (kivi_attention_tuned_int{2,4}.cu): D = 128, group 32 or 128.
int tuned_occupancy_int2(int group, int tune);
int tuned_occupancy_int4(int group, int tune);
cudaError_t tuned_launch_int2(const KiviParams& p, int tune, dim3 grid, cudaStream_t stream);
cudaError_t tuned_launch_int4(const KiviParams& p, int tune, dim3 grid, cudaStream_t stream);

// The tunings instantiated besides the default (vstage * 1000 + min_blocks * 100 + stages * 10 + mode), as
// X(VST, MINB, NSTAGE, MODE); X(8, 2, 2, 0) is v11's default layout (VST 8 acts as 0: the V codes into registers, no
// ldmatrix; its id differs from KIVI_TUNE_DEFAULT's 220), the default before v13 (int2) and v14 (int4 at groups of 32
// or more), kept to time the default against. (Run s10-1 also timed 4 stages, 3 CTAs with 3 stages, and loads alone with 3 stages;
// removed after it: KERNEL_NOTES.md, v11.)
#define KVLAB_KIVI_TUNES(X) \
  X(8, 2, 2, 0) X(0, 3, 2, 0) X(0, 2, 3, 0) X(0, 2, 2, 1) X(0, 2, 2, 2) X(1, 2, 2, 0) X(1, 2, 3, 0) X(1, 3, 2, 0) X(1, 2, 2, 1)
// The tunings with code operands read by ldmatrix (VST 2: K and V, the V codes staged; 3: K only), for int2 (v13)
// and int4 (v14), and for int2 only VST + 4: the K codes copied through L1 (KERNEL_NOTES.md, v13); the default
// layout's loads alone (mode 1) and its loads without the window units (mode 3), and for int2 its 3 stages (v15);
// the default layout's arithmetic alone (mode 2: the first block's stage computed over and over, v16).
// With -DKVLAB_KIVI_WS=1 (v16's prototype, for sm_90a: TORCH_CUDA_ARCH_LIST=9.0a) also the warp-specialised "m-" layout
// (VST 34), 2 and 3 stages, int2.
#ifndef KVLAB_KIVI_WS
#define KVLAB_KIVI_WS 0
#endif
#if KVLAB_KIVI_WS
#define KVLAB_KIVI_TUNES_WS(X) X(34, 2, 2, 0) X(34, 2, 3, 0)
#else
#define KVLAB_KIVI_TUNES_WS(X)
#endif
#define KVLAB_KIVI_TUNES_INT2(X) X(2, 2, 2, 0) X(3, 2, 2, 0) X(4, 2, 2, 0) X(6, 2, 2, 0) X(4, 2, 2, 1) X(2, 2, 2, 1) X(2, 2, 2, 3) X(2, 2, 3, 0) X(2, 2, 2, 2) \
  KVLAB_KIVI_TUNES_WS(X)
#define KVLAB_KIVI_TUNES_INT4(X) X(2, 2, 2, 0) X(3, 2, 2, 0) X(2, 2, 2, 1) X(2, 2, 2, 3) X(2, 2, 2, 2)

// The body of kivi_attention_tuned_int{BITS}.cu: occupancy and launch of the tunings for D = 128, where the
// instance exists (group 32 or 128: DG 4 or 1); -1 / cudaErrorInvalidValue otherwise.
#define KVLAB_KIVI_TUNED_TU(BITS)                                                                                 \
  int tuned_occupancy_int##BITS(int group, int tune) {                                                          \
    if (group != 32 && group != 128) return -1;                                                                 \
    KVLAB_KIVI_TUNES(KV_TUNED_OCC)                                                                              \
    KVLAB_KIVI_TUNES_INT##BITS(KV_TUNED_OCC)                                                                    \
    return -1;                                                                                                  \
  }                                                                                                             \
  cudaError_t tuned_launch_int##BITS(const KiviParams& p, int tune, dim3 grid, cudaStream_t stream) {           \
    if (p.group != 32 && p.group != 128) return cudaErrorInvalidValue;                                          \
    KVLAB_KIVI_TUNES(KV_TUNED_LAUNCH)                                                                           \
    KVLAB_KIVI_TUNES_INT##BITS(KV_TUNED_LAUNCH)                                                                 \
    return cudaErrorInvalidValue;                                                                               \
  }
#define KV_TUNE_ID(V, M, S, O) ((V) * 1000 + (M) * 100 + (S) * 10 + (O))
#define KV_TUNED_DG(V, M, S, O, DG, CALL) Dynamic<KIVI_VARIANT_FOLDED, KV_TU_BITS, 128, DG, M, S, O, V>::CALL
#define KV_TUNED_OCC(V, M, S, O)                                                                                \
  if (tune == KV_TUNE_ID(V, M, S, O))                                                                           \
    return group == 32 ? KV_TUNED_DG(V, M, S, O, 4, occupancy)() : KV_TUNED_DG(V, M, S, O, 1, occupancy)();
#define KV_TUNED_LAUNCH(V, M, S, O)                                                                             \
  if (tune == KV_TUNE_ID(V, M, S, O))                                                                           \
    return p.group == 32 ? KV_TUNED_DG(V, M, S, O, 4, launch)(p, grid, stream)                                  \
                         : KV_TUNED_DG(V, M, S, O, 1, launch)(p, grid, stream);

}  // namespace kvlab
