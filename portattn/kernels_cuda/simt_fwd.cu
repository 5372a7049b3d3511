// SIMT forward attention: runs on every arch from sm_50, no tensor-core assumptions.
//
// FlashAttention-2 structure: one CTA per (query tile, batch*head), K/V tiles streamed
// through shared memory, online softmax in the log2 domain with the scale folded into Q.
// Register-blocked like an SGEMM: thread (ty, tx) owns RM query rows, RN columns of each
// S tile and D/TX columns of O. The TX threads of a row group are consecutive lanes, so
// row max/sum are lane shuffles, never shared memory.
//
// Shared memory, all fp32 (fp16 in shared memory would cost a conversion per FMA):
//   Qs  [D][BM]  Q^T, pre-scaled     } transposed so the inner loops read RM rows / RN
//   KPs [D][BN]  K^T, then P^T [BN][BM] }  columns as one 16-byte vector each
//   Vs  [BN][D]  V
// The transposed arrays are XOR-swizzled in 8-column groups instead of padded: the
// staging stores (8 rows x 4 head-dim chunks per warp) hit 32 distinct banks, and the
// vector reads stay contiguous. Padding pushed head dim 64 x 64x64 tiles past 48 KB.
#include "common.cuh"

namespace portattn {

// Column swizzle for a transposed array with ROWS columns, applied in 8-column groups.
template <int ROWS>
__device__ __forceinline__ int swz(int row) {
  static_assert(ROWS >= 8 && (ROWS & (ROWS - 1)) == 0, "ROWS must be a power of two >= 8");
  return ((row >> 3) & (ROWS / 8 - 1)) << 3;
}

// dst[dd][r ^ swz(dd)] = scale * src[row0 + r][dd] for r < ROWS, dd < D (zero-filled past
// nrows / d). A warp covers 8 rows x 32 head-dim elements per step.
template <class T, int ROWS, int D, int NT>
__device__ __forceinline__ void stage_transposed(float* dst, const T* src, long long row_stride,
                                                 int row0, int nrows, int d, bool vec,
                                                 float scale) {
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
    for (int e = 0; e < 8; ++e) dst[(d0 + e) * ROWS + (r ^ swz<ROWS>(d0 + e))] = x[e] * scale;
  }
}

// dst[r][dd] = src[row0 + r][dd], row-major, zero-filled.
template <class T, int ROWS, int D, int NT>
__device__ __forceinline__ void stage_rows(float* dst, const T* src, long long row_stride,
                                           int row0, int nrows, int d, bool vec) {
  for (int u = threadIdx.x; u < ROWS * (D / 8); u += NT) {
    const int r = u / (D / 8), d0 = (u % (D / 8)) * 8;
    float x[8];
    const int n = r < nrows ? d - d0 : 0;
    load8(x, src + static_cast<long long>(row0 + r) * row_stride + d0, n, vec);
    float4* out = reinterpret_cast<float4*>(dst + r * D + d0);
    out[0] = make_float4(x[0], x[1], x[2], x[3]);
    out[1] = make_float4(x[4], x[5], x[6], x[7]);
  }
}

template <class T, int D, int BM, int BN, int NT, int TX>
__global__ void __launch_bounds__(NT, 1) simt_fwd_kernel(
    PORTATTN_FWD_PARAMS(T)) {
  constexpr int TY = NT / TX;
  constexpr int RM = BM / TY;        // query rows per thread
  constexpr int RN = BN / TX;        // S columns per thread
  constexpr int DC = D / TX;         // O columns per thread
  static_assert(TY * RM == BM && TX * RN == BN && TX * DC == D, "tile shape");
  static_assert(RN % 4 == 0 && DC % 4 == 0 && D % 32 == 0, "16-byte column groups");
  static_assert(32 % TX == 0, "a row group must sit inside one warp");

  extern __shared__ float4 smem_f4[];
  float* Qs = reinterpret_cast<float*>(smem_f4);
  float* KPs = Qs + D * BM;
  float* Vs = KPs + (D * BN > BN * BM ? D * BN : BN * BM);

  const int tid = threadIdx.x;
  const int tx = tid % TX, ty = tid / TX;
  const CtaTile t(BM, hq, group, sq, sk, cu_q, cu_k, align_br, win_right);
  if (t.rows_valid <= 0) return;
  const int b = t.b, h = t.h, hk = t.hk, m0 = t.m0, rows_valid = t.rows_valid;
  const CtaScores cs(t, bias, bias_kind, bias_sb, bias_sh, bias_sq, bias_sk, alibi, alibi_sb,
                     alibi_sh, softcap_log2, win_left, win_right);
  const ScoreMods& mods = cs.mods;
  const bool has_mods = mods.any();
  const int n_lo = cs.n_lo, n_hi = cs.n_hi;

  stage_transposed<T, BM, D, NT>(Qs, q + t.q_at(b, q_sb, q_ss) + h * q_sh, q_ss, m0, rows_valid, d,
                                 vec_flags & 1, scale_log2);

  float m_i[RM], l_i[RM], acc[RM][DC];
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    m_i[r] = neg_inf();
    l_i[r] = 0.f;  // this thread's share of the row sum; reduced once at the end
#pragma unroll
    for (int c = 0; c < DC; ++c) acc[r][c] = 0.f;
  }

  const T* kbase = k + t.k_at(b, k_sb, k_ss) + hk * k_sh;
  const T* vbase = v + t.k_at(b, v_sb, v_ss) + hk * v_sh;
  for (int n0 = n_lo / BN * BN; n0 < n_hi; n0 += BN) {
    const int cols_valid = min(BN, t.sk - n0);
    stage_transposed<T, BN, D, NT>(KPs, kbase, k_ss, n0, cols_valid, d, vec_flags & 2, 1.f);
    stage_rows<T, BN, D, NT>(Vs, vbase, v_ss, n0, cols_valid, d, vec_flags & 4);
    __syncthreads();

    float s[RM][RN];
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
      for (int c = 0; c < RN; ++c) s[r][c] = 0.f;
#pragma unroll 8
    for (int dd = 0; dd < D; ++dd) {
      float a[RM], kb[RN];
      lds_vec<RM>(a, Qs + dd * BM + ((ty * RM) ^ swz<BM>(dd)));
#pragma unroll
      for (int g = 0; g < RN / 4; ++g) {
        float t[4];
        lds_vec<4>(t, KPs + dd * BN + ((g * TX * 4 + tx * 4) ^ swz<BN>(dd)));
#pragma unroll
        for (int e = 0; e < 4; ++e) kb[g * 4 + e] = t[e];
      }
#pragma unroll
      for (int r = 0; r < RM; ++r)
#pragma unroll
        for (int c = 0; c < RN; ++c) s[r][c] = fmaf(a[r], kb[c], s[r][c]);
    }
    __syncthreads();  // every K^T read is done before P^T overwrites it

    // Interior tiles (fully visible to every row) skip the per-element work.
    const bool interior = cs.interior(t, n0, BN);
    // Without modifiers only the mask applies (kept apart from apply(), whose modifier
    // branches the compiler would otherwise predicate into every element).
    if (!interior || has_mods) {
#pragma unroll
      for (int r = 0; r < RM; ++r)
#pragma unroll
        for (int c = 0; c < RN; ++c) {
          const int i = m0 + ty * RM + r, j = n0 + (c / 4) * TX * 4 + tx * 4 + (c % 4);
          if (has_mods) {
            s[r][c] = mods.apply(s[r][c], i, j);
          } else if (!mods.visible(i, j)) {
            s[r][c] = neg_inf();
          }
        }
    }

#pragma unroll
    for (int r = 0; r < RM; ++r) {
      float mx = s[r][0];
#pragma unroll
      for (int c = 1; c < RN; ++c) mx = fmaxf(mx, s[r][c]);
      const float m_new = fmaxf(m_i[r], group_max<TX>(mx));
      // A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
      // exp2 at exactly 0 rather than NaN.
      const float base = m_new == neg_inf() ? 0.f : m_new;
      const float corr = fast_exp2(m_i[r] - base);
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < RN; ++c) {
        s[r][c] = fast_exp2(s[r][c] - base);
        sum += s[r][c];
      }
      l_i[r] = l_i[r] * corr + sum;
      m_i[r] = m_new;
#pragma unroll
      for (int c = 0; c < DC; ++c) acc[r][c] *= corr;
    }
    // Dropout zeroes P after the row sum took it (lse and 1 / l are the undropped
    // softmax's); 1 / (1 - p) is folded into the final normalisation. A thread's columns
    // come in aligned groups of 4 keys: one Philox call each, gathered into packed bits by
    // a loop that is not unrolled, so one call is live at a time (unrolled, the calls'
    // temporaries raised the kernel's register count, and so cut occupancy, even with
    // dropout off).
    if (drop_threshold != 0u) {
      const Dropout drop(drop_seed, drop_offset, drop_threshold,
                         static_cast<unsigned>(b * hq + h));
      constexpr int kWords = (RM * RN + 31) / 32;
      unsigned keepw[kWords];
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        keepw[w] = 0u;
#pragma unroll 1
        for (int f = w * 8; f < min(w * 8 + 8, RM * RN / 4); ++f) {
          const int r = f / (RN / 4), cg = f % (RN / 4);
          keepw[w] |= drop.keep4(m0 + ty * RM + r, (n0 + cg * TX * 4 + tx * 4) >> 2)
                      << (4 * (f - w * 8));
        }
      }
#pragma unroll
      for (int r = 0; r < RM; ++r)
#pragma unroll
        for (int c = 0; c < RN; ++c) {
          const int bit = r * RN + c;   // = 4 f + c % 4 for f = r * RN / 4 + c / 4
          if (!((keepw[bit / 32] >> (bit % 32)) & 1u)) s[r][c] = 0.f;
        }
    }
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
      for (int c = 0; c < RN; ++c) {
        const int j = (c / 4) * TX * 4 + tx * 4 + (c % 4);
        KPs[j * BM + ((ty * RM + r) ^ swz<BM>(j))] = s[r][c];
      }
    __syncthreads();

#pragma unroll 4
    for (int j = 0; j < BN; ++j) {
      float p[RM];
      lds_vec<RM>(p, KPs + j * BM + ((ty * RM) ^ swz<BM>(j)));
#pragma unroll
      for (int g = 0; g < DC / 4; ++g) {
        const float4 vv = *reinterpret_cast<const float4*>(Vs + j * D + g * TX * 4 + tx * 4);
#pragma unroll
        for (int r = 0; r < RM; ++r) {
          acc[r][g * 4 + 0] = fmaf(p[r], vv.x, acc[r][g * 4 + 0]);
          acc[r][g * 4 + 1] = fmaf(p[r], vv.y, acc[r][g * 4 + 1]);
          acc[r][g * 4 + 2] = fmaf(p[r], vv.z, acc[r][g * 4 + 2]);
          acc[r][g * 4 + 3] = fmaf(p[r], vv.w, acc[r][g * 4 + 3]);
        }
      }
    }
    __syncthreads();  // P^T and V reads done before the next tile is staged
  }

#pragma unroll
  for (int r = 0; r < RM; ++r) {
    const float l = group_sum<TX>(l_i[r]);
    const int i = m0 + ty * RM + r;
    if (i >= t.sq) continue;
    // Fully masked rows: output 0 and lse = -inf (reference.py's convention). drop_scale
    // is dropout's 1 / (1 - p), 1 without dropout.
    const float inv = l > 0.f ? drop_scale / l : 0.f;
    T* orow = o + t.q_at(b, o_sb, o_ss) + static_cast<long long>(i) * o_ss + h * o_sh;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int col = (c / 4) * TX * 4 + tx * 4 + (c % 4);
      if (col < d) orow[col] = from_float<T>(acc[r][c] * inv);
    }
    if (lse != nullptr && tx == 0) {
      lse[t.q_at(b, lse_sb, 1) + h * lse_sh + i] =
          l > 0.f ? (m_i[r] + __log2f(l)) * kLn2 : neg_inf();
    }
  }
}

}  // namespace portattn
