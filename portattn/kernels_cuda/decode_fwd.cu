// KV-cache decoding (flash_attn_with_kvcache): attention of a few query rows against a long,
// possibly paged cache, split across CTAs along the keys (Flash-Decoding), the splits merged
// by their lse in the last CTA of each group to finish, and the in-place append of new
// keys/values.
//
// Decode reads every cached K/V byte once and does little math per byte. Two attention
// kernels: decode_tc_kernel (below; sm_80+ with fp16/bf16, sm_75 with fp16, aligned rows)
// and this SIMT one for everything else, built around memory traffic: each key row is read
// by L = D/8 lanes with one 16-byte load each, a warp covers KW = 32/L keys per step, and U
// steps are issued before any of them is used, so every thread has 2*U 16-byte loads in
// flight.
// The GQA group's query heads and the query rows (packed row r = i * group + g) share one
// CTA, so a K/V byte is read once per KV head for up to R packed rows. Each warp keeps its
// own online softmax; warps and key groups merge once at the end.
#include "common.cuh"

namespace portattn {

#define PORTATTN_DECODE_PARAMS(T) \
    const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc, \
    T* __restrict__ o, float* __restrict__ lse, float* __restrict__ o_part, \
    float* __restrict__ lse_part, int* __restrict__ counters, const int* __restrict__ seqlens, \
    const int* __restrict__ cache_idx, const int* __restrict__ block_table, \
    const float* __restrict__ alibi, \
    long long q_sb, long long q_ss, long long q_sh, \
    long long k_sb, long long k_ss, long long k_sh, \
    long long v_sb, long long v_ss, long long v_sh, \
    long long o_sb, long long o_ss, long long o_sh, \
    long long bt_sb, long long alibi_sb, long long alibi_sh, \
    int batch, int seqlen_const, int s_new, int hq, int group, int sq, int d, \
    int page_size, int page_shift, int num_blocks, int capacity, \
    int win_left, int win_right, int top_left, float scale_log2, float softcap_log2, \
    int num_splits, int vec_flags

// Keys visible to row b: cached ones plus the appended ones, never past the capacity (the
// host checks this; the clamp keeps unchecked calls inside the cache).
__device__ __forceinline__ int row_seqlen(const int* seqlens, int seqlen_const, int s_new,
                                          int capacity, int b) {
  const int cached = seqlens ? __ldg(seqlens + b) : seqlen_const;
  return min(max(cached, 0) + s_new, capacity);
}

// The keys any row of a decode tile can see (rows r0 .. r0 + rows - 1; row r is query r / group
// of the packed GQA heads), then split ``split``'s even share [lo, hi) of them.
__device__ __forceinline__ void split_key_range(int r0, int rows, int group, int win_left,
                                                int win_right, int diag_off, int sk,
                                                int num_splits, int split, int& lo, int& hi) {
  const int i_first = r0 / group, i_last = (r0 + rows - 1) / group;
  const int n_lo = win_left >= 0 ? max(0, i_first + diag_off - win_left) : 0;
  const int n_hi = win_right >= 0 ? min(sk, i_last + diag_off + win_right + 1) : sk;
  const int chunk = (max(0, n_hi - n_lo) + num_splits - 1) / num_splits;
  lo = n_lo + split * chunk;
  hi = min(n_hi, lo + chunk);
}

// Element offsets (K, V) of logical key j of batch row b: a page of the block table, or a
// row of the contiguous cache (cache_idx picks it). Page indices are clamped for the same
// reason as the length.
// cache_batch_idx entries are clamped the same way (num_blocks is k_cache.shape[0] there).
struct KeyLocator {
  const int* table;   // this batch row's block-table row, or null
  long long row_k, row_v;
  long long k_sb, k_ss, v_sb, v_ss;
  int page_size, page_shift, num_blocks;

  // Batch row b's cache (its block-table row, or its cache row: cache_batch_idx clamped
  // into the cache like every index the kernels read) for KV head hk.
  __device__ __forceinline__ KeyLocator(const int* block_table, long long bt_sb,
                                        const int* cache_idx, int b, int hk, long long k_sb,
                                        long long k_sh, long long k_ss, long long v_sb,
                                        long long v_sh, long long v_ss, int page_size,
                                        int page_shift, int num_blocks)
      : table(block_table ? block_table + b * bt_sb : nullptr),
        k_sb(k_sb), k_ss(k_ss), v_sb(v_sb), v_ss(v_ss), page_size(page_size),
        page_shift(page_shift), num_blocks(num_blocks) {
    const long long crow = cache_idx ? min(max(__ldg(cache_idx + b), 0), num_blocks - 1) : b;
    row_k = crow * k_sb + hk * k_sh;
    row_v = crow * v_sb + hk * v_sh;
  }

  __device__ __forceinline__ void locate(int j, long long& ok, long long& ov) const {
    if (table) {
      const int idx = page_shift >= 0 ? (j >> page_shift) : j / page_size;
      const int slot = j - idx * page_size;
      const int page = min(max(__ldg(table + idx), 0), num_blocks - 1);
      ok = page * k_sb + slot * k_ss;
      ov = page * v_sb + slot * v_ss;
    } else {
      ok = row_k + j * k_ss;
      ov = row_v + j * v_ss;
    }
  }
};

// An L2 load (ld.global.cg): the partial results of other CTAs of this launch must not
// come from this SM's L1 or the read-only path.
__device__ __forceinline__ float ld_cg(const float* p) {
  float x;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(x) : "l"(p));
  return x;
}

// Split-KV merge without a second kernel: every CTA of a (batch, KV head, row tile) group
// writes its split's normalised output and lse, and the last to arrive (one atomic per CTA)
// merges all splits. It reads them in split order, so the result is the same whichever CTA
// arrives last, and resets the group's counter to 0 for the next launch on the stream.
// The merge is on the kernel's critical path (the last CTAs finish together), so each thread
// issues every load for a batch of kMergeElems output elements and kMergeSplits splits,
// lse values included, before using any: one L2 round trip per batch instead of one per
// element. Splits beyond a batch are folded in with an online max, like the key loop.
constexpr int kMergeElems = 4;
constexpr int kMergeSplits = 4;
template <class T, int NT>
__device__ __forceinline__ void combine_if_last(
    int* counter, const float* o_part, const float* lse_part, T* o, float* lse,
    long long o_sb, long long o_ss, long long o_sh, long long rows_total, int b, int hk,
    int hq, int group, int sq, int r0, int rows, int d, int num_splits) {
  __shared__ int last_s;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int last = atomicAdd(counter, 1) == num_splits - 1;
    if (last) *counter = 0;
    last_s = last;
  }
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  const int n = rows * d;
  for (int x0 = threadIdx.x; x0 < n; x0 += kMergeElems * NT) {
    long long lrow[kMergeElems];
    float m[kMergeElems], l[kMergeElems], acc[kMergeElems];
#pragma unroll
    for (int e = 0; e < kMergeElems; ++e) {
      const int x = min(x0 + e * NT, n - 1);
      const int pr = r0 + x / d;
      lrow[e] = (static_cast<long long>(b) * hq + hk * group + pr % group) * sq + pr / group;
      m[e] = neg_inf();
      l[e] = acc[e] = 0.f;
    }
    for (int s0 = 0; s0 < num_splits; s0 += kMergeSplits) {
      float lv[kMergeElems][kMergeSplits], ov[kMergeElems][kMergeSplits];
#pragma unroll
      for (int e = 0; e < kMergeElems; ++e) {
        const int col = min(x0 + e * NT, n - 1) % d;
#pragma unroll
        for (int u = 0; u < kMergeSplits; ++u) {
          const long long at = min(s0 + u, num_splits - 1) * rows_total + lrow[e];
          lv[e][u] = s0 + u < num_splits ? ld_cg(lse_part + at) : neg_inf();
          ov[e][u] = ld_cg(o_part + at * d + col);
        }
      }
#pragma unroll
      for (int e = 0; e < kMergeElems; ++e) {
        float mx = m[e];
#pragma unroll
        for (int u = 0; u < kMergeSplits; ++u) mx = fmaxf(mx, lv[e][u]);
        // Empty splits (and fully masked rows) have lse = -inf and weigh 0.
        const float shift = mx == neg_inf() ? 0.f : mx;
        const float c = fast_exp2((m[e] - shift) * kLog2e);
        l[e] *= c;
        acc[e] *= c;
#pragma unroll
        for (int u = 0; u < kMergeSplits; ++u) {
          const float w = fast_exp2((lv[e][u] - shift) * kLog2e);
          l[e] += w;
          acc[e] = fmaf(w, ov[e][u], acc[e]);
        }
        m[e] = mx;
      }
    }
#pragma unroll
    for (int e = 0; e < kMergeElems; ++e) {
      const int x = x0 + e * NT;
      if (x >= n) break;
      const int r = x / d, col = x - r * d, pr = r0 + r;
      o[b * o_sb + (pr / group) * o_ss + (hk * group + pr % group) * o_sh + col] =
          from_float<T>(l[e] > 0.f ? acc[e] / l[e] : 0.f);
      if (col == 0 && lse) lse[lrow[e]] = l[e] > 0.f ? m[e] + __logf(l[e]) : neg_inf();
    }
  }
}

// Eight consecutive elements kept in their storage type until used, so loads in flight
// cost 4 registers each (8 for fp32) instead of 8 floats.
template <class T>
struct Chunk {
  static constexpr int kWords = sizeof(T) == 2 ? 4 : 8;
  unsigned w[kWords];

  // Zeros past n; vec promises 16-byte alignment of p.
  __device__ __forceinline__ void load(const T* p, int n, bool vec) {
    if (vec && n >= 8) {
#pragma unroll
      for (int i = 0; i < kWords; i += 4) {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(p) + i / 4);
        w[i] = x.x; w[i + 1] = x.y; w[i + 2] = x.z; w[i + 3] = x.w;
      }
    } else if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
        const unsigned lo = 2 * i < n ? __ldg(h + 2 * i) : 0u;
        const unsigned hi = 2 * i + 1 < n ? __ldg(h + 2 * i + 1) : 0u;
        w[i] = lo | (hi << 16);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        w[i] = i < n ? __float_as_uint(__ldg(reinterpret_cast<const float*>(p) + i)) : 0u;
    }
  }
  __device__ __forceinline__ float get(int e) const {
    if constexpr (sizeof(T) == 2) {
      T h;
      h.bits = static_cast<unsigned short>((e & 1) ? (w[e >> 1] >> 16) : (w[e >> 1] & 0xffffu));
      return to_float(h);
    } else {
      return __uint_as_float(w[e]);
    }
  }
};

// Two CTAs per SM in the launch bounds: without it ptxas squeezed the 8-row 16-bit variants
// into 168 registers (3 CTAs) and spilled 4-16 bytes on sm_50..sm_75 once the split merge
// joined the kernel; the plan sizes SIMT splits for 2 CTAs/SM at 8 rows (DECODE_EST_REGS).
template <class T, int D, int R, int U, int NT>
__global__ void __launch_bounds__(NT, 2) decode_fwd_kernel(PORTATTN_DECODE_PARAMS(T)) {
  constexpr int L = D / 8;          // lanes per key row, 8 elements (16 bytes for 16-bit) each
  constexpr int KW = 32 / L;        // keys per warp step
  constexpr int NW = NT / 32;
  constexpr int STEP = KW * U;      // keys per warp iteration
  static_assert(L * 8 == D && (L & (L - 1)) == 0 && L >= 4 && L <= 32, "D = 8 * 2^k, 32..256");
  static_assert(NT % 32 == 0 && NW >= 1, "whole warps");

  // Q (pre-scaled) lives in shared memory: lanes of different key groups read the same
  // elements (a broadcast), and registers stay free for the accumulators and loads.
  __shared__ __align__(16) float q_s[R][D];
  __shared__ float red_o[R][D];
  __shared__ float red_m[R], red_l[R], slope_s[R];
  __shared__ int qi_s[R];

  const int hkv = hq / group;
  const int packed = group * sq;
  const int ntiles = (packed + R - 1) / R;
  const int split = static_cast<int>(blockIdx.x % num_splits);
  const int tile = static_cast<int>((blockIdx.x / num_splits) % ntiles);
  const int bh = static_cast<int>(blockIdx.x / num_splits / ntiles);
  const int b = bh / hkv, hk = bh % hkv;
  const int r0 = tile * R;
  const int rows = min(R, packed - r0);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kg = lane / L, kl = lane % L;
  const int d0 = kl * 8;
  const int dn = d - d0;            // valid elements of this lane's chunk (may be <= 0)

  const int sk = row_seqlen(seqlens, seqlen_const, s_new, capacity, b);
  const int diag_off = top_left ? 0 : sk - sq;

  ScoreMods mods;
  mods.softcap_log2 = softcap_log2;
  mods.alibi_log2 = 0.f;            // per row below: the packed rows span query heads
  mods.bias = nullptr;
  mods.bias_sq = mods.bias_sk = 0;
  mods.bias_kind = 0;
  mods.win_left = win_left;
  mods.win_right = win_right;
  mods.diag_off = diag_off;
  mods.sq = sq;
  mods.sk = sk;
  const bool per_element = win_left >= 0 || win_right >= 0 || softcap_log2 > 0.f;

  for (int x = threadIdx.x; x < R * (D / 8); x += NT) {
    const int r = x / (D / 8), c = (x % (D / 8)) * 8;
    const int pr = r0 + min(r, rows - 1);
    const int i = pr / group, h = hk * group + pr % group;
    float qf[8];
    load8(qf, q + b * q_sb + i * q_ss + h * q_sh + c, r < rows ? d - c : 0, vec_flags & 1);
#pragma unroll
    for (int e = 0; e < 8; ++e) q_s[r][c + e] = qf[e] * scale_log2;
    if (c == 0) {
      qi_s[r] = i;
      slope_s[r] = alibi ? kLog2e * __ldg(alibi + b * alibi_sb + h * alibi_sh) : 0.f;
    }
  }
  __syncthreads();

  float acc[R][8], m_i[R], l_i[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
    m_i[r] = neg_inf();
    l_i[r] = 0.f;
  }

  int lo, hi;
  split_key_range(r0, rows, group, win_left, win_right, diag_off, sk, num_splits, split, lo, hi);

  const KeyLocator loc(block_table, bt_sb, cache_idx, b, hk, k_sb, k_sh, k_ss, v_sb, v_sh,
                       v_ss, page_size, page_shift, num_blocks);
  const T* kbase = kc + (block_table ? hk * k_sh : 0) + d0;
  const T* vbase = vc + (block_table ? hk * v_sh : 0) + d0;
  const bool kvec = vec_flags & 2, vvec = vec_flags & 4;

  for (int base = lo + warp * STEP; base < hi; base += NW * STEP) {
    Chunk<T> kx[U], vx[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * KW + kg;
      ok[u] = j < hi;
      long long ko = 0, vo = 0;
      if (ok[u]) loc.locate(j, ko, vo);
      kx[u].load(kbase + ko, ok[u] ? dn : 0, kvec);
      vx[u].load(vbase + vo, ok[u] ? dn : 0, vvec);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;
      float qf[8];
      lds_vec<8>(qf, &q_s[r][d0]);
      float s[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(qf[e], kx[u].get(e), dot);
        dot = group_sum<L>(dot);
        const int j = base + u * KW + kg;
        if (!ok[u]) {
          dot = neg_inf();
        } else {
          if (per_element) dot = mods.apply(dot, qi_s[r], j);
          const float sl = slope_s[r];
          if (sl != 0.f) dot -= sl * fabsf(static_cast<float>(qi_s[r] + diag_off - j));
        }
        s[u] = dot;
      }
      float mx = s[0];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u]);
      const float m_new = fmaxf(m_i[r], mx);
      // A row that has seen only masked keys keeps m = -inf; subtracting 0 keeps exp2 at 0.
      const float shift = m_new == neg_inf() ? 0.f : m_new;
      const float corr = fast_exp2(m_i[r] - shift);
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u] = fast_exp2(s[u] - shift);
        sum += s[u];
      }
      l_i[r] = l_i[r] * corr + sum;
      m_i[r] = m_new;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float a = acc[r][e] * corr;
#pragma unroll
        for (int u = 0; u < U; ++u) a = fmaf(s[u], vx[u].get(e), a);
        acc[r][e] = a;
      }
    }
  }

  // Merge the key groups of each warp (lanes kl, kl + L, ...), then the warps.
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int off = L; off < 32; off <<= 1) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m_i[r], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l_i[r], off);
      const float m_new = fmaxf(m_i[r], m_o);
      const float shift = m_new == neg_inf() ? 0.f : m_new;
      const float c_self = fast_exp2(m_i[r] - shift), c_o = fast_exp2(m_o - shift);
      l_i[r] = l_i[r] * c_self + l_o * c_o;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float a_o = __shfl_xor_sync(0xffffffffu, acc[r][e], off);
        acc[r][e] = acc[r][e] * c_self + a_o * c_o;
      }
      m_i[r] = m_new;
    }
  }
  for (int w = 1; w < NW; ++w) {
    if (warp == w && kg == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int e = 0; e < 8; ++e) red_o[r][d0 + e] = acc[r][e];
        if (kl == 0) {
          red_m[r] = m_i[r];
          red_l[r] = l_i[r];
        }
      }
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float m_o = red_m[r], l_o = red_l[r];
        const float m_new = fmaxf(m_i[r], m_o);
        const float shift = m_new == neg_inf() ? 0.f : m_new;
        const float c_self = fast_exp2(m_i[r] - shift), c_o = fast_exp2(m_o - shift);
        l_i[r] = l_i[r] * c_self + l_o * c_o;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = acc[r][e] * c_self + red_o[r][d0 + e] * c_o;
        m_i[r] = m_new;
      }
    }
    __syncthreads();
  }
  const long long rows_total = static_cast<long long>(batch) * hq * sq;
  if (warp == 0 && kg == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;
      const int pr = r0 + r;
      const int i = pr / group, h = hk * group + pr % group;
      // Fully masked rows (and empty splits): output 0 and lse = -inf, never NaN.
      const float inv = l_i[r] > 0.f ? 1.f / l_i[r] : 0.f;
      const float row_lse = l_i[r] > 0.f ? (m_i[r] + __log2f(l_i[r])) * kLn2 : neg_inf();
      const long long lrow = (static_cast<long long>(b) * hq + h) * sq + i;
      if (o_part) {
        float* dst = o_part + (split * rows_total + lrow) * d + d0;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (e < dn) dst[e] = acc[r][e] * inv;
        if (kl == 0) lse_part[split * rows_total + lrow] = row_lse;
      } else {
        T* dst = o + b * o_sb + i * o_ss + h * o_sh + d0;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (e < dn) dst[e] = from_float<T>(acc[r][e] * inv);
        if (kl == 0 && lse) lse[lrow] = row_lse;
      }
    }
  }
  if (o_part)
    combine_if_last<T, NT>(counters + bh * ntiles + tile, o_part, lse_part, o, lse, o_sb, o_ss,
                           o_sh, rows_total, b, hk, hq, group, sq, r0, rows, d, num_splits);
}

// Tensor-core decode (sm_80+ fp16/bf16; sm_75 fp16 through m16n8k8). The SIMT kernel above
// spends ~0.4 instructions per K/V byte (conversions, per-key shuffle reductions, per-row
// softmax), more than an H100 can issue at its ~13 bytes/clock/SM of DRAM bandwidth;
// mma.sync takes the multiply-adds and conversions off the issue slots (~0.03 instructions
// per byte here).
//
// A warp handles 16 keys per step. S = Q K^T is m16n8k16 with the packed query rows as
// A (rows 8..15 of the tile unused and zero) and K as B: lane (g, t) loads key g of each
// half of the step, 16 bytes per 32 head-dim elements at offset 8t, and those 8 elements
// serve as its B registers of two k16 steps. Q's A registers follow the same head-dim
// order, so the permutation cancels in the dot product. The S accumulators (row g, keys
// 2t, 2t+1 of each half) are exactly the A registers of P for O = P V, and lane (g, t)
// loads V of those four keys at head-dim chunks 64c + 8g, one element per n-block, packing
// two keys' elements per B register with one byte permute; the output columns come out
// in that order and are put back when stored. Every fragment comes straight from global
// memory: 16 loads of 16 bytes per lane per step (d128) are in flight before any use.
// 16 bytes, or zeros where ok is false. The tensor-core plan requires 16-byte aligned
// rows and d % 8 == 0, so a lane's 8 elements are either all inside the head or all past it.
__device__ __forceinline__ void ld16(unsigned (&w)[4], const void* p, bool ok) {
  uint4 x = make_uint4(0u, 0u, 0u, 0u);
  if (ok) x = __ldg(reinterpret_cast<const uint4*>(p));
  w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
}

// The same 16 bytes with the streaming hints described at decode_tc_kernel when hint is set
// (L2::128B on Turing: ptxas accepts L2::256B from sm_80 on).
template <int ARCH>
__device__ __forceinline__ void ld16_stream(unsigned (&w)[4], const void* p, bool ok,
                                            bool hint) {
  if (ok && hint) {
    if constexpr (ARCH >= 80) {
      asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
    } else {
      asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
    }
  } else {
    ld16(w, p, ok);
  }
}

// One k16 step of S or O with only rows 0..7 of A in use (rows 8..15 are zero and their
// accumulators discarded). sm_80+: one m16n8k16. Turing (fp16 only, no bf16 MMA before
// sm_80): two m16n8k8, whose A/B registers are the k16 step's first and second halves.
template <class T, int ARCH> struct DecodeMma;
template <> struct DecodeMma<half_t, 80> {
  static __device__ __forceinline__ void run(float& c0, float& c1, unsigned a0, unsigned a2,
                                             unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("{\n .reg .f32 z0, z1;\n"
        " mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,z0,z1}, {%2,%4,%3,%4}, "
        "{%5,%6}, {%0,%1,%7,%7};\n}"
        : "+f"(c0), "+f"(c1) : "r"(a0), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.f));
#endif
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};
template <> struct DecodeMma<bf16_t, 80> {
  static __device__ __forceinline__ void run(float& c0, float& c1, unsigned a0, unsigned a2,
                                             unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("{\n .reg .f32 z0, z1;\n"
        " mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,z0,z1}, {%2,%4,%3,%4}, "
        "{%5,%6}, {%0,%1,%7,%7};\n}"
        : "+f"(c0), "+f"(c1) : "r"(a0), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.f));
#endif
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};
template <> struct DecodeMma<half_t, 75> {
  static __device__ __forceinline__ void run(float& c0, float& c1, unsigned a0, unsigned a2,
                                             unsigned b0, unsigned b1) {
    asm("{\n .reg .f32 z0, z1;\n"
        " mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,z0,z1}, {%2,%4}, {%5}, "
        "{%0,%1,%7,%7};\n"
        " mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,z0,z1}, {%3,%4}, {%6}, "
        "{%0,%1,%7,%7};\n}"
        : "+f"(c0), "+f"(c1) : "r"(a0), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.f));
  }
  // cvt.rn.f16x2.f32 needs sm_80: two scalar conversions.
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    return static_cast<unsigned>(from_float<half_t>(lo).bits) |
           (static_cast<unsigned>(from_float<half_t>(hi).bits) << 16);
  }
};

// Up to d128 all of a step's K and V loads are issued together (16 per lane at d128);
// d256's fragments would not fit in registers, so it loads V after S, 128 columns at a time.
//
// vec_flags bit 3: K/V loads carry L2::256B (a miss fetches the whole 256-byte block, so
// DRAM sees whole rows rather than the 64-byte pieces one K load instruction covers per
// key) and L1::no_allocate (each byte is used once).
template <class T, int D, int R, int BN, int NT, int ARCH>
__global__ void __launch_bounds__(NT) decode_tc_kernel(PORTATTN_DECODE_PARAMS(T)) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  constexpr int NW = NT / 32;
  constexpr int KC = D / 32;        // K loads per key per lane (two k16 steps each)
  constexpr int VC = D / 64;        // V loads per key per lane
  constexpr int NB = D / 8;         // n-blocks of O = P V
  constexpr int VG = D <= 128 ? VC : 2;   // V loads per key issued together
  constexpr bool kTwoChains = KC >= 4;
  static_assert(R == 8 && BN == 16 && D % 64 == 0 && NT % 32 == 0, "decode_tc shape");
  static_assert(sizeof(T) == 2, "16-bit inputs");
  using Mma = DecodeMma<T, ARCH>;

  // d256 parks each lane's Q registers in shared memory during the key loop (its own
  // words only, so no barrier); the cross-warp merge reuses the space afterwards.
  constexpr bool kQSmem = D > 128;
  __shared__ __align__(16) float red_o[NW][R][D];
  __shared__ float red_m[NW][R], red_l[NW][R];
  static_assert(!kQSmem || NW * 32 * KC * 16 <= sizeof(red_o), "Q parking fits");

  const int hkv = hq / group;
  const int packed = group * sq;
  const int ntiles = (packed + R - 1) / R;
  const int split = static_cast<int>(blockIdx.x % num_splits);
  const int tile = static_cast<int>((blockIdx.x / num_splits) % ntiles);
  const int bh = static_cast<int>(blockIdx.x / num_splits / ntiles);
  const int b = bh / hkv, hk = bh % hkv;
  const int r0 = tile * R;
  const int rows = min(R, packed - r0);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  uint4* q_park = reinterpret_cast<uint4*>(&red_o[0][0][0]) + warp * 32 * KC + lane;

  const int sk = row_seqlen(seqlens, seqlen_const, s_new, capacity, b);
  const int diag_off = top_left ? 0 : sk - sq;

  ScoreMods mods;
  mods.softcap_log2 = softcap_log2;
  mods.alibi_log2 = 0.f;
  mods.bias = nullptr;
  mods.bias_sq = mods.bias_sk = 0;
  mods.bias_kind = 0;
  mods.win_left = win_left;
  mods.win_right = win_right;
  mods.diag_off = diag_off;
  mods.sq = sq;
  mods.sk = sk;
  const bool per_element = win_left >= 0 || win_right >= 0 || softcap_log2 > 0.f;

  // This lane's query row (packed row r0 + g) and its A registers, in the K lanes' order.
  const bool row_ok = g < rows;
  const int pr = r0 + min(g, rows - 1);
  const int qi = pr / group, qh = hk * group + pr % group;
  const float slope = alibi && row_ok ? kLog2e * __ldg(alibi + b * alibi_sb + qh * alibi_sh)
                                      : 0.f;
  unsigned qa[KC][4];
#pragma unroll
  for (int c = 0; c < KC; ++c)
    ld16(qa[c], q + b * q_sb + qi * q_ss + qh * q_sh + 32 * c + 8 * t,
         row_ok && 32 * c + 8 * t < d);
  if constexpr (kQSmem) {
#pragma unroll
    for (int c = 0; c < KC; ++c)
      q_park[c * 32] = make_uint4(qa[c][0], qa[c][1], qa[c][2], qa[c][3]);
  }

  int lo, hi;
  split_key_range(r0, rows, group, win_left, win_right, diag_off, sk, num_splits, split, lo, hi);

  const KeyLocator loc(block_table, bt_sb, cache_idx, b, hk, k_sb, k_sh, k_ss, v_sb, v_sh,
                       v_ss, page_size, page_shift, num_blocks);
  const T* kbase = kc + (block_table ? hk * k_sh : 0) + 8 * t;
  const T* vbase = vc + (block_table ? hk * v_sh : 0) + 8 * g;

  float oacc[NB][2];
#pragma unroll
  for (int j = 0; j < NB; ++j) oacc[j][0] = oacc[j][1] = 0.f;
  float m_i = neg_inf(), l_i = 0.f;
  const bool hint = vec_flags & 8;

  for (int base = lo + warp * BN; base < hi; base += NW * BN) {
    unsigned kx[2][KC][4], vx[2][2][VG][4];
    const auto load_v = [&](int c0) {
#pragma unroll
      for (int kb = 0; kb < 2; ++kb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = base + kb * 8 + 2 * t + e;
          const bool ok = j < hi;
          long long ko = 0, vo = 0;
          if (ok) loc.locate(j, ko, vo);
#pragma unroll
          for (int c = 0; c < VG; ++c)
            ld16_stream<ARCH>(vx[kb][e][c], vbase + vo + 64 * (c0 + c),
                              ok && 64 * (c0 + c) + 8 * g < d, hint);
        }
      }
    };
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
      const int j = base + kb * 8 + g;
      const bool ok = j < hi;
      long long ko = 0, vo = 0;
      if (ok) loc.locate(j, ko, vo);
#pragma unroll
      for (int c = 0; c < KC; ++c)
        ld16_stream<ARCH>(kx[kb][c], kbase + ko + 32 * c, ok && 32 * c + 8 * t < d, hint);
    }
    if constexpr (VG == VC) load_v(0);

    // From d128 on, each key half's S accumulates in two chains (the first and second k16
    // step of every 32 columns), added at the end: the step's MMA dependency chain is KC
    // deep instead of 2 KC, and the key loop is latency-bound enough to show it (+0.2-0.4%,
    // benchmarks/NOTES.md, ninth session). At d64 the extra registers spilled.
    float s[2][2], s2[2][2];
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
      s[kb][0] = s[kb][1] = s2[kb][0] = s2[kb][1] = 0.f;
      float(&second)[2] = kTwoChains ? s2[kb] : s[kb];
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        if constexpr (kQSmem) {
          const uint4 x = q_park[c * 32];
          qa[c][0] = x.x; qa[c][1] = x.y; qa[c][2] = x.z; qa[c][3] = x.w;
        }
        Mma::run(s[kb][0], s[kb][1], qa[c][0], qa[c][1], kx[kb][c][0], kx[kb][c][1]);
        Mma::run(second[0], second[1], qa[c][2], qa[c][3], kx[kb][c][2], kx[kb][c][3]);
      }
      if constexpr (kTwoChains) {
        s[kb][0] += s2[kb][0];
        s[kb][1] += s2[kb][1];
      }
    }
    float mx = neg_inf();
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = base + kb * 8 + 2 * t + e;
        float x = s[kb][e] * scale_log2;
        if (j >= hi || !row_ok) {
          x = neg_inf();
        } else {
          if (per_element) x = mods.apply(x, qi, j);
          if (slope != 0.f) x -= slope * fabsf(static_cast<float>(qi + diag_off - j));
        }
        s[kb][e] = x;
        mx = fmaxf(mx, x);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m_i, mx);
    // A row that has seen only masked keys keeps m = -inf; subtracting 0 keeps exp2 at 0.
    const float shift = m_new == neg_inf() ? 0.f : m_new;
    const float corr = fast_exp2(m_i - shift);
    float sum = 0.f;
#pragma unroll
    for (int kb = 0; kb < 2; ++kb) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[kb][e] = fast_exp2(s[kb][e] - shift);
        sum += s[kb][e];
      }
    }
    l_i = l_i * corr + sum;
    m_i = m_new;
    const unsigned pa0 = Mma::pack(s[0][0], s[0][1]);
    const unsigned pa2 = Mma::pack(s[1][0], s[1][1]);
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      if constexpr (VG < VC) {
        if (jb % (8 * VG) == 0) load_v(jb / 8);
      }
      const int c = (jb / 8) % VG, w = (jb % 8) / 2;
      const unsigned sel = (jb & 1) ? 0x7632u : 0x5410u;
      const unsigned b0 = __byte_perm(vx[0][0][c][w], vx[0][1][c][w], sel);
      const unsigned b1 = __byte_perm(vx[1][0][c][w], vx[1][1][c][w], sel);
      oacc[jb][0] *= corr;
      oacc[jb][1] *= corr;
      Mma::run(oacc[jb][0], oacc[jb][1], pa0, pa2, b0, b1);
    }
  }

  // l_i is this lane's share of its row's keys; the row's four lanes hold one m_i.
  l_i += __shfl_xor_sync(0xffffffffu, l_i, 1);
  l_i += __shfl_xor_sync(0xffffffffu, l_i, 2);
  if constexpr (kQSmem) __syncthreads();
#pragma unroll
  for (int jb = 0; jb < NB; ++jb) {
    const int col = 64 * (jb / 8) + 16 * t + jb % 8;
    red_o[warp][g][col] = oacc[jb][0];
    red_o[warp][g][col + 8] = oacc[jb][1];
  }
  if (t == 0) {
    red_m[warp][g] = m_i;
    red_l[warp][g] = l_i;
  }
  __syncthreads();

  const long long rows_total = static_cast<long long>(batch) * hq * sq;
  for (int x = threadIdx.x; x < R * D; x += NT) {
    const int r = x / D, col = x % D;
    if (r >= rows || col >= d) continue;
    float mw = neg_inf();
#pragma unroll
    for (int w = 0; w < NW; ++w) mw = fmaxf(mw, red_m[w][r]);
    const float shift = mw == neg_inf() ? 0.f : mw;
    float lsum = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float cw = fast_exp2(red_m[w][r] - shift);
      lsum += red_l[w][r] * cw;
      acc += red_o[w][r][col] * cw;
    }
    const int prr = r0 + r;
    const int i = prr / group, h = hk * group + prr % group;
    // Fully masked rows (and empty splits): output 0 and lse = -inf, never NaN.
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
    const float row_lse = lsum > 0.f ? (mw + __log2f(lsum)) * kLn2 : neg_inf();
    const long long lrow = (static_cast<long long>(b) * hq + h) * sq + i;
    if (o_part) {
      o_part[(split * rows_total + lrow) * d + col] = acc * inv;
      if (col == 0) lse_part[split * rows_total + lrow] = row_lse;
    } else {
      o[b * o_sb + i * o_ss + h * o_sh + col] = from_float<T>(acc * inv);
      if (col == 0 && lse) lse[lrow] = row_lse;
    }
  }
  if (o_part)
    combine_if_last<T, NT>(counters + bh * ntiles + tile, o_part, lse_part, o, lse, o_sb, o_ss,
                           o_sh, rows_total, b, hk, hq, group, sq, r0, rows, d, num_splits);
#endif
}

// New keys/values of batch row b go to logical positions cache_seqlens[b] + t, through the
// block table or cache_idx exactly as the attention kernel reads them.
template <class T, int D, int R, int U, int NT>
__global__ void __launch_bounds__(NT) decode_append_kernel(
    const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ kc, T* __restrict__ vc,
    const int* __restrict__ seqlens, const int* __restrict__ cache_idx,
    const int* __restrict__ block_table,
    long long kn_sb, long long kn_ss, long long kn_sh,
    long long vn_sb, long long vn_ss, long long vn_sh,
    long long k_sb, long long k_ss, long long k_sh,
    long long v_sb, long long v_ss, long long v_sh, long long bt_sb,
    int seqlen_const, int s_new, int hkv, int d, int page_size, int num_blocks, int capacity,
    long long total) {
  for (long long idx = static_cast<long long>(blockIdx.x) * NT + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * NT) {
    const int e = static_cast<int>(idx % d);
    long long rest = idx / d;
    const int h = static_cast<int>(rest % hkv);
    rest /= hkv;
    const int t = static_cast<int>(rest % s_new);
    const int b = static_cast<int>(rest / s_new);
    const int cached = seqlens ? __ldg(seqlens + b) : seqlen_const;
    const int pos = max(cached, 0) + t;
    if (pos >= capacity) continue;
    long long ko, vo;
    if (block_table) {
      const int page = min(max(__ldg(block_table + b * bt_sb + pos / page_size), 0),
                           num_blocks - 1);
      const int slot = pos % page_size;
      ko = page * k_sb + slot * k_ss;
      vo = page * v_sb + slot * v_ss;
    } else {
      const long long crow = cache_idx ? min(max(__ldg(cache_idx + b), 0), num_blocks - 1) : b;
      ko = crow * k_sb + pos * k_ss;
      vo = crow * v_sb + pos * v_ss;
    }
    kc[ko + h * k_sh + e] = k[b * kn_sb + t * kn_ss + h * kn_sh + e];
    vc[vo + h * v_sh + e] = v[b * vn_sb + t * vn_ss + h * vn_sh + e];
  }
}

}  // namespace portattn
