// Fused decode attention over a KIVI cache (packed int2/int4 K and V, fp16 scales, fp16 windows), CUDA C++.
//
// Same function and cache layout as the Triton kernel in kvlab/kernels/kivi_attention.py (its docstring has
// the layout); this file holds only device code so that it compiles without torch (kivi_attention_cuda.cu has
// the instances and launchers, kivi_binding.cpp the torch binding). fp16 queries, sm_80 or newer (mma.sync
// m16n8k16). This is the "registers" variant; kivi_attention_staged.cuh is the "staged" one, which shares
// everything here but the main loop's loads.
//
// Why a second kernel: the Triton one spends ~55 warp-instructions per (token, kv head) getting codes into
// the matrix unit's operand registers through shared memory (benchmarks/KERNEL_NOTES.md). Here every code
// goes from global memory straight into the register that the mma reads, with no shared memory and no
// shuffles, because the roles of the matrix-multiply rows and columns are chosen to fit the packed layout:
//
//  * scores: S^T (tokens x query rows) = K (tokens x channels) . Q^T. mma A = K codes: tokens on M (16),
//    channels on K (16); B = the query rows (N = 8: GQA x n query tokens, padded). Lane (g = lane / 4,
//    c = lane % 4) owns the codes of the 8 consecutive tokens g*8.. (a 32-bit word of int4 codes, 16 bits of
//    int2 codes) of channels 16kk + 4c + e (e = 0..3); A row g of M-tile i is token g*8 + 2i, row g + 8 is
//    token g*8 + 2i + 1; A column 2c, 2c+1, 2c+8, 2c+9 is channel 4c, 4c+1, 4c+2, 4c+3 of the k-step. One
//    byte permute of two channels' words puts the same token of both channels side by side, and one AND/OR turns each pair into two fp16 values
//    1024 + code (the 0x6400 mantissa trick: no int-to-float conversion).
//  * output: O^T (channels x query rows) += V^T (channels x tokens) . P^T. A = V codes: channels on M,
//    tokens on K; lane owns the CPT = D / 8 consecutive channels g*CPT.. of tokens 16ks + 4c + e.
//  * P goes from the score accumulators to the B operand of the second mma through 1 KiB of shared memory
//    per warp (per token, not per code).
//
// Each warp runs its own online softmax over blocks of BN = 64 tokens; the 4 warps of a CTA are merged
// through shared memory at the end, and each CTA writes one split's normalised partial output and its
// log2-sum-exp2, merged by kivi_merge_kernel. The tokens after the last full block where both K and V are
// quantized (the residual windows; masked, causal) are shared out among all warps of the sequence's CTAs
// after their blocks, in 16-token units staged in shared memory as fp16 and run through the same two mma
// products (tail_units).

#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include "kivi_attention_cuda.h"

namespace kvlab {


template <int BITS, int D, int NT>
struct KiviCfg {
  static constexpr int TPT = 8;  // K: tokens per lane and channel (a 32-bit word for int4, 16 bits for int2)
  static constexpr int BN = 8 * TPT;  // tokens per block of a warp: 64
  static constexpr int MTK = TPT / 2;  // K m-tiles (16 tokens) per block
  static constexpr int KK = D / 16;  // k-steps over channels
  static constexpr int CPT = D / 8;  // V: channels per lane
  static constexpr int MTV = CPT / 2;  // V m-tiles (16 channels)
  static constexpr int KS = BN / 16;  // k-steps over tokens
  static constexpr int VBITS = CPT * BITS;  // bits of V codes per lane and token: 16, 32 or 64
  static constexpr int VW = VBITS >= 32 ? VBITS / 32 : 1;  // words per lane and token (16 bits count as one)
  static constexpr int ROWS = 8 * NT;  // query rows (GQA x n), padded to the mma's N
  static constexpr int PST = BN + 16;  // P row stride in shared memory (halves): no bank conflicts
  static constexpr int WARPS = 4;
};

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Code n (0 .. 32/BITS - 1) of two words side by side as fp16 (1024 + code): lo = __byte_perm(wa, wb, 0x5410)
// holds the first 16 bits of each word, hi = __byte_perm(wa, wb, 0x7632) the last 16.
template <int BITS, int N>
__device__ __forceinline__ uint32_t code_pair(uint32_t lo, uint32_t hi) {
  constexpr int NPH = 16 / BITS;
  constexpr uint32_t MASK = ((1u << BITS) - 1u) * 0x10001u;
  const uint32_t y = (N < NPH ? lo : hi) >> ((N % NPH) * BITS);
  uint32_t x;  // (y & MASK) | 0x64006400 in one instruction
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(x) : "r"(y), "n"(MASK), "n"(0x64006400u));
  return x;
}

// (1024 + code) * scale + min - 1024 * scale, exactly as code * scale + min rounded once (fp16 FMA)
__device__ __forceinline__ uint32_t dequant(uint32_t x, __half2 s, __half2 m) {
  __half2 h = *reinterpret_cast<__half2*>(&x);
  h = __hfma2(__hsub2(h, __float2half2_rn(1024.0f)), s, m);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The lo and hi halves (see code_pair) of two pairs of words: y = {lo(w0, w1), hi(w0, w1), lo(w2, w3), hi(w2, w3)}
__device__ __forceinline__ void pair_words(uint32_t (&y)[4], uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  y[0] = __byte_perm(w0, w1, 0x5410);
  y[1] = __byte_perm(w0, w1, 0x7632);
  y[2] = __byte_perm(w2, w3, 0x5410);
  y[3] = __byte_perm(w2, w3, 0x7632);
}

// The mma A operand of m-tile i (at most 8; a constant once the caller's loop is unrolled, which the switch
// needs): codes 2i and 2i+1 of the first pair of words, dequantized with (s01, m01), and of the second pair
// with (s23, m23).
template <int BITS>
__device__ __forceinline__ void tile_operand(uint32_t (&a)[4], int i, const uint32_t (&y)[4], __half2 s01,
                                             __half2 m01, __half2 s23, __half2 m23) {
  switch (i) {
#define KV_CASE(I)                                                  \
  case I:                                                           \
    a[0] = dequant(code_pair<BITS, 2 * I>(y[0], y[1]), s01, m01);     \
    a[1] = dequant(code_pair<BITS, 2 * I + 1>(y[0], y[1]), s01, m01); \
    a[2] = dequant(code_pair<BITS, 2 * I>(y[2], y[3]), s23, m23);     \
    a[3] = dequant(code_pair<BITS, 2 * I + 1>(y[2], y[3]), s23, m23); \
    break;
    KV_CASE(0) KV_CASE(1) KV_CASE(2) KV_CASE(3) KV_CASE(4) KV_CASE(5) KV_CASE(6) KV_CASE(7)
#undef KV_CASE
    default: a[0] = a[1] = a[2] = a[3] = 0u;
  }
}

__device__ __forceinline__ uint32_t ld32(const uint8_t* p) { return __ldg(reinterpret_cast<const uint32_t*>(p)); }

// Loads of the main path's codes and scales, read-only, with an L2 prefetch-size hint (KVLAB_KIVI_L2_PREFETCH =
// 64, 128 or 256 bytes; 0: none): a warp-block reads 32 (int4) / 16 (int2) bytes of each K channel row, and
// the neighbouring pieces are the other warps' blocks. On an H100 (B=8, T=32k, run 20) 128 bytes took int4
// from 151.6 to 144.5 us (registers variant) and int2 from 115.3 to 113.6 us (staged); 256 was no better.
#ifndef KVLAB_KIVI_L2_PREFETCH
#define KVLAB_KIVI_L2_PREFETCH 128
#endif
#define KV_STR2(x) #x
#define KV_STR(x) KV_STR2(x)
#if KVLAB_KIVI_L2_PREFETCH
#define KV_L2 ".L2::" KV_STR(KVLAB_KIVI_L2_PREFETCH) "B"
#else
#define KV_L2 ""
#endif
__device__ __forceinline__ uint32_t ldc32(const void* p) {
  uint32_t v;
  asm("ld.global.nc" KV_L2 ".b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ldc16(const void* p) {
  unsigned short v;
  asm("ld.global.nc" KV_L2 ".u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ldc64(const void* p) {
  uint2 v;
  asm("ld.global.nc" KV_L2 ".v2.b32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ float load_float(const void* p, int64_t i, int dtype) {
  if (dtype == 0) return __half2float(reinterpret_cast<const __half*>(p)[i]);
  if (dtype == 1) {
    const uint16_t u = reinterpret_cast<const uint16_t*>(p)[i];
    return __uint_as_float(static_cast<uint32_t>(u) << 16);
  }
  return reinterpret_cast<const float*>(p)[i];
}

// NS online-softmax states of a CTA: one per warp (the folded variant keeps two a warp: its main blocks' and
// its tail's).
template <int D, int ROWS, int NS = 4>
struct KiviSmem {
  float o[NS][ROWS][D];  // unnormalised outputs
  float m[NS][ROWS];
  float l[NS][ROWS];
};

// Merge the NS online-softmax states (in shared memory) and write this CTA's split; by the first NTHR threads (0: all
// of the CTA's), though every thread of the CTA takes the barrier.
template <int D, int ROWS, int NS = 4, int NTHR = 0>
__device__ void write_split(const KiviParams& p, KiviSmem<D, ROWS, NS>& sm, int b, int h, int rows, int split,
                            int splits) {
  __syncthreads();
  const int nthr = NTHR ? NTHR : blockDim.x;
  for (int idx = threadIdx.x; idx < rows * D; idx += nthr) {
    const int r = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < NS; ++w) mx = fmaxf(mx, sm.m[w][r]);
    float o = 0.f, l = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NS; ++w) {
        const float a = fast_exp2(sm.m[w][r] - mx);  // 0 for a warp that saw nothing
        o += a * sm.o[w][r][d];
        l += a * sm.l[w][r];
      }
    }
    const int head = h * p.gqa + r / p.nq, qi = r % p.nq;
    const int64_t row = (static_cast<int64_t>(b) * p.H * p.gqa + head) * p.nq + qi;
    p.o_part[(row * splits + split) * D + d] = l > 0.f ? o / l : 0.f;
    if (d == 0) p.lse_part[row * splits + split] = l > 0.f ? mx + __log2f(l) : -INFINITY;
  }
}

// One (sequence, kv head)'s cache: its code and scale pointers and token counts.
struct KiviSeq {
  const uint8_t* kc;  // K codes (D, capk * BITS / 8)
  const __half* ks;  // K scales and minima (capk / group, D)
  const __half* km;
  const uint8_t* vc;  // V codes (capv, D * BITS / 8)
  const __half* vs;  // V scales and minima (capv, D / group)
  const __half* vm;
  int L;  // tokens
  int nv;  // V tokens quantized (the rest in the V window)
  int nk;  // K tokens quantized (whole residual blocks; the rest in the K window)
};

__device__ __forceinline__ KiviSeq seq_of(const KiviParams& p, int b, int h) {
  KiviSeq q;
  q.L = p.lengths[b];
  q.nv = max(q.L - p.residual, 0);
  q.nk = (q.L / p.residual) * p.residual;
  q.kc = p.kc + b * p.skc_b + h * p.skc_h;
  q.ks = p.ks + b * p.sks_b + h * p.sks_h;
  q.km = p.km + b * p.sks_b + h * p.sks_h;
  q.vc = p.vc + b * p.svc_b + h * p.svc_h;
  q.vs = p.vs + b * p.svs_b + h * p.svs_h;
  q.vm = p.vm + b * p.svs_b + h * p.svs_h;
  return q;
}

// The tail: tokens [main_end, L) of sequence b, kv head h (the last partial block of the quantized region and
// the residual windows), in units of UT = 16 tokens shared out among all warps of the sequence's CTAs. A warp
// stages a unit in shared memory as fp16 (K codes dequantized or K window; V likewise), K as (token, channel)
// rows and V transposed, then runs the main path's two mma products and online softmax on it, continuing the
// warp's state in registers. Rows past L or hidden by the causal order of the query tokens are masked.
template <int D>
struct TailCfg {
  static constexpr int UT = 16;  // tokens per unit
  static constexpr int KST = 2 * D + 32;  // K tile row stride (bytes): 64-bit reads of 16 lanes hit 32 banks
  static constexpr int KT = UT * KST;  // K tile: (token, channel)
  static constexpr int VT = D * UT * 2;  // V^T tile: channel ch in row (ch % (D / 8)) * 8 + ch / (D / 8), by token
  static constexpr int BYTES = KT + VT;  // per warp
};

// Staging of a tail unit (tail_units): this lane's CPL = D / 32 channels ch0 = lane * CPL .. of tokens
// u0 .. u0 + 15 (past L: token L - 1, masked later) as fp16, dequantized exactly as the main path (one fp16
// FMA). A unit wholly inside the quantized region or wholly inside an fp16 window loads everything without a
// branch, so that its loads are in flight together; a unit across the boundary, or a bf16/fp32 window, takes
// the per-token path.
// This lane's channels of fp16 window rows for tokens u0 .. u0 + 15 (past L: L - 1); the window starts at
// token n0, its rows `stride` elements apart.
template <int D>
__device__ __forceinline__ void window_fp16(const char* w, int64_t stride, int u0, int L, int n0, int ch0,
                                            __half (&x)[TailCfg<D>::UT][D / 32]) {
  const __half* win = reinterpret_cast<const __half*>(w);
#pragma unroll
  for (int e = 0; e < TailCfg<D>::UT; ++e) {
    const int64_t row = (min(u0 + e, L - 1) - n0) * stride + ch0;
#pragma unroll
    for (int k = 0; k < D / 32; ++k) x[e][k] = win[row + k];
  }
}

template <int BITS, int D>
__device__ __forceinline__ void stage_k(const KiviParams& p, const KiviSeq& sq, const char* kw, int u0, uint8_t* tile) {
  using T = TailCfg<D>;
  constexpr int CPL = D / 32, PER_BYTE = 8 / BITS, QMAX = (1 << BITS) - 1;
  const int ch0 = (threadIdx.x & 31) * CPL;
  const uint8_t* kc = sq.kc;
  const __half *ks = sq.ks, *km = sq.km;
  const int L = sq.L, nk = sq.nk;
  __half kx[T::UT][CPL];
  if (u0 + T::UT <= nk) {  // codes along tokens: 16 tokens of a channel are 8 (int4) / 4 (int2) bytes
    uint32_t w[CPL][2];
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const uint8_t* src = kc + (ch0 + k) * p.skc_d + u0 * BITS / 8;
      if constexpr (BITS == 4) {
        w[k][0] = ld32(src);
        w[k][1] = ld32(src + 4);
      } else {
        w[k][0] = __ldg(reinterpret_cast<const uint16_t*>(src));
        w[k][1] = __ldg(reinterpret_cast<const uint16_t*>(src + 2));
      }
    }
    __half sc[2][CPL], mn[2][CPL];  // the groups of tokens u0 and u0 + 8 (group >= 8)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int64_t si = ((u0 + 8 * half) / p.group) * p.sks_g + ch0 + k;
        sc[half][k] = ks[si];
        mn[half][k] = km[si];
      }
#pragma unroll
    for (int e = 0; e < T::UT; ++e)
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int code = (w[k][e / 8] >> ((e % 8) * BITS)) & QMAX;  // 8 tokens per loaded word
        kx[e][k] = __hfma(__int2half_rn(code), sc[e / 8][k], mn[e / 8][k]);
      }
  } else if (u0 >= nk && p.kw_dtype == 0) {
    window_fp16<D>(kw, p.skw_t, u0, L, nk, ch0, kx);
  } else {
#pragma unroll
    for (int e = 0; e < T::UT; ++e) {
      const int t = min(u0 + e, L - 1);
      if (t < nk) {
        const int64_t si = (t / p.group) * p.sks_g + ch0;
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          const int code = (kc[(ch0 + k) * p.skc_d + t / PER_BYTE] >> ((t % PER_BYTE) * BITS)) & QMAX;
          kx[e][k] = __hfma(__int2half_rn(code), ks[si + k], km[si + k]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < CPL; ++k) kx[e][k] = __float2half_rn(load_float(kw, (t - nk) * p.skw_t + ch0 + k, p.kw_dtype));
      }
    }
  }
#pragma unroll
  for (int e = 0; e < T::UT; ++e)
#pragma unroll
    for (int k = 0; k < CPL; k += 2)
      *reinterpret_cast<__half2*>(tile + e * T::KST + (ch0 + k) * 2) = __halves2half2(kx[e][k], kx[e][k + 1]);
}

template <int BITS, int D>
__device__ __forceinline__ void stage_v(const KiviParams& p, const KiviSeq& sq, const char* vw, int u0, uint8_t* vt) {
  using T = TailCfg<D>;
  constexpr int CPL = D / 32, PER_BYTE = 8 / BITS, QMAX = (1 << BITS) - 1, CPT = D / 8;
  const int ch0 = (threadIdx.x & 31) * CPL;
  const uint8_t* vc = sq.vc;
  const __half *vs = sq.vs, *vm = sq.vm;
  const int L = sq.L, nv = sq.nv;
  __half vx[T::UT][CPL];
  if (u0 + T::UT <= nv) {  // codes along channels: this lane's CPL codes of a token are CPL * BITS / 8 bytes
    uint32_t w[T::UT];
    __half sc[T::UT], mn[T::UT];
#pragma unroll
    for (int e = 0; e < T::UT; ++e) {
      const int t = u0 + e;
      const uint8_t* src = vc + t * p.svc_t + ch0 * BITS / 8;
      if constexpr (CPL * BITS == 16) {
        w[e] = __ldg(reinterpret_cast<const uint16_t*>(src));
      } else {
        w[e] = __ldg(src);
      }
      const int64_t si = t * p.svs_t + ch0 / p.group;
      sc[e] = vs[si];
      mn[e] = vm[si];
    }
#pragma unroll
    for (int e = 0; e < T::UT; ++e)
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int code = (w[e] >> ((ch0 * BITS) % 8 + k * BITS)) & QMAX;  // int2 at D=64: half a byte a lane
        vx[e][k] = __hfma(__int2half_rn(code), sc[e], mn[e]);
      }
  } else if (u0 >= nv && p.vw_dtype == 0) {
    window_fp16<D>(vw, p.svw_t, u0, L, nv, ch0, vx);
  } else {
#pragma unroll
    for (int e = 0; e < T::UT; ++e) {
      const int t = min(u0 + e, L - 1);
      if (t < nv) {
        const int64_t si = t * p.svs_t + ch0 / p.group;
        const __half s = vs[si], m = vm[si];
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          const int code = (vc[t * p.svc_t + (ch0 + k) / PER_BYTE] >> (((ch0 + k) % PER_BYTE) * BITS)) & QMAX;
          vx[e][k] = __hfma(__int2half_rn(code), s, m);
        }
      } else {
#pragma unroll
        for (int k = 0; k < CPL; ++k) vx[e][k] = __float2half_rn(load_float(vw, (t - nv) * p.svw_t + ch0 + k, p.vw_dtype));
      }
    }
  }
  // V^T rows: channel ch in row (ch % CPT) * 8 + ch / CPT, its 16 tokens (32 bytes)
#pragma unroll
  for (int k = 0; k < CPL; ++k) {
    const int ch = ch0 + k;
    uint32_t w[T::UT / 2];
#pragma unroll
    for (int e = 0; e < T::UT; e += 2) {
      const __half2 h2 = __halves2half2(vx[e][k], vx[e + 1][k]);
      w[e / 2] = *reinterpret_cast<const uint32_t*>(&h2);
    }
    uint4* row = reinterpret_cast<uint4*>(vt + ((ch % CPT) * 8 + ch / CPT) * T::UT * 2);
    row[0] = make_uint4(w[0], w[1], w[2], w[3]);
    row[1] = make_uint4(w[4], w[5], w[6], w[7]);
  }
}

template <int BITS, int D, int NT>
__device__ void tail_units(const KiviParams& p, int b, int h, int main_end, const uint32_t (&qf)[NT][D / 16][2],
                           float (&m_r)[NT][2], float (&l_r)[NT][2], float (&oacc)[D / 16][NT][4], __half* ps,
                           uint8_t* tile) {
  using C = KiviCfg<BITS, D, NT>;
  using T = TailCfg<D>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const KiviSeq sq = seq_of(p, b, h);
  const int L = sq.L;
  const int nu = (L - main_end + T::UT - 1) / T::UT;
  const int kwsz = p.kw_dtype == 2 ? 4 : 2, vwsz = p.vw_dtype == 2 ? 4 : 2;
  const char* kw = static_cast<const char*>(p.kw) + (b * p.skw_b + h * p.skw_h) * kwsz;
  const char* vw = static_cast<const char*>(p.vw) + (b * p.svw_b + h * p.svw_h) * vwsz;
  uint8_t* vt = tile + T::KT;
  // Which warps take the units: those of the splits with no main block of this sequence (from s0 on), where there
  // are such splits (the plan adds one where the wave has room: kivi_cuda.plan), else those of every split. A unit on
  // top of a warp's main blocks made that warp, and so the call, ~3.5 us longer (KERNEL_NOTES.md, v15).
  const int first_empty = (main_end + p.split_len - 1) / p.split_len;
  const int s0 = first_empty < p.n_main ? first_empty : 0;
  const int y = static_cast<int>(blockIdx.y) - s0;
  for (int u = y < 0 ? nu : y * C::WARPS + warp; u < nu; u += (p.n_main - s0) * C::WARPS) {
    const int u0 = main_end + u * T::UT;
    __syncwarp();  // the previous unit (or the main path) is done with the tiles and P
    // ---- stage this lane's CPL channels of the unit's tokens
    stage_k<BITS, D>(p, sq, kw, u0, tile);
    stage_v<BITS, D>(p, sq, vw, u0, vt);
    __syncwarp();

    // ---- scores of tokens u0 + g (C row g) and u0 + g + 8 (row g + 8): S^T = K . Q^T
    float sacc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) sacc[nt][j] = 0.f;
#pragma unroll
    for (int kk = 0; kk < C::KK; ++kk) {
      const uint2 r0 = *reinterpret_cast<const uint2*>(tile + g * T::KST + 32 * kk + 8 * c);
      const uint2 r1 = *reinterpret_cast<const uint2*>(tile + (g + 8) * T::KST + 32 * kk + 8 * c);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_16816(sacc[nt], r0.x, r1.x, r0.y, r1.y, qf[nt][kk][0], qf[nt][kk][1]);
    }
    // ---- online softmax (masked), P to shared memory
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = nt * 8 + 2 * c + j;
        const int last = min(L - 1, L - p.nq + r % p.nq);  // the last token query row r sees
        const float s0 = u0 + g <= last ? sacc[nt][j] * p.qk_scale : -INFINITY;
        const float s1 = u0 + g + 8 <= last ? sacc[nt][2 + j] * p.qk_scale : -INFINITY;
        float mx = fmaxf(s0, s1);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float m_new = fmaxf(m_r[nt][j], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: every p is 0
        const float alpha = fast_exp2(m_r[nt][j] - m_use);
        const float p0 = fast_exp2(s0 - m_use), p1 = fast_exp2(s1 - m_use);
        m_r[nt][j] = m_new;
        l_r[nt][j] = l_r[nt][j] * alpha + p0 + p1;
#pragma unroll
        for (int mt = 0; mt < C::MTV; ++mt) {
          oacc[mt][nt][j] *= alpha;
          oacc[mt][nt][2 + j] *= alpha;
        }
        ps[r * C::PST + g] = __float2half_rn(p0);
        ps[r * C::PST + g + 8] = __float2half_rn(p1);
      }
    }
    __syncwarp();
    // ---- output: O^T += V^T . P^T over the unit's 16 tokens (one k-step)
    uint32_t pf[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint2 v = *reinterpret_cast<const uint2*>(ps + (nt * 8 + g) * C::PST + 4 * c);
      pf[nt][0] = v.x;
      pf[nt][1] = v.y;
    }
#pragma unroll
    for (int mt = 0; mt < C::MTV; ++mt) {
      const uint2 r0 = *reinterpret_cast<const uint2*>(vt + (16 * mt + g) * T::UT * 2 + 8 * c);
      const uint2 r1 = *reinterpret_cast<const uint2*>(vt + (16 * mt + 8 + g) * T::UT * 2 + 8 * c);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_16816(oacc[mt][nt], r0.x, r1.x, r0.y, r1.y, pf[nt][0], pf[nt][1]);
    }
  }
  __syncwarp();
}

// The warp's state to shared memory slot `slot` (true channel order): unnormalised outputs, running max, sum over
// tokens.
template <int D, int NT, int NS>
__device__ void store_state(KiviSmem<D, 8 * NT, NS>& sm, int slot, float (&m_r)[NT][2], float (&l_r)[NT][2],
                            float (&oacc)[D / 16][NT][4]) {
  constexpr int CPT = D / 8;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float l = l_r[nt][j];
      l += __shfl_xor_sync(0xffffffffu, l, 4);
      l += __shfl_xor_sync(0xffffffffu, l, 8);
      l += __shfl_xor_sync(0xffffffffu, l, 16);
      l_r[nt][j] = l;
    }
  __syncthreads();  // everyone is done with P, the tiles and the stages before the shared memory is reused
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = nt * 8 + 2 * c + j;
      if (g == 0) {
        sm.m[slot][r] = m_r[nt][j];
        sm.l[slot][r] = l_r[nt][j];
      }
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt) {
        sm.o[slot][r][g * CPT + 2 * mt] = oacc[mt][nt][j];
        sm.o[slot][r][g * CPT + 2 * mt + 1] = oacc[mt][nt][2 + j];
      }
    }
}

// ---- pieces of the main path shared by the variants (kivi_attention_staged.cuh and the folded tail use them)

// The B operand of the score mma (query row nt*8 + g, channels 16kk + 4c .. + 3; zero past the real rows) and an
// empty online-softmax state.
template <int BITS, int D, int NT>
__device__ __forceinline__ void init_main(const KiviParams& p, int b, int h, uint32_t (&qf)[NT][D / 16][2],
                                          float (&m_r)[NT][2], float (&l_r)[NT][2], float (&oacc)[D / 16][NT][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int rows = p.gqa * p.nq;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int r = nt * 8 + g;
    const __half* qrow = p.q + b * p.sq_b + (h * p.gqa + r / p.nq) * p.sq_h + (r % p.nq) * p.sq_t;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint2 v = make_uint2(0u, 0u);
      if (r < rows) v = __ldg(reinterpret_cast<const uint2*>(qrow + 16 * kk + 4 * c));
      qf[nt][kk][0] = v.x;
      qf[nt][kk][1] = v.y;
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    m_r[nt][0] = m_r[nt][1] = -INFINITY;
    l_r[nt][0] = l_r[nt][1] = 0.f;
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
      for (int j = 0; j < 4; ++j) oacc[mt][nt][j] = 0.f;
  }
}

// This lane's V codes of token tok (its CPT channels g*CPT..) into w (VW words)
template <int BITS, int D, int NT>
__device__ __forceinline__ void load_v_codes(const KiviParams& p, const uint8_t* vc, int tok,
                                             uint32_t (&w)[KiviCfg<BITS, D, NT>::VW]) {
  using C = KiviCfg<BITS, D, NT>;
  const uint8_t* src = vc + tok * p.svc_t + ((threadIdx.x & 31) >> 2) * (C::VBITS / 8);
  if constexpr (C::VBITS == 64) {
    const uint2 v = ldc64(src);
    w[0] = v.x;
    w[C::VW - 1] = v.y;
  } else if constexpr (C::VBITS == 32) {
    w[0] = ldc32(src);
  } else {
    w[0] = ldc16(src);
  }
}

// Online softmax over one block's scores (sacc: MTK m-tiles of 16 tokens in the C layout), P to this warp's
// shared-memory rows (row, token) as fp16, the state rescaled.
template <int BITS, int D, int NT>
__device__ __forceinline__ void softmax_block(const float (&sacc)[KiviCfg<BITS, D, NT>::MTK][NT][4], float qk_scale,
                                              float (&m_r)[NT][2], float (&l_r)[NT][2], float (&oacc)[D / 16][NT][4],
                                              __half* ps) {
  using C = KiviCfg<BITS, D, NT>;
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < C::MTK; ++i) mx = fmaxf(mx, fmaxf(sacc[i][nt][j], sacc[i][nt][2 + j]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float m_new = fmaxf(m_r[nt][j], mx * qk_scale);
      const float alpha = fast_exp2(m_r[nt][j] - m_new);
      m_r[nt][j] = m_new;
      float lsum = 0.f;
      __half* prow = ps + (nt * 8 + 2 * c + j) * C::PST + g * C::TPT;
#pragma unroll
      for (int i = 0; i < C::MTK; ++i) {
        const float p0 = fast_exp2(fmaf(sacc[i][nt][j], qk_scale, -m_new));
        const float p1 = fast_exp2(fmaf(sacc[i][nt][2 + j], qk_scale, -m_new));
        lsum += p0 + p1;
        *reinterpret_cast<__half2*>(prow + 2 * i) = __floats2half2_rn(p0, p1);
      }
      l_r[nt][j] = l_r[nt][j] * alpha + lsum;
#pragma unroll
      for (int mt = 0; mt < C::MTV; ++mt) {
        oacc[mt][nt][j] *= alpha;
        oacc[mt][nt][2 + j] *= alpha;
      }
    }
  }
}

// O^T += V^T . P^T over k-step s (tokens 16s ..) of a block: vw = this lane's V words of tokens 16s + 4c + e,
// (s01, m01) the scales and minima of tokens 4c, 4c+1, (s23, m23) of 4c+2, 4c+3.
template <int BITS, int D, int NT>
__device__ __forceinline__ void pv_kstep(int s, const uint32_t (&vw)[4][KiviCfg<BITS, D, NT>::VW], __half2 s01,
                                         __half2 m01, __half2 s23, __half2 m23, const __half* ps,
                                         float (&oacc)[D / 16][NT][4]) {
  using C = KiviCfg<BITS, D, NT>;
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  uint32_t pf[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const uint2 v = *reinterpret_cast<const uint2*>(ps + (nt * 8 + g) * C::PST + 16 * s + 4 * c);
    pf[nt][0] = v.x;
    pf[nt][1] = v.y;
  }
#pragma unroll
  for (int wi = 0; wi < C::VW; ++wi) {
    uint32_t y[4];
    pair_words(y, vw[0][wi], vw[1][wi], vw[2][wi], vw[3][wi]);
    constexpr int MT_PER_WORD = (C::VBITS >= 32 ? 32 / BITS : C::CPT) / 2;  // m-tiles from one word
#pragma unroll
    for (int u = 0; u < MT_PER_WORD; ++u) {
      uint32_t a[4];
      tile_operand<BITS>(a, u, y, s01, m01, s23, m23);
      const int mt = wi * MT_PER_WORD + u;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_16816(oacc[mt][nt], a[0], a[1], a[2], a[3], pf[nt][0], pf[nt][1]);
    }
  }
}

#ifndef KVLAB_KIVI_MIN_BLOCKS
#define KVLAB_KIVI_MIN_BLOCKS 2  // CTAs per SM the register allocation must allow
#endif

template <int BITS, int D, int NT>
__global__ void __launch_bounds__(128, KVLAB_KIVI_MIN_BLOCKS) kivi_decode_kernel(const KiviParams p) {
  using C = KiviCfg<BITS, D, NT>;
  constexpr int ROWS = C::ROWS;
  constexpr int TPT = C::TPT, BN = C::BN;
  constexpr int PBYTES = C::WARPS * ROWS * C::PST * 2;
  constexpr int TBYTES = PBYTES + C::WARPS * TailCfg<D>::BYTES;  // P buffers, then the warps' tail tiles
  constexpr int SBYTES = sizeof(KiviSmem<D, ROWS>);
  __shared__ __align__(16) uint8_t smem_raw[TBYTES > SBYTES ? TBYTES : SBYTES];
  auto& sm = *reinterpret_cast<KiviSmem<D, ROWS>*>(smem_raw);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int rows = p.gqa * p.nq;
  const KiviSeq sq = seq_of(p, b, h);
  const int main_end = (sq.nv / BN) * BN;

  {
    // ------------------------------------------------------------------ quantized region, mma path
    const int lo = blockIdx.y * p.split_len;
    const int hi = min(lo + p.split_len, main_end);
    uint32_t qf[NT][C::KK][2];
    float m_r[NT][2], l_r[NT][2];
    float oacc[C::MTV][NT][4];
    init_main<BITS, D, NT>(p, b, h, qf, m_r, l_r, oacc);
    __half* ps = reinterpret_cast<__half*>(smem_raw) + warp * ROWS * C::PST;
    const int vgrp = (g * C::CPT) / p.group;  // this lane's V channels share one group (group >= CPT)

    // Software pipeline over this warp's blocks: K of the next block is loaded while P.V of this one is
    // computed, V of the next block while its scores are computed (the registers of each are free by then).
    uint32_t kwd[C::KK][4];
    uint2 ksc[C::KK], kmn[C::KK];
    uint32_t vwd[C::KS][4][C::VW];
    __half2 vsc[C::KS][2], vmn[C::KS][2];  // (tokens 4c, 4c+1), (4c+2, 4c+3) of each k-step
    auto load_k = [&](int t0) {
      const int kbyte = (t0 + g * TPT) * BITS / 8;
      const int kgrp = (t0 + g * TPT) / p.group;
#pragma unroll
      for (int kk = 0; kk < C::KK; ++kk) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint8_t* src = sq.kc + (16 * kk + 4 * c + e) * p.skc_d + kbyte;
          if constexpr (BITS == 4) {
            kwd[kk][e] = ldc32(src);
          } else {
            kwd[kk][e] = ldc16(src);
          }
        }
        ksc[kk] = ldc64(sq.ks + kgrp * p.sks_g + 16 * kk + 4 * c);
        kmn[kk] = ldc64(sq.km + kgrp * p.sks_g + 16 * kk + 4 * c);
      }
    };
    auto load_v = [&](int t0) {
#pragma unroll
      for (int s = 0; s < C::KS; ++s) {
        __half sc[4], mn[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = t0 + 16 * s + 4 * c + e;
          load_v_codes<BITS, D, NT>(p, sq.vc, tok, vwd[s][e]);
          sc[e] = sq.vs[tok * p.svs_t + vgrp];
          mn[e] = sq.vm[tok * p.svs_t + vgrp];
        }
        vsc[s][0] = __halves2half2(sc[0], sc[1]);
        vsc[s][1] = __halves2half2(sc[2], sc[3]);
        vmn[s][0] = __halves2half2(mn[0], mn[1]);
        vmn[s][1] = __halves2half2(mn[2], mn[3]);
      }
    };
    if (lo + warp * BN < hi) {
      load_k(lo + warp * BN);
      load_v(lo + warp * BN);
    }
    for (int t0 = lo + warp * BN; t0 < hi; t0 += C::WARPS * BN) {
      const int tn = t0 + C::WARPS * BN;  // this warp's next block
      // ---- scores: S^T = K . Q^T
      float sacc[C::MTK][NT][4];
#pragma unroll
      for (int i = 0; i < C::MTK; ++i)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) sacc[i][nt][j] = 0.f;
#pragma unroll
      for (int kk = 0; kk < C::KK; ++kk) {
        uint32_t y[4];
        pair_words(y, kwd[kk][0], kwd[kk][1], kwd[kk][2], kwd[kk][3]);
        const __half2 s01 = *reinterpret_cast<const __half2*>(&ksc[kk].x);
        const __half2 s23 = *reinterpret_cast<const __half2*>(&ksc[kk].y);
        const __half2 m01 = *reinterpret_cast<const __half2*>(&kmn[kk].x);
        const __half2 m23 = *reinterpret_cast<const __half2*>(&kmn[kk].y);
#pragma unroll
        for (int i = 0; i < C::MTK; ++i) {
          uint32_t a[4];
          tile_operand<BITS>(a, i, y, s01, m01, s23, m23);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816(sacc[i][nt], a[0], a[1], a[2], a[3], qf[nt][kk][0], qf[nt][kk][1]);
        }
      }

      if (tn < hi) load_k(tn);

      // ---- online softmax; P to shared memory (row, token) as fp16
      __syncwarp();
      softmax_block<BITS, D, NT>(sacc, p.qk_scale, m_r, l_r, oacc, ps);
      __syncwarp();

      // ---- output: O^T += V^T . P^T
#pragma unroll
      for (int s = 0; s < C::KS; ++s) pv_kstep<BITS, D, NT>(s, vwd[s], vsc[s][0], vmn[s][0], vsc[s][1], vmn[s][1], ps, oacc);
      if (tn < hi) load_v(tn);
    }

    tail_units<BITS, D, NT>(p, b, h, main_end, qf, m_r, l_r, oacc, ps,
                            smem_raw + PBYTES + warp * TailCfg<D>::BYTES);
    store_state(sm, warp, m_r, l_r, oacc);
  }
  write_split<D, ROWS>(p, sm, b, h, rows, blockIdx.y, p.n_main);
}

// out[row, :] = sum_s w_s o_part[row, s, :], w = softmax over s of lse (base 2); one block of D x KIVI_MERGE_PARTS
// threads per row (dynamic shared memory: splits floats). The lse of every split goes into shared memory by one
// load each; thread (d, part) sums the splits part, part + PARTS, .. of channel d (independent loads, unrolled), and
// the partial sums meet in shared memory. (v15: with one thread per channel looping over all splits, the loads were a
// chain of L2 round trips: 3.6 us a call at 33 splits, B=1, against 2.2 at 4 splits.)
constexpr int KIVI_MERGE_PARTS = 4;
template <int D>
__global__ void __launch_bounds__(D * KIVI_MERGE_PARTS) kivi_merge_kernel(const float* __restrict__ o_part,
                                                                          const float* __restrict__ lse_part,
                                                                          __half* __restrict__ out, int splits) {
  constexpr int PARTS = KIVI_MERGE_PARTS;
  extern __shared__ float lse_s[];
  __shared__ float part_o[PARTS][D];
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x % D, part = threadIdx.x / D;
  for (int s = threadIdx.x; s < splits; s += D * PARTS) lse_s[s] = lse_part[row * splits + s];
  __syncthreads();
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse_s[s]);
  float o = 0.f, w = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < splits; ++s) w += fast_exp2(lse_s[s] - mx);
#pragma unroll 8
    for (int s = part; s < splits; s += PARTS) o += fast_exp2(lse_s[s] - mx) * o_part[(row * splits + s) * D + d];
  }
  part_o[part][d] = o;
  __syncthreads();
  if (part == 0) {
#pragma unroll
    for (int i = 1; i < PARTS; ++i) o += part_o[i][d];
    out[row * D + d] = __float2half_rn(w > 0.f ? o / w : 0.f);
  }
}

}  // namespace kvlab
