"""Plan for KV-cache decoding (flash_attn_with_kvcache): kernel variant and KV splits.

Two kernels: tensor-core (m16n8k16 on sm_80+ for fp16/bf16, m16n8k8 on sm_75 for fp16;
aligned rows) and SIMT (everything else).

``select_decode_plan`` is pure: integers from the arch table and DeviceInfo (SM count
included) decide the packed-row tile, the head-dim variant and how many CTAs share one
(batch, KV head)'s keys (split-KV, Flash-Decoding), so ``explain_kvcache`` and the
compile gate see the same decision as the run.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..spec import DTYPE_BYTES, DTYPES, MAX_HEAD_DIM, KernelSpec
from .device import DeviceInfo

DECODE_THREADS = 128
DECODE_UNROLL = 4              # key steps whose loads are issued before any is used
DECODE_ROWS = (4, 8)           # packed rows (query heads of a GQA group x query rows) per CTA
# Registers per thread measured by the compile gate (NVRTC 12.9, sm_50..sm_90), by packed
# rows and element bytes: 16-bit 121-128 (4 rows; 136-138 on sm_90, where 16-bit decode
# runs SIMT only unaligned or forced) and 177-213 (8), fp32 153-168 and 193-219; the plan
# sizes its splits for the upper bounds.
DECODE_EST_REGS = {(4, 2): 128, (8, 2): 216, (4, 4): 160, (8, 4): 248}
# Tensor-core decode (decode_tc_kernel; m16n8k16 on sm_80+ for fp16/bf16, two m16n8k8 on
# sm_75 for fp16; 16-byte aligned rows, d % 8 == 0): 8 packed rows per m16 tile, 16 keys per
# warp step, 4 warps per CTA (d128 ~200 registers: 2 CTAs, 8 warps, 64 KB of loads in flight
# per SM). H100, bench --sweep, 2026-11-22, headline shape: 2-warp CTAs (4 per SM, 8 splits)
# 2% slower, twice the splits 3% slower, a split count past one wave (5, 6) 13-30% slower.
# Registers (NVRTC 12.9), d64 / d128 / d256: sm_80..sm_90 112-128 / 200-208 / 232-234,
# sm_75 128 / 214 / 248 (d256 is 1 CTA/SM there: 36 KB of static shared memory).
TC_ROWS = 8
TC_KEYS = 16
TC_THREADS = 128
TC_HEAD_DIMS = (64, 128, 256)
TC_EST_REGS = {(80, 64): 128, (80, 128): 208, (80, 256): 240,
               (75, 64): 128, (75, 128): 216, (75, 256): 248}
# Tensor-core K/V loads with L2::256B (L2::128B on sm_75) and L1::no_allocate (decode_fwd.cu,
# vec_flags bit 3): 1.6% faster at the headline shape, 2% at batch 1 x 128k keys and 4-6%
# with paged caches (H100, 2026-11-22). An L2 prefetch of the next step instead measured 6%
# slower, and issuing the next step's K/V loads during this step's math (same registers)
# 0.5% slower.
TC_L2_HINT = True
APPEND_THREADS = 256
MAX_SPLITS = 128
MIN_KEYS_PER_SPLIT = 256       # below this the merge's extra pass costs more than it hides
NOMINAL_SM_COUNT = 80          # planning with no GPU (report --arch): a mid-size part


@dataclass(frozen=True)
class DecodeProblem:
    dtype: str
    head_dim: int
    seqlen_q: int = 1
    seqlen_k: int = 4096           # the longest row's keys (cached + appended)
    batch: int = 1
    nheads_q: int = 1
    nheads_kv: int = 1
    paged: bool = False
    num_splits: int = 0            # 0: the plan chooses
    aligned: bool = True           # q/k/v rows 16-byte aligned and head dim % 8 == 0


@dataclass(frozen=True)
class DecodePlan:
    path: str                      # "sm80", "sm75" (tensor cores) or "simt"
    spec: KernelSpec
    append_spec: KernelSpec
    num_splits: int
    row_tiles: int                 # CTAs per (batch, KV head, split) along the packed rows
    ctas_per_sm: int
    reason: str
    rejected: tuple
    plan_cc: int
    l2_hint: bool = False          # tensor-core K/V loads with L2::256B, L1::no_allocate

    @property
    def smem_bytes(self) -> int:
        return self.spec.smem_bytes

    @property
    def grid(self) -> int:
        return self.row_tiles * self.num_splits

    def describe(self) -> str:
        s = self.spec
        lines = [f"decode path {self.path} on sm_{self.plan_cc}: {s.dtype}, kernel head dim "
                 f"{s.head_dim}, {s.block_m} packed rows x {self.row_tiles} tile(s), "
                 f"{self.num_splits} KV split(s), {self.ctas_per_sm} CTA(s)/SM",
                 f"  why: {self.reason}"]
        lines += [f"  not {p}: {why}" for p, why in self.rejected]
        return "\n".join(lines)


def decode_head_dim(head_dim: int) -> int:
    """The kernel's head dim: 8 elements per lane on a power-of-two number of lanes (4..32)."""
    lanes = 4
    while lanes * 8 < head_dim:
        lanes *= 2
    return lanes * 8


def decode_rows(packed: int) -> int:
    return DECODE_ROWS[0] if packed <= DECODE_ROWS[0] else DECODE_ROWS[-1]


def tc_head_dim(head_dim: int) -> int:
    """The tensor-core kernel's head dim: V lanes take 8 columns of each 64."""
    return max(64, decode_head_dim(head_dim))


MERGE_SMEM_BYTES = 16   # decode_fwd.cu combine_if_last's "last CTA" flag, aligned


def tc_smem_bytes(head_dim: int) -> int:
    """decode_tc_kernel's static shared memory: the cross-warp merge of O, m and l, and the
    split merge's flag."""
    warps = TC_THREADS // 32
    return 4 * warps * TC_ROWS * (head_dim + 2) + MERGE_SMEM_BYTES


def _ctas_per_sm(device: DeviceInfo, regs: int, threads: int, smem: int = 0) -> int:
    f = device.facts
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = f.regs_per_sm // (per_warp * (threads // 32))
    by_smem = device.smem_per_sm // smem if smem else f.max_ctas_per_sm
    return max(1, min(by_regs, by_smem, f.max_ctas_per_sm, f.max_threads_per_sm // threads))


def _tc_why_not(device: DeviceInfo, p: DecodeProblem, mma: int = 80) -> str:
    """Why the tensor-core decode kernel with MMA policy ``mma`` (80: m16n8k16, 75:
    m16n8k8) cannot run ``p`` ('' when it can)."""
    if p.dtype not in ("float16", "bfloat16"):
        return f"{p.dtype} has no exact tensor-core form (tf32 rounds the inputs)"
    if mma == 80 and device.plan_cc < 80:
        return (f"sm_{device.plan_cc} lacks m16n8k16 for {p.dtype} (the kernel needs sm_80+)")
    if mma == 75 and device.plan_cc < 75:
        return (f"sm_{device.plan_cc} lacks m16n8k8 (Turing+), and a decode kernel on "
                f"Volta's m8n8k4 (quad-pair fragments, its own K/V fragment loads and P "
                f"exchange) is not written in this release: SIMT decode runs instead, "
                f"memory-bound up to about 8 packed rows (GQA group x q length), "
                f"compute-bound beyond")
    if mma == 75 and p.dtype == "bfloat16":
        return "bf16 has no MMA before sm_80 (m16n8k8 on Turing is fp16 only)"
    if not p.aligned:
        return ("q/k_cache/v_cache rows are not 16-byte aligned or the head dim is not a "
                "multiple of 8 (the kernel loads 16-byte fragments straight from the cache)")
    return ""


def _append_spec(dtype: str) -> KernelSpec:
    return KernelSpec("decode_fwd", dtype, 0, 1, 1, APPEND_THREADS, tx=1)


def select_decode_plan(device: DeviceInfo, problem: DecodeProblem,
                       only: str | None = None) -> DecodePlan:
    """Choose the decode kernel and KV split count for ``problem`` on ``device``."""
    p = problem
    if p.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {p.dtype!r}")
    if not 1 <= p.head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM}, got {p.head_dim}")
    if p.nheads_kv < 1 or p.nheads_q % p.nheads_kv:
        raise ValueError(f"nheads_q ({p.nheads_q}) must be a multiple of nheads_kv "
                         f"({p.nheads_kv})")
    if only is not None and only not in ("simt", "sm75", "sm80"):
        raise ValueError(f"PORTATTN_PATH={only}: KV-cache decoding has the simt, sm75 and sm80 "
                         f"paths; unset PORTATTN_PATH or set it to one of them")
    f = device.facts
    group = p.nheads_q // p.nheads_kv
    packed = group * p.seqlen_q
    # The newest MMA this arch has; PORTATTN_PATH=sm75 runs Turing's on newer GPUs.
    mma = 75 if only == "sm75" or (device.plan_cc < 80 and only != "sm80") else 80
    tc_no = _tc_why_not(device, p, mma)
    if only in ("sm75", "sm80") and tc_no:
        raise ValueError(f"PORTATTN_PATH={only}: the tensor-core decode kernel cannot run this "
                         f"problem: {tc_no}")
    use_tc = not tc_no and only != "simt"
    if use_tc:
        rows = TC_ROWS
        kd = tc_head_dim(p.head_dim)
        ctas = _ctas_per_sm(device, TC_EST_REGS[mma, kd], TC_THREADS, tc_smem_bytes(kd))
    else:
        rows = decode_rows(packed)
        ctas = _ctas_per_sm(device, DECODE_EST_REGS[(rows, DTYPE_BYTES[p.dtype])],
                            DECODE_THREADS)
    tiles = -(-packed // rows)
    sms = device.sm_count if device.sm_count else NOMINAL_SM_COUNT
    sm_note = f"{sms} SMs" if device.sm_count else f"{sms} SMs assumed (no GPU)"
    blocks = max(1, p.batch * p.nheads_kv * tiles)
    slots = sms * ctas
    if p.num_splits > 0:
        splits = p.num_splits
        split_why = f"{splits} split(s) as requested (num_splits={splits})"
    else:
        by_len = max(1, p.seqlen_k // MIN_KEYS_PER_SPLIT)
        splits = max(1, min(slots // blocks, by_len, MAX_SPLITS))
        if splits == 1:
            split_why = (f"1 split: {blocks} CTA(s) (batch x KV heads x row tiles) leave no "
                         f"room for a second split in one wave of {slots} resident slots "
                         f"({sm_note} x {ctas})" if 2 * blocks > slots else
                         f"1 split: {p.seqlen_k} keys are too few to share "
                         f"(< {2 * MIN_KEYS_PER_SPLIT})")
        else:
            split_why = (f"{splits} splits: {blocks} CTA(s) (batch x KV heads x row tiles) "
                         f"x {splits} fit in one wave of {slots} resident slots "
                         f"({sm_note} x {ctas}), >= {MIN_KEYS_PER_SPLIT} keys each")
    append = _append_spec(p.dtype)
    rows_why = (f"each K/V byte is read once for {rows} packed rows (GQA group {group} x "
                f"{p.seqlen_q} query row(s) in {tiles} tile(s))")
    if use_tc:
        spec = KernelSpec("decode_fwd", p.dtype, tc_head_dim(p.head_dim), TC_ROWS, TC_KEYS,
                          TC_THREADS, tx=2, mma=mma)
        op = "m16n8k16, sm_80+" if mma == 80 else "two m16n8k8 per k16 step, sm_75"
        reason = (f"tensor-core decode (mma.sync {op}): {rows_why}; the MMAs take "
                  f"the multiply-adds and conversions off the issue slots, which a SIMT kernel "
                  f"fills before {f.name}'s memory does; {TC_KEYS} keys per warp step with "
                  f"all 16-byte K/V loads in flight; {split_why}")
        rejected = (("simt decode", "~0.4 instructions per K/V byte (conversions, shuffle "
                     "reductions, per-row softmax) outrun the issue rate at full bandwidth"),)
        path = f"sm{mma}"
    else:
        spec = KernelSpec("decode_fwd", p.dtype, decode_head_dim(p.head_dim), rows,
                          DECODE_UNROLL, DECODE_THREADS)
        reason = (f"SIMT decode: {rows_why}, about {2 * rows} FLOP per element; 16-byte "
                  f"loads, {DECODE_UNROLL} key steps in flight per thread; {split_why}")
        rejected = (("tensor-core decode", tc_no or "PORTATTN_PATH=simt"),)
        path = "simt"
    return DecodePlan(path, spec, append, splits, tiles, ctas, reason, rejected,
                      device.plan_cc, l2_hint=TC_L2_HINT and use_tc)


def all_decode_specs_for(device: DeviceInfo) -> dict:
    """Every KernelSpec a decode plan can use on ``device`` (for the compile gate)."""
    specs = {}
    for dtype in DTYPES:
        for d in (32, 64, 128, 256):
            for packed in (1, DECODE_ROWS[-1]):
                for aligned in (True, False):
                    plan = select_decode_plan(device, DecodeProblem(
                        dtype=dtype, head_dim=d, nheads_q=packed, aligned=aligned))
                    specs[plan.spec] = plan
        specs[_append_spec(dtype)] = plan
    return specs
