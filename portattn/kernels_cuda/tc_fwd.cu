// Tensor-core forward attention for Turing (sm_75: mma.m16n8k8 + ldmatrix) and Ampere and
// newer (sm_80+: mma.m16n8k16 + ldmatrix + cp.async), one kernel with per-arch policies.
//
// FlashAttention-2 partitioning: each warp owns MB blocks of 16 query rows, so softmax
// statistics never leave a warp (quad shuffles only). Per K/V tile:
//   S = Q K^T   A = Q (ldmatrix), B = K rows (ldmatrix), fp32 accumulators
//   softmax     online, log2 domain, scale folded into the exp2 argument (one FFMA)
//   O += P V    P reused from the S accumulators as the A operand (the m16n8 C layout of
//               two adjacent n8 tiles is the m16k16 A layout), B = V via ldmatrix.trans
// Shared memory: Q [BM][D+8], K [BN][D+8], V [BN][D+8] in the input type. The 8-element
// row padding puts the 8 rows one ldmatrix reads in 8 different 16-byte bank groups.
// One buffer each for K and V, overlapped with compute: V_j streams in during S_j, and
// K_{j+1} during P V_j (cp.async on sm_80+, register-staged loads on sm_75).
#include "tc_common.cuh"

namespace portattn {

// FEAT bit 0 (spec.FEAT_MODS) compiles in the score modifiers (softcap, ALiBi, bias) and
// negative scales; without it the host guarantees none are present.
// MINB: resident CTAs per SM asked of ptxas (plan.tc_min_ctas).
template <class T, int D, int BM, int BN, int NT, int ARCH, int FEAT, int MINB>
__global__ void __launch_bounds__(NT, MINB) tc_fwd_kernel(
    PORTATTN_FWD_PARAMS(T)) {
  constexpr int NW = NT / 32;
  constexpr int MB = BM / (16 * NW);   // 16-row blocks per warp
  constexpr int NTL = BN / 8;          // n8 tiles of S
  constexpr int DTL = D / 8;           // n8 tiles of O
  constexpr int LD = D + 8;
  constexpr bool kAsync = ARCH >= 80;
  // Turing has 64 KB of shared memory per SM: where Q's fragments fit in 32 registers it
  // is held there for the whole kernel and its shared-memory slot becomes K/V's, which
  // triples resident CTAs at d128 (spec.py's tc_q_in_registers must agree).
  constexpr bool kQRegs = !kAsync && MB * D / 4 <= 32;
  // Turing stages the next tile in registers only while that costs <= 16 registers;
  // beyond (d >= 192) the staging spills, so copies go straight to shared memory
  // (plan.tc_staged agrees).
  constexpr bool kStage = !kAsync && TileCopy<T, BN, D, NT>::kPerThread <= 4;
  static_assert(MB * 16 * NW == BM && BN % 16 == 0 && D % 16 == 0, "tile shape");
  using Mma = MmaK16<T, ARCH>;
  constexpr float kRescaleSlack = 8.f;
  using QCopy = TileCopy<T, BM, D, NT>;
  using KVCopy = TileCopy<T, BN, D, NT>;

  extern __shared__ uint4 smem_u4[];
  T* Qs = reinterpret_cast<T*>(smem_u4);
  T* Ks = kQRegs ? Qs : Qs + BM * LD;
  T* Vs = Ks + BN * LD;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const CtaTile tile(BM, hq, group, sq, sk, cu_q, cu_k, align_br, win_right);
  if (tile.rows_valid <= 0) return;
  const int b = tile.b, h = tile.h, hk = tile.hk, m0 = tile.m0;
  const int rows_valid = tile.rows_valid;
  const int wrow0 = warp * MB * 16;     // this warp's first row inside the tile
  // Per-lane ldmatrix bases (byte addresses); loads below add compile-time offsets.
  // Q (A operand): lane l addresses row l%16, column half l/16, so matrices 0-3 are the
  // A fragment's (rows 0-7 | 8-15) x (k 0-7 | 8-15). K and V: row l%8 + 8*(l/16), column
  // half (l/8)%2: matrices (keys 0-7, cols 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15).
  // V uses K's pattern at a constant offset, so one register holds both bases.
  constexpr unsigned kRowBytes = LD * sizeof(T);
  const unsigned q_lane = smem_addr(Qs + (wrow0 + (lane & 15)) * LD + (lane >> 4) * 8);
  const unsigned k_lane = smem_addr(Ks + ((lane >> 4) * 8 + (lane & 7)) * LD +
                                    ((lane >> 3) & 1) * 8);
  constexpr unsigned kVOffset = BN * LD * sizeof(T);  // Vs - Ks
  // V as P V's transposed B operand, d <= 64: Q's pattern (no warp offset) returns an n8
  // tile's two k8 halves in registers 0,1 and 2,3, the pairs the MMA reads; K's pattern
  // gives 0,2 and 1,3, and ptxas spends two moves per load to pair them (+3-8% at d64 on
  // the H100). Larger head dims keep K's pattern: the extra base register spilled d128 on
  // sm_80 and its bf16 FEAT_MODS build on sm_90.
  constexpr bool kVPairs = D <= 64;
  constexpr int kV1 = kVPairs ? 1 : 2, kV2 = kVPairs ? 2 : 1;
  const unsigned v_lane = kVPairs ? smem_addr(Vs + (lane & 15) * LD + (lane >> 4) * 8)
                                  : k_lane + kVOffset;
  const CtaScores cs(tile, bias, bias_kind, bias_sb, bias_sh, bias_sq, bias_sk, alibi, alibi_sb,
                     alibi_sh, softcap_log2, win_left, win_right);
  const ScoreMods& mods = cs.mods;
  // A negative scale reverses the max; the per-element path handles it exactly, so the
  // host compiles it in for negative scales too. Inside the FEAT_MODS variant the test
  // stays at run time, as it was before FEAT existed (a compile-time true spilled 112
  // bytes at d128 on sm_80).
  const bool has_mods = (FEAT & 1) != 0 && (mods.any() || scale_log2 < 0.f);
  const int n_lo = cs.n_lo, n_hi = cs.n_hi;
  const int n_first = n_lo / BN * BN;

  const T* qbase = q + tile.q_at(b, q_sb, q_ss) + h * q_sh;
  const T* kbase = k + tile.k_at(b, k_sb, k_ss) + hk * k_sh;
  const T* vbase = v + tile.k_at(b, v_sb, v_ss) + hk * v_sh;
  const bool vq = vec_flags & 1, vk = vec_flags & 2, vv = vec_flags & 4;

  KVCopy kstage, vstage;  // Turing's register staging (elided where unused)
  if constexpr (kAsync) {
    QCopy::async(Qs, qbase, q_ss, m0, rows_valid, d, vq);
    if (n_first < n_hi)
      KVCopy::async(Ks, kbase, k_ss, n_first, min(BN, tile.sk - n_first), d, vk);
  } else {
    QCopy::direct(Qs, qbase, q_ss, m0, rows_valid, d, vq);
  }
  unsigned qreg[kQRegs ? MB : 1][kQRegs ? D / 16 : 1][4];
  if constexpr (kQRegs) {
    __syncthreads();
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int kd = 0; kd < D / 16; ++kd)
        ldsm_x4(qreg[mb][kd], q_lane + mb * 16 * kRowBytes + kd * 16 * sizeof(T));
    __syncthreads();  // every warp holds its Q before K overwrites the slot
  }
  if constexpr (!kAsync) {
    if (n_first < n_hi)
      KVCopy::direct(Ks, kbase, k_ss, n_first, min(BN, tile.sk - n_first), d, vk);
  }

  float acc[MB][DTL][4];
  float m_i[MB][2], l_i[MB][2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      m_i[mb][hh] = neg_inf();
      l_i[mb][hh] = 0.f;  // this thread's share of the row sum; quad-reduced at the end
    }
#pragma unroll
    for (int t = 0; t < DTL; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mb][t][e] = 0.f;
  }

  for (int n0 = n_first; n0 < n_hi; n0 += BN) {
    const int cols_valid = min(BN, tile.sk - n0);
    if constexpr (kAsync) KVCopy::async_wait();
    __syncthreads();  // K_j in place; every warp is done with V_{j-1}
    if constexpr (kAsync) {
      KVCopy::async(Vs, vbase, v_ss, n0, cols_valid, d, vv);
    } else if constexpr (kStage) {
      vstage.load(vbase, v_ss, n0, cols_valid, d, vv);
    } else {
      KVCopy::direct(Vs, vbase, v_ss, n0, cols_valid, d, vv);
    }

    float s[MB][NTL][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int t = 0; t < NTL; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mb][t][e] = 0.f;
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) {
      unsigned qa[MB][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        if constexpr (kQRegs) {
#pragma unroll
          for (int r = 0; r < 4; ++r) qa[mb][r] = qreg[mb][kd][r];
        } else {
          ldsm_x4(qa[mb], q_lane + mb * 16 * kRowBytes + kd * 16 * sizeof(T));
        }
      }
#pragma unroll
      for (int np = 0; np < NTL / 2; ++np) {
        unsigned kb[4];
        ldsm_x4(kb, k_lane + np * 16 * kRowBytes + kd * 16 * sizeof(T));
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          Mma::k16(s[mb][2 * np], qa[mb], kb[0], kb[1]);
          Mma::k16(s[mb][2 * np + 1], qa[mb], kb[2], kb[3]);
        }
      }
    }

    // Scores stay raw (q.k) on interior tiles, with the scale folded into exp2's FFMA;
    // tiles that need masks or modifiers move to the log2 domain element by element.
    const bool interior = cs.interior(tile, n0, BN);
    // Without modifiers, masked tiles only need -inf outside each row's key range: two
    // integer compares per score.
    const float sc = has_mods ? 1.f : scale_log2;
    if constexpr ((FEAT & 1) != 0) {
      if (has_mods || !interior) {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int t = 0; t < NTL; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = m0 + wrow0 + mb * 16 + g + (e >> 1) * 8;
              const int j = n0 + t * 8 + tig * 2 + (e & 1);
              if (has_mods) {
                s[mb][t][e] = mods.apply(s[mb][t][e] * scale_log2, i, j);
              } else if (!mods.visible(i, j)) {
                s[mb][t][e] = neg_inf();
              }
            }
      }
    } else if (!interior) {
      const int row0 = m0 + wrow0 + g;
      const int col0 = n0 + tig * 2;
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          int lo, hi;
          mods.key_range(row0 + mb * 16 + hh * 8, lo, hi);
          lo -= col0;   // compared with the tile-relative key offsets below
          hi -= col0;
#pragma unroll
          for (int t = 0; t < NTL; ++t)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (t * 8 + e < lo || t * 8 + e >= hi) s[mb][t][2 * hh + e] = neg_inf();
        }
    }

    // The running row max m_i only moves, with the O and l rescale that costs, when some
    // row of the warp grew by more than kRescaleSlack (log2 units): otherwise
    // P = exp2(s - m_i) <= 2^kRescaleSlack, which fp16/bf16 P and the fp32 sums hold as
    // well, and out = O / l and lse = m + log2(l) are unchanged. Skips MB*D/2 FMULs and
    // 2*MB exp2 per lane on most tiles; the rare rescale recomputes the maxima rather
    // than keeping them live (at d128 128x64 those registers spilled).
    auto row_max = [&](int mb, int hh) {
      float v = neg_inf();
#pragma unroll
      for (int t = 0; t < NTL; ++t) v = fmaxf(v, fmaxf(s[mb][t][2 * hh], s[mb][t][2 * hh + 1]));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
      return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2)) * sc;
    };
    bool grow = false;
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) grow |= row_max(mb, hh) > m_i[mb][hh] + kRescaleSlack;
    if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float m_new = fmaxf(m_i[mb][hh], row_max(mb, hh));
          // Rows with no visible key yet keep m = -inf; 0 keeps exp2 at 0, not NaN.
          const float corr = fast_exp2(m_i[mb][hh] - (m_new == neg_inf() ? 0.f : m_new));
          l_i[mb][hh] *= corr;
          m_i[mb][hh] = m_new;
#pragma unroll
          for (int t = 0; t < DTL; ++t) {
            acc[mb][t][2 * hh] *= corr;
            acc[mb][t][2 * hh + 1] *= corr;
          }
        }
    }

    unsigned pa[MB][BN / 16][4];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float base = m_i[mb][hh] == neg_inf() ? 0.f : m_i[mb][hh];
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < NTL; ++t)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = fast_exp2(fmaf(s[mb][t][2 * hh + e], sc, -base));
            s[mb][t][2 * hh + e] = p;
            sum += p;
          }
        l_i[mb][hh] += sum;
      }
#pragma unroll
      for (int kn = 0; kn < BN / 16; ++kn) {
        pa[mb][kn][0] = Pack2<T, ARCH>::run(s[mb][2 * kn][0], s[mb][2 * kn][1]);
        pa[mb][kn][1] = Pack2<T, ARCH>::run(s[mb][2 * kn][2], s[mb][2 * kn][3]);
        pa[mb][kn][2] = Pack2<T, ARCH>::run(s[mb][2 * kn + 1][0], s[mb][2 * kn + 1][1]);
        pa[mb][kn][3] = Pack2<T, ARCH>::run(s[mb][2 * kn + 1][2], s[mb][2 * kn + 1][3]);
      }
    }

    // Dropout zeroes P after the row sums took it (lse and 1 / l are the undropped
    // softmax's; 1 / (1 - p) is folded into the final normalisation), on the packed
    // operand, where s is dead. A lane holds keys 2 tig, 2 tig + 1 of each n8 tile for rows
    // g and g + 8; lanes tig and tig ^ 1 share one aligned group of 4 keys, so each draws
    // that group for one of the two rows and they trade the other row's bits. The bits
    // are gathered first (4 per n8 tile, packed in registers) by a loop unrolled only by
    // 2: fully unrolled, the Philox calls' temporaries spilled at d128; not unrolled, each
    // call's 10-round dependency chain ran alone (2 chains: 12% faster at p = 0.1, d64).
    if (drop_threshold != 0u) {
      const Dropout drop(drop_seed, drop_offset, drop_threshold,
                         static_cast<unsigned>(b * hq + h));
      const int odd = tig & 1;
      unsigned keepw[(MB * NTL + 7) / 8];
#pragma unroll
      for (int w = 0; w < (MB * NTL + 7) / 8; ++w) {
        keepw[w] = 0u;
#pragma unroll 2
        for (int f = w * 8; f < min(w * 8 + 8, MB * NTL); ++f) {
          const int mb = f / NTL, t = f % NTL;
          const unsigned mine =
              drop.keep4(m0 + wrow0 + mb * 16 + g + odd * 8, (n0 + t * 8) / 4 + (tig >> 1));
          const unsigned other = __shfl_xor_sync(0xffffffffu, mine, 1);
          const unsigned row_lo = ((odd ? other : mine) >> (2 * odd)) & 3u;
          const unsigned row_hi = ((odd ? mine : other) >> (2 * odd)) & 3u;
          keepw[w] |= (row_lo | (row_hi << 2)) << (4 * (f - w * 8));
        }
      }
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int t = 0; t < NTL; ++t) {
          const int f = mb * NTL + t;
          const unsigned nib = keepw[f / 8] >> (4 * (f % 8));
          pa[mb][t / 2][2 * (t & 1)] &= keep_halves(nib);
          pa[mb][t / 2][2 * (t & 1) + 1] &= keep_halves(nib >> 2);
        }
    }

    if constexpr (kAsync) {
      KVCopy::async_wait();
    } else if constexpr (kStage) {
      vstage.store(Vs);
    }
    __syncthreads();  // V_j in place; every warp is done reading K_j
    const int n_next = n0 + BN;
    if (n_next < n_hi) {
      if constexpr (kAsync) {
        KVCopy::async(Ks, kbase, k_ss, n_next, min(BN, tile.sk - n_next), d, vk);
      } else if constexpr (kStage) {
        kstage.load(kbase, k_ss, n_next, min(BN, tile.sk - n_next), d, vk);
      } else {
        KVCopy::direct(Ks, kbase, k_ss, n_next, min(BN, tile.sk - n_next), d, vk);
      }
    }

#pragma unroll
    for (int kn = 0; kn < BN / 16; ++kn) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        unsigned vb[4];
        ldsm_x4_trans(vb, v_lane + kn * 16 * kRowBytes + dp * 16 * sizeof(T));
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          Mma::k16(acc[mb][2 * dp], pa[mb][kn], vb[0], vb[kV1]);
          Mma::k16(acc[mb][2 * dp + 1], pa[mb][kn], vb[kV2], vb[3]);
        }
      }
    }
    // Turing: every warp finished reading K_j before the barrier above.
    if constexpr (kStage) {
      if (n_next < n_hi) kstage.store(Ks);
    }
  }

#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float l = l_i[mb][hh];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int i = m0 + wrow0 + mb * 16 + g + hh * 8;
      if (i >= tile.sq) continue;
      // Fully masked rows: output 0 and lse = -inf (reference.py's convention). drop_scale
      // is dropout's 1 / (1 - p), 1 without dropout.
      const float inv = l > 0.f ? drop_scale / l : 0.f;
      T* orow = o + tile.q_at(b, o_sb, o_ss) + static_cast<long long>(i) * o_ss + h * o_sh;
      // o is the launcher's own contiguous array, so with d even every pair is 4-byte
      // aligned and goes out as one store.
#pragma unroll
      for (int t = 0; t < DTL; ++t) {
        const int col = t * 8 + tig * 2;
        const float lo = acc[mb][t][2 * hh] * inv, hi = acc[mb][t][2 * hh + 1] * inv;
        if (col + 1 < d && (d & 1) == 0) {
          *reinterpret_cast<unsigned*>(orow + col) = Pack2<T, ARCH>::run(lo, hi);
        } else {
          if (col < d) orow[col] = from_float<T>(lo);
          if (col + 1 < d) orow[col + 1] = from_float<T>(hi);
        }
      }
      if (lse != nullptr && tig == 0) {
        lse[tile.q_at(b, lse_sb, 1) + h * lse_sh + i] =
            l > 0.f ? (m_i[mb][hh] + __log2f(l)) * kLn2 : neg_inf();
      }
    }
}

}  // namespace portattn
