// Helpers shared by the tensor-core kernel families: shared-memory addresses, ldmatrix,
// the global -> shared tile copy (cp.async, direct, or register-staged), and packing two
// fp32 values into one register of the MMA input type.
#pragma once
#include "common.cuh"

namespace portattn {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// ldmatrix from a 32-bit shared-memory address. Kernels convert a per-lane base once and
// add compile-time byte offsets, which ptxas folds into the instruction; converting a
// generic pointer per load cost three integer ops and a register per load on sm_80/90.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Copy of one ROWS x D tile (16-byte chunks) from global into padded shared memory.
// Chunks past the valid rows / head dim are zero; a chunk that straddles d, or any chunk
// of a tensor whose rows are not 16-byte aligned, is copied element by element.
template <class T, int ROWS, int D, int NT>
struct TileCopy {
  static constexpr int LD = D + 8;
  static constexpr int kChunks = ROWS * D / 8;
  static constexpr int kPerThread = (kChunks + NT - 1) / NT;

  // The thread index, re-read on every call (a volatile read is never hoisted): with
  // threadIdx.x the compiler hoisted each thread's 64-bit per-chunk K and V offsets out
  // of the tile loop and held them in registers for the whole kernel (sm_80 d128 128x64
  // spilled them; Turing's staged copies pinned up to 16 registers).
  static __device__ __forceinline__ int tid() {
    unsigned t;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
    return static_cast<int>(t);
  }
  static __device__ __forceinline__ bool chunk_of(int c, int& r, int& d0) {
    r = c / (D / 8);
    d0 = (c % (D / 8)) * 8;
    return c < kChunks;
  }
  static __device__ __forceinline__ void scalar_chunk(T* dst, const T* src, int n) {
    unsigned short v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e)
      v[e] = e < n ? __ldg(reinterpret_cast<const unsigned short*>(src) + e) : 0;
    *reinterpret_cast<uint4*>(dst) =
        make_uint4(v[0] | (unsigned(v[1]) << 16), v[2] | (unsigned(v[3]) << 16),
                   v[4] | (unsigned(v[5]) << 16), v[6] | (unsigned(v[7]) << 16));
  }

  // Ampere+: asynchronous copies, completed by cp_async_wait + __syncthreads.
  static __device__ __forceinline__ void async(T* smem, const T* g, long long stride, int row0,
                                               int nrows, int d, bool vec) {
    if (kRowsPerPass > 0 && vec && nrows >= ROWS && d == D) {
      async_full(smem, g, stride, row0);
      return;
    }
    // Not unrolled: unrolled, every chunk's 64-bit address is hoisted out of the tile
    // loop and held in registers for the whole kernel (d128: 255 registers and spills).
#pragma unroll 1
    for (int i = 0; i < kPerThread; ++i) {
      int r, d0;
      if (!chunk_of(threadIdx.x + i * NT, r, d0)) break;
      T* dst = smem + r * LD + d0;
      const T* src = g + static_cast<long long>(row0 + r) * stride + d0;
      const int n = r < nrows ? d - d0 : 0;
      if (vec && n >= 8) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)),
                     "l"(src));
      } else if (n <= 0) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      } else {
        scalar_chunk(dst, src, n);
      }
    }
    asm volatile("cp.async.commit_group;");
  }
  // Every chunk of the tile in bounds and aligned (all tiles but the last of a sequence,
  // when d is a multiple of 32): each thread walks one column of chunks with a pointer and
  // an address increment, with none of the general loop's per-chunk index arithmetic and
  // bounds tests (about 25 integer instructions per chunk there, 4 here).
  static constexpr int kRowsPerPass = NT % (D / 8) == 0 ? NT / (D / 8) : 0;
  static __device__ __forceinline__ void async_full(T* smem, const T* g, long long stride,
                                                    int row0) {
    const int t = tid(), r = t / (D / 8), d0 = (t % (D / 8)) * 8;
    const T* src = g + static_cast<long long>(row0 + r) * stride + d0;
    unsigned dst = smem_addr(smem + r * LD + d0);
    const long long step = kRowsPerPass * stride;
    // Unrolled: the rolled loop's branches stalled warps on branch resolution and
    // instruction fetch, and the shared-memory offsets become immediates.
#pragma unroll
    for (int i = 0; i < (ROWS + kRowsPerPass - 1) / kRowsPerPass; ++i) {
      if (ROWS % kRowsPerPass == 0 || r + i * kRowsPerPass < ROWS)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                     ::"r"(dst + i * kRowsPerPass * LD * static_cast<unsigned>(sizeof(T))),
                     "l"(src));
      src += step;
    }
    asm volatile("cp.async.commit_group;");
  }
  static __device__ __forceinline__ void async_wait() {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
  }

  // Turing, tiles too large to stage: each chunk loaded and stored at once, not
  // unrolled for the same reason as async().
  static __device__ __forceinline__ void direct(T* smem, const T* g, long long stride,
                                                int row0, int nrows, int d, bool vec) {
    if constexpr (kRowsPerPass > 0) {
      if (vec && nrows >= ROWS && d == D) {
        // Whole tile in bounds and aligned: every load issued before the first store, by
        // a pointer walk (as async_full). Written out rather than as load() + store():
        // that form compiled to the same registers but ran the forced-sm75 fwd+bwd 14-36%
        // slower on the H100.
        constexpr int kPasses = (ROWS + kRowsPerPass - 1) / kRowsPerPass;
        const int t = tid(), r = t / (D / 8);
        const T* src = g + static_cast<long long>(row0 + r) * stride + (t % (D / 8)) * 8;
        T* dst = smem + r * LD + (t % (D / 8)) * 8;
        const long long step = kRowsPerPass * stride;
        uint4 v[kPasses];
#pragma unroll
        for (int i = 0; i < kPasses; ++i) {
          if (ROWS % kRowsPerPass == 0 || r + i * kRowsPerPass < ROWS)
            v[i] = __ldg(reinterpret_cast<const uint4*>(src));
          src += step;
        }
#pragma unroll
        for (int i = 0; i < kPasses; ++i)
          if (ROWS % kRowsPerPass == 0 || r + i * kRowsPerPass < ROWS)
            *reinterpret_cast<uint4*>(dst + i * kRowsPerPass * LD) = v[i];
        return;
      }
    }
#pragma unroll 1
    for (int i = 0; i < kPerThread; ++i) {
      int r, d0;
      if (!chunk_of(threadIdx.x + i * NT, r, d0)) break;
      T* dst = smem + r * LD + d0;
      const T* src = g + static_cast<long long>(row0 + r) * stride + d0;
      const int n = r < nrows ? d - d0 : 0;
      if (vec && n >= 8) {
        *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
      } else if (n <= 0) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      } else {
        scalar_chunk(dst, src, n);
      }
    }
  }

  // Turing: the same copy staged through registers: load() issues the global loads,
  // store() (after the compute they overlap) writes shared memory.
  uint4 regs[kPerThread];
  __device__ __forceinline__ void load(const T* g, long long stride, int row0, int nrows,
                                       int d, bool vec) {
    const int t = tid();
    if constexpr (kRowsPerPass > 0) {
      if (vec && nrows >= ROWS && d == D) {
        // Whole tile in bounds and aligned: a pointer walk, as async_full (store() reads
        // the same chunk order: chunk t + i*NT is row t/(D/8) + i*kRowsPerPass). Turing
        // forward +9-15% on the H100 (forced sm_75), from the per-chunk index arithmetic.
        const T* src =
            g + static_cast<long long>(row0 + t / (D / 8)) * stride + (t % (D / 8)) * 8;
        const long long step = kRowsPerPass * stride;
#pragma unroll
        for (int i = 0; i < kPerThread; ++i) {
          if (ROWS % kRowsPerPass == 0 || t / (D / 8) + i * kRowsPerPass < ROWS)
            regs[i] = __ldg(reinterpret_cast<const uint4*>(src));
          src += step;
        }
        return;
      }
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      int r, d0;
      if (!chunk_of(t + i * NT, r, d0)) break;
      const T* src = g + static_cast<long long>(row0 + r) * stride + d0;
      const int n = r < nrows ? d - d0 : 0;
      if (vec && n >= 8) {
        regs[i] = __ldg(reinterpret_cast<const uint4*>(src));
      } else if (n <= 0) {
        regs[i] = make_uint4(0, 0, 0, 0);
      } else {
        T tmp[8];
        scalar_chunk(tmp, src, n);
        regs[i] = *reinterpret_cast<uint4*>(tmp);
      }
    }
  }
  __device__ __forceinline__ void store(T* smem) const {
    const int t = tid();
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      int r, d0;
      if (!chunk_of(t + i * NT, r, d0)) break;
      *reinterpret_cast<uint4*>(smem + r * LD + d0) = regs[i];
    }
  }
};

// Two P values in the MMA input type, one register. ptxas turns the fp16 form into one
// packed convert on every arch; bf16's hand rounding (common.cuh, for pre-sm_80 targets)
// costs ~8 integer ops and a branch per element, so sm_80+ uses its packed convert.
template <class T, int ARCH>
struct Pack2 {
  static __device__ __forceinline__ unsigned run(float lo, float hi) {
    return static_cast<unsigned>(from_float<T>(lo).bits) |
           (static_cast<unsigned>(from_float<T>(hi).bits) << 16);
  }
};
template <int ARCH>
struct Pack2<bf16_t, ARCH> {
  static __device__ __forceinline__ unsigned run(float lo, float hi) {
    if constexpr (ARCH >= 80) {
      unsigned r;
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
      return r;
    } else {
      return static_cast<unsigned>(from_float<bf16_t>(lo).bits) |
             (static_cast<unsigned>(from_float<bf16_t>(hi).bits) << 16);
    }
  }
};

// D += A(16x16) * B(16x8), fp32 accumulate: one m16n8k16 (sm_80+) or two m16n8k8 (sm_75,
// A regs 0,1 / B reg 0 cover k 0-7; 2,3 / 1 cover k 8-15).
template <class T, int ARCH> struct MmaK16;
template <int ARCH> struct MmaK16<half_t, ARCH> {
  static __device__ __forceinline__ void k16(float (&d)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    if constexpr (ARCH >= 80) {
      asm(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
          "{%8,%9}, {%0,%1,%2,%3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
      asm(
          "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
          "{%0,%1,%2,%3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(b0));
      asm(
          "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
          "{%0,%1,%2,%3};"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[2]), "r"(a[3]), "r"(b1));
    }
  }
};
template <int ARCH> struct MmaK16<bf16_t, ARCH> {
  static_assert(ARCH >= 80, "bf16 MMA needs sm_80");
  static __device__ __forceinline__ void k16(float (&d)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Volta's mma.sync.m8n8k4 (fp16 in, fp32 accumulate): four independent 8x8x4 products per
// warp, one per quad pair (lanes 4q..4q+3 and 4q+16..4q+19); the layouts name A's and B's.
#define PORTATTN_MMA884(LAYOUTS, d, a0, a1, b0, b1)                                          \
  asm volatile("mma.sync.aligned.m8n8k4." LAYOUTS ".f32.f16.f16.f32 "                        \
               "{%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9}, {%10,%11}, {%0,%1,%2,%3,%4,%5,%6,%7};"  \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),    \
                 "+f"(d[6]), "+f"(d[7])                                                      \
               : "r"(a0), "r"(a1), "r"(b0), "r"(b1))
template <class T> struct Mma884;
template <> struct Mma884<half_t> {
  static __device__ __forceinline__ void row_col(float (&d)[8], unsigned a0, unsigned a1,
                                                 unsigned b0, unsigned b1) {
    PORTATTN_MMA884("row.col", d, a0, a1, b0, b1);
  }
  static __device__ __forceinline__ void row_row(float (&d)[8], unsigned a0, unsigned a1,
                                                 unsigned b0, unsigned b1) {
    PORTATTN_MMA884("row.row", d, a0, a1, b0, b1);
  }
  static __device__ __forceinline__ void col_row(float (&d)[8], unsigned a0, unsigned a1,
                                                 unsigned b0, unsigned b1) {
    PORTATTN_MMA884("col.row", d, a0, a1, b0, b1);
  }
};
#undef PORTATTN_MMA884

// An m8n8k4 f32 C tile (lane t of quad pair h holds rows (t & 1) + 2e + 4h, e = 0/1, at
// columns c0 + {0, 1, 4, 5}, c0 = t & 2) as the A operand of the next product (.row: row
// t + 4h, columns 0..7 as four packed pairs). Lane t keeps its row e = t >> 1 and trades the
// other row's four values with lane t ^ 2, which holds the other four columns.
template <class T, int ARCH>
__device__ __forceinline__ void c_to_a884(unsigned (&a)[4], const float (&c)[8], int c0) {
  const unsigned r0a = Pack2<T, ARCH>::run(c[0], c[1]);   // row e0, columns c0, c0 + 1
  const unsigned r1a = Pack2<T, ARCH>::run(c[2], c[3]);   // row e1, columns c0, c0 + 1
  const unsigned r0b = Pack2<T, ARCH>::run(c[4], c[5]);   // row e0, columns c0 + 4, + 5
  const unsigned r1b = Pack2<T, ARCH>::run(c[6], c[7]);   // row e1, columns c0 + 4, + 5
  const unsigned rxa = __shfl_xor_sync(0xffffffffu, c0 ? r0a : r1a, 2);
  const unsigned rxb = __shfl_xor_sync(0xffffffffu, c0 ? r0b : r1b, 2);
  a[0] = c0 ? rxa : r0a;   // columns 0, 1
  a[1] = c0 ? r1a : rxa;   // 2, 3
  a[2] = c0 ? rxb : r0b;   // 4, 5
  a[3] = c0 ? r1b : rxb;   // 6, 7
}

__device__ __forceinline__ uint4 lds128(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}

}  // namespace portattn
