// Loads-only microbenchmark for issue 20 (KERNEL_NOTES.md, v15): stream exactly the bytes the folded KIVI decode
// kernel reads at B=8, T=32k, Llama-3-8B heads (8 kv heads, head_dim 128), group 32, int2 and int4, on the folded
// kernel's grid (B x H x 4 splits of 8192 tokens: 256 CTAs, one wave at 2 CTAs per SM), in three ways:
//
//  * cpasync: the kernel's scheme (kivi_attention_staged.cuh: stage_block, staged_blocks; V codes staged as the
//    default VST 2 does): each of 4 warps copies its own 64-token block by 16-byte cp.async (L2::128B hint) into
//    one of NSTAGE stages, NSTAGE - 1 blocks ahead, and touches one word of it; padded to 2 CTAs per SM (the real
//    kernel's register budget).
//  * bulk: one producer warp and 4 consumer warps a CTA. A stage holds TOK tokens of the CTA's split (the 4
//    consumer warps' blocks side by side): the K code rows (one cp.async.bulk per channel: TOK * BITS / 8 bytes),
//    the K scales and minima (TOK / 32 groups, one copy each), the V codes (one copy) and the V scales and minima
//    (one copy each), completing on the stage's "full" mbarrier; the consumers wait on it, touch one word each, and
//    arrive on the stage's "empty" mbarrier, which the producer waits on before refilling. NST stages.
//  * tma: as bulk, but the K code rows of a stage by one 2D tensor copy (cp.async.bulk.tensor, box 128 channels x
//    TOK * BITS / 8 bytes).
//  * contig: as bulk, with the K codes of a stage read as one contiguous range (as if the cache were token-blocked):
//    the same bytes, not the same addresses; an upper bound on what the K layout costs.
// Reference rows: cudaMemcpy of 1 GiB (the copy bandwidth, read + write) and a plain 16-byte-load read of the same
// byte count as each width's stream, contiguous.
// Each variant is checked once (not timed) in a mode that sums every 4-byte word it copied: all must agree with a
// plain global-memory sum over the same bytes.
// Timing: CUDA events around each launch, L2 evicted before each by reading 512 MB, median of 60.
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -o loads_bulk loads_bulk.cu
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));      \
      exit(1);                                                                                 \
    }                                                                                          \
  } while (0)

constexpr int B = 8, H = 8, D = 128, G = 32, DG = D / G, SPLITS = 4;
static int T = 32768;  // tokens a sequence (host); the kernels take it from Bufs
constexpr int NBH = B * H;

struct Bufs {
  const uint8_t *kc, *ks, *km, *vc, *vs, *vm;
  unsigned long long* sum;
  int bits, T;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Sum (FULL) or touch one word (else) of n bytes at p, by the lanes of one warp.
template <bool FULL>
__device__ __forceinline__ void consume(const uint8_t* p, int n, int lane, uint32_t& x, unsigned long long& s) {
  if constexpr (FULL) {
    for (int i = 4 * lane; i < n; i += 128) s += *reinterpret_cast<const uint32_t*>(p + i);
  } else {
    x ^= *reinterpret_cast<const uint32_t*>(p + 4 * lane);
  }
}

// ---- cpasync: the kernel's per-warp scheme
template <int BITS, int NSTAGE, bool FULL>
__global__ void __launch_bounds__(128) k_cpasync(Bufs bf) {
  constexpr int KROW = 64 * BITS / 8, KC = D * KROW, CPR = KROW / 16, RSTEP = 32 / CPR;
  constexpr int KSB = 2 * (64 / G) * D * 2;  // K scales + minima of a block: 2 groups x D fp16 x 2 arrays
  constexpr int VSB = 2 * 64 * DG * 2, VROW = D * BITS / 8, VCB = 64 * VROW;
  constexpr int SB = KC + KSB + VSB + VCB;
  extern __shared__ __align__(128) uint8_t sm[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int T = bf.T, SPLIT = T / SPLITS;
  const int bh = blockIdx.x, lo = blockIdx.y * SPLIT, hi = lo + SPLIT;
  const int64_t skc = T * BITS / 8;
  const uint8_t* kc = bf.kc + bh * D * skc;
  const uint8_t* ks = bf.ks + (int64_t)bh * (T / G) * D * 2;
  const uint8_t* km = bf.km + (int64_t)bh * (T / G) * D * 2;
  const uint8_t* vc = bf.vc + (int64_t)bh * T * VROW;
  const uint8_t* vs = bf.vs + (int64_t)bh * T * DG * 2;
  const uint8_t* vm = bf.vm + (int64_t)bh * T * DG * 2;
  uint8_t* stages = sm + warp * NSTAGE * SB;
  auto issue = [&](int st, int t0) {
    const uint32_t base = smem_u32(stages + st * SB);
    const int ch0 = lane / CPR, part = lane % CPR;
#pragma unroll
    for (int i = 0; i < D / RSTEP; ++i)
      cp_async16(base + (ch0 + i * RSTEP) * KROW + part * 16, kc + (ch0 + i * RSTEP) * skc + part * 16 + t0 * BITS / 8);
    // K scales / minima: 2 groups x 2 arrays x D fp16 = 64 chunks of 16 bytes
#pragma unroll
    for (int q = lane; q < KSB / 16; q += 32) {
      const int arr = q / (KSB / 32), r = q % (KSB / 32);
      cp_async16(base + KC + q * 16, (arr ? km : ks) + (t0 / G) * D * 2 + r * 16);
    }
#pragma unroll
    for (int q = lane; q < VSB / 16; q += 32) {
      const int arr = q / (VSB / 32), r = q % (VSB / 32);
      cp_async16(base + KC + KSB + q * 16, (arr ? vm : vs) + t0 * DG * 2 + r * 16);
    }
#pragma unroll
    for (int q = lane; q < VCB / 16; q += 32) cp_async16(base + KC + KSB + VSB + q * 16, vc + t0 * VROW + q * 16);
  };
  uint32_t x = 0;
  unsigned long long s = 0;
  const int first = lo + warp * 64, step = 4 * 64;
#pragma unroll
  for (int i = 0; i < NSTAGE - 1; ++i) {
    if (first + i * step < hi) issue(i, first + i * step);
    cp_commit();
  }
  int st = 0;
  for (int t0 = first; t0 < hi; t0 += step) {
    const int tn = t0 + (NSTAGE - 1) * step;
    if (tn < hi) issue(st == 0 ? NSTAGE - 1 : st - 1, tn);
    cp_commit();
    cp_wait<NSTAGE - 1>();
    __syncwarp();
    const uint8_t* p = stages + st * SB;
    if constexpr (FULL) {
      consume<true>(p, SB, lane, x, s);
    } else {
      x ^= *reinterpret_cast<const uint32_t*>(p + 4 * lane) ^ *reinterpret_cast<const uint32_t*>(p + KC + KSB + VSB + 4 * lane);
    }
    __syncwarp();
    st = st + 1 == NSTAGE ? 0 : st + 1;
  }
  cp_wait<0>();
  if (FULL) atomicAdd(bf.sum, s);
  if (x == 0x9e3779b9u) atomicAdd(bf.sum + 1, 1ull);
}

// ---- bulk / tma / contig: a producer warp and 4 consumer warps
__device__ __forceinline__ void mbar_init(uint64_t* b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}\n" ::"r"(smem_u32(b)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
__device__ __forceinline__ void tma_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
}

enum { KIND_BULK = 0, KIND_TMA = 1, KIND_CONTIG = 2 };

template <int BITS, int TOK>
struct WsCfg {
  static constexpr int KROW = TOK * BITS / 8, KC = D * KROW, KSB = 2 * (TOK / G) * D * 2;
  static constexpr int VSB = 2 * TOK * DG * 2, VROW = D * BITS / 8, VCB = TOK * VROW;
  static constexpr int SB = KC + KSB + VSB + VCB;  // every piece a multiple of 128 bytes
};

template <int BITS, int TOK, int NST, int KIND, bool FULL>
__global__ void __launch_bounds__(160) k_ws(Bufs bf, const __grid_constant__ CUtensorMap kmap) {
  using W = WsCfg<BITS, TOK>;
  extern __shared__ __align__(1024) uint8_t smw[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smw);
  uint64_t* empty = full + NST;
  uint8_t* stages = smw + 1024;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int T = bf.T, SPLIT = T / SPLITS;
  const int bh = blockIdx.x, lo = blockIdx.y * SPLIT;
  const int NT = SPLIT / TOK;
  if (threadIdx.x == 0) {
    for (int s = 0; s < NST; ++s) {
      mbar_init(full + s, 1);
      mbar_init(empty + s, 4);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (warp == 4) {  // producer
    const int64_t skc = T * BITS / 8;
    const uint8_t* kc = bf.kc + bh * D * skc;
    const uint8_t* ks = bf.ks + (int64_t)bh * (T / G) * D * 2;
    const uint8_t* km = bf.km + (int64_t)bh * (T / G) * D * 2;
    const uint8_t* vc = bf.vc + (int64_t)bh * T * W::VROW;
    const uint8_t* vs = bf.vs + (int64_t)bh * T * DG * 2;
    const uint8_t* vm = bf.vm + (int64_t)bh * T * DG * 2;
    for (int i = 0; i < NT; ++i) {
      const int s = i % NST, t0 = lo + i * TOK;
      if (i >= NST) mbar_wait(empty + s, ((i / NST) - 1) & 1);
      uint8_t* st = stages + s * W::SB;
      if (lane == 0) mbar_expect_tx(full + s, W::SB);
      __syncwarp();
      if constexpr (KIND == KIND_BULK) {
#pragma unroll
        for (int ch = lane; ch < D; ch += 32) bulk_g2s(st + ch * W::KROW, kc + ch * skc + t0 * BITS / 8, W::KROW, full + s);
      } else if constexpr (KIND == KIND_TMA) {
        if (lane == 0) tma_2d(st, &kmap, t0 * BITS / 8, bh * D, full + s);
      } else {
        if (lane == 0) bulk_g2s(st, kc + (int64_t)t0 * D * BITS / 8, W::KC, full + s);  // as if token-blocked
      }
      if (lane == 1) bulk_g2s(st + W::KC, ks + (t0 / G) * D * 2, W::KSB / 2, full + s);
      if (lane == 2) bulk_g2s(st + W::KC + W::KSB / 2, km + (t0 / G) * D * 2, W::KSB / 2, full + s);
      if (lane == 3) bulk_g2s(st + W::KC + W::KSB, vs + t0 * DG * 2, W::VSB / 2, full + s);
      if (lane == 4) bulk_g2s(st + W::KC + W::KSB + W::VSB / 2, vm + t0 * DG * 2, W::VSB / 2, full + s);
      if (lane == 5) bulk_g2s(st + W::KC + W::KSB + W::VSB, vc + (int64_t)t0 * W::VROW, W::VCB, full + s);
    }
  } else {  // consumers: warp w takes its quarter of each piece
    uint32_t x = 0;
    unsigned long long acc = 0;
    for (int i = 0; i < NT; ++i) {
      const int s = i % NST;
      mbar_wait(full + s, (i / NST) & 1);
      const uint8_t* st = stages + s * W::SB;
      if constexpr (FULL) {
        consume<true>(st + warp * (W::SB / 4), W::SB / 4, lane, x, acc);
      } else {
        x ^= *reinterpret_cast<const uint32_t*>(st + warp * (W::KC / 4) + 4 * lane) ^
             *reinterpret_cast<const uint32_t*>(st + W::KC + W::KSB + W::VSB + warp * (W::VCB / 4) + 4 * lane);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + s);
    }
    if (FULL) atomicAdd(bf.sum, acc);
    if (x == 0x9e3779b9u) atomicAdd(bf.sum + 1, 1ull);
  }
}

// ---- references: a plain read of n bytes (16-byte loads), sum or touch; the flush
template <bool FULL>
__global__ void k_read(const uint4* p, size_t n16, unsigned long long* sum) {
  uint32_t x = 0;
  unsigned long long s = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16; i += (size_t)gridDim.x * blockDim.x) {
    const uint4 v = __ldcs(p + i);
    if (FULL) s += (unsigned long long)v.x + v.y + v.z + v.w;
    else x ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (FULL) atomicAdd(sum, s);
  if (x == 0x9e3779b9u) atomicAdd(sum + 1, 1ull);
}
__global__ void k_fill(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 0x9e3779b1u ^ seed;
    h ^= h >> 15; h *= 0x2c1b3c6du; h ^= h >> 12; h *= 0x297a2d39u; h ^= h >> 15;
    p[i] = h;
  }
}

static uint8_t* g_flush;
static const size_t kFlush = 512ull << 20;
static void flush() { k_read<false><<<132 * 8, 512>>>(reinterpret_cast<const uint4*>(g_flush), kFlush / 16, reinterpret_cast<unsigned long long*>(g_flush)); }

template <class F>
static double time_us(F&& launch, int reps = 60) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> ts;
  for (int r = 0; r < reps + 3; ++r) {
    flush();
    CK(cudaEventRecord(a));
    launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    CK(cudaGetLastError());
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (r >= 3) ts.push_back(ms * 1000.f);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

static double g_copy_bw;  // bytes / s, read + write

struct Layout {
  uint8_t *kc, *ks, *km, *vc, *vs, *vm;
  size_t nkc, nks, nvc, nvs, total;
};

static unsigned long long g_ref;

static void report(const char* name, int bits, double us, size_t bytes, int occ, unsigned long long sum, bool checked) {
  const double bw = bytes / (us * 1e-6);
  printf("int%d %-34s %8.1f us  %7.1f GB/s  %5.1f%% of copy bw  CTAs/SM %d  %s\n", bits, name, us, bw / 1e9,
         100.0 * bw / g_copy_bw, occ, !checked ? "" : sum == g_ref ? "sum ok" : "SUM MISMATCH");
}

static unsigned long long run_sum(void (*launch)(const Bufs&), Bufs bf) {
  CK(cudaMemset(bf.sum, 0, 16));
  launch(bf);
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  unsigned long long s;
  CK(cudaMemcpy(&s, bf.sum, 8, cudaMemcpyDeviceToHost));
  return s;
}

static PFN_cuTensorMapEncodeTiled_v12000 g_encode;
static CUtensorMap g_kmap[2][3];  // [bits == 4][TOK: 128, 256, 512]

static int tok_index(int tok) { return tok == 128 ? 0 : tok == 256 ? 1 : 2; }

static void make_kmap(CUtensorMap* m, const uint8_t* kc, int bits, int tok) {
  const cuuint64_t dims[2] = {(cuuint64_t)T * bits / 8, (cuuint64_t)NBH * D};
  const cuuint64_t strides[1] = {(cuuint64_t)T * bits / 8};
  const cuuint32_t box[2] = {(cuuint32_t)(tok * bits / 8), (cuuint32_t)D};
  const cuuint32_t estr[2] = {1, 1};
  CUresult r = g_encode(m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<uint8_t*>(kc), dims, strides, box, estr,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    fprintf(stderr, "cuTensorMapEncodeTiled failed: %d\n", (int)r);
    exit(1);
  }
}

static Bufs g_bf;

template <int BITS, int NSTAGE, bool FULL>
static void launch_cpasync(const Bufs& bf) {
  constexpr int KROW = 64 * BITS / 8;
  constexpr int SB = D * KROW + 2 * (64 / G) * D * 2 + 2 * 64 * DG * 2 + 64 * D * BITS / 8;
  // padded to 2 CTAs per SM, the real kernel's budget (its ~228 registers a thread)
  const int smem = std::max(4 * NSTAGE * SB, 100 * 1024);
  CK(cudaFuncSetAttribute(k_cpasync<BITS, NSTAGE, FULL>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  k_cpasync<BITS, NSTAGE, FULL><<<dim3(NBH, SPLITS), 128, smem>>>(bf);
}
template <int BITS, int NSTAGE>
static int occ_cpasync() {
  constexpr int KROW = 64 * BITS / 8;
  constexpr int SB = D * KROW + 2 * (64 / G) * D * 2 + 2 * 64 * DG * 2 + 64 * D * BITS / 8;
  const int smem = std::max(4 * NSTAGE * SB, 100 * 1024);
  int n = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k_cpasync<BITS, NSTAGE, false>, 128, smem));
  return n;
}

// as cpasync's, padded to at most 2 CTAs per SM
template <int BITS, int TOK, int NST>
static int ws_smem() { return std::max(1024 + NST * WsCfg<BITS, TOK>::SB, 100 * 1024); }

template <int BITS, int TOK, int NST, int KIND, bool FULL>
static void launch_ws(const Bufs& bf) {
  const int smem = ws_smem<BITS, TOK, NST>();
  auto k = k_ws<BITS, TOK, NST, KIND, FULL>;
  CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  k<<<dim3(NBH, SPLITS), 160, smem>>>(bf, g_kmap[BITS == 4][tok_index(TOK)]);
}
template <int BITS, int TOK, int NST, int KIND>
static int occ_ws() {
  const int smem = ws_smem<BITS, TOK, NST>();
  auto k = k_ws<BITS, TOK, NST, KIND, false>;
  CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int n = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, 160, smem));
  return n;
}

template <int BITS, int NSTAGE>
static void do_cpasync(size_t bytes) {
  const unsigned long long s = run_sum(launch_cpasync<BITS, NSTAGE, true>, g_bf);
  const double us = time_us([] { launch_cpasync<BITS, NSTAGE, false>(g_bf); });
  char name[64];
  snprintf(name, sizeof name, "cpasync %d stages", NSTAGE);
  report(name, BITS, us, bytes, occ_cpasync<BITS, NSTAGE>(), s, true);
}

template <int BITS, int TOK, int NST, int KIND>
static void do_ws(size_t bytes) {
  if (1024 + NST * WsCfg<BITS, TOK>::SB > 227 * 1024 || TOK > T / SPLITS) return;
  const unsigned long long s = run_sum(launch_ws<BITS, TOK, NST, KIND, true>, g_bf);
  const double us = time_us([] { launch_ws<BITS, TOK, NST, KIND, false>(g_bf); });
  char name[64];
  snprintf(name, sizeof name, "%s TOK %d, %d stages (%d KB)", KIND == KIND_BULK ? "bulk" : KIND == KIND_TMA ? "tma" : "contig",
           TOK, NST, NST * WsCfg<BITS, TOK>::SB / 1024);
  // contig reads other K addresses (the same bytes): its sum is not comparable
  report(name, BITS, us, bytes, occ_ws<BITS, TOK, NST, KIND>(), s, KIND != KIND_CONTIG);
}

template <int BITS>
static void run_width(uint8_t* pool) {
  Layout L;
  L.nkc = (size_t)NBH * D * T * BITS / 8;
  L.nks = (size_t)NBH * (T / G) * D * 2;
  L.nvc = (size_t)NBH * T * D * BITS / 8;
  L.nvs = (size_t)NBH * T * DG * 2;
  L.kc = pool;
  L.ks = L.kc + L.nkc;
  L.km = L.ks + L.nks;
  L.vc = L.km + L.nks;
  L.vs = L.vc + L.nvc;
  L.vm = L.vs + L.nvs;
  L.total = L.nkc + 2 * L.nks + L.nvc + 2 * L.nvs;
  g_bf = Bufs{L.kc, L.ks, L.km, L.vc, L.vs, L.vm, g_bf.sum, BITS, T};
  for (int i = 0; i < 3; ++i) make_kmap(&g_kmap[BITS == 4][i], L.kc, BITS, 128 << i);
  // the reference sum: every byte of the six tensors (the variants read all of them: 4 splits x 8192 tokens)
  CK(cudaMemset(g_bf.sum, 0, 16));
  k_read<true><<<132 * 8, 512>>>(reinterpret_cast<const uint4*>(pool), L.total / 16, g_bf.sum);
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpy(&g_ref, g_bf.sum, 8, cudaMemcpyDeviceToHost));
  const size_t fp16 = (size_t)NBH * T * D * 2 * 2;
  printf("\nB=%d, T=%d, int%d, group %d: %.1f MB streamed (fp16 K+V %.1f MB: %.2fx fewer)\n", B, T, BITS, G, L.total / 1e6, fp16 / 1e6,
         (double)fp16 / L.total);
  {
    const double us = time_us([&] { k_read<false><<<132 * 16, 512>>>(reinterpret_cast<const uint4*>(pool), L.total / 16, g_bf.sum); });
    report("plain read, contiguous", BITS, us, L.total, 0, 0, false);
  }
  do_cpasync<BITS, 2>(L.total);
  if (T != 32768) {  // the intercept: the scheme and the best copies of T = 32k at shorter lengths
    do_ws<BITS, 256, 2, KIND_TMA>(L.total);
    do_ws<BITS, 128, 4, KIND_TMA>(L.total);
    return;
  }
  do_cpasync<BITS, 3>(L.total);
  do_ws<BITS, 64, 4, KIND_BULK>(L.total);
  do_ws<BITS, 64, 8, KIND_BULK>(L.total);
  do_ws<BITS, 128, 2, KIND_BULK>(L.total);
  do_ws<BITS, 128, 4, KIND_BULK>(L.total);
  do_ws<BITS, 128, 6, KIND_BULK>(L.total);
  do_ws<BITS, 128, 8, KIND_BULK>(L.total);
  do_ws<BITS, 256, 2, KIND_BULK>(L.total);
  do_ws<BITS, 256, 3, KIND_BULK>(L.total);
  do_ws<BITS, 256, 4, KIND_BULK>(L.total);
  do_ws<BITS, 128, 4, KIND_TMA>(L.total);
  do_ws<BITS, 128, 8, KIND_TMA>(L.total);
  do_ws<BITS, 256, 2, KIND_TMA>(L.total);
  do_ws<BITS, 256, 4, KIND_TMA>(L.total);
  do_ws<BITS, 512, 2, KIND_TMA>(L.total);
  do_ws<BITS, 128, 4, KIND_CONTIG>(L.total);
  do_ws<BITS, 256, 4, KIND_CONTIG>(L.total);
}

int main() {
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&g_encode), 12000, cudaEnableDefault, &q));
  CK(cudaMalloc(&g_flush, kFlush));
  k_fill<<<1024, 256>>>(reinterpret_cast<uint32_t*>(g_flush), kFlush / 4, 7);
  const size_t pool_bytes = 400ull << 20;  // int4: 335.5 MB
  uint8_t* pool;
  CK(cudaMalloc(&pool, pool_bytes));
  k_fill<<<1024, 256>>>(reinterpret_cast<uint32_t*>(pool), pool_bytes / 4, 12345);
  CK(cudaMalloc(&g_bf.sum, 16));
  {
    const size_t n = 1ull << 30;
    uint8_t *a, *b;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 1, n));
    const double us = time_us([&] { CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice)); }, 20);
    g_copy_bw = 2.0 * n / (us * 1e-6);
    printf("copy bandwidth (1 GiB D2D, read + write): %.2f TB/s\n", g_copy_bw / 1e12);
    CK(cudaFree(a));
    CK(cudaFree(b));
  }
  CK(cudaDeviceSynchronize());
  for (int t : {32768, 4096, 1024}) {
    T = t;
    run_width<2>(pool);
    run_width<4>(pool);
  }
  return 0;
}
