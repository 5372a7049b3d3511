// Tensor-core backward attention: Ampere and newer (m16n8k16 + ldmatrix + cp.async) and
// Turing (2x m16n8k8, direct copies), one kernel with a per-arch policy. Stages use
// simt_bwd.cu's numbering and arguments (plan_bwd picks a spec per stage):
//   BM > 0  stage 1, dK/dV with atomic dQ (below);
//   BM = 0  the memory-bound row stages 0 (delta, lse2) and 3 (dq = dq_accum * scale)
//           in a few registers per thread;
// the deterministic dq stage (2) stays SIMT.
// On sm_90 dQ's column pairs go out as one red.global.add.v2.f32 (13% of the kernel's
// time at d128 against two scalar atomics, H100).
//
// FlashAttention-2 partitioning: one CTA per (key tile, batch, kv head), NT/32 warps, each
// owning 16 key rows for the whole kernel, so dK and dV (16 x D per warp, fp32) stay in
// registers while the CTA walks the group's query heads and the query tiles that can see
// its keys (GQA sums the group without repeating K/V). Per query tile of BM rows:
//   S^T  = K Q^T        A = K rows (ldmatrix), B = Q rows (ldmatrix)
//   dP^T = V dO^T       A = V rows, B = dO rows
//   P^T  = exp2(S^T * scale_log2 - lse2), dS^T = P^T (dP^T - delta) [x softcap' ]
//                       (with dropout, dV takes the kept P / (1 - p) and dP is masked and
//                       scaled alike, as simt_bwd.cu does)
//   dV  += P^T dO       A = P^T straight from the accumulators (an m16n8 C pair is an
//   dK  += dS^T Q       m16k16 A), B = dO / Q via ldmatrix.trans
//   dQ  += dS K         needs every warp's keys: dS^T goes to shared memory (16-bit) and
//                       each warp multiplies a 16-row block of it (ldmatrix.trans) by K
//                       (ldmatrix.trans), then adds to dq_accum with fp32 atomics.
// With warp pairs (FEAT_PAIRS, sm_80+; see k2D and kS2D below) warps own 32 keys x D/2 of dK
// and dV instead, P^T joins dS^T in shared memory, and S^T / dP^T split across the pair.
// Q is not pre-scaled (S is raw q.k, the scale folded into exp2's FFMA), so
// dK = scale * dS^T Q and dQ = scale * dS K: the scale is applied once at the end (dK) and
// by the cvt stage (dQ), as simt_bwd.cu does.
//
// Shared memory (input type, rows padded by 8 elements so the 8 rows one ldmatrix reads
// sit in 8 different 16-byte bank groups): K, V [BN][D+8]; Q, dO [NBUF][BM][D+8] (NBUF 2 on
// sm_80+: the next query tile streams in by cp.async during this one's products); dS^T
// [BN][BM+8] and, with pairs, P^T [BN][BM+8]; lse2 and delta [NBUF][BM] fp32.
#include "tc_common.cuh"

namespace portattn {

// FEAT bit 0 (spec.FEAT_MODS) compiles in the score modifiers (softcap, ALiBi, bias);
// without it the host guarantees none are present. Bit 1 (FEAT_PAIRS): see k2D.
template <class T, int D, int BM, int BN, int NT, int ARCH, int FEAT>
__global__ void __launch_bounds__(NT, 1) tc_bwd_kernel(PORTATTN_BWD_PARAMS(T)) {
  if constexpr (BM == 0) {
    // Row stages (a BM = 0 spec, a few registers, so many warps per SM hide the memory
    // latency; SIMT's pre/cvt share the 200+ registers of its dK/dV kernel).
    bwd_row_stage<T, NT>(PORTATTN_BWD_ARGS);
  } else {
    constexpr int NW = NT / 32;
    constexpr int LD = D + 8, LS = BM + 8;
    constexpr bool kAsync = ARCH >= 80;
    constexpr int NBUF = kAsync ? 2 : 1;
    // dQ = dS K: QB blocks of MQ query rows, WQ warps per block, each DW head-dim columns,
    // in chunks of CW columns (bounds the live accumulators next to dK and dV). Blocks of
    // 32 rows where that leaves each warp 32 columns: per 16 keys, 2 dS^T and 2 K loads
    // feed 8 MMAs, where 16 rows x 64 columns (two chunks) took 2 + 4. Not on Turing: the
    // 16 more live accumulators spilled its d128 tile.
    constexpr int WQ32 = BM % 32 == 0 && NW % (BM / 32) == 0 ? NW / (BM / 32) : 0;
    constexpr int MQ = ARCH >= 80 && WQ32 > 0 && D % WQ32 == 0 && (D / WQ32) % 32 == 0 &&
                               D * (BM / 16) / NW >= 64
                           ? 32
                           : 16;
    constexpr int QB = BM / MQ, WQ = NW / QB, DW = D / WQ;
    constexpr int CW = DW % 32 == 0 ? 32 : 16;
    static_assert(BN == 16 * NW && BM % 16 == 0 && D % 32 == 0, "tile shape");
    static_assert(WQ * QB == NW && DW * WQ == D && DW % CW == 0 && CW % 16 == 0, "dQ split");
    using Mma = MmaK16<T, ARCH>;
    using QCopy = TileCopy<T, BM, D, NT>;
    using KCopy = TileCopy<T, BN, D, NT>;
    constexpr unsigned kRowBytes = LD * sizeof(T);
    constexpr unsigned kBufBytes = BM * LD * sizeof(T);
    // Turing: a fully unrolled S^T / dP^T head-dim loop lets ptxas hoist enough ldmatrix
    // results (its k16 step is two MMAs) to spill at 255 registers (d64 64x64, d128 32x64);
    // rolled, it fits. Ampere+ unrolls it fully with no spills.
    constexpr int kUnroll = ARCH >= 80 ? D / 16 : 1;
    // FEAT bit 1 (spec.FEAT_PAIRS, Ampere+): dV and dK are accumulated by warp pairs: warp w
    // owns keys 32 (w % (NW / 2)) .. +31 and half the head dim (w / (NW / 2)), with P^T and
    // dS^T read back from shared memory, so each warp streams half of dO and Q per query
    // tile instead of all of it (per warp and tile, d128: 48 ldmatrix instead of 64).
    // Alone (S^T unsplit) it measured fwd+bwd d128 +1-6%, d96 -0-3% and d64 -1-4% on the H100
    // (at d64 K and V fragments sit in registers and dV, dK's A operands came from registers
    // too); with the split below, the plan pairs 64-query tiles from d96
    // (plan_bwd.TC_BWD_PAIRS_MIN_HEAD_DIM) and d64 on 128-query tiles only.
    constexpr bool k2D = (FEAT & 2) != 0;
    static_assert(!k2D || (ARCH >= 80 && NW % 2 == 0 && (D / 2) % 16 == 0), "pairs");
    constexpr int kMT = k2D ? 2 : 1;           // m16 key tiles per warp in dK / dV
    constexpr int kDT = k2D ? D / 16 : D / 8;  // n8 head-dim tiles per warp in dK / dV
    // With pairs, S^T and dP^T split the same way (FA2's 2-D split): warp w computes its
    // dK / dV keys against queries BM/2 (w / (NW / 2)) .. + BM/2 - 1, loading two K / V blocks
    // and half of Q and dO per k16 step (for 128 queries, 12 ldmatrix per 32 MMAs where 16
    // keys x 128 queries took 18), and 128-query tiles halve the steps and barriers. K and V
    // stay in shared memory here (their fragments would not fit next to S^T and dP^T).
    // fwd+bwd on the H100 against the unsplit form: d64 128x128 (vs 64x128 unpaired) +8-11%,
    // d96 64x128 (vs 64x64 unpaired) +9-19%, d128 64x128 +4-8%; forced sm_86 d96 64x64 and
    // d128 32x64 +2-5%. Not with score modifiers at d >= 96: d128 64x128 spilled 4 bytes.
    constexpr bool kS2D = k2D && (BM >= 128 || (D >= 96 && (FEAT & 1) == 0));
    constexpr int kMT1 = kS2D ? 2 : 1;         // m16 key tiles per warp in S^T / dP^T
    constexpr int kQW = kS2D ? BM / 2 : BM;    // queries per warp in S^T / dP^T
    constexpr int QT1 = kQW / 8;
    constexpr int kKeepW = (kMT1 * QT1 * 4 + 31) / 32;
    // d <= 64 on Ampere+: this warp's K and V A fragments (2 x D/16 x 4 registers) stay in
    // registers for the whole kernel instead of being re-read from shared memory for every
    // query tile (shared-memory bandwidth is what bounds this kernel).
    constexpr bool kKVRegs = ARCH >= 80 && D <= 64 && !kS2D;

    if (stage != 1) return;  // a tile spec runs only the dK/dV (+ atomic dQ) stage

    extern __shared__ uint4 smem_u4[];
    T* Ks = reinterpret_cast<T*>(smem_u4);
    T* Vs = Ks + BN * LD;
    T* Qs = Vs + BN * LD;
    T* dOs = Qs + NBUF * BM * LD;
    T* dSt = dOs + NBUF * BM * LD;
    T* Pt = dSt + BN * LS;   // P^T (k2D only)
    float* lse2s = reinterpret_cast<float*>(Pt + (k2D ? BN * LS : 0));
    float* deltas = lse2s + NBUF * BM;

    const KeyTile kt(BN, hq, group, sq, sk, cu_q, cu_k, align_br, win_left, win_right,
                     ARCH >= 80 ? kLptCtas : kLptCtasTuringBwd);
    if (kt.cols_valid <= 0) return;
    const SeqSpan& span = kt;
    const int b = kt.b, hk = kt.hk, n0 = kt.n0, cols_valid = kt.cols_valid;
    const int diag_off = kt.diag_off, m_lo = kt.m_lo, m_hi = kt.m_hi;
    const int m_start = m_lo / BM * BM;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tig = lane & 3;
    const int tid = threadIdx.x;
    // ldmatrix lane bases. A pattern: lane l addresses row l%16, column half l/16; B
    // pattern: row l%8 + 8*(l/16), column half (l/8)%2. This warp's 16 K/V rows as the A
    // operand and Q, dO as B operands (non-transposed) take them as named. dS^T as dQ's A
    // operand (.trans) takes the B pattern. On Ampere+ the transposed B operands (dO and Q
    // for dV and dK, K for dQ) take the A pattern: it returns an n8 tile's two k8 halves in
    // registers 0,1 and 2,3, the pairs m16n8k16 reads (with the B pattern they came as 0,2
    // and 1,3, and ptxas spent two moves per MMA pairing them: 18% of the d64 kernel's
    // instructions). Turing's m16n8k8 takes one register per k8 half, so it keeps the B
    // pattern and no extra base registers (the A pattern spilled its d128 tile).
    constexpr bool kTPairs = ARCH >= 80;
    constexpr int kT1 = kTPairs ? 1 : 2, kT2 = kTPairs ? 2 : 1;
    const int arow = lane & 15, acol = (lane >> 4) * 8;
    const int brow = (lane >> 4) * 8 + (lane & 7), bcol = ((lane >> 3) & 1) * 8;
    const int trow = kTPairs ? arow : brow, tcol = kTPairs ? acol : bcol;
    // This warp's first S^T / dP^T key and query, within the tiles.
    const int key0 = kS2D ? (warp % (NW / 2)) * 32 : warp * 16;
    const int q0 = kS2D ? (warp / (NW / 2)) * kQW : 0;
    const unsigned k_a = smem_addr(Ks + (key0 + arow) * LD + acol);
    const unsigned q_b = smem_addr(Qs + brow * LD + bcol);
    const unsigned q_t = smem_addr(Qs + trow * LD + tcol);
    const unsigned k_t = smem_addr(Ks + trow * LD + tcol);
    const unsigned ds_b = smem_addr(dSt + brow * LS + bcol);
    constexpr unsigned kVOff = BN * LD * sizeof(T);          // Vs - Ks
    constexpr unsigned kdOOff = NBUF * BM * LD * sizeof(T);  // dOs - Qs

    const T* kbase = k + span.k_at(b, k_sb, k_ss) + hk * k_sh;
    const T* vbase = v + span.k_at(b, v_sb, v_ss) + hk * v_sh;
    const bool vq = vec_flags & 1, vk = vec_flags & 2, vv = vec_flags & 4, vdo = vec_flags & 16;
    if constexpr (kAsync) {
      KCopy::async(Ks, kbase, k_ss, n0, cols_valid, d, vk);
      KCopy::async(Vs, vbase, v_ss, n0, cols_valid, d, vv);
    } else {
      KCopy::direct(Ks, kbase, k_ss, n0, cols_valid, d, vk);
      KCopy::direct(Vs, vbase, v_ss, n0, cols_valid, d, vv);
    }

    // Q, dO and the row statistics of query tile m0 of head hk*group + hh into buffer buf;
    // rows past the sequence get lse2 = +inf, so their P (and dS) is exactly 0.
    auto stage_q = [&](int buf, int hh, int m0) {
      const int h = hk * group + hh;
      const int rows_valid = min(BM, span.sq - m0);
      const T* qbase = q + span.q_at(b, q_sb, q_ss) + h * q_sh;
      const T* dobase = dout + span.q_at(b, do_sb, do_ss) + h * do_sh;
      if constexpr (kAsync) {
        QCopy::async(Qs + buf * BM * LD, qbase, q_ss, m0, rows_valid, d, vq);
        QCopy::async(dOs + buf * BM * LD, dobase, do_ss, m0, rows_valid, d, vdo);
      } else {
        QCopy::direct(Qs, qbase, q_ss, m0, rows_valid, d, vq);
        QCopy::direct(dOs, dobase, do_ss, m0, rows_valid, d, vdo);
      }
      const long long base = span.q_at(b, st_sb, 1) + h * st_sh + m0;
      for (int il = tid; il < BM; il += NT) {
        lse2s[buf * BM + il] = il < rows_valid ? lse2[base + il] : __int_as_float(0x7f800000);
        deltas[buf * BM + il] = il < rows_valid ? delta[base + il] : 0.f;
      }
    };

    float dka[kMT][kDT][4], dva[kMT][kDT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int t = 0; t < kDT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[mt][t][e] = dva[mt][t][e] = 0.f;

    const int ntiles = (m_hi - m_start + BM - 1) / BM;
    // Turing: each key tile starts its walk at a different query tile (its index, modulo
    // the count) and wraps around. In one order, every CTA of a (batch, head) added into
    // the same dQ rows at once with scalar atomics, which serialised in L2: the rotation
    // made forced-sm75 non-causal fwd+bwd 6-12% faster on the H100. Ampere+ (8-byte
    // reductions on sm_90, 128-key tiles) measured 1-4% slower with it: the shared walk
    // keeps Q and dO hot in L2. Turing's d128 tile sits at 255 registers and spilled with
    // the extra live value, so it keeps one order.
    constexpr bool kRotate = ARCH < 80 && D <= 96;
    const int rot = kRotate && ntiles > 0 ? (n0 / BN) % ntiles : 0;
    auto tile_m0 = [&](int it) {
      const int r = it + rot;
      return m_start + BM * (r >= ntiles ? r - ntiles : r);
    };
    int hh = 0, it = 0, buf = 0;
    if (ntiles <= 0) hh = group;  // no query sees these keys: dK = dV = 0
    if (kAsync && hh < group) stage_q(0, 0, tile_m0(0));
    unsigned kvreg[kKVRegs ? D / 16 : 1][2][4];
    if constexpr (kKVRegs) {
      if (hh < group) {
        KCopy::async_wait();
        __syncthreads();
#pragma unroll
        for (int kd = 0; kd < D / 16; ++kd) {
          ldsm_x4(kvreg[kd][0], k_a + kd * 16 * sizeof(T));
          ldsm_x4(kvreg[kd][1], k_a + kVOff + kd * 16 * sizeof(T));
        }
      }
    }
    for (; hh < group; buf ^= (NBUF - 1)) {
      const int cur_m0 = tile_m0(it);
      if constexpr (kAsync) {
        KCopy::async_wait();
      } else {
        __syncthreads();  // every warp is done with the previous tile's Q, dO and dS^T
        stage_q(0, hh, cur_m0);
      }
      __syncthreads();  // this tile's Q, dO and statistics in place
      const int h = hk * group + hh;
      if (++it == ntiles) {
        ++hh;
        it = 0;
      }
      // Buffer buf^1 was last read before the barrier above.
      if (kAsync && hh < group) stage_q(buf ^ 1, hh, tile_m0(it));

      const unsigned qb_lane = q_b + buf * kBufBytes + q0 * kRowBytes;
      const unsigned qt_lane = q_t + buf * kBufBytes;
      float s[kMT1][QT1][4], dp[kMT1][QT1][4];
#pragma unroll
      for (int mt = 0; mt < kMT1; ++mt)
#pragma unroll
        for (int t = 0; t < QT1; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][t][e] = dp[mt][t][e] = 0.f;
#pragma unroll kUnroll
      for (int kd = 0; kd < D / 16; ++kd) {
        unsigned ka[kMT1][4], va[kMT1][4];
        if constexpr (kKVRegs) {
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            ka[0][r] = kvreg[kd][0][r];
            va[0][r] = kvreg[kd][1][r];
          }
        } else {
#pragma unroll
          for (int mt = 0; mt < kMT1; ++mt) {
            ldsm_x4(ka[mt], k_a + (mt * 16 * LD + kd * 16) * sizeof(T));
            ldsm_x4(va[mt], k_a + kVOff + (mt * 16 * LD + kd * 16) * sizeof(T));
          }
        }
#pragma unroll
        for (int np = 0; np < kQW / 16; ++np) {
          unsigned qb[4], ob[4];
          ldsm_x4(qb, qb_lane + np * 16 * kRowBytes + kd * 16 * sizeof(T));
          ldsm_x4(ob, qb_lane + kdOOff + np * 16 * kRowBytes + kd * 16 * sizeof(T));
#pragma unroll
          for (int mt = 0; mt < kMT1; ++mt) {
            Mma::k16(s[mt][2 * np], ka[mt], qb[0], qb[1]);
            Mma::k16(s[mt][2 * np + 1], ka[mt], qb[2], qb[3]);
            Mma::k16(dp[mt][2 * np], va[mt], ob[0], ob[1]);
            Mma::k16(dp[mt][2 * np + 1], va[mt], ob[2], ob[3]);
          }
        }
      }

      const ScoreMods mods =
          ScoreMods::for_head(b, h, bias, bias_kind, bias_sb, bias_sh, bias_sq, bias_sk, alibi,
                              alibi_sb, alibi_sh, softcap_log2, win_left, win_right, diag_off,
                              span.sq, span.sk);
      // FEAT_MODS keeps the fast interior path for calls whose modifiers are all off (a
      // negative scale alone selects the variant too).
      const bool has_mods = (FEAT & 1) != 0 && mods.any();
      const int last_row = min(cur_m0 + BM, span.sq) - 1;
      // Every row of the tile sees every key: no per-element mask.
      const bool interior =
          cols_valid == BN && (win_left < 0 || n0 >= last_row + diag_off - win_left) &&
          (win_right < 0 || n0 + BN - 1 <= cur_m0 + diag_off + win_right);
      // Without modifiers a score is kept where its query lies in its key's visible range
      // (keys g and g + 8 of each of this warp's key blocks; offsets relative to this
      // thread's first query): two integer compares per score on every tile, no branch.
      int q_lo[kMT1][2], q_hi[kMT1][2];
#pragma unroll
      for (int mt = 0; mt < kMT1; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          mods.query_range(n0 + key0 + mt * 16 + g + hf * 8, q_lo[mt][hf], q_hi[mt][hf]);
          q_lo[mt][hf] -= cur_m0 + q0 + tig * 2;
          q_hi[mt][hf] -= cur_m0 + q0 + tig * 2;
        }
      // With dropout, V saw Pd = P Z / (1 - p): dV takes Pd and dP is masked and scaled
      // alike (the forward's mask, a pure function of (seed, offset, b, h, i, j):
      // philox.cuh). The keep bits of this thread's elements (bit (mt * QT1 + t) * 4 + e)
      // are drawn first in a rolled loop: inlined into the unrolled one below, 32 Philox
      // bodies spilled at d128.
      unsigned keep[kKeepW];
#pragma unroll
      for (int w = 0; w < kKeepW; ++w) keep[w] = 0u;
      if (drop_threshold != 0u) {
        const Dropout drop(drop_seed, drop_offset, drop_threshold,
                           static_cast<unsigned>(b * hq + h));
#pragma unroll
        for (int w = 0; w < kKeepW; ++w) {
#pragma unroll 1
          for (int x = w * 32; x < min(w * 32 + 32, kMT1 * QT1 * 4); ++x) {
            const int i = cur_m0 + q0 + ((x >> 2) % QT1) * 8 + tig * 2 + (x & 1);
            const int j = n0 + key0 + (x / (QT1 * 4)) * 16 + g + ((x >> 1) & 1) * 8;
            keep[w] |= ((drop.keep4(i, j >> 2) >> (j & 3)) & 1u) << (x & 31);
          }
        }
      }
      const float* lrow = lse2s + buf * BM + q0;
      const float* drow = deltas + buf * BM + q0;
#pragma unroll
      for (int mt = 0; mt < kMT1; ++mt)
#pragma unroll
        for (int t = 0; t < QT1; ++t) {
          const float2 l2 = *reinterpret_cast<const float2*>(lrow + t * 8 + tig * 2);
          const float2 dl = *reinterpret_cast<const float2*>(drow + t * 8 + tig * 2);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float lse_e = (e & 1) ? l2.y : l2.x;
            const float del_e = (e & 1) ? dl.y : dl.x;
            float p;
            if constexpr ((FEAT & 1) == 0) {
              const int ir = t * 8 + (e & 1);
              p = fast_exp2(fmaf(s[mt][t][e], scale_log2, -lse_e));
              if (ir < q_lo[mt][e >> 1] || ir >= q_hi[mt][e >> 1]) p = 0.f;
            } else if (interior && !has_mods) {
              p = fast_exp2(fmaf(s[mt][t][e], scale_log2, -lse_e));
            } else {
              const int i = cur_m0 + q0 + t * 8 + tig * 2 + (e & 1);
              const int j = n0 + key0 + mt * 16 + g + (e >> 1) * 8;
              p = fast_exp2(mods.masked(s[mt][t][e] * scale_log2, i, j, has_mods) - lse_e);
            }
            float pd = p, dpv = dp[mt][t][e];
            if (drop_threshold != 0u) {
              const int bit = (mt * QT1 + t) * 4 + e;
              const bool kept = (keep[bit / 32] >> (bit % 32)) & 1u;
              pd = kept ? p * drop_scale : 0.f;
              dpv = kept ? dpv * drop_scale : 0.f;
            }
            float ds = p * (dpv - del_e);
            if (has_mods && softcap_log2 > 0.f) {
              const float th = tanhf(s[mt][t][e] * scale_log2 / softcap_log2);
              ds *= 1.f - th * th;
            }
            s[mt][t][e] = pd;
            dp[mt][t][e] = ds;
          }
        }
      // P^T and dS^T as A fragments: n8 tiles 2kn and 2kn+1 of a C are k16 block kn of an A.
      unsigned pa[kMT1][kQW / 16][4], dsa[kMT1][kQW / 16][4];
#pragma unroll
      for (int mt = 0; mt < kMT1; ++mt)
#pragma unroll
        for (int kn = 0; kn < kQW / 16; ++kn)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int tt = 2 * kn + (r >> 1), e0 = 2 * (r & 1);
            pa[mt][kn][r] = Pack2<T, ARCH>::run(s[mt][tt][e0], s[mt][tt][e0 + 1]);
            dsa[mt][kn][r] = Pack2<T, ARCH>::run(dp[mt][tt][e0], dp[mt][tt][e0 + 1]);
          }
      if (k2D || dq_accum != nullptr) {
        // dS^T (and with pairs P^T) rows g and g+8 of this warp's key blocks; one 32-bit word
        // per query pair, and the padded row length (BM+8 elements) puts the warp's 32 words
        // on 32 banks.
#pragma unroll
        for (int mt = 0; mt < kMT1; ++mt) {
          const int off = (key0 + mt * 16 + g) * LS + q0 + tig * 2;
          unsigned* row0 = reinterpret_cast<unsigned*>(dSt + off);
          unsigned* prow0 = reinterpret_cast<unsigned*>(Pt + off);
#pragma unroll
          for (int kn = 0; kn < kQW / 16; ++kn) {
            row0[kn * 8] = dsa[mt][kn][0];
            row0[kn * 8 + 4 * LS] = dsa[mt][kn][1];
            row0[kn * 8 + 4] = dsa[mt][kn][2];
            row0[kn * 8 + 4 + 4 * LS] = dsa[mt][kn][3];
            if constexpr (k2D) {
              prow0[kn * 8] = pa[mt][kn][0];
              prow0[kn * 8 + 4 * LS] = pa[mt][kn][1];
              prow0[kn * 8 + 4] = pa[mt][kn][2];
              prow0[kn * 8 + 4 + 4 * LS] = pa[mt][kn][3];
            }
          }
        }
      }

      if constexpr (k2D) {
        __syncthreads();  // P^T and dS^T of every warp in place
        const int kb2 = (warp % (NW / 2)) * 32, d0 = (warp / (NW / 2)) * (D / 2);
        const unsigned pt_a = smem_addr(Pt + (kb2 + arow) * LS + acol);
        const unsigned dst_a = smem_addr(dSt + (kb2 + arow) * LS + acol);
#pragma unroll
        for (int kn = 0; kn < BM / 16; ++kn) {
          unsigned pf[2][4], sf[2][4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            ldsm_x4(pf[mt], pt_a + (mt * 16 * LS + kn * 16) * sizeof(T));
            ldsm_x4(sf[mt], dst_a + (mt * 16 * LS + kn * 16) * sizeof(T));
          }
#pragma unroll
          for (int dd = 0; dd < D / 32; ++dd) {
            unsigned ob[4], qb[4];
            ldsm_x4_trans(ob, qt_lane + kdOOff + kn * 16 * kRowBytes + (d0 + dd * 16) * sizeof(T));
            ldsm_x4_trans(qb, qt_lane + kn * 16 * kRowBytes + (d0 + dd * 16) * sizeof(T));
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              Mma::k16(dva[mt][2 * dd], pf[mt], ob[0], ob[kT1]);
              Mma::k16(dva[mt][2 * dd + 1], pf[mt], ob[kT2], ob[3]);
              Mma::k16(dka[mt][2 * dd], sf[mt], qb[0], qb[kT1]);
              Mma::k16(dka[mt][2 * dd + 1], sf[mt], qb[kT2], qb[3]);
            }
          }
        }
      } else {
#pragma unroll
        for (int kn = 0; kn < BM / 16; ++kn) {
#pragma unroll
          for (int dd = 0; dd < D / 16; ++dd) {
            unsigned ob[4], qb[4];
            ldsm_x4_trans(ob, qt_lane + kdOOff + kn * 16 * kRowBytes + dd * 16 * sizeof(T));
            Mma::k16(dva[0][2 * dd], pa[0][kn], ob[0], ob[kT1]);
            Mma::k16(dva[0][2 * dd + 1], pa[0][kn], ob[kT2], ob[3]);
            ldsm_x4_trans(qb, qt_lane + kn * 16 * kRowBytes + dd * 16 * sizeof(T));
            Mma::k16(dka[0][2 * dd], dsa[0][kn], qb[0], qb[kT1]);
            Mma::k16(dka[0][2 * dd + 1], dsa[0][kn], qb[kT2], qb[3]);
          }
        }
      }

      if (dq_accum != nullptr) {
        if constexpr (!k2D) __syncthreads();  // dS^T of every warp in place
        const int qblk = warp % QB, c_first = (warp / QB) * DW;
        const int i0 = cur_m0 + qblk * MQ + g;
        // This thread's first column in row i0; every other element it adds is a multiple
        // of 8 rows and a compile-time column offset from it (64-bit address arithmetic
        // per element was a quarter of the dQ section's instructions).
        float* dq0 = dq_accum + span.q_at(b, dq_sb, dq_ss) + static_cast<long long>(i0) * dq_ss +
                     h * dq_sh + c_first + tig * 2;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        // sm_90 adds a column pair in one 8-byte reduction, with no per-column test where
        // every column of this warp's share lies inside the head dim. Pairs start at even
        // columns: 8-byte aligned when every stride is even (dq_accum is backward.py's own
        // 256-byte aligned allocation). Elsewhere the per-column tests stay: the same
        // test-free path with two scalar atomics spilled sm_75's d128 tile.
        const bool pairs = c_first + DW <= d && ((dq_sb | dq_ss | dq_sh) & 1) == 0;
#endif
#pragma unroll
        for (int j = 0; j < DW / CW; ++j) {
          float acc[MQ / 16][CW / 8][4];
#pragma unroll
          for (int mq = 0; mq < MQ / 16; ++mq)
#pragma unroll
            for (int t = 0; t < CW / 8; ++t)
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[mq][t][e] = 0.f;
#pragma unroll
          for (int kn = 0; kn < BN / 16; ++kn) {
            unsigned a[MQ / 16][4];
#pragma unroll
            for (int mq = 0; mq < MQ / 16; ++mq)
              ldsm_x4_trans(a[mq], ds_b + kn * 16 * LS * sizeof(T) +
                                       (qblk * MQ + mq * 16) * sizeof(T));
#pragma unroll
            for (int cc = 0; cc < CW / 16; ++cc) {
              unsigned kb[4];
              ldsm_x4_trans(kb, k_t + kn * 16 * kRowBytes +
                                    (c_first + j * CW + cc * 16) * sizeof(T));
#pragma unroll
              for (int mq = 0; mq < MQ / 16; ++mq) {
                Mma::k16(acc[mq][2 * cc], a[mq], kb[0], kb[kT1]);
                Mma::k16(acc[mq][2 * cc + 1], a[mq], kb[kT2], kb[3]);
              }
            }
          }
#pragma unroll
          for (int mq = 0; mq < MQ / 16; ++mq)
#pragma unroll
          for (int t = 0; t < CW / 8; ++t) {
            const int c = c_first + j * CW + t * 8 + tig * 2;
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              const bool row_ok = i0 + mq * 16 + hf * 8 < span.sq;
              float* dst = dq0 + (mq * 16 + hf * 8) * dq_ss + j * CW + t * 8;
              const float x0 = acc[mq][t][2 * hf], x1 = acc[mq][t][2 * hf + 1];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
              if (row_ok && pairs) {
                asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dst), "f"(x0),
                             "f"(x1) : "memory");
                continue;
              }
#endif
              if (row_ok && c < d) atomicAdd(dst, x0);
              if (row_ok && c + 1 < d) atomicAdd(dst + 1, x1);
            }
          }
        }
      }
    }

    // A CTA whose keys no query sees ran no iteration: its K/V copies must land before exit.
    if constexpr (kAsync) KCopy::async_wait();
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int j = n0 + (k2D ? (warp % (NW / 2)) * 32 + mt * 16 : warp * 16) + g + hf * 8;
      if (j >= span.sk) continue;
      T* krow = dk + span.k_at(b, dk_sb, dk_ss) + static_cast<long long>(j) * dk_ss + hk * dk_sh;
      T* vrow = dv + span.k_at(b, dv_sb, dv_ss) + static_cast<long long>(j) * dv_ss + hk * dv_sh;
      const int c_0 = k2D ? (warp / (NW / 2)) * (D / 2) : 0;
#pragma unroll
      for (int t = 0; t < kDT; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = c_0 + t * 8 + tig * 2 + e;
          if (col < d) {
            krow[col] = from_float<T>(dka[mt][t][2 * hf + e] * dq_scale);
            vrow[col] = from_float<T>(dva[mt][t][2 * hf + e]);
          }
        }
      }
    }
  }
}

}  // namespace portattn
