// Fused decode attention over a KIVI cache (packed int2/int4 K and V, fp16 scales, fp16 windows), CUDA C++.
//
// Same function and cache layout as the Triton kernel in kvlab/kernels/kivi_attention.py (its docstring has
// the layout); this file holds only device code so that it compiles without torch (see kivi_attention_cuda.cu
// for the binding). fp16 queries, sm_80 or newer (mma.sync m16n8k16).
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
// after their blocks, through a plain per-token path.

#pragma once

#include <cuda_fp16.h>
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

__device__ __forceinline__ float load_float(const void* p, int64_t i, int dtype) {
  if (dtype == 0) return __half2float(reinterpret_cast<const __half*>(p)[i]);
  if (dtype == 1) {
    const uint16_t u = reinterpret_cast<const uint16_t*>(p)[i];
    return __uint_as_float(static_cast<uint32_t>(u) << 16);
  }
  return reinterpret_cast<const float*>(p)[i];
}

template <int D, int ROWS>
struct KiviSmem {
  float o[4][ROWS][D];  // per warp: unnormalised outputs
  float m[4][ROWS];
  float l[4][ROWS];
};

// Merge the 4 warps' online-softmax states (in shared memory) and write this CTA's split.
template <int D, int ROWS>
__device__ void write_split(const KiviParams& p, KiviSmem<D, ROWS>& sm, int b, int h, int rows, int split,
                            int splits) {
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; ++w) mx = fmaxf(mx, sm.m[w][r]);
    float o = 0.f, l = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
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

#ifndef KVLAB_KIVI_MIN_BLOCKS
#define KVLAB_KIVI_MIN_BLOCKS 2  // CTAs per SM the register allocation must allow
#endif

template <int BITS, int D, int NT>
__global__ void __launch_bounds__(128, KVLAB_KIVI_MIN_BLOCKS) kivi_decode_kernel(const KiviParams p) {
  using C = KiviCfg<BITS, D, NT>;
  constexpr int ROWS = C::ROWS;
  constexpr int TPT = C::TPT, BN = C::BN;
  constexpr int PER_BYTE = 8 / BITS;
  constexpr int QMAX = (1 << BITS) - 1;
  constexpr int PBYTES = C::WARPS * ROWS * C::PST * 2;
  constexpr int SBYTES = sizeof(KiviSmem<D, ROWS>);
  __shared__ __align__(16) uint8_t smem_raw[PBYTES > SBYTES ? PBYTES : SBYTES];
  auto& sm = *reinterpret_cast<KiviSmem<D, ROWS>*>(smem_raw);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int rows = p.gqa * p.nq;
  const int splits = p.n_main;
  const int L = p.lengths[b];
  const int nv = max(L - p.residual, 0);
  const int nk = (L / p.residual) * p.residual;
  const int main_end = (nv / BN) * BN;

  const uint8_t* kc = p.kc + b * p.skc_b + h * p.skc_h;
  const __half* ks = p.ks + b * p.sks_b + h * p.sks_h;
  const __half* km = p.km + b * p.sks_b + h * p.sks_h;
  const uint8_t* vc = p.vc + b * p.svc_b + h * p.svc_h;
  const __half* vs = p.vs + b * p.svs_b + h * p.svs_h;
  const __half* vm = p.vm + b * p.svs_b + h * p.svs_h;

  {
    // ------------------------------------------------------------------ quantized region, mma path
    const int lo = blockIdx.y * p.split_len;
    const int hi = min(lo + p.split_len, main_end);
    // B operand of the score mma: query row nt*8 + g, channels 16kk + 4c .. + 3
    uint32_t qf[NT][C::KK][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = nt * 8 + g;
      const __half* qrow = p.q + b * p.sq_b + (h * p.gqa + r / p.nq) * p.sq_h + (r % p.nq) * p.sq_t;
#pragma unroll
      for (int kk = 0; kk < C::KK; ++kk) {
        uint2 v = make_uint2(0u, 0u);
        if (r < rows) v = __ldg(reinterpret_cast<const uint2*>(qrow + 16 * kk + 4 * c));
        qf[nt][kk][0] = v.x;
        qf[nt][kk][1] = v.y;
      }
    }
    float m_r[NT][2], l_r[NT][2];
    float oacc[C::MTV][NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      m_r[nt][0] = m_r[nt][1] = -INFINITY;
      l_r[nt][0] = l_r[nt][1] = 0.f;
#pragma unroll
      for (int mt = 0; mt < C::MTV; ++mt)
#pragma unroll
        for (int j = 0; j < 4; ++j) oacc[mt][nt][j] = 0.f;
    }
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
          const uint8_t* src = kc + (16 * kk + 4 * c + e) * p.skc_d + kbyte;
          if constexpr (BITS == 4) {
            kwd[kk][e] = ld32(src);
          } else {
            kwd[kk][e] = __ldg(reinterpret_cast<const uint16_t*>(src));
          }
        }
        ksc[kk] = __ldg(reinterpret_cast<const uint2*>(ks + kgrp * p.sks_g + 16 * kk + 4 * c));
        kmn[kk] = __ldg(reinterpret_cast<const uint2*>(km + kgrp * p.sks_g + 16 * kk + 4 * c));
      }
    };
    auto load_v = [&](int t0) {
#pragma unroll
      for (int s = 0; s < C::KS; ++s) {
        __half sc[4], mn[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = t0 + 16 * s + 4 * c + e;
          const uint8_t* src = vc + tok * p.svc_t + g * (C::VBITS / 8);
          if constexpr (C::VBITS == 64) {
            const uint2 w = __ldg(reinterpret_cast<const uint2*>(src));
            vwd[s][e][0] = w.x;
            vwd[s][e][C::VW - 1] = w.y;
          } else if constexpr (C::VBITS == 32) {
            vwd[s][e][0] = ld32(src);
          } else {
            vwd[s][e][0] = __ldg(reinterpret_cast<const uint16_t*>(src));
          }
          sc[e] = vs[tok * p.svs_t + vgrp];
          mn[e] = vm[tok * p.svs_t + vgrp];
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
          const float m_new = fmaxf(m_r[nt][j], mx * p.qk_scale);
          const float alpha = fast_exp2(m_r[nt][j] - m_new);
          m_r[nt][j] = m_new;
          float lsum = 0.f;
          __half* prow = ps + (nt * 8 + 2 * c + j) * C::PST + g * TPT;
#pragma unroll
          for (int i = 0; i < C::MTK; ++i) {
            const float p0 = fast_exp2(fmaf(sacc[i][nt][j], p.qk_scale, -m_new));
            const float p1 = fast_exp2(fmaf(sacc[i][nt][2 + j], p.qk_scale, -m_new));
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
      __syncwarp();

      // ---- output: O^T += V^T . P^T
#pragma unroll
      for (int s = 0; s < C::KS; ++s) {
        uint32_t pf[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint2 v = *reinterpret_cast<const uint2*>(ps + (nt * 8 + g) * C::PST + 16 * s + 4 * c);
          pf[nt][0] = v.x;
          pf[nt][1] = v.y;
        }
        const __half2 s01 = vsc[s][0], s23 = vsc[s][1], m01 = vmn[s][0], m23 = vmn[s][1];
#pragma unroll
        for (int wi = 0; wi < C::VW; ++wi) {
          uint32_t y[4];
          pair_words(y, vwd[s][0][wi], vwd[s][1][wi], vwd[s][2][wi], vwd[s][3][wi]);
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
      if (tn < hi) load_v(tn);
    }

    // ---- this warp's state to shared memory (true channel order), then the CTA's split
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
    __syncthreads();  // everyone is done with P before the shared memory is reused
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = nt * 8 + 2 * c + j;
        if (g == 0) {
          sm.m[warp][r] = m_r[nt][j];
          sm.l[warp][r] = l_r[nt][j];
        }
#pragma unroll
        for (int mt = 0; mt < C::MTV; ++mt) {
          sm.o[warp][r][g * C::CPT + 2 * mt] = oacc[mt][nt][j];
          sm.o[warp][r][g * C::CPT + 2 * mt + 1] = oacc[mt][nt][2 + j];
        }
      }
  }
  __syncwarp();

  // -------------------------------------------------------------------- the tail: tokens [main_end, L)
  // Shared by all warps of all CTAs of this (sequence, kv head), TU tokens per warp at a time, masked,
  // lanes along channels (d = lane + 32 j), windows included; the warp's online softmax continues from
  // its main-path state, read back from shared memory in this layout.
  constexpr int DJ = D / 32;
  float qv[ROWS][DJ];
  float acc[ROWS][DJ];
  float m_t[ROWS], l_t[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m_t[r] = sm.m[warp][r];
    l_t[r] = sm.l[warp][r];
    const __half* qrow = p.q + b * p.sq_b + (h * p.gqa + r / p.nq) * p.sq_h + (r % p.nq) * p.sq_t;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      qv[r][j] = r < rows ? __half2float(qrow[lane + 32 * j]) : 0.f;
      acc[r][j] = sm.o[warp][r][lane + 32 * j];
    }
  }
  const char* kw = static_cast<const char*>(p.kw);
  const char* vw = static_cast<const char*>(p.vw);
  const int kwsz = p.kw_dtype == 2 ? 4 : 2, vwsz = p.vw_dtype == 2 ? 4 : 2;
  constexpr int TU = 4;  // tokens per warp and step: their loads are in flight together (8: slower, see notes)
  const int workers = p.n_main * C::WARPS;
  for (int t1 = main_end + (blockIdx.y * C::WARPS + warp) * TU; t1 < L; t1 += workers * TU) {
    float kx[TU][DJ], vx[TU][DJ];
#pragma unroll
    for (int u = 0; u < TU; ++u) {
      const int t = min(t1 + u, L - 1);  // past the end: a valid token, masked below
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = lane + 32 * j;
        if (t < nk) {
          const int code = (kc[d * p.skc_d + t / PER_BYTE] >> ((t % PER_BYTE) * BITS)) & QMAX;
          const int64_t si = (t / p.group) * p.sks_g + d;
          kx[u][j] = __half2float(__float2half_rn(code * __half2float(ks[si]) + __half2float(km[si])));
        } else {
          kx[u][j] = load_float(kw + (b * p.skw_b + h * p.skw_h) * kwsz, (t - nk) * p.skw_t + d, p.kw_dtype);
        }
        if (t < nv) {
          const int code = (vc[t * p.svc_t + d / PER_BYTE] >> ((d % PER_BYTE) * BITS)) & QMAX;
          const int64_t si = t * p.svs_t + d / p.group;
          vx[u][j] = __half2float(__float2half_rn(code * __half2float(vs[si]) + __half2float(vm[si])));
        } else {
          vx[u][j] = load_float(vw + (b * p.svw_b + h * p.svw_h) * vwsz, (t - nv) * p.svw_t + d, p.vw_dtype);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < TU; ++u) {
      const int t = t1 + u;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r >= rows) break;
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < DJ; ++j) s = fmaf(qv[r][j], kx[u][j], s);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (t >= L || t > L - p.nq + r % p.nq) continue;  // past the end; causal among the query tokens
        s *= p.qk_scale;
        const float m_new = fmaxf(m_t[r], s);
        const float alpha = fast_exp2(m_t[r] - m_new);
        const float pr = fast_exp2(s - m_new);
        l_t[r] = l_t[r] * alpha + pr;
#pragma unroll
        for (int j = 0; j < DJ; ++j) acc[r][j] = fmaf(acc[r][j], alpha, pr * vx[u][j]);
        m_t[r] = m_new;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (lane == 0) {
      sm.m[warp][r] = m_t[r];
      sm.l[warp][r] = l_t[r];
    }
#pragma unroll
    for (int j = 0; j < DJ; ++j) sm.o[warp][r][lane + 32 * j] = acc[r][j];
  }
  write_split<D, ROWS>(p, sm, b, h, rows, blockIdx.y, splits);
}

// out[row, :] = sum_s w_s o_part[row, s, :], w = softmax over s of lse (base 2); one block per row.
template <int D>
__global__ void kivi_merge_kernel(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                                  __half* __restrict__ out, int splits) {
  const int64_t row = blockIdx.x;
  const int d = threadIdx.x;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse_part[row * splits + s]);
  float o = 0.f, w = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float a = fast_exp2(lse_part[row * splits + s] - mx);
      o += a * o_part[(row * splits + s) * D + d];
      w += a;
    }
  }
  out[row * D + d] = __float2half_rn(w > 0.f ? o / w : 0.f);
}

}  // namespace kvlab
