// Variant 8 of the CUDA KIVI decode attention, "folded": the scales and minima leave the per-code work. The
// main path's mma operands are the raw codes; each code's scale goes into the other operand, each minimum into
// one extra mma a k-step.
//
//  * K (per-channel groups along tokens): q . k_t = sum_c (q_c s_gc) code_tc + sum_c q_c m_gc. The score mma's B
//    operand is the query scaled by the K scales of a group (one HMUL2 per 2 channels and block). A 64-token
//    block holds 64 / group groups, so the B operand's 8 columns hold one copy of the query rows per group
//    (RS = min(group, 64) / 8 slots each, rows <= RS), and a lane's tokens, which lie in one group, take the
//    columns of that group: the C columns 2c, 2c+1 of lane (g, c) are its own when (2c + j) / RS == g / RS.
//  * V (per-token groups along channels): sum_t p_t v_tc = sum_t (p_t s_tg) code_tc + sum_t p_t m_tg. A lane's
//    V channels are taken in sets of 64 (channels 64 set + 8g .. + 7), so that the 16 rows of an m-tile span
//    64 / group groups, and the P.V mma's B operand is P scaled by each token's scale of the lane's group, with
//    the same column slots as K.
//  * The minima: one more mma with A = the minima (rows g and g + 8 of lane g: its group's) and B = the unscaled
//    query / P: its C entries are sum_c q_c m_gc / sum_t p_t m_tg of the lane's group.
//  * Codes reach the operands as fp16 subnormals: a code at bit p of a 16-bit half is code * 2^(p - 24) exactly,
//    one AND per two codes, no conversion and no offset to subtract (the registers variant spends a shift, a
//    LOP3, an HSUB2 and an HFMA2 per two codes). The power of two comes back per score row (one FFMA a score,
//    with the minima term) and per output channel (once, at the end).
//
// Loads as in the staged variant (kivi_attention_staged.cuh): each warp copies its next block's K codes, K scales
// and V scales into shared memory with cp.async; the V codes come one block ahead into registers, from rows of
// a compile-time length, so that all of a block's V loads share one address. Everything else (the tail in
// 16-token units, the split merge) is the registers variant's, in its own layout: the tail runs with a fresh
// online-softmax state after the main blocks, and the CTA merges 8 states (4 warps x main and tail).
//
// Rounding: the other variants round each dequantized K and V value to fp16 (one FMA); this one rounds the
// products q s and p s to fp16 and keeps code * scale + minimum exact. Tests hold every variant to the same
// tolerance against the fp32 reference, and the benchmark prints each variant's error against it.

#pragma once

#include "kivi_attention_staged.cuh"

namespace kvlab {

// Bit position of a lane's code n (0..7) in the word it is taken from (fold_code): int2, 8 codes in 16 bits:
// n < 5 at 2n, n >= 5 at 2(n - 5) after a shift by 10; int4, codes 0-3 in the low 16 bits of a word, 4-7 in the
// high: 4 (n % 2), after a shift by 8 for n % 4 >= 2.
template <int BITS>
__host__ __device__ constexpr int fold_pos(int n) {
  return BITS == 2 ? (n < 5 ? 2 * n : 2 * (n - 5)) : 4 * (n % 2);
}

// 2^(24 - fold_pos(n)): the subnormal code n times this is the code.
template <int BITS>
__device__ __forceinline__ float fold_factor(int n) {
  return __int_as_float((127 + 24 - fold_pos<BITS>(n)) << 23);
}

// 2^(fold_pos(n) - 24), its inverse.
template <int BITS>
__device__ __forceinline__ float fold_unit(int n) {
  return __int_as_float((127 - 24 + fold_pos<BITS>(n)) << 23);
}

template <int BITS>
__device__ __forceinline__ uint32_t fold_shift(uint32_t y) {
  return BITS == 2 ? y >> 10 : y >> 8;
}

// Code n of a pair of words side by side (lo / hi halves as pair_words makes them; ys = fold_shift of each) as
// two fp16 subnormals code * 2^(fold_pos - 24).
template <int BITS>
__device__ __forceinline__ uint32_t fold_code(int n, uint32_t lo, uint32_t hi, uint32_t slo, uint32_t shi) {
  const bool upper = BITS == 4 && n >= 4;
  const bool shifted = BITS == 2 ? n >= 5 : (n % 4) >= 2;
  const uint32_t src = upper ? (shifted ? shi : hi) : (shifted ? slo : lo);
  return src & ((((1u << BITS) - 1u) << fold_pos<BITS>(n)) * 0x10001u);
}

// The A operand of m-tile i (rows g, g + 8: codes 2i, 2i + 1) from pair_words' y and their fold_shift ys.
template <int BITS>
__device__ __forceinline__ void fold_operand(uint32_t (&a)[4], int i, const uint32_t (&y)[4], const uint32_t (&ys)[4]) {
  a[0] = fold_code<BITS>(2 * i, y[0], y[1], ys[0], ys[1]);
  a[1] = fold_code<BITS>(2 * i + 1, y[0], y[1], ys[0], ys[1]);
  a[2] = fold_code<BITS>(2 * i, y[2], y[3], ys[2], ys[3]);
  a[3] = fold_code<BITS>(2 * i + 1, y[2], y[3], ys[2], ys[3]);
}

__device__ __forceinline__ uint32_t hmul2_u32(uint32_t a, uint32_t b) {
  const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

__device__ __forceinline__ uint32_t half2_u32(__half lo, __half hi) {
  const __half2 r = __halves2half2(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&r);
}

#ifndef KVLAB_KIVI_FOLDED_MIN_BLOCKS
// CTAs per SM the register allocation must allow: 2 (up to 255 registers) was faster on an H100 than 3 (168
// registers and ~140 bytes of spills after the main loop): int2, B=8, T=32k, 92.9 against 97.9 us
#define KVLAB_KIVI_FOLDED_MIN_BLOCKS 2
#endif

// Dynamic shared memory of one CTA of the folded kernel: the staged variant's, with 8 merge states.
#ifndef KVLAB_KIVI_FOLDED_VSTAGE
// The V codes of a block: 0 into registers by plain loads, 1 staged by cp.async; 2: staged by cp.async in
// ldmatrix's layout, and the K and V code operands read by ldmatrix (ldsm_x4_trans), 3: the K code operands by
// ldmatrix, the V codes into registers (int2: v13; int4 at groups of 32 or more: v14); for int2 also + 4: the K
// codes copied through L1 (cp.async.ca; v13); + 8 changes nothing (the tuning "r-b2s2": VST 0 under its own id)
#define KVLAB_KIVI_FOLDED_VSTAGE 0
#endif

// Whether V mode VST stages the V codes in shared memory, reads the K / V code operands by ldmatrix, copies the K
// codes through L1.
__host__ __device__ constexpr bool folded_vstaged(int vst) { return (vst & 3) == 1 || (vst & 3) == 2; }
__host__ __device__ constexpr bool folded_kldsm(int vst) { return (vst & 3) == 2 || (vst & 3) == 3; }
__host__ __device__ constexpr bool folded_vldsm(int vst) { return (vst & 3) == 2; }
__host__ __device__ constexpr bool folded_kca(int vst) { return (vst & 4) != 0; }

// VST + 32 (v16, a prototype: compiled only with -DKVLAB_KIVI_WS=1, timed and tested on no GPU yet): warp-specialised.
// 8 warps a CTA: warps 0-3 compute as the default does, warp 4 + w copies warp w's blocks into warp w's stages (the
// same cp.async, NSTAGE blocks ahead instead of NSTAGE - 1), each stage guarded by two mbarriers (full: the producer's
// 32 lanes arrive as their copies land, cp.async.mbarrier.arrive.noinc; empty: the consumer's lane 0 arrives once
// the warp has read it). On sm_90a the producers give their registers to the consumers (setmaxnreg: 32 and 224 of
// the 128 at entry, 2 CTAs an SM); on plain sm_90 the instance still builds, at 128 registers with spills.
__host__ __device__ constexpr bool folded_ws(int vst) { return (vst & 32) != 0; }
__host__ __device__ constexpr int folded_threads(int vst) { return folded_ws(vst) ? 256 : 128; }
constexpr int kFoldedWsConsumerRegs = 224, kFoldedWsProducerRegs = 32;  // 128 x (224 + 32) = half the register file

__device__ __forceinline__ void mbar_init(uint32_t a, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t a, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred P1;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n @P1 bra DONE;\n"
      " bra WAIT;\n DONE:\n }\n" ::"r"(a), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t a) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n }\n" ::"r"(a) : "memory");
}
// The mbarrier at a gets one arrival from this thread once all of its earlier cp.async have landed.
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t a) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(a) : "memory");
}
template <int N>
__device__ __forceinline__ void regs_grow() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void regs_shrink() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// The V mode of the default instances: 2 (ldmatrix operands, V codes staged) for int2 at D a multiple of 128, which
// took int2 at B=8, T=32k on an H200 from 89.4 to 75.3 us at group 32 and from 80.9 to 69.2 at group 128 (run
// s14-1, KERNEL_NOTES.md, v13), and for int4 at D = 128 and groups of 32 or more: from 100.8 to 98.4 us at group 32
// (graph 101.2 to 95.2) and from 88.9 to 83.6 from graphs at group 128 (run s16-1, v14); KVLAB_KIVI_FOLDED_VSTAGE
// otherwise.
__host__ __device__ constexpr int folded_default_vst(int bits, int d, int group) {
  return (bits == 2 && d % 128 == 0) || (bits == 4 && d == 128 && group >= 32) ? 2 : KVLAB_KIVI_FOLDED_VSTAGE;
}

// int4 V codes staged for ldmatrix (VST = 2, v14): the 16-byte chunk s (channels 32s .. + 31) of token t's 64-byte
// row at t * 64 + 16 (s ^ ((t / 4) % 4)), so that the 8 rows of each matrix ldsm_x4_trans reads (tokens 4j + {0, 1}
// or 4j + {2, 3}, j = 0..3, one chunk) hit 8 different 16-byte sets of banks.
__host__ __device__ constexpr int vldsm4_off(int t, int s) { return t * 64 + 16 * (s ^ ((t >> 2) & 3)); }

// Four 8x8 matrices of 16-bit elements, transposed: lane (g, c) gets in r[j] elements g of the 16-byte rows 2c (low
// half) and 2c + 1 (high half) of matrix j, whose row i lanes 8j + i address.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// int2 V codes staged for ldmatrix (VST = 2): the 16-byte half s (channels 64s ..) of token t's 32-byte row at
// (t / 4) * 128 + 16 * ((2 (t % 4) + s) ^ f((t / 4) % 4)), f(q) = (q & 1) | (q & 2) << 1, so that the 8 rows of
// each matrix ldsm_x4_trans reads (tokens 4j + {0, 1} or 4j + {2, 3}, j = 0..3, one half) hit 8 different
// 16-byte sets of banks.
__host__ __device__ constexpr int vldsm_chunk(int t, int s) {
  return (t / 4) * 128 + 16 * ((2 * (t % 4) + s) ^ (((t / 4) & 1) | (((t / 4) & 2) << 1)));
}

// Staged V codes (VST = 1) of one block in a stage: token t's D * BITS / 8 bytes at t * VROW + (t / 4) * 8 * BITS,
// after the V scales; the padding after every 4 tokens puts the 4 token rows that one read instruction's lanes
// take (tokens 4c + e, c = 0..3) into 4 different sets of banks.
template <int BITS, int D>
__host__ __device__ constexpr int folded_vcode_bytes() {
  return 64 * (D * BITS / 8) + 16 * 8 * BITS;
}
template <int BITS, int D>
__host__ __device__ constexpr int folded_vtok(int t) {
  return t * (D * BITS / 8) + (t / 4) * 8 * BITS;
}

template <int BITS, int D, int NSTAGE, int VST>
__host__ __device__ constexpr int folded_smem_bytes(int group) {
  // WS: the 2 x 4 x NSTAGE mbarriers after everything else (16-byte aligned)
  const int base = staged_smem_bytes<BITS, D, 1, 8, NSTAGE, folded_vstaged(VST) ? folded_vcode_bytes<BITS, D>() : 0>(group);
  return folded_ws(VST) ? (base + 15) / 16 * 16 + 64 * NSTAGE : base;
}

// Needs (checked by the caller): what the staged variant needs (group = D / DG, DG in 1, 2, 4, 8; aligned K rows
// and scales, V scales contiguous per token), one query-row tile with rows <= RS = min(group, 64) / 8, group 16,
// 32 or a multiple of 64, and V code rows of D * BITS / 8 bytes (a contiguous token dimension).
// MINB: CTAs per SM the register allocation must allow; NSTAGE: cp.async stages a warp (NSTAGE - 1 blocks in
// flight ahead of the one computed); MODE: KIVI_MODE_FULL, or for experiments KIVI_MODE_LOADS (the loads alone,
// no arithmetic) / KIVI_MODE_COMPUTE (the arithmetic on the first block's data, no further loads): both of these
// compute no attention.
// VST: 1, the V codes staged by cp.async with the rest of a block (NSTAGE - 1 blocks ahead; needs 16-byte aligned V
// code rows) instead of loaded into registers one block ahead; int2 only: 2, staged as 1 in ldmatrix's layout
// and the K and V code operands read by ldmatrix (one ldsm_x4_trans per two k-steps of K and per k-step of V,
// instead of 4 or 8 16-bit loads and 2 or 4 byte permutes), 3: the K code operands by ldmatrix only.
template <int BITS, int D, int DG, int MINB = KVLAB_KIVI_FOLDED_MIN_BLOCKS, int NSTAGE = 2, int MODE = KIVI_MODE_FULL,
          int VST = folded_default_vst(BITS, D, D / DG)>
__global__ void __launch_bounds__(folded_threads(VST), MINB) kivi_decode_folded_kernel(const KiviParams p) {
  using C = KiviCfg<BITS, D, 1>;
  using S = StagedCfg<BITS, D>;
  constexpr bool VSTG = folded_vstaged(VST), KLDSM = folded_kldsm(VST), VLDSM = folded_vldsm(VST);
  constexpr int ROWS = C::ROWS, BN = C::BN, TPT = C::TPT, KK = C::KK, KS = C::KS, W = C::WARPS;
  constexpr int G = D / DG, RS = (G < 64 ? G : 64) / 8;  // group; column slots per group
  // int4 operands by ldmatrix (v14): a 16-bit element of a 16-byte row holds 4 codes, so lane g's K codes are tokens
  // 4g .. 4g + 3 (codes 0-3, tiles 0, 1) and 32 + 4g .. (codes 4-7, tiles 2, 3) of a block, and its V codes channels
  // 4g .. and 32 + 4g .. of a 64-channel set. At group 32 (TWO) tiles 0, 1 then lie in one group and tiles 2, 3 in the
  // next, whatever the lane: the minima mma carries both groups (A rows g: the first, g + 8: the second), and a lane's
  // useful columns go with its tiles instead of with g.
  constexpr bool K4 = KLDSM && BITS == 4, V4 = VLDSM && BITS == 4, TWO = G == 32;
  static_assert(!KLDSM || BITS == 2 || G >= 32, "int4 ldmatrix operands: groups of 32 or more");
  static_assert(!VLDSM || (BITS == 2 ? D % 128 == 0 : D == 128), "ldmatrix V operands: int2 at D % 128 == 0, int4 at D = 128");
  constexpr int SETS = D / 64;  // V channel sets; a lane holds 8 channels of each
  constexpr int VROW = D * BITS / 8;  // bytes of a token's V codes
  constexpr int PBYTES = W * ROWS * C::PST * 2;
  constexpr int vc0 = staged_stage_bytes<BITS, D>(G);  // staged V codes in a stage (VST)
  constexpr int stage_bytes = vc0 + (VSTG ? folded_vcode_bytes<BITS, D>() : 0);
  constexpr int vs0 = S::KC + staged_ngb(G) * S::KSG;  // V scales in a stage
  using Smem = KiviSmem<D, ROWS, 2 * W>;  // states: main blocks of warp w in slot w, its tail in W + w
  extern __shared__ __align__(16) uint8_t smem_dyn[];
  auto& sm = *reinterpret_cast<Smem*>(smem_dyn);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int rows = p.gqa * p.nq;
  const KiviSeq sq = seq_of(p, b, h);
  const int main_end = (sq.nv / BN) * BN;
  const int slot = g / RS;  // group of this lane's K tokens within a block and of its V channels within a set
  const bool use[2] = {(2 * c) / RS == slot, (2 * c + 1) / RS == slot};  // C columns 2c, 2c+1 are this lane's
  __half* ps = reinterpret_cast<__half*>(smem_dyn) + warp * ROWS * C::PST;  // P rows 0 .. RS - 1 are read
  constexpr int area = NSTAGE * stage_bytes > TailCfg<D>::BYTES ? NSTAGE * stage_bytes : TailCfg<D>::BYTES;
  constexpr bool WS = folded_ws(VST);
  static_assert(!WS || (VSTG && MODE == KIVI_MODE_FULL), "warp-specialised: V codes staged, full mode");
  const int cw = WS ? warp & (W - 1) : warp;  // WS: the consumer warp whose stages this warp fills (warps W ..) or reads
  uint8_t* stages = smem_dyn + PBYTES + cw * area;
  // WS: full[w][s] at bars + 8 (w NSTAGE + s), empty[w][s] 8 W NSTAGE bytes after
  [[maybe_unused]] const uint32_t bars = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dyn)) +
                                         folded_smem_bytes<BITS, D, NSTAGE, VST>(G) - 64 * NSTAGE;

  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
  // O^T m-tile i of set s in oacc[4s + i]: rows = channels 64s + 8g + 2i, + 1, in units of that row's
  // fold_unit (the code's scale in the mma); each block's minima term is added in at the block's end, so that
  // the accumulator holds the output itself and not two large sums that cancel (the code term ~ sum p (v - m)
  // and the minima term ~ sum p m: with both accumulated over a whole split, fp32 accumulation in the mma left
  // a 2e-3 relative error against the reference on random data, 5x the other variants')
  float oacc[4 * SETS][4];
#pragma unroll
  for (int t = 0; t < 4 * SETS; ++t)
#pragma unroll
    for (int j = 0; j < 4; ++j) oacc[t][j] = 0.f;
  uint32_t qr[KK][2];  // B column g: query row g % RS (zero past the real rows), channels 16kk + 4c ..
  {
    const int r = g % RS;
    const __half* qrow = p.q + b * p.sq_b + (h * p.gqa + r / p.nq) * p.sq_h + (r % p.nq) * p.sq_t;
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
      uint2 v = make_uint2(0u, 0u);
      if (r < rows) v = __ldg(reinterpret_cast<const uint2*>(qrow + 16 * kk + 4 * c));
      qr[kk][0] = v.x;
      qr[kk][1] = v.y;
    }
  }

  const int lo = blockIdx.y * p.split_len;
  const int hi = min(lo + p.split_len, main_end);
  const int kgrp = G < BN ? (g * TPT) / G : 0;  // group of this lane's K tokens within a block
  const int kx = BITS == 4 ? c : c >> 1;  // K rows in a stage are XOR-permuted (staged_row)
  const int kbyte = g * (TPT * BITS / 8);
  // V codes of tokens 16ks + 4c + e, this lane's 8 channels of each set, one block ahead (loading them a
  // block earlier still, into a second set of registers, was slower on an H100: 96.7 against 92.9 us)
  uint32_t vwd[KS][4][SETS];
  auto load_v = [&](int t0) {
    if constexpr (VSTG) return;  // staged with the block
    const uint8_t* row = sq.vc + (t0 + 4 * c) * VROW + g * BITS;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int e = 0; e < 4; ++e)
#pragma unroll
        for (int s = 0; s < SETS; ++s) {
          const uint8_t* src = row + (16 * ks + e) * VROW + 8 * BITS * s;
          vwd[ks][e][s] = BITS == 4 ? ldc32(src) : ldc16(src);
        }
  };
  auto issue = [&](int st, int t0) {
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(stages + st * stage_bytes));
    stage_block<BITS, D, DG, KLDSM, folded_kca(VST)>(base, p, sq, t0);
    if constexpr (VSTG) {  // the block's V codes: 64 rows of VROW contiguous bytes, 16-byte chunks
      constexpr int CPR = VROW / 16, N = 64 * CPR / 32;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int q = lane + 32 * i, t = q / CPR, part = q % CPR;
        const int dst = !VLDSM ? folded_vtok<BITS, D>(t) + part * 16
                        : BITS == 2 ? (part / 2) * 64 * 32 + vldsm_chunk(t, part % 2) : vldsm4_off(t, part);
        cp_async16(base + vc0 + dst, sq.vc + (t0 + t) * VROW + part * 16);
      }
    }
  };

  if constexpr (WS) {
    if (threadIdx.x < 2 * W * NSTAGE) mbar_init(bars + 8 * threadIdx.x, threadIdx.x < W * NSTAGE ? 32u : 1u);
    __syncthreads();  // the mbarriers initialised before anyone uses them
    if (warp >= W) {  // the producer of warp cw's blocks: stage i % NSTAGE, once warp cw has read what it held
      regs_shrink<kFoldedWsProducerRegs>();
      int i = 0;
      for (int t0 = lo + cw * BN; t0 < hi; t0 += W * BN, ++i) {
        const int st = i % NSTAGE;
        if (i >= NSTAGE) mbar_wait(bars + 8 * (W * NSTAGE + cw * NSTAGE + st), (i / NSTAGE - 1) & 1);
        issue(st, t0);
        cp_async_mbar_arrive(bars + 8 * (cw * NSTAGE + st));
      }
      cp_async_wait<0>();
      __syncthreads();  // store_state's: the stages are reused for the merge states
      __syncthreads();  // write_split's (the consumers merge and write)
      return;
    }
    regs_grow<kFoldedWsConsumerRegs>();
  }
  auto body = [&](const uint8_t* sst) {
    if constexpr (MODE == KIVI_MODE_LOADS || MODE == KIVI_MODE_LOADS_NOTAIL) {  // consume the V codes and a word of the stage
      uint32_t x = *reinterpret_cast<const uint32_t*>(sst + 4 * lane);
      if constexpr (VSTG) {
        x ^= *reinterpret_cast<const uint32_t*>(sst + vc0 + 4 * lane);
      } else {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
#pragma unroll
          for (int e = 0; e < 4; ++e)
#pragma unroll
            for (int s = 0; s < SETS; ++s) x ^= vwd[ks][e][s];
      }
      oacc[0][0] += x == 0x9e3779b9u ? 1.f : 0.f;
      return;
    }
    // ---- scores: S^T = codes . (Q s)^T, and the minima term
    float sacc[C::MTK][4], bk[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < C::MTK; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sacc[i][j] = 0.f;
    const uint8_t* kscp = sst + S::KC + kgrp * S::KSG + 8 * c;  // the K group of this lane's B column g
    const uint8_t* kscp0 = sst + S::KC + 8 * c;
    uint32_t kl[4];  // KLDSM: y[0], y[2] of k-steps kk and kk + 1 (kk even)
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
      uint32_t y[4], ys[4];
      if constexpr (K4) {
        // matrix j = lane / 8: chunk j % 2 of channels 16kk + 4 (i / 2) + 2 (j / 2) + i % 2 (row i), so that lane (g, c)
        // gets tokens 4g .. 4g + 3 (y[0], y[2]) and 32 + 4g .. (y[1], y[3]) of channels 4c, 4c + 1 (y[0], y[1]) and
        // 4c + 2, 4c + 3 (y[2], y[3]): pair_words' form, with other tokens
        const int j = lane >> 3, i = lane & 7;
        const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(sst)) +
                           ldsm4_off(16 * kk + 4 * (i >> 1) + 2 * (j >> 1) + (i & 1), j & 1);
        uint32_t r[4];
        ldsm_x4_trans(r, a);
        y[0] = r[0];
        y[1] = r[1];
        y[2] = r[2];
        y[3] = r[3];
      } else if constexpr (KLDSM) {
        // matrix j = lane / 8 of k-step kk + j / 2: row i holds channel 4 (i / 2) + 2 (j % 2) + i % 2 (stage row
        // ldsm_row), so lane (g, c) gets tokens 8g .. 8g + 7 of channels 4c, 4c + 1 (j even: y[0]) or 4c + 2, 4c + 3
        if (kk % 2 == 0) {
          const int j = lane >> 3, i = lane & 7;
          const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(sst)) + 16 * 16 * (kk + j / 2) +
                             16 * ldsm_row(4 * (i >> 1) + 2 * (j & 1) + (i & 1));
          ldsm_x4_trans(kl, a);
        }
        y[0] = kl[2 * (kk % 2)];
        y[2] = kl[2 * (kk % 2) + 1];
        y[1] = y[3] = 0u;  // int2: the high halves hold no codes
      } else {
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint8_t* src = sst + (16 * kk + 4 * c + (e ^ kx)) * S::KROW + kbyte;
          w[e] = BITS == 4 ? *reinterpret_cast<const uint32_t*>(src) : *reinterpret_cast<const uint16_t*>(src);
        }
        pair_words(y, w[0], w[1], w[2], w[3]);
      }
      const uint2 sc = *reinterpret_cast<const uint2*>(kscp + 32 * kk);
      const uint2 mn = *reinterpret_cast<const uint2*>((K4 && TWO ? kscp0 : kscp) + 2 * D + 32 * kk);
#pragma unroll
      for (int e = 0; e < 4; ++e) ys[e] = fold_shift<BITS>(y[e]);
      const uint32_t b0 = hmul2_u32(qr[kk][0], sc.x), b1 = hmul2_u32(qr[kk][1], sc.y);
#pragma unroll
      for (int i = 0; i < C::MTK; ++i) {
        uint32_t a[4];
        fold_operand<BITS>(a, i, y, ys);
        mma_16816(sacc[i], a[0], a[1], a[2], a[3], b0, b1);
      }
      if constexpr (K4 && TWO) {  // rows g: the block's first K group, g + 8: its second
        const uint2 mn1 = *reinterpret_cast<const uint2*>(kscp0 + S::KSG + 2 * D + 32 * kk);
        mma_16816(bk, mn.x, mn1.x, mn.y, mn1.y, qr[kk][0], qr[kk][1]);
      } else {
        mma_16816(bk, mn.x, mn.x, mn.y, mn.y, qr[kk][0], qr[kk][1]);
      }
    }

    // ---- online softmax over this lane's columns; P to shared memory (query row, token) as fp16
    __syncwarp();
    if constexpr (K4) {
      // tiles 2h, 2h + 1 (TWO: the group of this lane's columns, h = c / 2) or all four; rows g, g + 8 of tile i are
      // tokens tok + 4g + 2 (i % 2) + 32 (i / 2), + 1
      constexpr int NU = TWO ? 2 : 4;
      const int hsel = TWO ? c >> 1 : 0;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float sv[NU][2];
#pragma unroll
        for (int i = 0; i < C::MTK; ++i) {
          const float bias = TWO && i >= 2 ? bk[2 + j] : bk[j];
          sacc[i][j] = fmaf(sacc[i][j], fold_factor<BITS>(2 * i), bias);
          sacc[i][2 + j] = fmaf(sacc[i][2 + j], fold_factor<BITS>(2 * i + 1), bias);
        }
        float mx = -INFINITY;
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          sv[u][0] = TWO && hsel ? sacc[u + 2][j] : sacc[u][j];
          sv[u][1] = TWO && hsel ? sacc[u + 2][2 + j] : sacc[u][2 + j];
          mx = fmaxf(mx, fmaxf(sv[u][0], sv[u][1]));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        if constexpr (RS <= 4) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_r[j], mx * p.qk_scale);
        const float alpha = fast_exp2(m_r[j] - m_new);
        m_r[j] = m_new;
        float lsum = 0.f;
        __half* prow = ps + ((2 * c + j) % RS) * C::PST + 32 * hsel + 4 * g;
#pragma unroll
        for (int u = 0; u < NU; ++u) {
          const float p0 = fast_exp2(fmaf(sv[u][0], p.qk_scale, -m_new));
          const float p1 = fast_exp2(fmaf(sv[u][1], p.qk_scale, -m_new));
          lsum += p0 + p1;
          *reinterpret_cast<__half2*>(prow + 2 * (u % 2) + 32 * (u / 2)) = __floats2half2_rn(p0, p1);
        }
        l_r[j] = l_r[j] * alpha + lsum;
#pragma unroll
        for (int t = 0; t < 4 * SETS; ++t) {
          oacc[t][j] *= alpha;
          oacc[t][2 + j] *= alpha;
        }
      }
    } else {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < C::MTK; ++i) {
        sacc[i][j] = fmaf(sacc[i][j], fold_factor<BITS>(2 * i), bk[j]);
        sacc[i][2 + j] = fmaf(sacc[i][2 + j], fold_factor<BITS>(2 * i + 1), bk[j]);
        mx = fmaxf(mx, fmaxf(sacc[i][j], sacc[i][2 + j]));
      }
      if (!use[j]) mx = -INFINITY;
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      if constexpr (RS <= 4) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      if constexpr (RS <= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_new = fmaxf(m_r[j], mx * p.qk_scale);
      const float alpha = fast_exp2(m_r[j] - m_new);
      m_r[j] = m_new;
      float lsum = 0.f;
      // without branches: the other group's lanes write row 7, which no one reads (RS < 8 when they exist)
      __half* prow = ps + (use[j] ? (2 * c + j) % RS : ROWS - 1) * C::PST + g * TPT;
#pragma unroll
      for (int i = 0; i < C::MTK; ++i) {
        const float p0 = fast_exp2(fmaf(sacc[i][j], p.qk_scale, -m_new));
        const float p1 = fast_exp2(fmaf(sacc[i][2 + j], p.qk_scale, -m_new));
        lsum += p0 + p1;
        *reinterpret_cast<__half2*>(prow + 2 * i) = __floats2half2_rn(p0, p1);
      }
      l_r[j] = l_r[j] * alpha + (use[j] ? lsum : 0.f);
#pragma unroll
      for (int t = 0; t < 4 * SETS; ++t) {
        oacc[t][j] *= alpha;
        oacc[t][2 + j] *= alpha;
      }
    }
    }
    __syncwarp();

    // ---- output: O^T += codes^T . (P s)^T, and the minima term; V scales from the stage
    const __half* vsp = reinterpret_cast<const __half*>(sst + vs0);
    float bv[SETS][4];  // this block's minima term of each set (rows g and g + 8 alike)
#pragma unroll
    for (int s = 0; s < SETS; ++s)
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[s][j] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      // B column g: P row g % RS, tokens 16ks + 4c, +1 (x) and +2, +3 (y)
      const uint2 pv = *reinterpret_cast<const uint2*>(ps + (g % RS) * C::PST + 16 * ks + 4 * c);
      const int tl = 16 * ks + 4 * c;
      // VLDSM: matrix j = lane / 8 (+ 4 per further pair of sets), row i: token 16ks + 4 (i / 2) + i % 2 + 2 (j % 2)
      // of set j / 2, so lane (g, c) gets channels 64s + 8g .. + 7 of tokens 4c, 4c + 1 (j even: y[0]) or 4c + 2,
      // 4c + 3 (y[2])
      uint32_t vl[4 * SETS];  // V4: y[0..3] of set s in vl[4s ..]
      if constexpr (V4) {
        // matrix j = lane / 8, row i: token 16ks + 4 (i / 2) + 2 (j / 2) + i % 2, chunk 2s + j % 2, so that lane (g, c)
        // gets channels 64s + 4g .. + 3 (y[0], y[2]) and 64s + 32 + 4g .. (y[1], y[3]) of tokens 4c, 4c + 1 (y[0],
        // y[1]) and 4c + 2, 4c + 3 (y[2], y[3])
        const int j = lane >> 3, i = lane & 7;
        const uint32_t a0 = static_cast<uint32_t>(__cvta_generic_to_shared(sst + vc0));
#pragma unroll
        for (int s = 0; s < SETS; ++s) {
          uint32_t r[4];
          ldsm_x4_trans(r, a0 + vldsm4_off(16 * ks + 4 * (i >> 1) + 2 * (j >> 1) + (i & 1), 2 * s + (j & 1)));
#pragma unroll
          for (int x = 0; x < 4; ++x) vl[4 * s + x] = r[x];
        }
      } else if constexpr (VLDSM) {
        const int j = lane >> 3, i = lane & 7;
        const uint32_t a0 = static_cast<uint32_t>(__cvta_generic_to_shared(sst + vc0));
#pragma unroll
        for (int s2 = 0; s2 < SETS; s2 += 2) {
          uint32_t r[4];
          const int t = 16 * ks + 4 * (i >> 1) + (i & 1) + 2 * (j & 1), s = s2 + (j >> 1);
          ldsm_x4_trans(r, a0 + (s / 2) * 64 * 32 + vldsm_chunk(t, s % 2));
#pragma unroll
          for (int x = 0; x < 4; ++x) vl[2 * s2 + x] = r[x];
        }
      }
#pragma unroll
      for (int s = 0; s < SETS; ++s) {
        const int vg = (64 * s + 8 * g) / G;  // this lane's V group in set s
        const uint32_t s01 = half2_u32(vsp[tl * DG + vg], vsp[(tl + 1) * DG + vg]);
        const uint32_t s23 = half2_u32(vsp[(tl + 2) * DG + vg], vsp[(tl + 3) * DG + vg]);
        const uint32_t m01 = half2_u32(vsp[(64 + tl) * DG + vg], vsp[(65 + tl) * DG + vg]);
        const uint32_t m23 = half2_u32(vsp[(66 + tl) * DG + vg], vsp[(67 + tl) * DG + vg]);
        const uint32_t b0 = hmul2_u32(pv.x, s01), b1 = hmul2_u32(pv.y, s23);
        uint32_t y[4], ys[4];
        if constexpr (V4) {
#pragma unroll
          for (int x = 0; x < 4; ++x) y[x] = vl[4 * s + x];
        } else if constexpr (VLDSM) {
          y[0] = vl[2 * s];
          y[2] = vl[2 * s + 1];
          y[1] = y[3] = 0u;
        } else {
          uint32_t vv[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            if constexpr (VSTG) {  // token 16ks + 4c + e, this lane's 8 channels of set s
              const uint8_t* src = sst + vc0 + folded_vtok<BITS, D>(16 * ks + 4 * c + e) + g * BITS + 8 * BITS * s;
              vv[e] = BITS == 4 ? *reinterpret_cast<const uint32_t*>(src) : *reinterpret_cast<const uint16_t*>(src);
            } else {
              vv[e] = vwd[ks][e][s];
            }
          }
          pair_words(y, vv[0], vv[1], vv[2], vv[3]);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) ys[e] = fold_shift<BITS>(y[e]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint32_t a[4];
          fold_operand<BITS>(a, i, y, ys);
          mma_16816(oacc[4 * s + i], a[0], a[1], a[2], a[3], b0, b1);
        }
        if constexpr (V4 && TWO) {  // rows g: the set's first V group, g + 8: its second
          const int v0 = 2 * s, v1 = 2 * s + 1;
          const uint32_t n01 = half2_u32(vsp[(64 + tl) * DG + v0], vsp[(65 + tl) * DG + v0]);
          const uint32_t n23 = half2_u32(vsp[(66 + tl) * DG + v0], vsp[(67 + tl) * DG + v0]);
          const uint32_t o01 = half2_u32(vsp[(64 + tl) * DG + v1], vsp[(65 + tl) * DG + v1]);
          const uint32_t o23 = half2_u32(vsp[(66 + tl) * DG + v1], vsp[(67 + tl) * DG + v1]);
          mma_16816(bv[s], n01, o01, n23, o23, pv.x, pv.y);
        } else {
          mma_16816(bv[s], m01, m01, m23, m23, pv.x, pv.y);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < SETS; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float bvj = V4 && TWO && i >= 2 ? bv[s][2 + j] : bv[s][j];
          oacc[4 * s + i][j] = fmaf(bvj, fold_unit<BITS>(2 * i), oacc[4 * s + i][j]);
          oacc[4 * s + i][2 + j] = fmaf(bvj, fold_unit<BITS>(2 * i + 1), oacc[4 * s + i][2 + j]);
        }
  };
  if constexpr (WS) {
    int i = 0;
    for (int t0 = lo + warp * BN; t0 < hi; t0 += W * BN, ++i) {
      const int st = i % NSTAGE;
      mbar_wait(bars + 8 * (warp * NSTAGE + st), (i / NSTAGE) & 1);  // the producer's copies of this block landed
      body(stages + st * stage_bytes);
      __syncwarp();  // every lane is done with the stage
      if (lane == 0) mbar_arrive(bars + 8 * (W * NSTAGE + warp * NSTAGE + st));
    }
  } else {
    staged_blocks<NSTAGE, MODE>(lo + warp * BN, hi, W * BN, stages, stage_bytes, issue, load_v, body);
  }

  // ---- the main blocks' state: sums over the lanes of a column's query row, outputs in true scale
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    float l = l_r[j];
    l += __shfl_xor_sync(0xffffffffu, l, 4);
    l += __shfl_xor_sync(0xffffffffu, l, 8);
    l += __shfl_xor_sync(0xffffffffu, l, 16);
    if constexpr (RS <= 4) l += __shfl_xor_sync(0xffffffffu, l, 2);
    if constexpr (RS <= 2) l += __shfl_xor_sync(0xffffffffu, l, 1);
    l_r[j] = l;
  }
#pragma unroll
  for (int s = 0; s < SETS; ++s)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        oacc[4 * s + i][j] *= fold_factor<BITS>(2 * i);
        oacc[4 * s + i][2 + j] *= fold_factor<BITS>(2 * i + 1);
      }

  // ---- the tail, in the registers variant's layout with its own state (its tiles over this warp's stages)
  {
    uint32_t qf[1][KK][2];
    float tm[1][2], tl[1][2];
    float to[D / 16][1][4];
    init_main<BITS, D, 1>(p, b, h, qf, tm, tl, to);
    if constexpr (MODE != KIVI_MODE_LOADS_NOTAIL) tail_units<BITS, D, 1>(p, b, h, main_end, qf, tm, tl, to, ps, stages);
    store_state(sm, W + warp, tm, tl, to);  // synchronises the CTA before writing
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int r = (2 * c + j) % RS;
    if (use[j] && g == 0) {
      sm.m[warp][r] = m_r[j];
      sm.l[warp][r] = l_r[j];
    }
#pragma unroll
    for (int s = 0; s < SETS; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // V4: tile i holds channels 64s + 4g + 2 (i % 2) + 32 (i / 2), + 1, in the set's group i / 2 (TWO)
        const bool mine = V4 ? !TWO || (2 * c + j) / RS == i / 2 : use[j];
        const int ch = V4 ? 64 * s + 4 * g + 2 * (i % 2) + 32 * (i / 2) : 64 * s + 8 * g + 2 * i;
        if (mine) {
          sm.o[warp][r][ch] = oacc[4 * s + i][j];
          sm.o[warp][r][ch + 1] = oacc[4 * s + i][2 + j];
        }
      }
  }
  write_split<D, ROWS, 2 * W, WS ? 32 * W : 0>(p, sm, b, h, rows, blockIdx.y, p.n_main);  // WS: the consumers alone
}

}  // namespace kvlab
