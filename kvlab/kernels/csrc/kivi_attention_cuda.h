// Host-side interface of the CUDA KIVI decode attention: the kernel parameters and the launchers that
// kivi_attention_cuda.cu defines. No device code and no torch here, so that the torch binding
// (kivi_binding.cpp) compiles with the host compiler while the kernels compile with nvcc alone.

#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace kvlab {

struct KiviParams {
  const __half* q;  // (B, Hq, NQ, D)
  int64_t sq_b, sq_h, sq_t;
  const uint8_t* kc;  // (B, H, D, capk * BITS / 8) K codes packed along tokens
  int64_t skc_b, skc_h, skc_d;
  const __half* ks;  // (B, H, capk / group, D) K scales
  const __half* km;  // K minima, same strides
  int64_t sks_b, sks_h, sks_g;
  const void* kw;  // (B, H, RK, D) K window
  int64_t skw_b, skw_h, skw_t;
  int kw_dtype;  // 0 fp16, 1 bf16, 2 fp32
  const uint8_t* vc;  // (B, H, capv, D * BITS / 8) V codes packed along channels
  int64_t svc_b, svc_h, svc_t;
  const __half* vs;  // (B, H, capv, D / group) V scales
  const __half* vm;  // V minima, same strides
  int64_t svs_b, svs_h, svs_t;
  const void* vw;  // (B, H, RV, D) V window
  int64_t svw_b, svw_h, svw_t;
  int vw_dtype;
  const int32_t* lengths;  // (B,)
  float* o_part;  // (B * Hq * NQ, splits, D) normalised partial outputs
  float* lse_part;  // (B * Hq * NQ, splits) log2-sum-exp2 of the scaled scores (-inf: empty)
  float qk_scale;  // softmax scale * log2(e)
  int H, gqa, nq, group, residual;
  int n_main;  // CTAs per (sequence, kv head) along the sequence (>= 1)
  int split_len;  // tokens per main CTA (a multiple of 4 * BN)
};

// Kernel variants: 6 loads every code and scale straight into registers (kivi_attention_cuda.cuh); 7 stages K
// codes and all scales of the next block in shared memory with cp.async (kivi_attention_staged.cuh); 8 feeds
// the raw codes to the mma and folds the scales into the query and P operands (kivi_attention_folded.cuh).
constexpr int KIVI_VARIANT_REGISTERS = 6;
constexpr int KIVI_VARIANT_STAGED = 7;
constexpr int KIVI_VARIANT_FOLDED = 8;

// What the folded kernel computes (a template argument): the attention, or for experiments only the loads of
// every block without the arithmetic, or the arithmetic over the first block's data without further loads.
constexpr int KIVI_MODE_FULL = 0;
constexpr int KIVI_MODE_LOADS = 1;
constexpr int KIVI_MODE_COMPUTE = 2;
// The loads of every block as KIVI_MODE_LOADS, without the window units (the tail after the main blocks): with it,
// what the tail costs a call (KERNEL_NOTES.md, v15).
constexpr int KIVI_MODE_LOADS_NOTAIL = 3;

// Tunings of the folded kernel that the launcher instantiates (``tune`` argument of kivi_launch and
// kivi_occupancy: min_blocks * 100 + stages * 10 + mode; 0 = the default, KIVI_TUNE_DEFAULT). Experimental
// tunings exist for D = 128 and groups 32 and 128 only (kivi_attention_tuned.cu).
constexpr int KIVI_TUNE_DEFAULT = 220;

// Dynamic shared memory of one CTA (bytes); 0 for variant 6, which uses static shared memory.
size_t kivi_smem_bytes(int bits, int D, int nt, int variant, int group, int tune = 0);
// CTAs of the decode kernel that one SM of the current device holds at once; -1 when there is no such instance.
int kivi_occupancy(int bits, int D, int nt, int variant, int group, int tune = 0);
// Decode kernel over grid (bh, p.n_main), then the split merge into out (out_rows rows of D fp16); returns
// cudaErrorInvalidValue when there is no instance for (bits, D, nt, variant, tune).
cudaError_t kivi_launch(const KiviParams& p, int bits, int D, int nt, int variant, int bh, int out_rows, __half* out,
                        cudaStream_t stream, int tune = 0);
// Whether the folded kernel has an instance for a non-default tune (kivi_attention_tuned.cu), and its launch.
bool kivi_tuned_exists(int bits, int D, int group, int tune);
int kivi_tuned_occupancy(int bits, int D, int group, int tune);
cudaError_t kivi_tuned_launch(const KiviParams& p, int bits, int D, int tune, dim3 grid, cudaStream_t stream);

}  // namespace kvlab
