// Dropout's random bits: Philox4x32-10 (Salmon et al., SC'11; the Random123 generator)
// with the counter layout reference.py's dropout_mask_ref defines, so every kernel, the
// forward and the backward, draws the same mask element for element.
//
// Element (b, h, i, j) (b the batch or varlen sequence index, h the query head, i / j the
// query and key position inside the sequence): counter (j >> 2, i, b * nheads + h, offset),
// key (seed low 32 bits, seed high 32 bits); word j & 3 of the output is its uniform u,
// kept iff u >= threshold. One call gives the 4 keys 4 * (j >> 2) .. + 3 of one row.
//
// Use in a kernel (arguments drop_seed, drop_offset, drop_threshold, drop_scale of
// PORTATTN_FWD_PARAMS / PORTATTN_BWD_PARAMS):
//   if (drop_threshold != 0u) {                 // dropout off: threshold 0, scale 1
//     const Dropout drop(drop_seed, drop_offset, drop_threshold, b * hq + h);
//     const unsigned bits = drop.keep4(i, j >> 2);   // bit e: key 4 * (j >> 2) + e kept
//     ...
//   }
// then multiply what survives by drop_scale = 1 / (1 - p) (the forward kernels fold it
// into the final 1 / l). Build the Dropout right where the bits are used: its fields are
// kernel arguments and two indices, so nothing stays live across the kernel's hot loops.
#pragma once

namespace portattn {

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, unsigned k0, unsigned k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // One 32x32 -> 64-bit multiply each (IMAD.WIDE.U32) gives both halves.
    const unsigned long long p0 = static_cast<unsigned long long>(0xD2511F53u) * c.x;
    const unsigned long long p1 = static_cast<unsigned long long>(0xCD9E8D57u) * c.z;
    c = make_uint4(static_cast<unsigned>(p1 >> 32) ^ c.y ^ k0, static_cast<unsigned>(p1),
                   static_cast<unsigned>(p0 >> 32) ^ c.w ^ k1, static_cast<unsigned>(p0));
  }
  return c;
}

struct Dropout {
  unsigned k0, k1, bh, offset, threshold;

  __device__ __forceinline__ Dropout(unsigned long long seed, unsigned offset_,
                                     unsigned threshold_, unsigned bh_)
      : k0(static_cast<unsigned>(seed)), k1(static_cast<unsigned>(seed >> 32)), bh(bh_),
        offset(offset_), threshold(threshold_) {}

  // Keep bits of keys 4 * jg .. 4 * jg + 3 of row i: bit e set = key 4 * jg + e kept.
  __device__ __forceinline__ unsigned keep4(int i, int jg) const {
    const uint4 u = philox4x32_10(
        make_uint4(static_cast<unsigned>(jg), static_cast<unsigned>(i), bh, offset), k0, k1);
    return static_cast<unsigned>(u.x >= threshold) |
           (static_cast<unsigned>(u.y >= threshold) << 1) |
           (static_cast<unsigned>(u.z >= threshold) << 2) |
           (static_cast<unsigned>(u.w >= threshold) << 3);
  }
};

// Two 16-bit lanes of a packed register kept or zeroed by keep bits 0 (low) and 1 (high).
__device__ __forceinline__ unsigned keep_halves(unsigned bits) {
  return ((bits & 1u) ? 0x0000ffffu : 0u) | ((bits & 2u) ? 0xffff0000u : 0u);
}

}  // namespace portattn
