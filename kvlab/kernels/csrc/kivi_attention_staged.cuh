// Variant 7 of the CUDA KIVI decode attention: the kernel of kivi_attention_cuda.cuh (same operand roles,
// same dequantization, online softmax, tail and merge), with the next block's K codes and all its scales
// staged in shared memory by cp.async instead of registers.
//
// Why: variant 6 holds ~112 registers of prefetched codes and scales per thread (252 in all), so an SM runs 8
// warps, and ncu found it waiting on loads and dependent arithmetic half of the time; packing the V scales
// right after their loads stalled every block on global latency; and its 96 loads per block cost ~3 address
// instructions each. Here each warp copies a block as 16-byte chunks (12 per lane at D=128, int4, group 32)
// into one of two stages while it computes the other, the V codes stay one block ahead in registers, and the
// kernel fits 3 CTAs (12 warps) per SM.
//
// Stage layout (one warp, bytes; G = group, NGB = K groups per 64-token block, DG = D / G V groups a token):
//   [0, KC)                K codes, one KROW-byte row per channel; channel ch sits in row ch ^ X(ch) so that
//                          the 32 lanes' reads of one instruction hit 32 different banks (X below)
//   [KC, KC + NGB * KSG)   per K group: D fp16 scales, D fp16 minima, 32 bytes of padding (banks)
//   then                   V scales (64 x DG fp16), then V minima (same), as in global memory

#pragma once

#include "kivi_attention_cuda.cuh"

namespace kvlab {

template <int BITS, int D>
struct StagedCfg {
  static constexpr int BN = 64;  // tokens per block of a warp
  static constexpr int KROW = BN * BITS / 8;  // bytes of one channel's codes in a block: 32 (int4), 16 (int2)
  static constexpr int KC = D * KROW;
  static constexpr int KSG = 4 * D + 32;  // bytes per K group in a stage
  static constexpr int CPR = KROW / 16;  // 16-byte chunks per channel row
  static constexpr int RSTEP = 32 / CPR;  // channel rows a warp copies per pass
};

__host__ __device__ constexpr int staged_ngb(int group) { return group < 64 ? 64 / group : 1; }

// Bytes of one warp's stage for a group size (a multiple of 16).
template <int BITS, int D>
__host__ __device__ constexpr int staged_stage_bytes(int group) {
  return StagedCfg<BITS, D>::KC + staged_ngb(group) * StagedCfg<BITS, D>::KSG + 2 * 64 * (D / group) * 2;
}

// Row of channel ch in a stage: XOR of its low bits with higher ones, so that channels 16kk + 4c + e of the
// four c of one read land in four different groups of banks.
template <int BITS>
__host__ __device__ constexpr int staged_row(int ch) {
  return BITS == 4 ? ch ^ ((ch >> 2) & 3) : ch ^ ((ch >> 3) & 1);
}

// Row of channel ch in a stage of int2 K codes read by ldmatrix (the folded variant's tunings VST >= 2): within
// 16 channels, 8a + 4b + 2c + d goes to row 8c + 4b + 2a + d, so that the 8 channels {4j, 4j + 1} (j = 0..3) of one
// 8x8 matrix, and the 8 {4j + 2, 4j + 3} of the other, lie in 8 different 16-byte sets of banks. Rows 32 apart stay
// 32 apart (stage_block's copies step by 32 channels).
__host__ __device__ constexpr int ldsm_row(int ch) {
  return (ch & ~15) | ((ch & 2) << 2) | (ch & 4) | ((ch & 8) >> 2) | (ch & 1);
}

// Offset of the 16-byte chunk `part` (tokens 32 part .. + 31) of channel ch's 32-byte row in a stage of int4 K codes
// read by ldmatrix (the folded variant's tunings VST 2, 3 at int4; v14): within 16 channels, 8a + 4a' + 2e + b
// goes to row 8e + 4b + 2a + a', and the chunk to 16 (part ^ b), so that the 8 rows {4j + 2e + b: j = 0..3,
// b = 0, 1} of one 8x8 matrix (one chunk) lie in 8 different 16-byte sets of banks. Rows 16 apart stay 16 apart.
__host__ __device__ constexpr int ldsm4_row(int ch) {
  return (ch & ~15) | ((ch & 2) << 2) | ((ch & 1) << 2) | ((ch & 8) >> 2) | ((ch & 4) >> 2);
}
__host__ __device__ constexpr int ldsm4_off(int ch, int part) { return ldsm4_row(ch) * 32 + 16 * (part ^ (ch & 1)); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global" KV_L2 " [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// The same through L1 (.ca): two warps of an SM that copy the two 16-byte halves of one 32-byte sector (int2 K
// codes: a block is 16 bytes of a channel row, the next warp's block the next 16) can share one L2 request.
__device__ __forceinline__ void cp_async16_ca(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global" KV_L2 " [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Bytes of dynamic shared memory of one CTA: the warps' P buffers and two stages each, or the final merge
// states (NS of them, laid over the rest), whichever is larger.
template <int BITS, int D, int NT, int NS = 4, int NSTAGE = 2, int VEXTRA = 0>
__host__ __device__ constexpr int staged_smem_bytes(int group) {
  using C = KiviCfg<BITS, D, NT>;
  constexpr int PBYTES = C::WARPS * C::ROWS * C::PST * 2;
  constexpr int SBYTES = static_cast<int>(sizeof(KiviSmem<D, C::ROWS, NS>));
  // a warp's area (VEXTRA more bytes a stage: the folded variant's staged V codes), reused for its tail tiles
  const int stages = NSTAGE * (staged_stage_bytes<BITS, D>(group) + VEXTRA);
  const int main = PBYTES + C::WARPS * (stages > TailCfg<D>::BYTES ? stages : TailCfg<D>::BYTES);
  return main > SBYTES ? main : SBYTES;
}

// cp.async of block t0 (this warp's 64 tokens) into the stage at shared-memory address base: K code rows, K
// scales and minima, V scales and minima (layout above); needs what kivi_decode_staged_kernel needs. LDSM: the
// K code rows at ldsm_row (int2) or ldsm4_off (int4) instead of staged_row; KCA: the K codes copied through L1
// (cp_async16_ca).
template <int BITS, int D, int DG, bool LDSM = false, bool KCA = false>
__device__ __forceinline__ void stage_block(uint32_t base, const KiviParams& p, const KiviSeq& sq, int t0) {
  using S = StagedCfg<BITS, D>;
  constexpr int G = D / DG, ngb = staged_ngb(G), vs0 = S::KC + ngb * S::KSG;
  const int lane = threadIdx.x & 31;
  // int4 with LDSM: lane 8q + 2a + x copies chunk x ^ b of channel 4a + q (q = 2e + b), so that each 8 lanes' copies
  // land in 8 different 16-byte sets of banks; otherwise lane l copies chunk l % CPR of channel l / CPR
  const bool l4 = LDSM && BITS == 4;
  const int ch0 = l4 ? 4 * ((lane >> 1) & 3) + (lane >> 3) : lane / S::CPR;
  const int part = l4 ? (lane & 1) ^ ((lane >> 3) & 1) : lane % S::CPR;
  const uint8_t* src = sq.kc + ch0 * p.skc_d + part * 16 + t0 * BITS / 8;
  const int64_t kstep = S::RSTEP * p.skc_d;
  const uint32_t kdst0 = !LDSM ? staged_row<BITS>(ch0) * S::KROW + part * 16
                         : BITS == 2 ? ldsm_row(ch0) * S::KROW + part * 16 : ldsm4_off(ch0, part);
#pragma unroll
  for (int i = 0; i < D / S::RSTEP; ++i) {
    if constexpr (KCA) {
      cp_async16_ca(base + kdst0 + i * S::RSTEP * S::KROW, src + i * kstep);
    } else {
      cp_async16(base + kdst0 + i * S::RSTEP * S::KROW, src + i * kstep);
    }
  }
  const int gi0 = t0 / G;
#pragma unroll
  for (int q = lane; q < ngb * (D / 4); q += 32) {
    const int grp = q / (D / 4), r = q % (D / 4);
    const int arr = r / (D / 8), pt = r % (D / 8);
    cp_async16(base + S::KC + grp * S::KSG + arr * 2 * D + pt * 16, (arr ? sq.km : sq.ks) + (gi0 + grp) * p.sks_g + pt * 8);
  }
#pragma unroll
  for (int q = lane; q < 16 * DG; q += 32) {
    const int arr = q / (8 * DG), pt = q % (8 * DG);
    cp_async16(base + vs0 + arr * 128 * DG + pt * 16, (arr ? sq.vm : sq.vs) + t0 * DG + pt * 8);
  }
}

// One warp's staged main loop: blocks first, first + step, .. below hi, each copied into one of NSTAGE stages by
// issue(stage, t0) NSTAGE - 1 blocks ahead (cp.async, one commit group a block) and its V codes loaded by
// load_v(t0) a block ahead; body(stage) computes a block once the stage's copies have landed.
// MODE (experiments only, kivi_attention_cuda.h: KIVI_MODE_*): KIVI_MODE_COMPUTE issues the first block's
// copies and V codes only and runs every body on them (the arithmetic without the memory traffic); the loads-only
// mode is the caller's body.
template <int NSTAGE = 2, int MODE = 0, class Issue, class LoadV, class Body>
__device__ __forceinline__ void staged_blocks(int first, int hi, int step, const uint8_t* stages, int stage_bytes,
                                              Issue&& issue, LoadV&& load_v, Body&& body) {
  static_assert(NSTAGE >= 2 && NSTAGE <= 4, "2 to 4 stages");
  constexpr bool COMPUTE_ONLY = MODE == KIVI_MODE_COMPUTE;
#pragma unroll
  for (int i = 0; i < NSTAGE - 1; ++i) {  // the first NSTAGE - 1 blocks, one commit group each
    const int t = first + i * step;
    if (t < hi && (i == 0 || !COMPUTE_ONLY)) issue(i, t);
    cp_async_commit();
  }
  if (first < hi) load_v(first);
  int st = 0;
  for (int t0 = first; t0 < hi; t0 += step) {
    const int tn = t0 + (NSTAGE - 1) * step;  // the block NSTAGE - 1 ahead goes into the stage freed last
    if (!COMPUTE_ONLY && tn < hi) issue(st == 0 ? NSTAGE - 1 : st - 1, tn);
    cp_async_commit();
    cp_async_wait<NSTAGE - 1>();  // this block's copies (all but the NSTAGE - 1 groups committed after) landed
    __syncwarp();
    body(stages + (COMPUTE_ONLY ? 0 : st) * stage_bytes);
    if (!COMPUTE_ONLY && t0 + step < hi) load_v(t0 + step);
    __syncwarp();  // every lane is done with this stage before a later iteration copies into it
    st = st + 1 == NSTAGE ? 0 : st + 1;
  }
  cp_async_wait<0>();
}

#ifndef KVLAB_KIVI_STAGED_MIN_BLOCKS
#define KVLAB_KIVI_STAGED_MIN_BLOCKS 3  // CTAs per SM the register allocation must allow
#endif

// Needs (checked by the caller): K code rows, K scale rows and the V scales of a block 16-byte aligned, V
// scales contiguous per token (stride DG), group = D / DG with DG in 1, 2, 4, 8 (a compile-time group keeps
// the copies and the scale reads free of integer arithmetic).
template <int BITS, int D, int NT, int DG>
__global__ void __launch_bounds__(128, KVLAB_KIVI_STAGED_MIN_BLOCKS) kivi_decode_staged_kernel(const KiviParams p) {
  using C = KiviCfg<BITS, D, NT>;
  using S = StagedCfg<BITS, D>;
  constexpr int ROWS = C::ROWS;
  constexpr int TPT = C::TPT, BN = C::BN;
  constexpr int PBYTES = C::WARPS * ROWS * C::PST * 2;
  extern __shared__ __align__(16) uint8_t smem_dyn[];
  auto& sm = *reinterpret_cast<KiviSmem<D, ROWS>*>(smem_dyn);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int rows = p.gqa * p.nq;
  const KiviSeq sq = seq_of(p, b, h);
  const int main_end = (sq.nv / BN) * BN;
  constexpr int G = D / DG, dg = DG;
  constexpr int ngb = staged_ngb(G);
  constexpr int stage_bytes = staged_stage_bytes<BITS, D>(G);
  constexpr int vs0 = S::KC + ngb * S::KSG;  // V scales in a stage


  {
    const int lo = blockIdx.y * p.split_len;
    const int hi = min(lo + p.split_len, main_end);
    uint32_t qf[NT][C::KK][2];
    float m_r[NT][2], l_r[NT][2];
    float oacc[C::MTV][NT][4];
    init_main<BITS, D, NT>(p, b, h, qf, m_r, l_r, oacc);
    __half* ps = reinterpret_cast<__half*>(smem_dyn) + warp * ROWS * C::PST;
    constexpr int area = 2 * stage_bytes > TailCfg<D>::BYTES ? 2 * stage_bytes : TailCfg<D>::BYTES;
    uint8_t* stages = smem_dyn + PBYTES + warp * area;
    const int vgrp = (g * C::CPT) / G;  // this lane's V channels share one group (group >= CPT)
    const int kgrp = G < BN ? (g * TPT) / G : 0;  // group of this lane's K tokens within a block
    // this lane's K words in a stage: channel 16kk + 4c + e at row 16kk + 4c + (e ^ X), X = c (int4), c / 2 (int2)
    const int kx = BITS == 4 ? c : c >> 1;
    const int kbyte = g * (TPT * BITS / 8);

    auto issue = [&](int st, int t0) {
      stage_block<BITS, D, DG>(static_cast<uint32_t>(__cvta_generic_to_shared(stages + st * stage_bytes)), p, sq, t0);
    };

    uint32_t vwd[C::KS][4][C::VW];  // V codes of the next block, in registers as in variant 6
    auto load_v = [&](int t0) {
#pragma unroll
      for (int s = 0; s < C::KS; ++s)
#pragma unroll
        for (int e = 0; e < 4; ++e) load_v_codes<BITS, D, NT>(p, sq.vc, t0 + 16 * s + 4 * c + e, vwd[s][e]);
    };

    staged_blocks(lo + warp * BN, hi, C::WARPS * BN, stages, stage_bytes, issue, load_v, [&](const uint8_t* sst) {
      // ---- scores: S^T = K . Q^T
      float sacc[C::MTK][NT][4];
#pragma unroll
      for (int i = 0; i < C::MTK; ++i)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int j = 0; j < 4; ++j) sacc[i][nt][j] = 0.f;
      const uint8_t* kscp = sst + S::KC + kgrp * S::KSG + 8 * c;
#pragma unroll
      for (int kk = 0; kk < C::KK; ++kk) {
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint8_t* src = sst + (16 * kk + 4 * c + (e ^ kx)) * S::KROW + kbyte;
          if constexpr (BITS == 4) {
            w[e] = *reinterpret_cast<const uint32_t*>(src);
          } else {
            w[e] = *reinterpret_cast<const uint16_t*>(src);
          }
        }
        uint32_t y[4];
        pair_words(y, w[0], w[1], w[2], w[3]);
        const uint2 sc = *reinterpret_cast<const uint2*>(kscp + 32 * kk);
        const uint2 mn = *reinterpret_cast<const uint2*>(kscp + 2 * D + 32 * kk);
        const __half2 s01 = *reinterpret_cast<const __half2*>(&sc.x);
        const __half2 s23 = *reinterpret_cast<const __half2*>(&sc.y);
        const __half2 m01 = *reinterpret_cast<const __half2*>(&mn.x);
        const __half2 m23 = *reinterpret_cast<const __half2*>(&mn.y);
#pragma unroll
        for (int i = 0; i < C::MTK; ++i) {
          uint32_t a[4];
          tile_operand<BITS>(a, i, y, s01, m01, s23, m23);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816(sacc[i][nt], a[0], a[1], a[2], a[3], qf[nt][kk][0], qf[nt][kk][1]);
        }
      }

      // ---- online softmax; P to shared memory (row, token) as fp16
      __syncwarp();
      softmax_block<BITS, D, NT>(sacc, p.qk_scale, m_r, l_r, oacc, ps);
      __syncwarp();

      // ---- output: O^T += V^T . P^T, scales from the stage
      const __half* vsp = reinterpret_cast<const __half*>(sst + vs0) + vgrp;
#pragma unroll
      for (int s = 0; s < C::KS; ++s) {
        const int tl = 16 * s + 4 * c;
        const __half2 s01 = __halves2half2(vsp[tl * dg], vsp[(tl + 1) * dg]);
        const __half2 s23 = __halves2half2(vsp[(tl + 2) * dg], vsp[(tl + 3) * dg]);
        const __half2 m01 = __halves2half2(vsp[(64 + tl) * dg], vsp[(65 + tl) * dg]);
        const __half2 m23 = __halves2half2(vsp[(66 + tl) * dg], vsp[(67 + tl) * dg]);
        pv_kstep<BITS, D, NT>(s, vwd[s], s01, m01, s23, m23, ps, oacc);
      }
    });
    tail_units<BITS, D, NT>(p, b, h, main_end, qf, m_r, l_r, oacc, ps, stages);
    store_state(sm, warp, m_r, l_r, oacc);
  }
  write_split<D, ROWS>(p, sm, b, h, rows, blockIdx.y, p.n_main);
}

}  // namespace kvlab
