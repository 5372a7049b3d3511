// Tensor-core forward attention for Volta (sm_70: mma.sync.m8n8k4, fp16 in, fp32 accumulate).
//
// m8n8k4 is four independent 8x8x4 products per warp, one per quad pair (QP q = lanes
// 4q..4q+3 and 4q+16..4q+19), so its fragments differ from Turing's and Ampere's and this
// family has its own file. Each QP owns 8 query rows and a warp 32; where 32 rows x D of
// fp32 O would not fit in registers (D > 128), WD = 2 warps share one row group, each
// computing the whole S (the same P, bit for bit) but only its half of O's head dim.
//
// Per K/V tile, for a lane (t = lane % 4, h = lane / 16) of QP q:
//   S = Q K^T  A = Q (.row: row m = t + 4h, 4 consecutive d), B = K^T (.col: key t + 4h,
//              4 consecutive d); one 16-byte shared load feeds two k4 steps, and all QPs
//              read the same K rows (a broadcast)
//   softmax    the f32 C layout keeps row (t & 1) + 2e + 4h, e = 0/1, across lanes t and
//              t ^ 2: row statistics are one shuffle; online, log2 domain, scale in exp2
//   O += P V   A = P needs lane t to hold row t + 4h over 4 keys: one exchange of two
//              packed half2 with lane t ^ 2 per 8 keys; B = V (.row: key t, 4 consecutive
//              d of one V row), so V needs no transpose
// Q rows map to QP rows as 8q + (m ^ 4(q & 1)): the 8 lanes of each quarter warp then load
// 8 rows that are distinct modulo 8, which with rows padded to D + 8 halves puts their
// 16-byte loads in 8 different bank groups. Inside each 16-column group of O, MMA e covers
// d = 8(n / 4) + 4e + n % 4 so one 16-byte load of a V row feeds both MMAs.
// No ldmatrix or cp.async on Volta: K/V tiles are copied through registers, overlapped
// with compute where the staging fits (V_j during S_j, K_{j+1} during P V_j).
#include "tc_common.cuh"

namespace portattn {

template <class T, int D, int BM, int BN, int NT, int ARCH>
__global__ void __launch_bounds__(NT, 1) tc70_fwd_kernel(
    PORTATTN_FWD_PARAMS(T)) {
  constexpr int NW = NT / 32;
  constexpr int RW = BM / 32;          // row groups of 32 rows, one per warp (or WD warps)
  constexpr int WD = NW / RW;          // warps sharing a row group, each with D / WD of O
  constexpr int DW = D / WD;
  constexpr int NTL = BN / 8;          // n8 tiles of S
  constexpr int OTL = DW / 8;          // n8 tiles of O per warp
  constexpr int LD = D + 8;
  constexpr bool kStage = TileCopy<T, BN, D, NT>::kPerThread <= 4;
  static_assert(RW * 32 == BM && RW * WD == NW && DW % 16 == 0 && BN % 8 == 0 && D % 8 == 0,
                "tile shape");
  static_assert(ARCH == 70, "the m8n8k4 policy");
  using Mma = Mma884<T>;
  using QCopy = TileCopy<T, BM, D, NT>;
  using KVCopy = TileCopy<T, BN, D, NT>;

  extern __shared__ uint4 smem_u4[];
  T* Qs = reinterpret_cast<T*>(smem_u4);
  T* Ks = Qs + BM * LD;
  T* Vs = Ks + BN * LD;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t = lane & 3, qp = (lane >> 2) & 3, hi = lane >> 4;
  const int c0 = t & 2;                 // first S/O column this lane holds in an n8 tile
  const int flip = (qp & 1) * 4;
  const int wrow0 = (warp % RW) * 32;
  const int dbase = (warp / RW) * DW;
  // Row of this lane's Q fragment, and of its accumulator rows e = 0, 1, inside the tile.
  const int qrow = wrow0 + qp * 8 + ((t + 4 * hi) ^ flip);
  int crow[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) crow[e] = wrow0 + qp * 8 + (((t & 1) + 2 * e + 4 * hi) ^ flip);

  const CtaTile tile(BM, hq, group, sq, sk, cu_q, cu_k, align_br, win_right);
  if (tile.rows_valid <= 0) return;
  const int b = tile.b, h = tile.h, hk = tile.hk, m0 = tile.m0;
  const CtaScores cs(tile, bias, bias_kind, bias_sb, bias_sh, bias_sq, bias_sk, alibi,
                     alibi_sb, alibi_sh, softcap_log2, win_left, win_right);
  const ScoreMods& mods = cs.mods;
  // A negative scale reverses the max; the per-element path handles it exactly.
  const bool has_mods = mods.any() || scale_log2 < 0.f;
  const int n_lo = cs.n_lo, n_hi = cs.n_hi;
  const int n_first = n_lo / BN * BN;

  const T* qbase = q + tile.q_at(b, q_sb, q_ss) + h * q_sh;
  const T* kbase = k + tile.k_at(b, k_sb, k_ss) + hk * k_sh;
  const T* vbase = v + tile.k_at(b, v_sb, v_ss) + hk * v_sh;
  const bool vq = vec_flags & 1, vk = vec_flags & 2, vv = vec_flags & 4;

  QCopy::direct(Qs, qbase, q_ss, m0, tile.rows_valid, d, vq);
  if (n_first < n_hi)
    KVCopy::direct(Ks, kbase, k_ss, n_first, min(BN, tile.sk - n_first), d, vk);

  float acc[OTL][8];
  float m_i[2], l_i[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    m_i[e] = neg_inf();
    l_i[e] = 0.f;  // this lane's share of the row sum; reduced with lane t ^ 2 at the end
  }
#pragma unroll
  for (int o = 0; o < OTL; ++o)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[o][i] = 0.f;

  KVCopy kstage, vstage;  // register staging (elided where kStage is false)
  for (int n0 = n_first; n0 < n_hi; n0 += BN) {
    const int cols_valid = min(BN, tile.sk - n0);
    __syncthreads();  // K_j (and Q) in place; every warp is done with V_{j-1}
    if constexpr (kStage) {
      vstage.load(vbase, v_ss, n0, cols_valid, d, vv);
    } else {
      KVCopy::direct(Vs, vbase, v_ss, n0, cols_valid, d, vv);
    }

    float s[NTL][8];
#pragma unroll
    for (int j = 0; j < NTL; ++j)
#pragma unroll
      for (int i = 0; i < 8; ++i) s[j][i] = 0.f;
#pragma unroll
    for (int kd = 0; kd < D / 8; ++kd) {
      const uint4 qa = lds128(Qs + qrow * LD + kd * 8);
#pragma unroll
      for (int j = 0; j < NTL; ++j) {
        const uint4 kb = lds128(Ks + (j * 8 + t + 4 * hi) * LD + kd * 8);
        Mma::row_col(s[j], qa.x, qa.y, kb.x, kb.y);
        Mma::row_col(s[j], qa.z, qa.w, kb.z, kb.w);
      }
    }

    // Scores stay raw (q.k) on interior tiles, with the scale folded into exp2's FFMA;
    // tiles that need masks or modifiers move to the log2 domain element by element.
    const bool interior = cs.interior(tile, n0, BN);
    const float sc = has_mods ? 1.f : scale_log2;
    if (has_mods || !interior) {
#pragma unroll
      for (int j = 0; j < NTL; ++j)
#pragma unroll
        for (int x = 0; x < 8; ++x) {
          const int i = m0 + crow[(x >> 1) & 1];
          const int jj = n0 + j * 8 + c0 + (x & 1) + (x & 4);
          if (has_mods) {
            s[j][x] = mods.apply(s[j][x] * scale_log2, i, jj);
          } else if (!mods.visible(i, jj)) {
            s[j][x] = neg_inf();
          }
        }
    }

#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float mx = neg_inf();
#pragma unroll
      for (int j = 0; j < NTL; ++j)
        mx = fmaxf(mx, fmaxf(fmaxf(s[j][2 * e], s[j][2 * e + 1]),
                             fmaxf(s[j][2 * e + 4], s[j][2 * e + 5])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_i[e], mx * sc);
      // Rows with no visible key yet keep m = -inf; 0 keeps exp2 at 0, not NaN.
      const float base = m_new == neg_inf() ? 0.f : m_new;
      const float corr = fast_exp2(m_i[e] - base);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NTL; ++j)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int idx = 2 * e + (x & 1) + (x >> 1) * 4;
          const float p = fast_exp2(fmaf(s[j][idx], sc, -base));
          s[j][idx] = p;
          sum += p;
        }
      l_i[e] = l_i[e] * corr + sum;
      m_i[e] = m_new;
#pragma unroll
      for (int o = 0; o < OTL; ++o)
#pragma unroll
        for (int x = 0; x < 4; ++x) acc[o][2 * e + (x & 1) + (x >> 1) * 4] *= corr;
    }

    // P as the A operand: lane t then holds row t + 4h's 8 keys of each n8 tile.
    unsigned pa[NTL][4];
#pragma unroll
    for (int j = 0; j < NTL; ++j) c_to_a884<T, ARCH>(pa[j], s[j], c0);

    // Dropout zeroes P after the row sums took it (lse and 1 / l are the undropped
    // softmax's; 1 / (1 - p) is folded into the final normalisation), on the packed A
    // operand: lane t holds row qrow's 8 keys of each n8 tile, two Philox groups of 4.
    // The bits are gathered by a loop that is not unrolled (one call live at a time).
    if (drop_threshold != 0u) {
      const Dropout drop(drop_seed, drop_offset, drop_threshold,
                         static_cast<unsigned>(b * hq + h));
      unsigned keepw[(NTL + 3) / 4];
#pragma unroll
      for (int w = 0; w < (NTL + 3) / 4; ++w) {
        keepw[w] = 0u;
#pragma unroll 1
        for (int f = w * 8; f < min(w * 8 + 8, 2 * NTL); ++f)
          keepw[w] |= drop.keep4(m0 + qrow, n0 / 4 + f) << (4 * (f - w * 8));
      }
#pragma unroll
      for (int j = 0; j < NTL; ++j) {
        const unsigned byte = keepw[j / 4] >> (8 * (j % 4));   // keys j*8 .. j*8 + 7
#pragma unroll
        for (int x = 0; x < 4; ++x) pa[j][x] &= keep_halves(byte >> (2 * x));
      }
    }

    if constexpr (kStage) vstage.store(Vs);
    __syncthreads();  // V_j in place; every warp is done reading K_j
    const int n_next = n0 + BN;
    if (n_next < n_hi) {
      if constexpr (kStage) {
        kstage.load(kbase, k_ss, n_next, min(BN, tile.sk - n_next), d, vk);
      } else {
        KVCopy::direct(Ks, kbase, k_ss, n_next, min(BN, tile.sk - n_next), d, vk);
      }
    }

#pragma unroll
    for (int j = 0; j < NTL; ++j)
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        const T* vrow = Vs + (j * 8 + ks * 4 + t) * LD + dbase + 8 * hi;
#pragma unroll
        for (int g = 0; g < OTL / 2; ++g) {
          const uint4 vb = lds128(vrow + g * 16);
          Mma::row_row(acc[2 * g], pa[j][2 * ks], pa[j][2 * ks + 1], vb.x, vb.y);
          Mma::row_row(acc[2 * g + 1], pa[j][2 * ks], pa[j][2 * ks + 1], vb.z, vb.w);
        }
      }
    // Every warp finished reading K_j before the barrier above.
    if constexpr (kStage) {
      if (n_next < n_hi) kstage.store(Ks);
    }
  }

#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float l = l_i[e];
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int i = m0 + crow[e];
    if (i >= tile.sq) continue;
    // Fully masked rows: output 0 and lse = -inf (reference.py's convention). drop_scale
    // is dropout's 1 / (1 - p), 1 without dropout.
    const float inv = l > 0.f ? drop_scale / l : 0.f;
    T* orow = o + tile.q_at(b, o_sb, o_ss) + static_cast<long long>(i) * o_ss + h * o_sh;
#pragma unroll
    for (int o2 = 0; o2 < OTL; ++o2)
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const int col = dbase + (o2 >> 1) * 16 + x * 8 + (o2 & 1) * 4 + c0;
        if (col < d) orow[col] = from_float<T>(acc[o2][2 * e + 4 * x] * inv);
        if (col + 1 < d) orow[col + 1] = from_float<T>(acc[o2][2 * e + 4 * x + 1] * inv);
      }
    if (lse != nullptr && c0 == 0 && dbase == 0) {
      lse[tile.q_at(b, lse_sb, 1) + h * lse_sh + i] =
          l > 0.f ? (m_i[e] + __log2f(l)) * kLn2 : neg_inf();
    }
  }
}

}  // namespace portattn
