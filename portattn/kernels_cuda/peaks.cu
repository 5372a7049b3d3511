// Instruction-rate probes for `portattn bench`: each path's TFLOP/s is reported as a
// fraction of what this GPU measurably sustains for the instruction that path relies on.

// Eight independent FMA chains per thread: enough to cover FMA latency with a few
// warps per scheduler. a, b keep values finite and normal (no denormal slow paths).
extern "C" __global__ void fma_peak(float* out, int iters, float a, float b) {
  float x[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = threadIdx.x * 1e-3f + i;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int r = 0; r < 16; ++r)
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = fmaf(x[i], a, b);
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) s += x[i];
  // Written only when impossible so the chains stay live without a store per thread.
  if (s == 12345.678f) out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// Tensor-core probes, one per mma.sync shape a path is built on, fp16/bf16 in, fp32 out.
// Each kernel's body exists only from the arch that has the instruction, so this one module
// still compiles (to empty kernels) for every arch and the host launches only what the
// device supports.
//
// Operand values: normal numbers of magnitude [2^-7, 2^-3) with hashed signs and mantissas,
// so no operand is zero or denormal and the datapath toggles like real data (all-zero or
// constant operands draw less power and read a higher, unrepresentative peak). Two A and
// two B fragments alternate across chains for the same reason. The accumulators drift by
// at most 16 * 2^-6 per step, so they stay finite over any realistic loop count.

__device__ __forceinline__ unsigned probe_hash(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

template <bool kBf16>
__device__ __forceinline__ unsigned probe_half(unsigned h) {
  const unsigned sign = (h >> 31) << 15, e = (h >> 24) & 3u;
  return kBf16 ? sign | ((120u + e) << 7) | (h & 0x7fu)      // bf16 exponent bias 127
               : sign | ((8u + e) << 10) | (h & 0x3ffu);     // fp16 exponent bias 15
}

template <bool kBf16>
__device__ __forceinline__ unsigned probe_pair(unsigned seed) {
  const unsigned lo = probe_half<kBf16>(probe_hash(seed));
  return lo | (probe_half<kBf16>(probe_hash(seed ^ 0x5bd1e995u)) << 16);
}

// Eight independent accumulator chains per warp, four MMAs deep per loop trip: several
// times the MMA latency's worth of independent work even with one warp per scheduler.
template <class Op, bool kBf16>
__device__ __forceinline__ void mma_probe(float* out, int iters, unsigned seed) {
  constexpr int kChains = 8;
  const unsigned base = seed ^ (blockIdx.x * 0x9e3779b9u) ^ (threadIdx.x * 0x85ebca6bu);
  unsigned a[2][Op::kA], b[2][Op::kB];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
#pragma unroll
    for (int r = 0; r < Op::kA; ++r) a[s][r] = probe_pair<kBf16>(base + 131u * (s * 8 + r));
#pragma unroll
    for (int r = 0; r < Op::kB; ++r) b[s][r] = probe_pair<kBf16>(base + 137u * (s * 8 + r) + 7u);
  }
  float c[kChains][Op::kC];
#pragma unroll
  for (int i = 0; i < kChains; ++i)
#pragma unroll
    for (int j = 0; j < Op::kC; ++j) c[i][j] = 0.25f * (i * Op::kC + j) + 1.0f;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int i = 0; i < kChains; ++i) Op::run(c[i], a[i & 1], b[(i >> 1) & 1]);
  }
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kChains; ++i)
#pragma unroll
    for (int j = 0; j < Op::kC; ++j) s += c[i][j];
  // As in fma_peak: never true, but the compiler cannot know, so every chain stays live.
  if (s == 12345.678f) out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// Volta's shape: four 8x8x4 products per warp instruction (2048 FLOP). Later archs accept it
// too, at whatever rate they give it, which is what the sm70 path gets when forced there.
#if __CUDA_ARCH__ >= 700
struct MmaM8N8K4 {
  static constexpr int kA = 2, kB = 2, kC = 8;
  static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m8n8k4.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9}, {%10,%11}, {%0,%1,%2,%3,%4,%5,%6,%7};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]),
          "+f"(c[4]), "+f"(c[5]), "+f"(c[6]), "+f"(c[7])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]), "r"(b[1]));
  }
};
#endif

extern "C" __global__ void mma_m8n8k4_peak(float* out, int iters, unsigned seed) {
#if __CUDA_ARCH__ >= 700
  mma_probe<MmaM8N8K4, false>(out, iters, seed);
#endif
}

// Turing's shape: one 16x8x8 product per warp instruction (2048 FLOP).
#if __CUDA_ARCH__ >= 750
struct MmaM16N8K8 {
  static constexpr int kA = 2, kB = 1, kC = 4;
  static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]));
  }
};
#endif

extern "C" __global__ void mma_m16n8k8_peak(float* out, int iters, unsigned seed) {
#if __CUDA_ARCH__ >= 750
  mma_probe<MmaM16N8K8, false>(out, iters, seed);
#endif
}

// Ampere's shape: one 16x8x16 product per warp instruction (4096 FLOP), fp16 or bf16 inputs.
#if __CUDA_ARCH__ >= 800
template <bool kBf16>
struct MmaM16N8K16 {
  static constexpr int kA = 4, kB = 2, kC = 4;
  static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
    if (kBf16) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
          "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
          "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
  }
};
#endif

extern "C" __global__ void mma_m16n8k16_peak(float* out, int iters, unsigned seed) {
#if __CUDA_ARCH__ >= 800
  mma_probe<MmaM16N8K16<false>, false>(out, iters, seed);
#endif
}

extern "C" __global__ void mma_m16n8k16_bf16_peak(float* out, int iters, unsigned seed) {
#if __CUDA_ARCH__ >= 800
  mma_probe<MmaM16N8K16<true>, true>(out, iters, seed);
#endif
}
