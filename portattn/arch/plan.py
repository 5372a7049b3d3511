"""Plan selection: which code path and tiles run a problem on a device, and why.

``select_plan`` is pure (no CUDA calls) and compares integers read from the arch table,
so the same decision is printed by ``report --arch`` with no GPU, checked by the compile
gate, and taken at run time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..spec import (DTYPES, FEAT_MODS, MAX_HEAD_DIM, KernelSpec, head_dim_bucket,
                    tc_q_in_registers)
from .device import DeviceInfo
from .table import MMA_M8N8K4, MMA_M16N8K8, MMA_M16N8K16, MMA_NAMES

@dataclass(frozen=True)
class Problem:
    """The integers and flags a plan depends on (no array, no device pointer)."""
    dtype: str
    head_dim: int
    seqlen_q: int = 1024
    seqlen_k: int = 1024
    batch: int = 1
    nheads_q: int = 1
    nheads_kv: int = 1
    causal: bool = False
    window: tuple = (-1, -1)
    alibi: bool = False
    softcap: bool = False
    bias: bool = False
    varlen: bool = False     # packed sequences: batch = their count, seqlens the longest
    neg_scale: bool = False  # softmax_scale < 0 (reverses the row max)

    @property
    def score_mods(self) -> bool:
        """Any per-score modifier beyond masks (the tensor-core kernels' FEAT_MODS)."""
        return self.alibi or self.softcap or self.bias or self.neg_scale


@dataclass(frozen=True)
class Plan:
    path: str
    spec: KernelSpec
    smem_bytes: int
    ctas_per_sm: int         # resident CTAs allowed by smem, threads and the CTA limit
    reason: str
    rejected: tuple          # ((path, why), ...) for every other path
    plan_cc: int

    @property
    def warps_per_sm(self) -> int:
        return self.ctas_per_sm * self.spec.threads // 32

    def describe(self) -> str:
        s = self.spec
        lines = [f"path {self.path} on sm_{self.plan_cc}: {s.short()}, "
                 f"{self.smem_bytes // 1024} KB smem, {self.ctas_per_sm} CTA(s)/SM by smem",
                 f"  why: {self.reason}"]
        lines += [f"  not {p}: {why}" for p, why in self.rejected]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Path:
    name: str
    mma: int                 # minimum MMA level (MMA_NONE for SIMT)
    dtypes: tuple
    needs_ldmatrix: bool = False
    needs_cp_async: bool = False
    implemented: bool = False


# Preference order: the first path that is eligible and implemented runs.
PATHS = (
    _Path("sm80", MMA_M16N8K16, ("float16", "bfloat16"), True, True, implemented=True),
    _Path("sm75", MMA_M16N8K8, ("float16",), True, implemented=True),
    _Path("sm70", MMA_M8N8K4, ("float16",), implemented=True),
    _Path("simt", 0, DTYPES, implemented=True),
)
PATH_NAMES = tuple(p.name for p in PATHS)

# SIMT tile candidates (block_m, block_n, threads, tx), best first. tx threads share a
# query row group; each holds rows block_m/(threads/tx) x cols block_n/tx of S.
SIMT_TILES = (
    (64, 64, 128, 8),
    (64, 32, 128, 8),
    (128, 64, 256, 8),
    (128, 32, 256, 8),
    (32, 64, 128, 8),
    (32, 32, 128, 8),
    (16, 32, 128, 8),
    (16, 16, 64, 4),
)
# Per-thread accumulator budgets that keep ptxas within 255 registers with no spills
# (checked by the compile gate): O rows x O cols, the S micro-tile, and O + 2*S (S's
# operands stay live across the unrolled QK^T loop, so S weighs double). Measured with
# NVRTC 12.9, sm_52..sm_90: O+2S = 160 compiles to 208-237 registers; 176 (d224 128x64)
# to 253 and 192 (d256 64x64) to 247-255, too close to the limit to admit.
SIMT_MAX_O_REGS = 128
SIMT_MAX_S_REGS = 32
SIMT_MAX_ACC_REGS = 160
TARGET_WARPS_PER_SM = 8


def _path_hw_reason(path: _Path, f, dtype: str):
    """Why ``path`` cannot run ``dtype`` on arch facts ``f``; None if it can."""
    if f.mma < path.mma:
        have = MMA_NAMES[f.mma] if f.mma else "no tensor-core MMA"
        return f"needs {MMA_NAMES[path.mma]}; {f.name} has {have}"
    if path.needs_ldmatrix and not f.ldmatrix:
        return f"needs ldmatrix; {f.name} lacks it"
    if path.needs_cp_async and not f.cp_async:
        return f"needs cp.async; {f.name} lacks it"
    if dtype not in path.dtypes:
        if dtype == "bfloat16" and path.mma and path.mma < MMA_M16N8K16:
            return f"{MMA_NAMES[path.mma]} has no bfloat16 form (bf16 MMA needs sm_80)"
        if dtype == "float32" and path.mma:
            return "float32 inputs have no tensor-core form here; SIMT keeps full fp32"
        return f"does not take {dtype}"
    if path.mma == MMA_M8N8K4 and f.mma > MMA_M8N8K4:
        return (f"{MMA_NAMES[MMA_M8N8K4]} is emulated at a fraction of the rate on "
                f"{f.name}, which has {MMA_NAMES[f.mma]}")
    return None


def ctas_per_sm(device: DeviceInfo, threads: int, smem: int) -> int:
    f = device.facts
    by_smem = device.smem_per_sm // (smem + f.smem_reserved_per_block) if smem else f.max_ctas_per_sm
    return max(0, min(by_smem, f.max_ctas_per_sm, f.max_threads_per_sm // threads))


def simt_tile_candidates(head_dim_padded: int):
    """SIMT tiles whose per-thread accumulators fit the register budget."""
    out = []
    for bm, bn, threads, tx in SIMT_TILES:
        ty = threads // tx
        rm, rn = bm // ty, bn // tx
        o_regs, s_regs = rm * (head_dim_padded // tx), rm * rn
        if (o_regs <= SIMT_MAX_O_REGS and s_regs <= SIMT_MAX_S_REGS
                and o_regs + 2 * s_regs <= SIMT_MAX_ACC_REGS):
            out.append((bm, bn, threads, tx))
    return out


def simt_fma_per_load(bm: int, bn: int, threads: int, tx: int) -> float:
    """FMAs per shared-memory load instruction in the S = QK^T loop: RM rows of Q^T
    (16-byte vectors) and RN columns of K^T per head-dim step, RM*RN FMAs."""
    rm, rn = bm // (threads // tx), bn // tx
    return rm * rn / (-(-rm // 4) + rn // 4)


def _plan_simt(device: DeviceInfo, problem: Problem):
    """Pick the tile maximising (FMAs per shared load) x min(resident warps, 8) / 8: the
    inner loop's issue efficiency, discounted when too few warps hide latency."""
    d = head_dim_bucket(problem.head_dim)
    lim = f"{device.smem_per_block // 1024} KB/block, {device.smem_per_sm // 1024} KB/SM"
    best, best_score = None, -1.0
    for bm, bn, threads, tx in simt_tile_candidates(d):
        spec = KernelSpec("simt_fwd", problem.dtype, d, bm, bn, threads, tx)
        smem = spec.smem_bytes
        if smem > device.smem_per_block:
            continue
        ctas = ctas_per_sm(device, threads, smem)
        warps = ctas * threads // 32
        score = simt_fma_per_load(bm, bn, threads, tx) * min(warps, TARGET_WARPS_PER_SM)
        if score > best_score:
            best, best_score = (spec, smem, ctas), score
    if best is None:
        return None, (f"no SIMT tile for head dim {d} fits {device.smem_per_block // 1024} KB "
                      f"of shared memory per block")
    spec, smem, ctas = best
    fpl = simt_fma_per_load(spec.block_m, spec.block_n, spec.threads, spec.tx)
    return best, (f"{spec.block_m}x{spec.block_n} tile: best of {fpl:.1f} FMAs per shared "
                  f"load x {ctas} CTA(s) of {spec.threads // 32} warps resident "
                  f"(target {TARGET_WARPS_PER_SM} warps) in {lim}")


# Tensor-core tiles (block_m, block_n, threads), best first; each warp owns
# block_m / (16 * warps) blocks of 16 query rows (MB).
TC_TILES = (
    (128, 64, 128),
    (128, 32, 128),
    (128, 64, 256),
    (64, 64, 128),
    (64, 32, 128),
    (32, 32, 64),
)
# Estimated live accumulator/fragment registers per thread: MB * (O: d/2 + S and P:
# 3*block_n/4), plus Turing's register-staged tile. ptxas (NVRTC 12.9) lands at about
# est + 30..90. Per MMA policy: sm80 compiles est 224 (d128 128x64) to 255 registers
# with no spills once the copies stopped pinning 64-bit addresses (tc_common.cuh), and
# that tile measured 15% faster than 128x32 on an H100 (300 vs 261 TFLOP/s). Turing's
# staging, split MMAs and register-held Q cost more: est 160 spilled on sm_75 until the
# score modifiers became a compile-time feature; since then d128 128x64 with 8 warps
# (est 160) compiles to 248 registers (244 with FEAT_MODS) with no spills on sm_75.
TC_MAX_EST_REGS = {80: 224, 75: 160}


def tc_rows_per_warp(bm: int, threads: int) -> int:
    return bm // (16 * (threads // 32))


def tc_stage_chunks(bn: int, threads: int, d: int) -> int:
    """16-byte chunks of one K/V tile per thread."""
    return -(-(bn * d // 8) // threads)


def tc_staged(bn: int, threads: int, d: int, mma: int) -> bool:
    """Turing prefetches K/V tiles through registers (tc_fwd.cu's kStage rule)."""
    return mma < 80 and tc_stage_chunks(bn, threads, d) <= 4


def tc_est_regs(bm: int, bn: int, threads: int, d: int, mma: int) -> int:
    mb = tc_rows_per_warp(bm, threads)
    est = mb * (d // 2 + 3 * bn // 4)
    if tc_staged(bn, threads, d, mma):
        est += 4 * tc_stage_chunks(bn, threads, d)
    if tc_q_in_registers(bm, threads, d, mma):
        est += mb * d // 4
    return est


def tc_mma_per_ldsm(bm: int, bn: int, threads: int, d: int, mma: int) -> float:
    """MMAs per ldmatrix.x4 per warp and K/V tile: Q (MB per k16 step, none when held in
    registers) and K (block_n/16) for S, V (d/16 per key step) for PV."""
    mb = tc_rows_per_warp(bm, threads)
    q_loads = 0 if tc_q_in_registers(bm, threads, d, mma) else mb
    mma_ops = mb * bn * d // 64
    ldsm = (d // 16) * (q_loads + bn // 16) + (bn // 16) * (d // 16)
    return mma_ops / ldsm


# Ampere+ tiles at d <= 64 without score modifiers compile with no spills at 168
# registers, so 3 CTAs (12 warps) fit where shared memory allows: the softmax hides behind
# other warps' MMAs, 0.83-0.86 -> 0.90-0.98x SDPA flash at d64 on an H100
# (benchmarks/NOTES.md, fifth session). With FEAT_MODS the same cap spilled 220-236 bytes; on sm_86/89 shared
# memory holds only 2 CTAs and the cap would buy nothing.
TC_MIN_CTAS = 3
TC_MIN_CTAS_MAX_D = 64


def tc_min_ctas(spec: KernelSpec, ctas_by_smem: int) -> int:
    """The __launch_bounds__ minimum of a tc_fwd spec (1: no register cap)."""
    if (spec.mma >= 80 and spec.head_dim <= TC_MIN_CTAS_MAX_D and not spec.feat & FEAT_MODS
            and ctas_by_smem >= TC_MIN_CTAS):
        return TC_MIN_CTAS
    return 1


def _plan_tc(device: DeviceInfo, problem: Problem, mma: int):
    """Pick the tile maximising (MMAs per ldmatrix) x min(resident warps, 8) / 8 among
    those within the register estimate and the shared-memory limit."""
    d = head_dim_bucket(problem.head_dim)
    lim = f"{device.smem_per_block // 1024} KB/block, {device.smem_per_sm // 1024} KB/SM"
    best, best_score = None, -1.0
    for bm, bn, threads in TC_TILES:
        if (tc_rows_per_warp(bm, threads) < 1
                or tc_est_regs(bm, bn, threads, d, mma) > TC_MAX_EST_REGS[mma]):
            continue
        feat = FEAT_MODS if problem.score_mods else 0
        spec = KernelSpec("tc_fwd", problem.dtype, d, bm, bn, threads, mma=mma, feat=feat)
        smem = spec.smem_bytes
        if smem > device.smem_per_block:
            continue
        ctas = ctas_per_sm(device, threads, smem)
        score = tc_mma_per_ldsm(bm, bn, threads, d, mma) * min(ctas * threads // 32,
                                                           TARGET_WARPS_PER_SM)
        if score > best_score:
            best, best_score = (spec, smem, ctas), score
    if best is None:
        return None, f"no tensor-core tile for head dim {d} fits {lim}"
    spec, smem, ctas = best
    ratio = tc_mma_per_ldsm(spec.block_m, spec.block_n, spec.threads, d, mma)
    why = (f"{spec.block_m}x{spec.block_n} tile: best of {ratio:.2f} MMAs per ldmatrix "
           f"x {ctas} CTA(s) of {spec.threads // 32} warps resident "
           f"(target {TARGET_WARPS_PER_SM} warps) in {lim}")
    min_ctas = tc_min_ctas(spec, ctas)
    if min_ctas > 1:
        spec = dataclasses.replace(spec, min_ctas=min_ctas)
        cap = device.facts.regs_per_sm // (min_ctas * spec.threads) // 8 * 8
        why += f"; ptxas asked for {min_ctas} CTAs per SM (registers capped at {cap})"
    return (spec, smem, ctas), why


# Volta tiles (block_m, block_n, threads), best first. m8n8k4 gives each warp 32 query rows
# (8 per quad pair); WD = threads / 32 / (block_m / 32) warps share a row group, each with
# head_dim / WD of O (tc70_fwd.cu), since 32 rows x d fp32 of O exceed the registers past d128.
TC70_TILES = (
    (128, 64, 128),
    (128, 32, 128),
    (64, 32, 64),
    (64, 64, 128),
    (64, 32, 128),
    (32, 64, 64),
    (32, 32, 64),
)
# Estimated live registers per thread: O (d / WD) + 2 x S (block_n; S's operands and the
# packed P overlap it) + 2 x the register-staged K/V tile (both halves live across a
# product). NVRTC 12.9, sm_70: est 144-192 compiled to 192-252 registers with no spills;
# d64 128x64 (est 224) and d224 64x64 (240) spilled, and so did d32 64x64 with 64 threads
# (est 192: its 4 staged chunks per thread), which is why that tile is not in the table.
TC70_MAX_EST_REGS = 192


def tc70_split(bm: int, threads: int) -> int:
    """Warps sharing one 32-row group (WD in tc70_fwd.cu); 0 if the shape is invalid."""
    rw = bm // 32
    nw = threads // 32
    return nw // rw if rw and rw * 32 == bm and nw % rw == 0 else 0


def tc70_est_regs(bm: int, bn: int, threads: int, d: int) -> int:
    wd = tc70_split(bm, threads)
    per_thread = -(-(bn * d // 8) // threads)
    return d // wd + 2 * bn + (8 * per_thread if per_thread <= 4 else 0)


def tc70_mma_per_lds(bm: int, bn: int, threads: int, d: int) -> float:
    """Useful m8n8k4 per 16-byte shared load per warp and K/V tile: S takes one Q and
    block_n/8 K loads per two k4 steps, P V one V load per two MMAs; a warp sharing its
    rows (WD = 2) repeats S, so only 2 / (WD + 1) of its MMAs are useful."""
    wd = tc70_split(bm, threads)
    dw = d // wd
    mma = bn * d // 32 + bn * dw // 32
    lds = (d // 8) * (1 + bn // 8) + (bn // 4) * (dw // 16)
    return mma / lds * 2 / (wd + 1)


# Resident warps beyond which m8n8k4 tiles gain nothing more. Measured on an H100 planned as
# sm_70 (emulated m8n8k4, so only ratios mean anything), timing each candidate: at d128,
# 64x32/2 warps x 2 CTAs (one warp per row group) ran 1.4x faster than 64x32/4 warps x 2
# CTAs sharing rows (WD = 2); at d64, 128x32/4 warps beat 64x32/2 warps by 6%.
TC70_TARGET_WARPS = 4


def _plan_tc70(device: DeviceInfo, problem: Problem):
    """Pick the tile maximising useful MMAs per shared load x min(resident warps, 4) / 4
    among those within the register estimate and the shared-memory limit; on a tie, the
    taller tile (K/V read from global once per more query rows), then more resident CTAs."""
    d = head_dim_bucket(problem.head_dim)
    lim = f"{device.smem_per_block // 1024} KB/block, {device.smem_per_sm // 1024} KB/SM"
    best, best_score = None, (-1.0, 0, 0)
    for bm, bn, threads in TC70_TILES:
        wd = tc70_split(bm, threads)
        if (wd not in (1, 2) or (d // wd) % 16
                or tc70_est_regs(bm, bn, threads, d) > TC70_MAX_EST_REGS):
            continue
        spec = KernelSpec("tc70_fwd", problem.dtype, d, bm, bn, threads, mma=70)
        smem = spec.smem_bytes
        if smem > device.smem_per_block:
            continue
        ctas = ctas_per_sm(device, threads, smem)
        score = (tc70_mma_per_lds(bm, bn, threads, d) * min(ctas * threads // 32,
                                                            TC70_TARGET_WARPS), bm, ctas)
        if score > best_score:
            best, best_score = (spec, smem, ctas), score
    if best is None:
        return None, f"no m8n8k4 tile for head dim {d} fits {lim}"
    spec, smem, ctas = best
    wd = tc70_split(spec.block_m, spec.threads)
    ratio = tc70_mma_per_lds(spec.block_m, spec.block_n, spec.threads, d)
    share = f", {wd} warps per 32 rows" if wd > 1 else ""
    return best, (f"{spec.block_m}x{spec.block_n} tile{share}: best of {ratio:.2f} useful MMAs "
                  f"per shared load x {ctas} CTA(s) of {spec.threads // 32} warps resident "
                  f"(target {TC70_TARGET_WARPS} warps) in {lim}")


_PLANNERS = {"simt": _plan_simt,
             "sm70": _plan_tc70,
             "sm80": lambda device, problem: _plan_tc(device, problem, 80),
             "sm75": lambda device, problem: _plan_tc(device, problem, 75)}


def validate_problem(problem: Problem) -> None:
    if problem.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {problem.dtype!r}")
    if not 1 <= problem.head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM}, got {problem.head_dim}")


def select_plan(device: DeviceInfo, problem: Problem, only: str | None = None) -> Plan:
    """Choose the path and tiles for ``problem`` on ``device``; pure and deterministic.
    ``only`` (PORTATTN_PATH) restricts the choice to one path; ValueError if it can't run."""
    validate_problem(problem)
    if only is not None and only not in PATH_NAMES:
        raise ValueError(f"path must be one of {PATH_NAMES}, got {only!r}")
    f = device.facts
    chosen = None
    rejected = []
    for path in PATHS:
        why = _path_hw_reason(path, f, problem.dtype)
        if only is not None and path.name != only:
            why = f"excluded: PORTATTN_PATH={only}"
        if why is None and not path.implemented:
            why = "not implemented in this release of portattn"
        if why is None and chosen is not None:
            why = f"lower preference than {chosen[0]}"
        if why is None:
            picked, tile_why = _PLANNERS[path.name](device, problem)
            if picked is None:
                why = tile_why
            else:
                head = f"fastest eligible path for {problem.dtype} on {f.name}"
                chosen = (path.name, picked, f"{head}; {tile_why}")
                continue
        rejected.append((path.name, why))
    if chosen is None:
        raise ValueError(f"no path can run {problem} on {device.describe()}: " +
                         "; ".join(f"{p}: {w}" for p, w in rejected))
    name, (spec, smem, ctas), reason = chosen
    return Plan(path=name, spec=spec, smem_bytes=smem, ctas_per_sm=ctas, reason=reason,
                rejected=tuple(rejected), plan_cc=device.plan_cc)


def all_specs_for(device: DeviceInfo):
    """Every KernelSpec select_plan can return on ``device`` (for the compile gate)."""
    specs = {}
    for dtype in DTYPES:
        for d in range(32, MAX_HEAD_DIM + 1, 32):
            for alibi in (False, True):
                plan = select_plan(device, Problem(dtype=dtype, head_dim=d, alibi=alibi))
                specs[plan.spec] = plan
    return specs
