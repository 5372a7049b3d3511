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
