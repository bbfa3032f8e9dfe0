// Template instances and launchers of the CUDA KIVI decode attention (kivi_attention_cuda.h). Compiled by nvcc
// without torch headers; the torch binding (kivi_binding.cpp) calls these.

#include <atomic>

#include "kivi_attention_cuda.h"
#include "kivi_attention_cuda.cuh"
#include "kivi_attention_staged.cuh"
#include "kivi_attention_folded.cuh"

namespace kvlab {
namespace {

template <int BITS, int D, int NT>
int registers_occupancy() {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kivi_decode_kernel<BITS, D, NT>, 128, 0) != cudaSuccess) return -1;
  return n;
}

// Dynamic shared memory above 48 KiB must be allowed per kernel and device (the attribute belongs to the
// current device's context); carve-out: as much shared memory as possible. The bytes allowed so far are kept
// per instance and device, so that each device is asked once.
constexpr int kMaxDevices = 64;

// The kernels with dynamic shared memory: the staged variant and the folded one, for (BITS, D, DG = D / group).
template <int VARIANT, int BITS, int D, int DG>
struct Dynamic {
  static constexpr auto kernel() {
    if constexpr (VARIANT == KIVI_VARIANT_FOLDED) {
      return kivi_decode_folded_kernel<BITS, D, DG>;
    } else {
      return kivi_decode_staged_kernel<BITS, D, 1, DG>;
    }
  }
  static size_t bytes() {
    return VARIANT == KIVI_VARIANT_FOLDED ? folded_smem_bytes<BITS, D>(D / DG) : staged_smem_bytes<BITS, D, 1>(D / DG);
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
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel(), 128, bytes()) != cudaSuccess) return -1;
    return n;
  }
  static cudaError_t launch(const KiviParams& p, dim3 grid, cudaStream_t stream) {
    cudaError_t err = prepare();
    if (err != cudaSuccess) return err;
    kernel()<<<grid, 128, bytes(), stream>>>(p);
    return cudaSuccess;
  }
};

// The staged kernel exists for one query-row tile (NT = 1) and D / group in 1, 2, 4, 8; the folded one besides
// for groups of 16, 32 or a multiple of 64 (its column slots; the caller checks the rows against them).
bool staged_exists(int D, int nt, int group) {
  return nt == 1 && group > 0 && D % group == 0 && (D / group == 1 || D / group == 2 || D / group == 4 || D / group == 8);
}
bool folded_exists(int D, int nt, int group) {
  return staged_exists(D, nt, group) && (group == 16 || group == 32 || group % 64 == 0);
}
bool dynamic_exists(int variant, int D, int nt, int group) {
  return variant == KIVI_VARIANT_FOLDED ? folded_exists(D, nt, group) : staged_exists(D, nt, group);
}

template <int VARIANT, int BITS, int D>
int dynamic_occupancy(int group) {
  switch (D / group) {
    case 1: return Dynamic<VARIANT, BITS, D, 1>::occupancy();
    case 2: return Dynamic<VARIANT, BITS, D, 2>::occupancy();
    case 4: return Dynamic<VARIANT, BITS, D, 4>::occupancy();
    default: return Dynamic<VARIANT, BITS, D, 8>::occupancy();
  }
}

template <int VARIANT, int BITS, int D>
cudaError_t dynamic_launch(const KiviParams& p, dim3 grid, cudaStream_t stream) {
  switch (D / p.group) {
    case 1: return Dynamic<VARIANT, BITS, D, 1>::launch(p, grid, stream);
    case 2: return Dynamic<VARIANT, BITS, D, 2>::launch(p, grid, stream);
    case 4: return Dynamic<VARIANT, BITS, D, 4>::launch(p, grid, stream);
    default: return Dynamic<VARIANT, BITS, D, 8>::launch(p, grid, stream);
  }
}

template <int BITS, int D, int NT>
cudaError_t launch(const KiviParams& p, int variant, int bh, int out_rows, __half* out, cudaStream_t stream) {
  const dim3 grid(bh, p.n_main);
  cudaError_t err = cudaSuccess;
  if (variant == KIVI_VARIANT_STAGED || variant == KIVI_VARIANT_FOLDED) {
    if (!dynamic_exists(variant, D, NT, p.group)) return cudaErrorInvalidValue;
    err = variant == KIVI_VARIANT_FOLDED ? dynamic_launch<KIVI_VARIANT_FOLDED, BITS, D>(p, grid, stream)
                                         : dynamic_launch<KIVI_VARIANT_STAGED, BITS, D>(p, grid, stream);
    if (err != cudaSuccess) return err;
  } else {
    kivi_decode_kernel<BITS, D, NT><<<grid, 128, 0, stream>>>(p);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  kivi_merge_kernel<D><<<out_rows, D, 0, stream>>>(p.o_part, p.lse_part, out, p.n_main);
  return cudaGetLastError();
}

}  // namespace

#define KV_INSTANCES(X) X(4, 128, 1) X(4, 128, 2) X(4, 64, 1) X(4, 64, 2) X(2, 128, 1) X(2, 128, 2) X(2, 64, 1) X(2, 64, 2)

size_t kivi_smem_bytes(int bits, int D, int nt, int variant, int group) {
  if (variant == KIVI_VARIANT_REGISTERS || !dynamic_exists(variant, D, nt, group)) return 0;
#define KV_SMEM(B_, D_, N_)                                                                                     \
  if (bits == B_ && D == D_ && nt == N_)                                                                       \
    return variant == KIVI_VARIANT_FOLDED ? folded_smem_bytes<B_, D_>(group) : staged_smem_bytes<B_, D_, N_>(group);
  KV_INSTANCES(KV_SMEM)
#undef KV_SMEM
  return 0;
}

int kivi_occupancy(int bits, int D, int nt, int variant, int group) {
#define KV_OCC(B_, D_, N_)                                                                              \
  if (bits == B_ && D == D_ && nt == N_)                                                                \
    return variant == KIVI_VARIANT_REGISTERS          ? registers_occupancy<B_, D_, N_>()                  \
           : !dynamic_exists(variant, D_, N_, group) ? -1                                                  \
           : variant == KIVI_VARIANT_FOLDED          ? dynamic_occupancy<KIVI_VARIANT_FOLDED, B_, D_>(group)  \
                                                     : dynamic_occupancy<KIVI_VARIANT_STAGED, B_, D_>(group);
  KV_INSTANCES(KV_OCC)
#undef KV_OCC
  return -1;
}

cudaError_t kivi_launch(const KiviParams& p, int bits, int D, int nt, int variant, int bh, int out_rows, __half* out,
                        cudaStream_t stream) {
#define KV_LAUNCH(B_, D_, N_) \
  if (bits == B_ && D == D_ && nt == N_) return launch<B_, D_, N_>(p, variant, bh, out_rows, out, stream);
  KV_INSTANCES(KV_LAUNCH)
#undef KV_LAUNCH
  return cudaErrorInvalidValue;
}

}  // namespace kvlab
