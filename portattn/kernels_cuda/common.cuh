// Device helpers shared by every portattn kernel family.
// No CUDA headers are included: NVRTC 11.x-13.x all compile this as-is, and the element
// types are plain 16-bit payloads converted with PTX that exists on every target (sm_50+).
#pragma once
#include "philox.cuh"

// Dropout (philox.cuh) is the last four arguments of both lists: drop_threshold 0 turns it
// off, drop_scale is 1 / (1 - p) (1 when off).

// The forward kernels' argument list, in the order api._launch passes it (one place, so
// the families and the launcher cannot drift apart).
#define PORTATTN_FWD_PARAMS(T) \
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, \
    T* __restrict__ o, float* __restrict__ lse, const void* __restrict__ bias, \
    const float* __restrict__ alibi, const int* __restrict__ cu_q, \
    const int* __restrict__ cu_k, \
    long long q_sb, long long q_ss, long long q_sh, \
    long long k_sb, long long k_ss, long long k_sh, \
    long long v_sb, long long v_ss, long long v_sh, \
    long long o_sb, long long o_ss, long long o_sh, \
    long long lse_sb, long long lse_sh, \
    long long bias_sb, long long bias_sh, long long bias_sq, long long bias_sk, \
    long long alibi_sb, long long alibi_sh, \
    int hq, int group, int sq, int sk, int d, \
    int win_left, int win_right, int align_br, \
    float scale_log2, float softcap_log2, int bias_kind, int vec_flags, \
    unsigned long long drop_seed, unsigned drop_offset, unsigned drop_threshold, \
    float drop_scale

// The backward kernels' argument list, in the order backward._launch_bwd passes it: every
// backward family takes it, so a stage's kernel can come from any family.
#define PORTATTN_BWD_PARAMS(T) \
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, \
    const T* __restrict__ o, const T* __restrict__ dout, const float* __restrict__ lse, \
    float* __restrict__ lse2, float* __restrict__ delta, float* __restrict__ dq_accum, \
    T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv, \
    const void* __restrict__ bias, const float* __restrict__ alibi, \
    const int* __restrict__ cu_q, const int* __restrict__ cu_k, \
    long long q_sb, long long q_ss, long long q_sh, \
    long long k_sb, long long k_ss, long long k_sh, \
    long long v_sb, long long v_ss, long long v_sh, \
    long long o_sb, long long o_ss, long long o_sh, \
    long long do_sb, long long do_ss, long long do_sh, \
    long long lse_sb, long long lse_sh, long long lse_ss, long long st_sb, long long st_sh, \
    long long dq_sb, long long dq_ss, long long dq_sh, \
    long long dk_sb, long long dk_ss, long long dk_sh, \
    long long dv_sb, long long dv_ss, long long dv_sh, \
    long long bias_sb, long long bias_sh, long long bias_sq, long long bias_sk, \
    long long alibi_sb, long long alibi_sh, \
    int batch, int hq, int group, int sq, int sk, int d, \
    int win_left, int win_right, int align_br, \
    float scale_log2, float softcap_log2, float dq_scale, int bias_kind, int vec_flags, \
    int stage, unsigned long long drop_seed, unsigned drop_offset, unsigned drop_threshold, \
    float drop_scale

// The same list as arguments, to hand a kernel's parameters to a device function.
#define PORTATTN_BWD_ARGS \
    q, k, v, o, dout, lse, lse2, delta, dq_accum, dq, dk, dv, bias, alibi, cu_q, cu_k, q_sb, \
    q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh, do_sb, do_ss, do_sh, \
    lse_sb, lse_sh, lse_ss, st_sb, st_sh, dq_sb, dq_ss, dq_sh, dk_sb, dk_ss, dk_sh, dv_sb, \
    dv_ss, dv_sh, bias_sb, bias_sh, bias_sq, bias_sk, alibi_sb, alibi_sh, batch, hq, group, \
    sq, sk, d, win_left, win_right, align_br, scale_log2, softcap_log2, dq_scale, bias_kind, \
    vec_flags, stage, drop_seed, drop_offset, drop_threshold, drop_scale

namespace portattn {

struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(half_t x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}
__device__ __forceinline__ float to_float(bf16_t x) {
  return __uint_as_float(static_cast<unsigned>(x.bits) << 16);
}

template <class T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float f) {
  half_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
  return h;
}
// cvt.rn.bf16.f32 needs sm_80; round to nearest even by hand so every arch rounds alike.
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float f) {
  unsigned u = __float_as_uint(f);
  bf16_t h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = static_cast<unsigned short>((u >> 16) | 0x40u);  // keep NaN a (quiet) NaN
  } else {
    h.bits = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return h;
}

// ex2.approx: one MUFU op; exp2(-inf) = +0, which the online softmax relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Read-only global loads through the non-coherent (texture/L1) path: Maxwell and Pascal
// cache ordinary global loads in L2 only.
__device__ __forceinline__ float ldg_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float ldg_float(const half_t* p) {
  half_t h;
  h.bits = __ldg(reinterpret_cast<const unsigned short*>(p));
  return to_float(h);
}
__device__ __forceinline__ float ldg_float(const bf16_t* p) {
  bf16_t h;
  h.bits = __ldg(reinterpret_cast<const unsigned short*>(p));
  return to_float(h);
}

// Eight consecutive elements as floats; zeros past ``n``. ``vec`` promises 16-byte
// alignment of p, so a full chunk is one or two 16-byte loads.
template <class T>
__device__ __forceinline__ void load8(float (&x)[8], const T* p, int n, bool vec) {
  if (vec && n >= 8) {
    if constexpr (sizeof(T) == 2) {
      uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
      const unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        T lo, hi;
        lo.bits = static_cast<unsigned short>(words[i] & 0xffffu);
        hi.bits = static_cast<unsigned short>(words[i] >> 16);
        x[2 * i] = to_float(lo);
        x[2 * i + 1] = to_float(hi);
      }
    } else {
      float4 a = __ldg(reinterpret_cast<const float4*>(p));
      float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
      x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) x[e] = e < n ? ldg_float(p + e) : 0.f;
  }
}

// N consecutive floats from shared memory, 4N-byte aligned.
template <int N>
__device__ __forceinline__ void lds_vec(float (&x)[N], const float* p) {
  static_assert(N == 1 || N == 2 || N == 4 || N == 8, "vector width");
  if constexpr (N == 1) {
    x[0] = p[0];
  } else if constexpr (N == 2) {
    float2 a = *reinterpret_cast<const float2*>(p);
    x[0] = a.x; x[1] = a.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      float4 a = *reinterpret_cast<const float4*>(p + i);
      x[i] = a.x; x[i + 1] = a.y; x[i + 2] = a.z; x[i + 3] = a.w;
    }
  }
}

// Reductions across the W consecutive lanes that share a row group (W a power of two).
template <int W>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <int W>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Score modifiers and masks, shared by every family so all paths agree with reference.py.
// Scores arrive in the log2 domain: q was pre-scaled by softmax_scale * log2(e).
struct ScoreMods {
  float softcap_log2;    // softcap * log2(e); 0 disables
  float alibi_log2;      // slope * log2(e) for this (batch, head); 0 disables
  const void* bias;      // already offset to this (batch, head); null disables
  long long bias_sq, bias_sk;
  int bias_kind;         // 1 float32, 2 float16, 3 bfloat16, 4 bool (nonzero keeps)
  int win_left, win_right, diag_off, sq, sk;

  // The modifiers of one (batch, head) from the kernel arguments every family shares.
  static __device__ __forceinline__ ScoreMods for_head(
      int b, int h, const void* bias, int bias_kind, long long bias_sb, long long bias_sh,
      long long bias_sq, long long bias_sk, const float* alibi, long long alibi_sb,
      long long alibi_sh, float softcap_log2, int win_left, int win_right, int diag_off,
      int sq, int sk) {
    ScoreMods m;
    const int elem = bias_kind == 1 ? 4 : bias_kind == 4 ? 1 : 2;
    m.softcap_log2 = softcap_log2;
    m.alibi_log2 = alibi ? kLog2e * alibi[b * alibi_sb + h * alibi_sh] : 0.f;
    m.bias_kind = bias_kind;
    m.bias = bias_kind ? static_cast<const void*>(static_cast<const char*>(bias) +
                                                  (b * bias_sb + h * bias_sh) * elem)
                       : nullptr;
    m.bias_sq = bias_sq;
    m.bias_sk = bias_sk;
    m.win_left = win_left;
    m.win_right = win_right;
    m.diag_off = diag_off;
    m.sq = sq;
    m.sk = sk;
    return m;
  }

  __device__ __forceinline__ bool any() const {
    return softcap_log2 > 0.f || alibi_log2 != 0.f || bias_kind != 0;
  }
  // Key j visible to query i: inside [0, sk) and the (bottom-right or top-left aligned)
  // window. Padding rows past sq see nothing, so no modifier reads bias rows that don't exist.
  __device__ __forceinline__ bool visible(int i, int j) const {
    return i < sq && j < sk && (win_left < 0 || j >= i + diag_off - win_left) &&
           (win_right < 0 || j <= i + diag_off + win_right);
  }
  // The keys query i sees as one range [lo, hi) (empty past sq): visible(i, j) is
  // lo <= j < hi, which lets a masked tile test two integers per score. query_range is
  // the same set seen from key j: the queries i with visible(i, j).
  __device__ __forceinline__ void key_range(int i, int& lo, int& hi) const {
    lo = win_left >= 0 ? i + diag_off - win_left : 0;
    hi = win_right >= 0 ? min(sk, i + diag_off + win_right + 1) : sk;
    if (i >= sq) hi = lo;
  }
  __device__ __forceinline__ void query_range(int j, int& lo, int& hi) const {
    lo = win_right >= 0 ? j - diag_off - win_right : 0;
    hi = win_left >= 0 ? min(sq, j - diag_off + win_left + 1) : sq;
    if (j >= sk) hi = lo;
  }
  // A log2-domain score as the backward kernels' masked tiles take it: modified where the
  // call has modifiers, else kept or -inf by the mask.
  __device__ __forceinline__ float masked(float s, int i, int j, bool has_mods) const {
    if (has_mods) return apply(s, i, j);
    return visible(i, j) ? s : neg_inf();
  }
  __device__ __forceinline__ float apply(float s, int i, int j) const {
    if (!visible(i, j)) return neg_inf();
    if (softcap_log2 > 0.f) s = softcap_log2 * tanhf(s / softcap_log2);
    if (alibi_log2 != 0.f) s -= alibi_log2 * fabsf(static_cast<float>(i + diag_off - j));
    if (bias_kind != 0) {
      const long long off = i * bias_sq + j * bias_sk;
      switch (bias_kind) {
        case 1: s += kLog2e * ldg_float(static_cast<const float*>(bias) + off); break;
        case 2: s += kLog2e * ldg_float(static_cast<const half_t*>(bias) + off); break;
        case 3: s += kLog2e * ldg_float(static_cast<const bf16_t*>(bias) + off); break;
        default:
          if (__ldg(static_cast<const unsigned char*>(bias) + off) == 0) s = neg_inf();
      }
    }
    return s;
  }
};

// One batch entry's sequence: its lengths, its causal/window diagonal and where its tokens
// start. Dense batches: every entry has the full lengths and starts at token 0 (the batch
// strides do the rest). Varlen (cu_q non-null): entry b is tokens [cu_q[b], cu_q[b+1]) of
// q/o/lse and [cu_k[b], cu_k[b+1]) of k/v, packed along one token axis (batch strides 0).
struct SeqSpan {
  int sq, sk, diag_off;   // diag_off: key index of query 0's diagonal (sk - sq bottom-right)
  long long q0, k0;       // first token row in q/o/lse and in k/v

  __device__ __forceinline__ SeqSpan(int b, int sq_max, int sk_max, const int* cu_q,
                                     const int* cu_k, int align_br) {
    if (cu_q != nullptr) {
      q0 = cu_q[b];
      k0 = cu_k[b];
      sq = cu_q[b + 1] - static_cast<int>(q0);
      sk = cu_k[b + 1] - static_cast<int>(k0);
    } else {
      q0 = k0 = 0;
      sq = sq_max;
      sk = sk_max;
    }
    diag_off = align_br ? sk - sq : 0;
  }
  // Offset of this entry's first row in an array with batch stride sb and row stride ss.
  __device__ __forceinline__ long long q_at(int b, long long sb, long long ss) const {
    return b * sb + q0 * ss;
  }
  __device__ __forceinline__ long long k_at(int b, long long sb, long long ss) const {
    return b * sb + k0 * ss;
  }
};

// Launch order of a grid of num_tiles tiles per (batch, head) pair, for CtaTile and
// KeyTile. Tiles of one pair stay adjacent (its K/V stay in L2) unless their work differs
// (causal, or a window's right edge): then the grid runs in chunks of pairs with the
// heaviest tile rank first across the chunk, so the last CTAs to start are the shortest.
// Pair after pair, a pair's heaviest tile can start near the end of the grid and run
// alone: on the H100, chunks made causal d128 L2048 17% faster (forward) and the causal
// backward 3-9% (benchmarks/NOTES.md, sixth session). A chunk spans about kLptCtas CTAs,
// enough to keep the tail short while the chunk's K/V still fit in L2. Turing's backward
// tiles (64 keys, 4 warps) re-read Q and dO twice as often per key and lost 3-7% to
// 512-CTA chunks; 128-CTA chunks gained 1-2% there (kLptCtasTuringBwd).
// Chunks hold 2^c pairs, 2^c the largest power of two dividing the pair count (every chunk
// whole) up to kLptCtas / num_tiles; c = 0 is the pair-after-pair order. Rank 0 is the
// heaviest tile.
constexpr unsigned kLptCtas = 512, kLptCtasTuringBwd = 128;
__device__ __forceinline__ unsigned tile_shift(unsigned n, bool uneven, unsigned target) {
  return uneven ? min(__ffs(gridDim.x / n) - 1, 31 - __clz(max(1u, target / n))) : 0u;
}
__device__ __forceinline__ int tile_rank(int num_tiles, bool uneven,
                                         unsigned target = kLptCtas) {
  const unsigned n = static_cast<unsigned>(num_tiles);
  return static_cast<int>((blockIdx.x >> tile_shift(n, uneven, target)) % n);
}
__device__ __forceinline__ int tile_pair(int num_tiles, bool uneven,
                                         unsigned target = kLptCtas) {
  const unsigned n = static_cast<unsigned>(num_tiles), c = tile_shift(n, uneven, target);
  return static_cast<int>((((blockIdx.x >> c) / n) << c) | (blockIdx.x & ((1u << c) - 1u)));
}

// The query tile, batch and head a CTA computes (rank 0: the last tile, for causal the
// heaviest). The grid covers the longest sequence (sq_max); in a varlen batch a CTA whose
// tile starts past its own sequence's end gets rows_valid <= 0 and must return before any
// barrier.
struct CtaTile : SeqSpan {
  int b, h, hk, m0, rows_valid, last_row;

  __device__ __forceinline__ CtaTile(int bm, int hq, int group, int sq_max, int sk_max,
                                     const int* cu_q, const int* cu_k, int align_br,
                                     int win_right)
      : SeqSpan(tile_pair((sq_max + bm - 1) / bm, win_right >= 0) / hq, sq_max, sk_max, cu_q,
                cu_k, align_br) {
    const int num_mb = (sq_max + bm - 1) / bm;
    const int mb = num_mb - 1 - tile_rank(num_mb, win_right >= 0);
    const int bh = tile_pair(num_mb, win_right >= 0);
    b = bh / hq;
    h = bh % hq;
    hk = h / group;
    m0 = mb * bm;
    rows_valid = min(bm, sq - m0);
    last_row = m0 + rows_valid - 1;
  }
};

// The key tile, batch and KV head a backward dK/dV CTA computes (rank 0: key tile 0, for
// causal the heaviest), and the query rows [m_lo, m_hi) that see any of
// its keys (the window read backwards). The grid covers the longest sequence (sk_max);
// cols_valid <= 0 means the tile starts past this sequence's end, and the CTA must return
// before any barrier.
struct KeyTile : SeqSpan {
  int b, hk, n0, cols_valid, m_lo, m_hi;

  __device__ __forceinline__ KeyTile(int bn, int hq, int group, int sq_max, int sk_max,
                                     const int* cu_q, const int* cu_k, int align_br,
                                     int win_left, int win_right, unsigned lpt = kLptCtas)
      : SeqSpan(tile_pair((sk_max + bn - 1) / bn, win_right >= 0, lpt) / (hq / group), sq_max,
                sk_max, cu_q, cu_k, align_br) {
    const int num_nb = (sk_max + bn - 1) / bn;
    const int bh = tile_pair(num_nb, win_right >= 0, lpt);
    b = bh / (hq / group);
    hk = bh % (hq / group);
    n0 = tile_rank(num_nb, win_right >= 0, lpt) * bn;
    cols_valid = min(bn, sk - n0);
    m_lo = win_right >= 0 ? max(0, n0 - diag_off - win_right) : 0;
    m_hi = win_left >= 0 ? min(sq, n0 + cols_valid - 1 - diag_off + win_left + 1) : sq;
  }
};

// Score modifiers and the window for this CTA's (batch, head), from the kernel arguments
// every family shares, plus the range of keys any of its rows can see.
struct CtaScores {
  ScoreMods mods;
  int n_lo, n_hi;   // tiles outside [n_lo, n_hi) are never loaded

  __device__ __forceinline__ CtaScores(const CtaTile& t, const void* bias, int bias_kind,
                                       long long bias_sb, long long bias_sh, long long bias_sq,
                                       long long bias_sk, const float* alibi,
                                       long long alibi_sb, long long alibi_sh,
                                       float softcap_log2, int win_left, int win_right)
      : mods(ScoreMods::for_head(t.b, t.h, bias, bias_kind, bias_sb, bias_sh, bias_sq,
                                 bias_sk, alibi, alibi_sb, alibi_sh, softcap_log2, win_left,
                                 win_right, t.diag_off, t.sq, t.sk)) {
    n_lo = win_left >= 0 ? max(0, t.m0 + t.diag_off - win_left) : 0;
    n_hi = win_right >= 0 ? min(t.sk, t.last_row + t.diag_off + win_right + 1) : t.sk;
  }

  // Every valid row of the CTA sees every key of [n0, n0 + bn): no per-element mask.
  __device__ __forceinline__ bool interior(const CtaTile& t, int n0, int bn) const {
    return n0 + bn <= mods.sk &&
           (mods.win_left < 0 || n0 >= t.last_row + mods.diag_off - mods.win_left) &&
           (mods.win_right < 0 || n0 + bn - 1 <= t.m0 + mods.diag_off + mods.win_right);
  }
};

// The backward's row stages, the same in every backward family (backward.BWD_STAGES):
//   0 pre  delta = rowsum(dO * O) and lse in the log2 domain (+inf where the row saw no
//          key, so exp2(s - lse2) is exactly 0, never NaN); pre_lanes(d) lanes per
//          (batch, head, query row), 8 head-dim elements each, 32 / pre_lanes(d) rows per
//          warp. With atomic dQ it also zeroes the row's dq_accum (no separate fill). A
//          varlen batch runs it as one sequence of all its tokens, which gives the (head,
//          token) layout the tile stages read through SeqSpan.
//   3 cvt  dq = dq_accum * softmax_scale in the input type (both (batch, seqlen, heads, d)
//          contiguous), a grid-stride loop, four elements per step where both are aligned.
// A warp per row at d64 left 24 of 32 lanes idle, and one element per step made cvt
// instruction-bound: together 2.1x FlashAttention-2's two kernels on the H100 at d64.
// d / 8 rounded up to a power of two, 4..32; backward.pre_lanes is the same rule.
__device__ __forceinline__ int pre_lanes(int d) {
  return d <= 32 ? 4 : d <= 64 ? 8 : d <= 128 ? 16 : 32;
}
template <class T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};
template <class T, int NT>
__device__ __forceinline__ void bwd_row_stage(PORTATTN_BWD_PARAMS(T)) {
  if (stage == 0) {
    const int L = pre_lanes(d);
    const int lane = threadIdx.x & 31, sub = lane & (L - 1);
    const long long row =
        (static_cast<long long>(blockIdx.x) * (NT / 32) + (threadIdx.x >> 5)) * (32 / L) +
        lane / L;
    // Every lane takes part in the shuffles below; lanes past the last row load nothing.
    const bool valid = row < static_cast<long long>(batch) * hq * sq;
    const int i = static_cast<int>(row % sq);
    const int h = static_cast<int>((row / sq) % hq);
    const int b = static_cast<int>(row / (static_cast<long long>(sq) * hq));
    float acc = 0.f;
    if (valid) {
      const T* orow = o + b * o_sb + static_cast<long long>(i) * o_ss + h * o_sh;
      const T* drow = dout + b * do_sb + static_cast<long long>(i) * do_ss + h * do_sh;
      for (int d0 = sub * 8; d0 < d; d0 += L * 8) {
        float a[8], g[8];
        load8(a, orow + d0, d - d0, vec_flags & 8);
        load8(g, drow + d0, d - d0, vec_flags & 16);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(a[e], g[e], acc);
      }
    }
    for (int off = L / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (valid && dq_accum != nullptr) {
      // dq_accum is (batch, seqlen, heads, d) contiguous, 256-byte aligned (backward.py).
      float* zrow = dq_accum + ((static_cast<long long>(b) * sq + i) * hq + h) * d;
      for (int c = sub * 8; c < d; c += L * 8) {
        if ((d & 3) == 0) {
          *reinterpret_cast<float4*>(zrow + c) = make_float4(0.f, 0.f, 0.f, 0.f);
          if (c + 4 < d) *reinterpret_cast<float4*>(zrow + c + 4) = make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (c + e < d) zrow[c + e] = 0.f;
        }
      }
    }
    if (valid && sub == 0) {
      const long long st = b * st_sb + h * st_sh + i;
      delta[st] = acc;
      const float l = lse[b * lse_sb + h * lse_sh + static_cast<long long>(i) * lse_ss];
      lse2[st] = l == neg_inf() ? pos_inf() : l * kLog2e;
    }
  } else if (stage == 3) {
    const long long n = static_cast<long long>(batch) * sq * hq * d;
    const long long step = static_cast<long long>(gridDim.x) * NT;
    const long long first = static_cast<long long>(blockIdx.x) * NT + threadIdx.x;
    const bool v4 = ((reinterpret_cast<unsigned long long>(dq_accum) & 15) |
                     (reinterpret_cast<unsigned long long>(dq) & (4 * sizeof(T) - 1))) == 0;
    const long long n4 = v4 ? n / 4 : 0;
    for (long long idx = first; idx < n4; idx += step) {
      const float4 x = reinterpret_cast<const float4*>(dq_accum)[idx];
      Vec4<T> y;
      y.v[0] = from_float<T>(x.x * dq_scale);
      y.v[1] = from_float<T>(x.y * dq_scale);
      y.v[2] = from_float<T>(x.z * dq_scale);
      y.v[3] = from_float<T>(x.w * dq_scale);
      reinterpret_cast<Vec4<T>*>(dq)[idx] = y;
    }
    for (long long idx = 4 * n4 + first; idx < n; idx += step)
      dq[idx] = from_float<T>(dq_accum[idx] * dq_scale);
  }
}

}  // namespace portattn
