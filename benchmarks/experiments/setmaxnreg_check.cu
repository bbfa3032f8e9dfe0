// Does nvcc take setmaxnreg (sm_90a) and let a consumer branch use more registers than the entry cap gives?
// (KERNEL_NOTES.md, v16; local, no GPU needed.) Compare:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -c -Xptxas -v setmaxnreg_check.cu   (nvcc 13.0: no spills)
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -c -Xptxas -v setmaxnreg_check.cu     (128 registers, spills)
// and the SASS of the first (-cubin, then cuobjdump --dump-sass): USETMAXREG.TRY_ALLOC / .DEALLOC. The body needs 208
// registers when nothing caps it (__launch_bounds__(128, 2)). Compile-only: it is not meant to be run.
#include <cstdint>
template <int N>
__device__ __forceinline__ void reg_alloc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void reg_dealloc() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }

// 256 threads, 2 CTAs an SM: 128 registers at entry; warpgroup 1 (producer) gives back to 24, warpgroup 0 takes 232.
__global__ void __launch_bounds__(256, 2) ws(const float4* __restrict__ x, float* __restrict__ y, int n) {
  const int wg = threadIdx.x / 128;
  if (wg == 1) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    reg_dealloc<24>();
#endif
    return;
  }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  reg_alloc<232>();
#endif
  // ~200 live floats: 48 float4 loads kept live, then a chain over all of them
  float acc[100];
#pragma unroll
  for (int i = 0; i < 100; ++i) acc[i] = 0.f;
  for (int k = 0; k < n; ++k) {
    float4 v[25];
#pragma unroll
    for (int i = 0; i < 25; ++i) v[i] = x[(k * 25 + i) * 128 + threadIdx.x];
#pragma unroll
    for (int i = 0; i < 25; ++i) {
      acc[4 * i] = fmaf(acc[4 * i], v[i].x, v[(i + 1) % 25].y);
      acc[4 * i + 1] = fmaf(acc[4 * i + 1], v[i].y, v[(i + 7) % 25].z);
      acc[4 * i + 2] = fmaf(acc[4 * i + 2], v[i].z, v[(i + 13) % 25].w);
      acc[4 * i + 3] = fmaf(acc[4 * i + 3], v[i].w, v[(i + 29) % 25].x);
    }
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 100; ++i) s += acc[i] * (i + 1);
  y[blockIdx.x * 128 + threadIdx.x] = s;
}
