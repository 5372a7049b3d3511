// Tensor-core backward attention for Volta (sm_70: mma.sync.m8n8k4, fp16 in, fp32
// accumulate): the dK/dV stage with atomic dQ (stage 1 of simt_bwd.cu's numbering). The
// row stages (pre, cvt) run in tc_bwd.cu's row kernel and deterministic dQ on SIMT.
//
// The partitioning is tc_bwd.cu's (FlashAttention-2): one CTA per (key tile, batch, kv
// head), each warp owning 16 keys and their dK, dV (16 x D fp32) for the whole kernel
// while the CTA walks the group's query heads and the query tiles that see its keys.
// m8n8k4's four quad pairs (QP q: lanes 4q..4q+3, 4q+16..4q+19) are independent 8x8
// products; in a warp, QP q takes keys 8*kh .. 8*kh+7 of the warp's 16 (kh = q & 1) and
// half ch = q >> 1 of something else:
//   S^T  = K Q^T, dP^T = V dO^T   ch picks half the query tile: A = K / V rows (.row: key
//                       t + 4h, 4 consecutive d), B = Q / dO rows (.col: query t + 4h); one
//                       16-byte load feeds two k4 steps (tc70_fwd.cu's S = Q K^T)
//   P^T, dS^T           elementwise as tc_bwd.cu, on the f32 C layout (row (t & 1) + 2e + 4h,
//                       columns c0 + {0, 1, 4, 5}); one exchange with lane t ^ 2 per 8
//                       queries turns them into A operands (row t + 4h, 8 queries)
//   dV += P^T dO, dK += dS^T Q   ch picks half of the head dim (so dK + dV take D fp32 per
//                       lane): the QP needs P^T over all queries, and the other half comes
//                       from QP q ^ 2 (lane ^ 8, same keys) by one shuffle per register;
//                       B = dO / Q rows (.row: query t, 4 consecutive d), 16 bytes per two MMAs
//   dQ += dS K          dS^T goes to shared memory as 16-byte rows of the A operands; each
//                       warp computes a 32-query x DW-column block: A = dS (.col: key t,
//                       4 consecutive queries, 8 bytes), B = K rows (.row), then fp32 atomics
// Keys map to A rows as 8*kh + (m ^ 4kh): a quarter warp's 8 lanes then load 8 K rows that
// are distinct modulo 8, which with rows padded to D + 8 halves puts their 16-byte loads in
// 8 different bank groups (QPs 0 and 1, 2 and 3 read the same Q / dO rows: a broadcast).
// In dQ, QP q's 8 rows are queries 4q..4q+3 (lanes h = 0) and 16+4q..16+4q+3 (h = 1), and
// dS^T rows are BM rounded up to 32, plus 16 halves long: each half warp's 8-byte loads
// then fall in 16 different bank pairs.
// No cp.async on Volta: the query tile's Q and dO are copied at the top of each step
// (tc_bwd.cu's Turing form).
#include "tc_common.cuh"

namespace portattn {

template <class T, int D, int BM, int BN, int NT, int ARCH, int FEAT>
__global__ void __launch_bounds__(NT, 1) tc70_bwd_kernel(PORTATTN_BWD_PARAMS(T)) {
  constexpr int NW = NT / 32;
  constexpr int QH = BM / 2;            // queries per QP in S^T / dP^T
  constexpr int QT = QH / 8;            // their n8 tiles
  constexpr int DH = D / 2;             // dK / dV columns per QP
  constexpr int DG = DH / 16;           // 16-column groups: one 16-byte B load, two MMAs
  constexpr int LD = D + 8;
  constexpr int LS = (BM + 31) / 32 * 32 + 16;
  // dQ: RQ blocks of 32 queries x WQ blocks of DW columns, one per warp, in chunks of CW
  // columns (bounds the live accumulators next to dK and dV).
  constexpr int RQ = BM / 32, WQ = NW / RQ, DW = D / WQ;
  constexpr int CW = DW % 32 == 0 ? 32 : 16;
  static_assert(ARCH == 70, "the m8n8k4 policy");
  static_assert(BN == 16 * NW && BM % 32 == 0 && DH % 16 == 0, "tile shape");
  static_assert(RQ * WQ == NW && DW * WQ == D && DW % CW == 0, "dQ split");
  static_assert(QT * 8 <= 32, "one keep-bit word per thread");
  using Mma = Mma884<T>;
  using QCopy = TileCopy<T, BM, D, NT>;
  using KCopy = TileCopy<T, BN, D, NT>;

  if (stage != 1) return;

  extern __shared__ uint4 smem_u4[];
  T* Ks = reinterpret_cast<T*>(smem_u4);
  T* Vs = Ks + BN * LD;
  T* Qs = Vs + BN * LD;
  T* dOs = Qs + BM * LD;
  T* dSt = dOs + BM * LD;
  float* lse2s = reinterpret_cast<float*>(dSt + BN * LS);
  float* deltas = lse2s + BM;

  const KeyTile kt(BN, hq, group, sq, sk, cu_q, cu_k, align_br, win_left, win_right,
                   kLptCtasTuringBwd);
  if (kt.cols_valid <= 0) return;
  const SeqSpan& span = kt;
  const int b = kt.b, hk = kt.hk, n0 = kt.n0, cols_valid = kt.cols_valid;
  const int diag_off = kt.diag_off, m_lo = kt.m_lo, m_hi = kt.m_hi;
  const int m_start = m_lo / BM * BM;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
  const int t = lane & 3, qp = (lane >> 2) & 3, hi = lane >> 4;
  const int kh = qp & 1, ch = qp >> 1, c0 = t & 2;
  // This lane's A-row key (S^T, dP^T, dV, dK) and its two C-row keys, within the tile.
  const int key_a = warp * 16 + kh * 8 + ((t + 4 * hi) ^ (4 * kh));
  int key_c[2];
#pragma unroll
  for (int e = 0; e < 2; ++e)
    key_c[e] = warp * 16 + kh * 8 + (((t & 1) + 2 * e + 4 * hi) ^ (4 * kh));

  const T* kbase = k + span.k_at(b, k_sb, k_ss) + hk * k_sh;
  const T* vbase = v + span.k_at(b, v_sb, v_ss) + hk * v_sh;
  const bool vq = vec_flags & 1, vk = vec_flags & 2, vv = vec_flags & 4, vdo = vec_flags & 16;
  KCopy::direct(Ks, kbase, k_ss, n0, cols_valid, d, vk);
  KCopy::direct(Vs, vbase, v_ss, n0, cols_valid, d, vv);

  float dka[DG][2][8], dva[DG][2][8];
#pragma unroll
  for (int g = 0; g < DG; ++g)
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int x = 0; x < 8; ++x) dka[g][m][x] = dva[g][m][x] = 0.f;

  // Query tiles in a rotated order, as tc_bwd.cu does on Turing: key tiles of one (batch,
  // head) then add into different dQ rows at once instead of queueing on the same ones.
  const int ntiles = (m_hi - m_start + BM - 1) / BM;
  const int rot = ntiles > 0 ? (n0 / BN) % ntiles : 0;
  int hh = ntiles > 0 ? 0 : group, it = 0;
  while (hh < group) {
    const int r = it + rot;
    const int cur_m0 = m_start + BM * (r >= ntiles ? r - ntiles : r);
    const int h = hk * group + hh;
    if (++it == ntiles) {
      ++hh;
      it = 0;
    }
    __syncthreads();  // every warp is done with the previous tile's Q, dO and dS^T
    {
      // Rows past the sequence get lse2 = +inf, so their P (and dS) is exactly 0.
      const int rows_valid = min(BM, span.sq - cur_m0);
      QCopy::direct(Qs, q + span.q_at(b, q_sb, q_ss) + h * q_sh, q_ss, cur_m0, rows_valid, d, vq);
      QCopy::direct(dOs, dout + span.q_at(b, do_sb, do_ss) + h * do_sh, do_ss, cur_m0,
                    rows_valid, d, vdo);
      const long long base = span.q_at(b, st_sb, 1) + h * st_sh + cur_m0;
      for (int il = tid; il < BM; il += NT) {
        lse2s[il] = il < rows_valid ? lse2[base + il] : pos_inf();
        deltas[il] = il < rows_valid ? delta[base + il] : 0.f;
      }
    }
    __syncthreads();  // K, V (first step), Q, dO and the statistics in place

    float s[QT][8], dp[QT][8];
#pragma unroll
    for (int j = 0; j < QT; ++j)
#pragma unroll
      for (int x = 0; x < 8; ++x) s[j][x] = dp[j][x] = 0.f;
#pragma unroll 2
    for (int kd = 0; kd < D / 8; ++kd) {
      const uint4 ka = lds128(Ks + key_a * LD + kd * 8);
      const uint4 va = lds128(Vs + key_a * LD + kd * 8);
#pragma unroll
      for (int j = 0; j < QT; ++j) {
        const int qrow = ch * QH + j * 8 + t + 4 * hi;
        const uint4 qb = lds128(Qs + qrow * LD + kd * 8);
        const uint4 ob = lds128(dOs + qrow * LD + kd * 8);
        Mma::row_col(s[j], ka.x, ka.y, qb.x, qb.y);
        Mma::row_col(s[j], ka.z, ka.w, qb.z, qb.w);
        Mma::row_col(dp[j], va.x, va.y, ob.x, ob.y);
        Mma::row_col(dp[j], va.z, va.w, ob.z, ob.w);
      }
    }

    const ScoreMods mods =
        ScoreMods::for_head(b, h, bias, bias_kind, bias_sb, bias_sh, bias_sq, bias_sk, alibi,
                            alibi_sb, alibi_sh, softcap_log2, win_left, win_right, diag_off,
                            span.sq, span.sk);
    const bool has_mods = (FEAT & 1) != 0 && mods.any();
    // This lane's first query (element x adds (x & 1) + (x & 4), tile j adds 8j).
    const int qcol = ch * QH + c0;
    // Without modifiers a score is kept where its query lies in its key's visible range:
    // two integer compares per score, no branch (tc_bwd.cu's form).
    int q_lo[2], q_hi[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      mods.query_range(n0 + key_c[e], q_lo[e], q_hi[e]);
      q_lo[e] -= cur_m0 + qcol;
      q_hi[e] -= cur_m0 + qcol;
    }
    // Dropout's keep bits of this thread's QT * 8 elements, drawn in a rolled loop (see
    // tc_bwd.cu); bit j * 8 + x is element x of tile j.
    unsigned keep = 0u;
    if (drop_threshold != 0u) {
      const Dropout drop(drop_seed, drop_offset, drop_threshold,
                         static_cast<unsigned>(b * hq + h));
#pragma unroll 1
      for (int x = 0; x < QT * 8; ++x) {
        const int i = cur_m0 + qcol + (x >> 3) * 8 + (x & 1) + (x & 4);
        const int j = n0 + key_c[(x >> 1) & 1];
        keep |= ((drop.keep4(i, j >> 2) >> (j & 3)) & 1u) << x;
      }
    }
#pragma unroll
    for (int j = 0; j < QT; ++j) {
      const float2 l2[2] = {*reinterpret_cast<const float2*>(lse2s + qcol + j * 8),
                            *reinterpret_cast<const float2*>(lse2s + qcol + j * 8 + 4)};
      const float2 dl[2] = {*reinterpret_cast<const float2*>(deltas + qcol + j * 8),
                            *reinterpret_cast<const float2*>(deltas + qcol + j * 8 + 4)};
#pragma unroll
      for (int x = 0; x < 8; ++x) {
        const int e = (x >> 1) & 1, iq = j * 8 + (x & 1) + (x & 4);
        const float lse_x = (x & 1) ? l2[x >> 2].y : l2[x >> 2].x;
        const float del_x = (x & 1) ? dl[x >> 2].y : dl[x >> 2].x;
        float p;
        if constexpr ((FEAT & 1) == 0) {
          p = fast_exp2(fmaf(s[j][x], scale_log2, -lse_x));
          if (iq < q_lo[e] || iq >= q_hi[e]) p = 0.f;
        } else {
          const int i = cur_m0 + qcol + iq, jk = n0 + key_c[e];
          p = fast_exp2(mods.masked(s[j][x] * scale_log2, i, jk, has_mods) - lse_x);
        }
        float pd = p, dpv = dp[j][x];
        if (drop_threshold != 0u) {
          const bool kept = (keep >> (j * 8 + x)) & 1u;
          pd = kept ? p * drop_scale : 0.f;
          dpv = kept ? dpv * drop_scale : 0.f;
        }
        float ds = p * (dpv - del_x);
        if (has_mods && softcap_log2 > 0.f) {
          const float th = tanhf(s[j][x] * scale_log2 / softcap_log2);
          ds *= 1.f - th * th;
        }
        s[j][x] = pd;
        dp[j][x] = ds;
      }
    }

    // P^T and dS^T as A operands: lane t then holds key row t + 4h's 8 queries per n8 tile.
    unsigned pa[QT][4], dsa[QT][4];
#pragma unroll
    for (int j = 0; j < QT; ++j) {
      c_to_a884<T, ARCH>(pa[j], s[j], c0);
      c_to_a884<T, ARCH>(dsa[j], dp[j], c0);
    }
    if (dq_accum != nullptr) {
#pragma unroll
      for (int j = 0; j < QT; ++j)
        *reinterpret_cast<uint4*>(dSt + key_a * LS + ch * QH + j * 8) =
            make_uint4(dsa[j][0], dsa[j][1], dsa[j][2], dsa[j][3]);
    }

    // dV += P^T dO and dK += dS^T Q over all BM queries: src 0 is this QP's half, src 1 the
    // other half from QP q ^ 2.
#pragma unroll
    for (int j = 0; j < QT; ++j)
#pragma unroll
      for (int src = 0; src < 2; ++src) {
        unsigned a_p[4], a_s[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          a_p[r] = src ? __shfl_xor_sync(0xffffffffu, pa[j][r], 8) : pa[j][r];
          a_s[r] = src ? __shfl_xor_sync(0xffffffffu, dsa[j][r], 8) : dsa[j][r];
        }
        const int q0 = (ch ^ src) * QH + j * 8;
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          const int off = (q0 + ks * 4 + t) * LD + ch * DH + 8 * hi;
#pragma unroll
          for (int g = 0; g < DG; ++g) {
            const uint4 ob = lds128(dOs + off + g * 16);
            Mma::row_row(dva[g][0], a_p[2 * ks], a_p[2 * ks + 1], ob.x, ob.y);
            Mma::row_row(dva[g][1], a_p[2 * ks], a_p[2 * ks + 1], ob.z, ob.w);
            const uint4 qb = lds128(Qs + off + g * 16);
            Mma::row_row(dka[g][0], a_s[2 * ks], a_s[2 * ks + 1], qb.x, qb.y);
            Mma::row_row(dka[g][1], a_s[2 * ks], a_s[2 * ks + 1], qb.z, qb.w);
          }
        }
      }

    if (dq_accum != nullptr) {
      __syncthreads();  // dS^T of every warp in place
      const int qa = (warp % RQ) * 32 + 16 * hi + 4 * qp;   // this lane's 4 A-row queries
      const int c_first = (warp / RQ) * DW;
      // C rows (t & 1) + 2e + 4h are queries qa + (t & 1) + 2e.
      const int i0 = cur_m0 + qa + (t & 1);
      float* dq0 = dq_accum + span.q_at(b, dq_sb, dq_ss) + static_cast<long long>(i0) * dq_ss +
                   h * dq_sh + c_first + c0;
#pragma unroll 1
      for (int jc = 0; jc < DW / CW; ++jc) {
        float acc[CW / 16][2][8];
#pragma unroll
        for (int g = 0; g < CW / 16; ++g)
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int x = 0; x < 8; ++x) acc[g][m][x] = 0.f;
#pragma unroll 4
        for (int kk = 0; kk < BN / 4; ++kk) {
          const uint2 a = *reinterpret_cast<const uint2*>(dSt + (kk * 4 + t) * LS + qa);
#pragma unroll
          for (int g = 0; g < CW / 16; ++g) {
            const uint4 kb =
                lds128(Ks + (kk * 4 + t) * LD + c_first + jc * CW + g * 16 + 8 * hi);
            Mma::col_row(acc[g][0], a.x, a.y, kb.x, kb.y);
            Mma::col_row(acc[g][1], a.x, a.y, kb.z, kb.w);
          }
        }
        // Element x of MMA m in group g: query i0 + 2((x >> 1) & 1), column
        // c_first + jc*CW + 16g + 8((x >> 2) & 1) + 4m + c0 + (x & 1).
#pragma unroll
        for (int g = 0; g < CW / 16; ++g)
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int x = 0; x < 8; ++x) {
              const int dc = jc * CW + g * 16 + ((x >> 2) & 1) * 8 + 4 * m + (x & 1);
              const int e = (x >> 1) & 1;
              if (i0 + 2 * e < span.sq && c_first + c0 + dc < d)
                atomicAdd(dq0 + 2 * e * dq_ss + dc, acc[g][m][x]);
            }
      }
    }
  }

#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int j = n0 + key_c[e];
    if (j >= span.sk) continue;
    T* krow = dk + span.k_at(b, dk_sb, dk_ss) + static_cast<long long>(j) * dk_ss + hk * dk_sh;
    T* vrow = dv + span.k_at(b, dv_sb, dv_ss) + static_cast<long long>(j) * dv_ss + hk * dv_sh;
#pragma unroll
    for (int g = 0; g < DG; ++g)
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int x = 0; x < 8; ++x) {
          if (((x >> 1) & 1) != e) continue;
          const int col = ch * DH + g * 16 + ((x >> 2) & 1) * 8 + 4 * m + c0 + (x & 1);
          if (col < d) {
            krow[col] = from_float<T>(dka[g][m][x] * dq_scale);
            vrow[col] = from_float<T>(dva[g][m][x]);
          }
        }
  }
}

}  // namespace portattn
