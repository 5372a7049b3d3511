// return_attn_probs's debug kernel: the softmax probabilities P (batch, heads, seqlen_q,
// seqlen_k) in fp32, recomputed from q, k and the forward's lse, with the entries dropout
// dropped negated (flash_attn's S_dmask convention; a dropped 0 is written as -0.0, so the
// sign bit alone gives the mask). Small shapes only (the caller limits the size), so it is
// plain SIMT with no tiling beyond BM query rows per CTA: thread x computes keys
// x, x + NT, ... of those rows, reading K straight from global memory.
// Takes the forward's argument list (o unused, lse read) plus the output.
#include "common.cuh"

namespace portattn {

template <class T, int D, int BM, int BN, int NT, int LAST>
__global__ void __launch_bounds__(NT) attn_probs_kernel(PORTATTN_FWD_PARAMS(T),
                                                         float* __restrict__ probs) {
  __shared__ float Qs[BM][D];
  const CtaTile t(BM, hq, group, sq, sk, cu_q, cu_k, align_br, win_right);
  if (t.rows_valid <= 0) return;
  const CtaScores cs(t, bias, bias_kind, bias_sb, bias_sh, bias_sq, bias_sk, alibi, alibi_sb,
                     alibi_sh, softcap_log2, win_left, win_right);
  const T* qbase = q + t.q_at(t.b, q_sb, q_ss) + t.h * q_sh;
  for (int idx = threadIdx.x; idx < BM * D; idx += NT) {
    const int r = idx / D, c = idx % D;
    Qs[r][c] = r < t.rows_valid && c < d
                   ? ldg_float(qbase + static_cast<long long>(t.m0 + r) * q_ss + c) * scale_log2
                   : 0.f;
  }
  __syncthreads();
  // lse in the log2 domain; rows that saw no key get +inf so exp2(s - lse2) is 0, not NaN.
  float lse2[BM];
#pragma unroll
  for (int r = 0; r < BM; ++r) {
    const float l = r < t.rows_valid ? lse[t.q_at(t.b, lse_sb, 1) + t.h * lse_sh + t.m0 + r]
                                     : neg_inf();
    lse2[r] = l == neg_inf() ? __int_as_float(0x7f800000) : l * kLog2e;
  }
  const Dropout drop(drop_seed, drop_offset, drop_threshold,
                     static_cast<unsigned>(t.b * hq + t.h));
  const T* kbase = k + t.k_at(t.b, k_sb, k_ss) + t.hk * k_sh;
  for (int j = threadIdx.x; j < t.sk; j += NT) {
    float acc[BM];
#pragma unroll
    for (int r = 0; r < BM; ++r) acc[r] = 0.f;
    const T* krow = kbase + static_cast<long long>(j) * k_ss;
    for (int c = 0; c < d; ++c) {
      const float kv = ldg_float(krow + c);
#pragma unroll
      for (int r = 0; r < BM; ++r) acc[r] = fmaf(Qs[r][c], kv, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < BM; ++r) {
      const int i = t.m0 + r;
      if (r >= t.rows_valid) continue;
      const float p = exp2f(cs.mods.apply(acc[r], i, j) - lse2[r]);
      const bool kept = drop_threshold == 0u || ((drop.keep4(i, j >> 2) >> (j & 3)) & 1u);
      probs[((static_cast<long long>(t.b) * hq + t.h) * sq + i) * sk + j] = kept ? p : -p;
    }
  }
}

}  // namespace portattn
