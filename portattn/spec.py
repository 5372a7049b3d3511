"""KernelSpec: the frozen description of one compiled kernel (one RawModule).

Pure Python with no CUDA dependency so that plans, the report and the compile gate can
build and print specs on a machine with no GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float16", "bfloat16", "float32")
DTYPE_CTYPE = {"float16": "portattn::half_t", "bfloat16": "portattn::bf16_t", "float32": "float"}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

MAX_HEAD_DIM = 256
# Head dims are padded inside the kernel up to a multiple of this; each bucket is one compile.
HEAD_DIM_GRANULE = 32
HEAD_DIM_BUCKETS = tuple(range(HEAD_DIM_GRANULE, MAX_HEAD_DIM + 1, HEAD_DIM_GRANULE))


# KernelSpec.feat bits (tc_fwd.cu's and tc_bwd.cu's FEAT): softcap, ALiBi, bias or a negative
# softmax scale.
FEAT_MODS = 1
# tc_bwd.cu on sm_80+: warp pairs share a key block for dK / dV, reading P^T and dS^T back
# from shared memory (plan_bwd picks it where it measured faster and fits).
FEAT_PAIRS = 2


def head_dim_bucket(head_dim: int) -> int:
    return -(-head_dim // HEAD_DIM_GRANULE) * HEAD_DIM_GRANULE


@dataclass(frozen=True)
class KernelSpec:
    """One template instantiation. Everything that changes the generated code is here.
    Run-time features (masks, ALiBi, softcap, bias) are kernel arguments; only the
    tensor-core forward and backward compile the score modifiers in or out (FEAT_MODS):
    the forward's run-time branch measured 13-25% on causal tiles (benchmarks/NOTES.md,
    fifth session)."""
    family: str          # kernel family == .cu file stem: "simt_fwd" or "tc_fwd"
    dtype: str           # element type of q/k/v/out
    head_dim: int        # padded head dim (a HEAD_DIM_BUCKETS value)
    block_m: int         # query rows per CTA
    block_n: int         # key rows per K/V tile
    threads: int
    tx: int = 0          # simt_fwd / simt_bwd: threads sharing one query row group
    mma: int = 0         # tc_fwd, tc_bwd: MMA policy, 80 (m16n8k16 + cp.async) or 75
                         # (m16n8k8); tc70_fwd, tc70_bwd: 70 (m8n8k4)
    feat: int = 0        # tc_fwd, tc_bwd, tc70_bwd: FEAT_* bits compiled in (0: plain or
                         # masked)
    min_ctas: int = 1    # tc_fwd: resident CTAs per SM asked of ptxas (__launch_bounds__)

    @property
    def name_expression(self) -> str:
        if self.family == "decode_fwd":   # tx picks one of decode_fwd.cu's kernels
            arch = f", {self.mma}" if self.mma else ""   # decode_tc_kernel's MMA policy
            return (f"portattn::{DECODE_KERNELS[self.tx]}<{DTYPE_CTYPE[self.dtype]}, "
                    f"{self.head_dim}, {self.block_m}, {self.block_n}, {self.threads}{arch}>")
        last = self.tx if self.family in ("simt_fwd", "simt_bwd") else self.mma
        feat = {"tc_fwd": f", {self.feat}, {self.min_ctas}",
                "tc_bwd": f", {self.feat}", "tc70_bwd": f", {self.feat}"}.get(self.family, "")
        return (f"portattn::{self.family}_kernel<{DTYPE_CTYPE[self.dtype]}, {self.head_dim}, "
                f"{self.block_m}, {self.block_n}, {self.threads}, {last}{feat}>")

    @property
    def smem_bytes(self) -> int:
        return SMEM_BYTES[self.family](self)

    def short(self) -> str:
        mma = f"/mma{self.mma}" if self.mma else ""
        feat = ("/mods" if self.feat & FEAT_MODS else "") + \
            ("/pairs" if self.feat & FEAT_PAIRS else "") + \
            (f"/min{self.min_ctas}" if self.min_ctas > 1 else "")
        return (f"{self.family}{mma}/{self.dtype}/d{self.head_dim}/"
                f"{self.block_m}x{self.block_n}/t{self.threads}{feat}")


def simt_fwd_smem_bytes(spec: KernelSpec) -> int:
    """fp32 staging: Q^T (D x BM), K^T (D x BN) sharing space with P^T (BN x BM), V (BN x D)."""
    d, bm, bn = spec.head_dim, spec.block_m, spec.block_n
    return 4 * (d * bm + max(d * bn, bn * bm) + bn * d)


def tc_q_in_registers(block_m: int, threads: int, head_dim: int, mma: int) -> bool:
    """Turing keeps Q's fragments in registers when they take <= 32 (tc_fwd.cu kQRegs)."""
    rows_per_warp = block_m // (16 * (threads // 32))
    return mma < 80 and rows_per_warp * head_dim // 4 <= 32


def tc_fwd_smem_bytes(spec: KernelSpec) -> int:
    """Q (BM rows), K and V (BN rows each) in the input type, rows padded by 8 elements;
    where Q lives in registers its rows are reused by K and V."""
    if tc_q_in_registers(spec.block_m, spec.threads, spec.head_dim, spec.mma):
        rows = max(spec.block_m, 2 * spec.block_n)
    else:
        rows = spec.block_m + 2 * spec.block_n
    return DTYPE_BYTES[spec.dtype] * rows * (spec.head_dim + 8)


def tc70_fwd_smem_bytes(spec: KernelSpec) -> int:
    """Q (BM rows), K and V (BN rows each) in the input type, rows padded by 8 elements."""
    return DTYPE_BYTES[spec.dtype] * (spec.block_m + 2 * spec.block_n) * (spec.head_dim + 8)


# decode_fwd.cu's kernels; their shared memory (the cross-warp merge) is static.
DECODE_KERNELS = ("decode_fwd_kernel", "decode_append_kernel", "decode_tc_kernel")

SMEM_BYTES = {"simt_fwd": simt_fwd_smem_bytes, "tc_fwd": tc_fwd_smem_bytes,
              "decode_fwd": lambda spec: 0,
              "tc70_fwd": tc70_fwd_smem_bytes}


def simt_bwd_smem_bytes(spec: KernelSpec) -> int:
    """The dkdv and dq stages: fp32, transposed with rows padded by one: K^T, V^T
    (D x BN+1), Q^T, dO^T (D x BM+1), P and dS (BN x BM+1), lse and delta of the query
    tile. The pre and cvt stages of the same kernel use none."""
    d, bm, bn = spec.head_dim, spec.block_m, spec.block_n
    return 4 * (2 * d * (bn + 1) + 2 * d * (bm + 1) + 2 * bn * (bm + 1) + 2 * bm)


SMEM_BYTES["simt_bwd"] = simt_bwd_smem_bytes
# return_attn_probs's debug kernel (attn_probs.cu): its Q rows are static shared memory.
SMEM_BYTES["attn_probs"] = lambda spec: 0


def tc_bwd_smem_bytes(spec: KernelSpec) -> int:
    """tc_bwd.cu's dK/dV stage: K, V (BN rows), Q and dO (BM rows, double-buffered on
    sm_80+) in the input type with rows padded by 8, dS^T (BN x BM+8) and, with FEAT_PAIRS,
    P^T of the same shape, and fp32 lse2 and delta per buffered query tile."""
    d, bm, bn = spec.head_dim, spec.block_m, spec.block_n
    if bm == 0:   # the row stages (pre, cvt) use none
        return 0
    nbuf = 2 if spec.mma >= 80 else 1
    st = 2 if spec.feat & FEAT_PAIRS else 1
    return (DTYPE_BYTES[spec.dtype] * (2 * bn * (d + 8) + 2 * nbuf * bm * (d + 8)
                                       + st * bn * (bm + 8)) + 4 * 2 * nbuf * bm)


SMEM_BYTES["tc_bwd"] = tc_bwd_smem_bytes


def tc70_bwd_dst_row(block_m: int) -> int:
    """tc70_bwd.cu's LS: dS^T rows of block_m rounded up to 32, plus 16 halves (so each half
    warp's 8-byte dQ operand loads fall in 16 different bank pairs)."""
    return -(-block_m // 32) * 32 + 16


def tc70_bwd_smem_bytes(spec: KernelSpec) -> int:
    """tc70_bwd.cu: K, V (BN rows), Q, dO (BM rows) in the input type with rows padded by 8,
    dS^T (BN x LS), and fp32 lse2 and delta of the query tile."""
    d, bm, bn = spec.head_dim, spec.block_m, spec.block_n
    return (DTYPE_BYTES[spec.dtype] * (2 * (bn + bm) * (d + 8) + bn * tc70_bwd_dst_row(bm))
            + 4 * 2 * bm)


SMEM_BYTES["tc70_bwd"] = tc70_bwd_smem_bytes
