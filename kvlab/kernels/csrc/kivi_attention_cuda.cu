// Template instances and launchers of the CUDA KIVI decode attention (kivi_attention_cuda.h). Compiled by nvcc
// without torch headers; the torch binding (kivi_binding.cpp) calls these. This unit holds the registers and
// staged variants and the dispatch; the folded variant's instances are in kivi_attention_folded.cu and its
// experimental tunings in kivi_attention_tuned_int{2,4}.cu (one unit each, compiled in parallel).

#include "kivi_attention_launch.cuh"

namespace kvlab {
namespace {

template <int BITS, int D, int NT>
int registers_occupancy() {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kivi_decode_kernel<BITS, D, NT>, 128, 0) != cudaSuccess) return -1;
  return n;
}

bool dynamic_exists(int variant, int D, int nt, int group) {
  return variant == KIVI_VARIANT_FOLDED ? folded_exists(D, nt, group) : staged_exists(D, nt, group);
}

template <int BITS, int D, int NT>
cudaError_t launch(const KiviParams& p, int variant, int bh, int out_rows, __half* out, cudaStream_t stream,
                   int tune) {
  const dim3 grid(bh, p.n_main);
  cudaError_t err = cudaSuccess;
  if (tune != 0 && tune != KIVI_TUNE_DEFAULT) {
    if (variant != KIVI_VARIANT_FOLDED || !kivi_tuned_exists(BITS, D, p.group, tune) || NT != 1)
      return cudaErrorInvalidValue;
    err = kivi_tuned_launch(p, BITS, D, tune, grid, stream);
    if (err != cudaSuccess) return err;
  } else if (variant == KIVI_VARIANT_STAGED || variant == KIVI_VARIANT_FOLDED) {
    if (!dynamic_exists(variant, D, NT, p.group)) return cudaErrorInvalidValue;
    err = variant == KIVI_VARIANT_FOLDED ? folded_launch(p, BITS, D, grid, stream)
                                         : dynamic_launch<KIVI_VARIANT_STAGED, BITS, D>(p, grid, stream);
    if (err != cudaSuccess) return err;
  } else {
    kivi_decode_kernel<BITS, D, NT><<<grid, 128, 0, stream>>>(p);
  }
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  kivi_merge_kernel<D><<<out_rows, D * KIVI_MERGE_PARTS, p.n_main * sizeof(float), stream>>>(p.o_part, p.lse_part, out,
                                                                                            p.n_main);
  return cudaGetLastError();
}

bool is_tuned(int tune) { return tune != 0 && tune != KIVI_TUNE_DEFAULT; }

}  // namespace

#define KV_INSTANCES(X) X(4, 128, 1) X(4, 128, 2) X(4, 64, 1) X(4, 64, 2) X(2, 128, 1) X(2, 128, 2) X(2, 64, 1) X(2, 64, 2)

bool kivi_tuned_exists(int bits, int D, int group, int tune) {
  if (D != 128 || (bits != 2 && bits != 4) || (group != 32 && group != 128)) return false;
#define KV_TUNE_IS(V, M, S, O) if (tune == KV_TUNE_ID(V, M, S, O)) return true;
  KVLAB_KIVI_TUNES(KV_TUNE_IS)
  if (bits == 2) {
    KVLAB_KIVI_TUNES_INT2(KV_TUNE_IS)
  } else {
    KVLAB_KIVI_TUNES_INT4(KV_TUNE_IS)
  }
#undef KV_TUNE_IS
  return false;
}

int kivi_tuned_occupancy(int bits, int D, int group, int tune) {
  if (!kivi_tuned_exists(bits, D, group, tune)) return -1;
  return bits == 2 ? tuned_occupancy_int2(group, tune) : tuned_occupancy_int4(group, tune);
}

cudaError_t kivi_tuned_launch(const KiviParams& p, int bits, int D, int tune, dim3 grid, cudaStream_t stream) {
  if (!kivi_tuned_exists(bits, D, p.group, tune)) return cudaErrorInvalidValue;
  return bits == 2 ? tuned_launch_int2(p, tune, grid, stream) : tuned_launch_int4(p, tune, grid, stream);
}

size_t kivi_smem_bytes(int bits, int D, int nt, int variant, int group, int tune) {
  if (variant == KIVI_VARIANT_REGISTERS || !dynamic_exists(variant, D, nt, group)) return 0;
  const int stages = is_tuned(tune) ? (tune / 10) % 10 : 2;
  const bool vst = folded_vstaged(is_tuned(tune) ? tune / 1000 : folded_default_vst(bits, D, group));
#define KV_SMEM(B_, D_, N_)                                                                                     \
  if (bits == B_ && D == D_ && nt == N_) {                                                                     \
    if (variant != KIVI_VARIANT_FOLDED) return staged_smem_bytes<B_, D_, N_>(group);                           \
    if (vst) return stages == 3 ? folded_smem_bytes<B_, D_, 3, 1>(group) : folded_smem_bytes<B_, D_, 2, 1>(group); \
    return stages == 3 ? folded_smem_bytes<B_, D_, 3, 0>(group) : folded_smem_bytes<B_, D_, 2, 0>(group);        \
  }
  KV_INSTANCES(KV_SMEM)
#undef KV_SMEM
  return 0;
}

int kivi_occupancy(int bits, int D, int nt, int variant, int group, int tune) {
  if (is_tuned(tune)) return variant == KIVI_VARIANT_FOLDED && nt == 1 ? kivi_tuned_occupancy(bits, D, group, tune) : -1;
#define KV_OCC(B_, D_, N_)                                                                              \
  if (bits == B_ && D == D_ && nt == N_)                                                                \
    return variant == KIVI_VARIANT_REGISTERS          ? registers_occupancy<B_, D_, N_>()                  \
           : !dynamic_exists(variant, D_, N_, group) ? -1                                                  \
           : variant == KIVI_VARIANT_FOLDED          ? folded_occupancy(B_, D_, group)                      \
                                                     : dynamic_occupancy<KIVI_VARIANT_STAGED, B_, D_>(group);
  KV_INSTANCES(KV_OCC)
#undef KV_OCC
  return -1;
}

cudaError_t kivi_launch(const KiviParams& p, int bits, int D, int nt, int variant, int bh, int out_rows, __half* out,
                        cudaStream_t stream, int tune) {
#define KV_LAUNCH(B_, D_, N_) \
  if (bits == B_ && D == D_ && nt == N_) return launch<B_, D_, N_>(p, variant, bh, out_rows, out, stream, tune);
  KV_INSTANCES(KV_LAUNCH)
#undef KV_LAUNCH
  return cudaErrorInvalidValue;
}

}  // namespace kvlab
