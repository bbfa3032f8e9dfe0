// Template instances and launchers of the CUDA KIVI decode attention (kivi_attention_cuda.h). Compiled by nvcc
// without torch headers; the torch binding (kivi_binding.cpp) calls these.

#include <atomic>

#include "kivi_attention_cuda.h"
#include "kivi_attention_cuda.cuh"
#include "kivi_attention_staged.cuh"

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

template <int BITS, int D, int DG>
cudaError_t staged_prepare(size_t bytes) {
  static std::atomic<size_t> allowed[kMaxDevices];  // zero-initialised (static storage)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices && bytes <= allowed[dev].load(std::memory_order_relaxed)) return cudaSuccess;
  auto kernel = kivi_decode_staged_kernel<BITS, D, 1, DG>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
  if (err == cudaSuccess && dev >= 0 && dev < kMaxDevices) {
    size_t seen = allowed[dev].load(std::memory_order_relaxed);
    while (seen < bytes && !allowed[dev].compare_exchange_weak(seen, bytes)) {
    }
  }
  return err;
}

template <int BITS, int D, int DG>
int staged_occupancy() {
  const size_t bytes = staged_smem_bytes<BITS, D, 1>(D / DG);
  if (staged_prepare<BITS, D, DG>(bytes) != cudaSuccess) return -1;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kivi_decode_staged_kernel<BITS, D, 1, DG>, 128, bytes) !=
      cudaSuccess)
    return -1;
  return n;
}

template <int BITS, int D, int DG>
cudaError_t staged_launch(const KiviParams& p, dim3 grid, cudaStream_t stream) {
  const size_t bytes = staged_smem_bytes<BITS, D, 1>(D / DG);
  cudaError_t err = staged_prepare<BITS, D, DG>(bytes);
  if (err != cudaSuccess) return err;
  kivi_decode_staged_kernel<BITS, D, 1, DG><<<grid, 128, bytes, stream>>>(p);
  return cudaSuccess;
}

// The staged kernel exists for one query-row tile (NT = 1) and D / group in 1, 2, 4, 8.
bool staged_exists(int D, int nt, int group) {
  return nt == 1 && group > 0 && D % group == 0 && (D / group == 1 || D / group == 2 || D / group == 4 || D / group == 8);
}

template <int BITS, int D>
int staged_occupancy_of(int group) {
  switch (D / group) {
    case 1: return staged_occupancy<BITS, D, 1>();
    case 2: return staged_occupancy<BITS, D, 2>();
    case 4: return staged_occupancy<BITS, D, 4>();
    default: return staged_occupancy<BITS, D, 8>();
  }
}

template <int BITS, int D, int NT>
cudaError_t launch(const KiviParams& p, int variant, int bh, int out_rows, __half* out, cudaStream_t stream) {
  const dim3 grid(bh, p.n_main);
  if (variant == KIVI_VARIANT_STAGED) {
    if (!staged_exists(D, NT, p.group)) return cudaErrorInvalidValue;
    cudaError_t err;
    switch (D / p.group) {
      case 1: err = staged_launch<BITS, D, 1>(p, grid, stream); break;
      case 2: err = staged_launch<BITS, D, 2>(p, grid, stream); break;
      case 4: err = staged_launch<BITS, D, 4>(p, grid, stream); break;
      default: err = staged_launch<BITS, D, 8>(p, grid, stream);
    }
    if (err != cudaSuccess) return err;
  } else {
    kivi_decode_kernel<BITS, D, NT><<<grid, 128, 0, stream>>>(p);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  kivi_merge_kernel<D><<<out_rows, D, 0, stream>>>(p.o_part, p.lse_part, out, p.n_main);
  return cudaGetLastError();
}

}  // namespace

#define KV_INSTANCES(X) X(4, 128, 1) X(4, 128, 2) X(4, 64, 1) X(4, 64, 2) X(2, 128, 1) X(2, 128, 2) X(2, 64, 1) X(2, 64, 2)

size_t kivi_smem_bytes(int bits, int D, int nt, int variant, int group) {
  if (variant != KIVI_VARIANT_STAGED || !staged_exists(D, nt, group)) return 0;
#define KV_SMEM(B_, D_, N_) \
  if (bits == B_ && D == D_ && nt == N_) return staged_smem_bytes<B_, D_, N_>(group);
  KV_INSTANCES(KV_SMEM)
#undef KV_SMEM
  return 0;
}

int kivi_occupancy(int bits, int D, int nt, int variant, int group) {
#define KV_OCC(B_, D_, N_)                                                                              \
  if (bits == B_ && D == D_ && nt == N_)                                                                \
    return variant != KIVI_VARIANT_STAGED ? registers_occupancy<B_, D_, N_>()                             \
           : staged_exists(D_, N_, group) ? staged_occupancy_of<B_, D_>(group) : -1;
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
