// SIMT backward attention: runs on every arch from sm_50, no tensor-core assumptions.
//
// FlashAttention-2 structure, P recomputed from Q, K and the forward's lse (nothing of size
// seqlen^2 is stored). One kernel, four stages picked by the run-time ``stage`` argument
// (one compile per tile serves them all), launched in order by backward.py:
//   0 pre   delta_i = rowsum(dO_i * O_i) and lse in the log2 domain (common.cuh's
//           bwd_row_stage, as stage 3);
//   1 dkdv  one CTA per (key tile, batch, kv head): loops over the group's query heads and
//           the query tiles that can see the keys, accumulates dK and dV in registers (so
//           GQA sums over the group without repeating K/V), and, given dq_accum, adds this
//           tile's share of dQ with fp32 atomics;
//   2 dq    deterministic dQ: one CTA per (query tile, batch, head) looping over key tiles,
//           no atomics, so results do not depend on scheduling;
//   3 cvt   dq = dq_accum * softmax_scale in the input type (bwd_row_stage).
//
// Scores use the forward's log2 domain: Q is staged pre-scaled by softmax_scale*log2(e), so
// the same ScoreMods give the same s, P = exp2(s - lse2), dS = P (dP - delta) times the
// softcap derivative 1 - tanh^2. With Q~ = Q*scale*log2(e): dK = ln2 * dS^T Q~,
// dQ = scale * dS K, dV = P^T dO. With dropout the forward's mask Z is redrawn
// (philox.cuh): dV = (P Z / (1 - p))^T dO and dS = P (dP Z / (1 - p) - delta).
//
// Shared memory is fp32, every operand stored transposed ([head dim][rows], padded by one
// column): each thread reads its rows/columns as scalars that are either broadcast within
// a row group or fall on distinct banks (the odd row length spreads the TX lanes), which
// lets one copy of Q, dO, K and V serve every product (S, dP, dV, dK and dQ).
#include "common.cuh"

namespace portattn {

template <int D, int BM, int BN, int NT, int TX>
struct BwdTile {
  static constexpr int TY = NT / TX;
  static constexpr int RK = BN / TY;    // keys per thread in S^T / dP^T and dK / dV
  static constexpr int RQ = BM / TX;    // queries per thread in S^T / dP^T
  static constexpr int RQC = BM / TY;   // queries per thread in dQ
  static constexpr int DC = D / TX;     // head-dim columns per thread in dK / dV / dQ
  static constexpr int LM = BM + 1;     // padded row length of [D][BM] and [BN][BM] arrays
  static constexpr int LN = BN + 1;
  static_assert(TY * RK == BN && TX * RQ == BM && TY * RQC == BM && TX * DC == D, "tile");
  static_assert(BM % 8 == 0 && BN % 8 == 0 && D % 32 == 0 && 32 % TX == 0, "tile shape");
};

// dst[c * (ROWS + 1) + r] = scale * src[row0 + r][c] for r < ROWS, c < D, zero past
// nrows / d. A warp covers 8 rows x 32 head-dim elements per step; the odd row length
// puts the 4 head-dim chunks x 8 rows of one store on distinct banks.
template <class T, int ROWS, int D, int NT>
__device__ __forceinline__ void stage_cols(float* dst, const T* src, long long row_stride,
                                           int row0, int nrows, int d, bool vec, float scale) {
  constexpr int LD = ROWS + 1;
  constexpr int kUnits = (ROWS / 8) * (D / 32);
  const int lane = threadIdx.x & 31;
  const int lo = lane & 7, c = lane >> 3;
  for (int u = threadIdx.x >> 5; u < kUnits; u += NT / 32) {
    const int r = (u % (ROWS / 8)) * 8 + lo;
    const int d0 = ((u / (ROWS / 8)) * 4 + c) * 8;
    float x[8];
    const int n = r < nrows ? d - d0 : 0;
    load8(x, src + static_cast<long long>(row0 + r) * row_stride + d0, n, vec);
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[(d0 + e) * LD + r] = x[e] * scale;
  }
}

// S^T and dP^T for keys n0.. x queries m0.., then P and dS into shared memory ([BN][BM]).
// Thread (ty, tx) owns keys ty*RK + r and queries tx + TX*e.
template <int D, int BM, int BN, int NT, int TX>
__device__ __forceinline__ void probs_and_dscores(const float* Kt, const float* Vt,
                                                  const float* Qt, const float* dOt,
                                                  const float* lse2s, const float* deltas,
                                                  float* Ps, float* dSs, const ScoreMods& mods,
                                                  int m0, int n0, bool store_p,
                                                  const Dropout& drop, float drop_scale) {
  using G = BwdTile<D, BM, BN, NT, TX>;
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  // Dropout's keep bits (the forward's mask, philox.cuh), bit r * RQ + e for key r and
  // query e of this thread (RK * RQ <= 32 by the plan's S budget). Its RK keys are
  // consecutive: with RK % 4 == 0 one Philox call covers 4 of them, else one per key. The
  // calls run in a loop that is not unrolled, so one is live at a time, and before
  // the products, while the S and dP accumulators are not live yet.
  static_assert(G::RK * G::RQ <= 32, "keep bits fit one word");
  constexpr int kPer = G::RK % 4 == 0 ? 4 : 1;   // keys per Philox call used
  unsigned keepw = 0u;
  const bool dropping = drop.threshold != 0u;
  if (dropping) {
#pragma unroll 1
    for (int f = 0; f < (G::RK / kPer) * G::RQ; ++f) {
      const int r0 = (f / G::RQ) * kPer, e = f % G::RQ;
      const int j = n0 + ty * G::RK + r0;
      const unsigned bits = drop.keep4(m0 + tx + TX * e, j >> 2) >> (kPer == 4 ? 0 : j & 3);
#pragma unroll
      for (int x = 0; x < kPer; ++x) keepw |= ((bits >> x) & 1u) << ((r0 + x) * G::RQ + e);
    }
  }
  float s[G::RK][G::RQ], dp[G::RK][G::RQ];
#pragma unroll
  for (int r = 0; r < G::RK; ++r)
#pragma unroll
    for (int e = 0; e < G::RQ; ++e) s[r][e] = dp[r][e] = 0.f;
#pragma unroll 4
  for (int dd = 0; dd < D; ++dd) {
    float kk[G::RK], vv[G::RK], qq[G::RQ], oo[G::RQ];
#pragma unroll
    for (int r = 0; r < G::RK; ++r) {
      kk[r] = Kt[dd * G::LN + ty * G::RK + r];
      vv[r] = Vt[dd * G::LN + ty * G::RK + r];
    }
#pragma unroll
    for (int e = 0; e < G::RQ; ++e) {
      qq[e] = Qt[dd * G::LM + tx + TX * e];
      oo[e] = dOt[dd * G::LM + tx + TX * e];
    }
#pragma unroll
    for (int r = 0; r < G::RK; ++r)
#pragma unroll
      for (int e = 0; e < G::RQ; ++e) {
        s[r][e] = fmaf(kk[r], qq[e], s[r][e]);
        dp[r][e] = fmaf(vv[r], oo[e], dp[r][e]);
      }
  }
  const bool has_mods = mods.any();
#pragma unroll
  for (int r = 0; r < G::RK; ++r)
#pragma unroll
    for (int e = 0; e < G::RQ; ++e) {
      const int il = tx + TX * e, jl = ty * G::RK + r;
      const int i = m0 + il, j = n0 + jl;
      const float x = s[r][e];
      float sc = x;
      if (has_mods) {
        sc = mods.apply(x, i, j);
      } else if (!mods.visible(i, j)) {
        sc = neg_inf();
      }
      const float p = fast_exp2(sc - lse2s[il]);
      // With dropout, V saw Pd = P Z / (1 - p): dV takes Pd and dP is scaled alike.
      float pd = p, dpv = dp[r][e];
      if (dropping) {
        const bool kept = (keepw >> (r * G::RQ + e)) & 1u;
        pd = kept ? p * drop_scale : 0.f;
        dpv = kept ? dpv * drop_scale : 0.f;
      }
      float ds = p * (dpv - deltas[il]);
      if (mods.softcap_log2 > 0.f) {
        const float th = tanhf(x / mods.softcap_log2);
        ds *= 1.f - th * th;
      }
      if (store_p) Ps[jl * G::LM + il] = pd;
      dSs[jl * G::LM + il] = ds;
    }
}

// acc[r][e] += sum_j dS[query ty*RQC + r][j] * K[j][column tx + TX*e].
template <int D, int BM, int BN, int NT, int TX>
__device__ __forceinline__ void dq_product(
    float (&acc)[BwdTile<D, BM, BN, NT, TX>::RQC][BwdTile<D, BM, BN, NT, TX>::DC],
    const float* dSs, const float* Kt) {
  using G = BwdTile<D, BM, BN, NT, TX>;
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll 2
  for (int j = 0; j < BN; ++j) {
    float ds[G::RQC];
#pragma unroll
    for (int r = 0; r < G::RQC; ++r) ds[r] = dSs[j * G::LM + ty * G::RQC + r];
#pragma unroll
    for (int e = 0; e < G::DC; ++e) {
      const float kv = Kt[(tx + TX * e) * G::LN + j];
#pragma unroll
      for (int r = 0; r < G::RQC; ++r) acc[r][e] = fmaf(ds[r], kv, acc[r][e]);
    }
  }
}

// Values of the ``stage`` argument, in launch order (backward.BWD_STAGES).
constexpr int kStagePre = 0, kStageDkdv = 1, kStageDq = 2, kStageCvt = 3;

template <class T, int D, int BM, int BN, int NT, int TX>
__global__ void __launch_bounds__(NT, 1) simt_bwd_kernel(PORTATTN_BWD_PARAMS(T)) {
  if (stage == kStagePre || stage == kStageCvt) {
    bwd_row_stage<T, NT>(PORTATTN_BWD_ARGS);
  } else {
    using G = BwdTile<D, BM, BN, NT, TX>;
    extern __shared__ float4 smem_f4[];
    float* Kt = reinterpret_cast<float*>(smem_f4);
    float* Vt = Kt + D * G::LN;
    float* Qt = Vt + D * G::LN;
    float* dOt = Qt + D * G::LM;
    float* Ps = dOt + D * G::LM;
    float* dSs = Ps + BN * G::LM;
    float* lse2s = dSs + BN * G::LM;
    float* deltas = lse2s + BM;
    const int tid = threadIdx.x;
    const int tx = tid % TX, ty = tid / TX;

    // Row statistics of query tile m0 of head h; padding rows get lse2 = +inf, so P = 0.
    auto stage_rows_stats = [&](const SeqSpan& span, int b, int h, int m0, int rows_valid) {
      const long long base = span.q_at(b, st_sb, 1) + h * st_sh + m0;
      for (int il = tid; il < BM; il += NT) {
        const long long row = base + il;
        lse2s[il] = il < rows_valid ? lse2[row] : pos_inf();
        deltas[il] = il < rows_valid ? delta[row] : 0.f;
      }
    };

    if (stage == kStageDkdv) {
      const KeyTile kt(BN, hq, group, sq, sk, cu_q, cu_k, align_br, win_left, win_right);
      if (kt.cols_valid <= 0) return;
      const SeqSpan& span = kt;
      const int b = kt.b, hk = kt.hk, n0 = kt.n0, cols_valid = kt.cols_valid;
      const int diag_off = kt.diag_off, m_lo = kt.m_lo, m_hi = kt.m_hi;
      stage_cols<T, BN, D, NT>(Kt, k + span.k_at(b, k_sb, k_ss) + hk * k_sh, k_ss, n0,
                               cols_valid, d, vec_flags & 2, 1.f);
      stage_cols<T, BN, D, NT>(Vt, v + span.k_at(b, v_sb, v_ss) + hk * v_sh, v_ss, n0,
                               cols_valid, d, vec_flags & 4, 1.f);
      float dka[G::RK][G::DC], dva[G::RK][G::DC];
#pragma unroll
      for (int r = 0; r < G::RK; ++r)
#pragma unroll
        for (int e = 0; e < G::DC; ++e) dka[r][e] = dva[r][e] = 0.f;

      for (int hh = 0; hh < group; ++hh) {
        const int h = hk * group + hh;
        const ScoreMods mods =
            ScoreMods::for_head(b, h, bias, bias_kind, bias_sb, bias_sh, bias_sq, bias_sk,
                                alibi, alibi_sb, alibi_sh, softcap_log2, win_left, win_right,
                                diag_off, span.sq, span.sk);
        for (int m0 = max(m_lo, 0) / BM * BM; m0 < m_hi; m0 += BM) {
          const int rows_valid = min(BM, span.sq - m0);
          stage_cols<T, BM, D, NT>(Qt, q + span.q_at(b, q_sb, q_ss) + h * q_sh, q_ss, m0,
                                   rows_valid, d, vec_flags & 1, scale_log2);
          stage_cols<T, BM, D, NT>(dOt, dout + span.q_at(b, do_sb, do_ss) + h * do_sh, do_ss,
                                   m0, rows_valid, d, vec_flags & 16, 1.f);
          stage_rows_stats(span, b, h, m0, rows_valid);
          __syncthreads();
          probs_and_dscores<D, BM, BN, NT, TX>(
              Kt, Vt, Qt, dOt, lse2s, deltas, Ps, dSs, mods, m0, n0, true,
              Dropout(drop_seed, drop_offset, drop_threshold, static_cast<unsigned>(b * hq + h)),
              drop_scale);
          __syncthreads();
#pragma unroll 2
          for (int il = 0; il < BM; ++il) {
            float p[G::RK], ds[G::RK];
#pragma unroll
            for (int r = 0; r < G::RK; ++r) {
              p[r] = Ps[(ty * G::RK + r) * G::LM + il];
              ds[r] = dSs[(ty * G::RK + r) * G::LM + il];
            }
#pragma unroll
            for (int e = 0; e < G::DC; ++e) {
              const float ov = dOt[(tx + TX * e) * G::LM + il];
              const float qv = Qt[(tx + TX * e) * G::LM + il];
#pragma unroll
              for (int r = 0; r < G::RK; ++r) {
                dva[r][e] = fmaf(p[r], ov, dva[r][e]);
                dka[r][e] = fmaf(ds[r], qv, dka[r][e]);
              }
            }
          }
          if (dq_accum != nullptr) {
            float acc[G::RQC][G::DC];
#pragma unroll
            for (int r = 0; r < G::RQC; ++r)
#pragma unroll
              for (int e = 0; e < G::DC; ++e) acc[r][e] = 0.f;
            dq_product<D, BM, BN, NT, TX>(acc, dSs, Kt);
#pragma unroll
            for (int r = 0; r < G::RQC; ++r) {
              const int i = m0 + ty * G::RQC + r;
              if (i >= span.sq) continue;
              float* row = dq_accum + span.q_at(b, dq_sb, dq_ss) +
                           static_cast<long long>(i) * dq_ss + h * dq_sh;
#pragma unroll
              for (int e = 0; e < G::DC; ++e) {
                const int c = tx + TX * e;
                if (c < d) atomicAdd(row + c, acc[r][e]);
              }
            }
          }
          __syncthreads();  // every read of this query tile is done before the next is staged
        }
      }
#pragma unroll
      for (int r = 0; r < G::RK; ++r) {
        const int j = n0 + ty * G::RK + r;
        if (j >= span.sk) continue;
        T* krow = dk + span.k_at(b, dk_sb, dk_ss) + static_cast<long long>(j) * dk_ss +
                  hk * dk_sh;
        T* vrow = dv + span.k_at(b, dv_sb, dv_ss) + static_cast<long long>(j) * dv_ss +
                  hk * dv_sh;
#pragma unroll
        for (int e = 0; e < G::DC; ++e) {
          const int c = tx + TX * e;
          if (c < d) {
            krow[c] = from_float<T>(dka[r][e] * kLn2);
            vrow[c] = from_float<T>(dva[r][e]);
          }
        }
      }
    } else {
      const CtaTile t(BM, hq, group, sq, sk, cu_q, cu_k, align_br, win_right);
      if (t.rows_valid <= 0) return;
      const CtaScores cs(t, bias, bias_kind, bias_sb, bias_sh, bias_sq, bias_sk, alibi,
                         alibi_sb, alibi_sh, softcap_log2, win_left, win_right);
      stage_cols<T, BM, D, NT>(Qt, q + t.q_at(t.b, q_sb, q_ss) + t.h * q_sh, q_ss, t.m0,
                               t.rows_valid, d, vec_flags & 1, scale_log2);
      stage_cols<T, BM, D, NT>(dOt, dout + t.q_at(t.b, do_sb, do_ss) + t.h * do_sh, do_ss,
                               t.m0, t.rows_valid, d, vec_flags & 16, 1.f);
      stage_rows_stats(t, t.b, t.h, t.m0, t.rows_valid);
      float acc[G::RQC][G::DC];
#pragma unroll
      for (int r = 0; r < G::RQC; ++r)
#pragma unroll
        for (int e = 0; e < G::DC; ++e) acc[r][e] = 0.f;
      const T* kbase = k + t.k_at(t.b, k_sb, k_ss) + t.hk * k_sh;
      const T* vbase = v + t.k_at(t.b, v_sb, v_ss) + t.hk * v_sh;
      for (int n0 = cs.n_lo / BN * BN; n0 < cs.n_hi; n0 += BN) {
        const int cols_valid = min(BN, t.sk - n0);
        stage_cols<T, BN, D, NT>(Kt, kbase, k_ss, n0, cols_valid, d, vec_flags & 2, 1.f);
        stage_cols<T, BN, D, NT>(Vt, vbase, v_ss, n0, cols_valid, d, vec_flags & 4, 1.f);
        __syncthreads();
        probs_and_dscores<D, BM, BN, NT, TX>(
            Kt, Vt, Qt, dOt, lse2s, deltas, Ps, dSs, cs.mods, t.m0, n0, false,
            Dropout(drop_seed, drop_offset, drop_threshold,
                    static_cast<unsigned>(t.b * hq + t.h)),
            drop_scale);
        __syncthreads();
        dq_product<D, BM, BN, NT, TX>(acc, dSs, Kt);
        __syncthreads();  // K^T and dS reads done before the next key tile is staged
      }
#pragma unroll
      for (int r = 0; r < G::RQC; ++r) {
        const int i = t.m0 + ty * G::RQC + r;
        if (i >= t.sq) continue;
        T* row = dq + t.q_at(t.b, dq_sb, dq_ss) + static_cast<long long>(i) * dq_ss +
                 t.h * dq_sh;
#pragma unroll
        for (int e = 0; e < G::DC; ++e) {
          const int c = tx + TX * e;
          if (c < d) row[c] = from_float<T>(acc[r][e] * dq_scale);
        }
      }
    }
  }
}

}  // namespace portattn
