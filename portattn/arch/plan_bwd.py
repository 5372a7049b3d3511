"""Backward plan: which kernels and tiles compute dQ, dK and dV on a device, and why.

Pure and table-driven like ``select_plan``. A backward plan is one spec per stage
(``BWD_STAGES``: pre, dkdv, dq, cvt). The SIMT family (simt_bwd.cu) runs every stage on
every arch, all four naming one spec (the stage is a run-time argument). On sm_80+
(fp16/bf16), sm_75 and sm_70 (fp16) the dkdv stage -- all but a few percent of the work,
dQ's atomics included -- is tensor-core (tc_bwd.cu, paths "sm80"/"sm75"; tc70_bwd.cu, path
"sm70"), pre and cvt run in tc_bwd's low-register row kernel, and the deterministic dq
stage stays on the SIMT spec.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..spec import DTYPES, FEAT_MODS, FEAT_PAIRS, MAX_HEAD_DIM, KernelSpec, head_dim_bucket
from .device import DeviceInfo
from .plan import (PATH_NAMES, PATHS, TARGET_WARPS_PER_SM, Problem, _path_hw_reason,
                   ctas_per_sm, validate_problem)

# SIMT backward tiles (block_m query rows, block_n key rows, threads, tx), best first.
# tx lanes split a query tile (S^T, dP^T) and the head dim (dK, dV, dQ); threads/tx
# rows of lanes split the key tile.
SIMT_BWD_TILES = (
    (64, 64, 256, 16),
    (32, 64, 128, 8),
    (64, 32, 128, 8),
    (32, 32, 256, 16),
    (32, 32, 128, 8),
    (16, 32, 128, 8),
    (16, 16, 256, 16),
    (16, 16, 128, 8),
    (8, 8, 64, 8),
)
# Per-thread budgets that keep ptxas under 255 registers with no spills (checked by the
# compile gate, NVRTC 12.9, sm_50..sm_90): dK + dV accumulators live across the whole
# kernel, dQ's partial tile and the S/dP micro-tiles live inside one query tile.
SIMT_BWD_MAX_ACC_REGS = 128
SIMT_BWD_MAX_S_REGS = 32
# The stages in launch order; simt_bwd.cu's ``stage`` argument is the index.
BWD_STAGES = ("pre", "dkdv", "dq", "cvt")


@dataclass(frozen=True)
class BwdPlan:
    path: str
    specs: dict              # stage name (BWD_STAGES) -> KernelSpec
    smem_bytes: int          # of the dkdv / dq stages
    ctas_per_sm: int
    reason: str
    rejected: tuple          # ((path, why), ...)
    plan_cc: int

    def spec(self, stage: str) -> KernelSpec:
        return self.specs[stage]

    def describe(self) -> str:
        s = self.specs["dkdv"]
        lines = [f"backward path {self.path} on sm_{self.plan_cc}: {s.short()}, "
                 f"{self.smem_bytes // 1024} KB smem, {self.ctas_per_sm} CTA(s)/SM by smem",
                 f"  why: {self.reason}"]
        lines += [f"  not {p}: {why}" for p, why in self.rejected]
        return "\n".join(lines)


def simt_bwd_regs(bm: int, bn: int, threads: int, tx: int, d: int) -> tuple:
    """(accumulator registers, S+dP registers) per thread for a tile and padded head dim."""
    ty = threads // tx
    rk, rq, rqc, dc = bn // ty, bm // tx, bm // ty, d // tx
    return 2 * rk * dc + rqc * dc, 2 * rk * rq


def simt_bwd_tile_candidates(d: int):
    out = []
    for bm, bn, threads, tx in SIMT_BWD_TILES:
        ty = threads // tx
        if bn % ty or bm % ty or bm % tx or d % tx:
            continue
        acc, s = simt_bwd_regs(bm, bn, threads, tx, d)
        if acc <= SIMT_BWD_MAX_ACC_REGS and s <= SIMT_BWD_MAX_S_REGS:
            out.append((bm, bn, threads, tx))
    return out


def _reuse(bm: int, bn: int) -> float:
    """Products per staged element: a bm x bn tile pair stages bm + bn rows of d."""
    return bm * bn / (bm + bn)


def _plan_simt_bwd(device: DeviceInfo, problem: Problem):
    d = head_dim_bucket(problem.head_dim)
    lim = f"{device.smem_per_block // 1024} KB/block, {device.smem_per_sm // 1024} KB/SM"
    best, best_score = None, -1.0
    for bm, bn, threads, tx in simt_bwd_tile_candidates(d):
        spec = KernelSpec("simt_bwd", problem.dtype, d, bm, bn, threads, tx)
        smem = spec.smem_bytes
        if smem > device.smem_per_block:
            continue
        ctas = ctas_per_sm(device, threads, smem)
        score = _reuse(bm, bn) * min(ctas * threads // 32, TARGET_WARPS_PER_SM)
        if score > best_score:
            best, best_score = (spec, smem, ctas), score
    if best is None:
        return None, f"no SIMT backward tile for head dim {d} fits {lim}"
    spec, smem, ctas = best
    reuse = _reuse(spec.block_m, spec.block_n)
    return best, (f"{spec.block_m}x{spec.block_n} tile: best of {reuse:.1f} "
                  f"products per staged element x {ctas} CTA(s) of {spec.threads // 32} warps "
                  f"resident (target {TARGET_WARPS_PER_SM} warps) in {lim}")


# Tensor-core dK/dV tiles (block_m query rows per step, block_n keys, threads), best first.
# Each warp owns 16 keys (block_n = 16 x warps) and keeps their dK and dV (16 x d, fp32) in
# registers; S^T and dP^T of a query step take block_m more per thread. With warp pairs
# (FEAT_PAIRS) the same amounts are split 32 keys x d/2, and 128-query tiles exist only
# with them (tc_bwd.cu's kS2D: S^T and dP^T split across the pair too).
TC_BWD_TILES = (
    (128, 128, 256),  # pairs only: FA2's d64 tile; fwd+bwd +8-11% at d64 on the H100
    (64, 128, 256),   # FA2's d<=128 tile: Q/dO re-read and dQ atomics per key = 1/128
    (64, 64, 128),
    (32, 64, 128),    # 99 KB (sm_86/89) and Turing's 64 KB at d128
    (32, 32, 64),
    (16, 64, 128),    # Turing d128: S^T + dP^T of 16 queries keep it under 255 registers
)
# Estimated live fp32 registers per thread, d (dK + dV) + block_m (S^T + dP^T), budget per
# MMA policy. NVRTC 12.9: sm_80 est 192 (d128, 64x128) compiles to 249 registers with no
# spills; sm_75 (two MMAs per k16 step) spilled at est 160 (d128 32x64, d96 64x64) and
# fits at 144 (d128 16x64: 252 registers). Larger head dims would hold more accumulators
# than a thread has registers (d256: 256 for dK + dV alone), so they stay on SIMT until a
# kernel splits the head dim across warps.
TC_BWD_MAX_EST_REGS = {80: 192, 75: 144}
# Without score modifiers (FEAT 0) sm_75 fits est 160: d128 32x64 and d96 64x64 compile to
# 255 and 246 registers with no spills (their FEAT_MODS builds spill 32-76 bytes).
TC_BWD_MAX_EST_REGS_PLAIN = {80: 192, 75: 160}


def tc_bwd_budget(mma: int, score_mods: bool) -> int:
    return (TC_BWD_MAX_EST_REGS if score_mods else TC_BWD_MAX_EST_REGS_PLAIN)[mma]
# d160 (32x64, est 192) spilled 52-72 bytes on sm_80/86 with one 16-key block per warp.
TC_BWD_MAX_HEAD_DIM = 128
# (head dim, block_m, block_n, threads, pairs) within the estimate that ptxas still spilled
# (NVRTC 12.9): sm_80 d96 64x128 without pairs (dQ in 16-column chunks of 48 per warp), 4-8
# bytes; sm_90 d32 128x128 with pairs, 12 bytes.
TC_BWD_SPILLED = {(96, 64, 128, 256, False), (32, 128, 128, 256, True)}
# The same with FEAT_MODS (the plain build fits): d64 128x128 with pairs, 212 bytes on sm_90.
TC_BWD_SPILLED_MODS = {(64, 128, 128, 256, True)}
# MMA policy per forward path name, in preference order; what each path needs of the
# hardware and which dtypes it takes are the forward's (arch.plan.PATHS).
TC_BWD_POLICIES = {"sm80": 80, "sm75": 75, "sm70": 70}


def tc_bwd_row_spec(dtype: str, mma: int) -> KernelSpec:
    """tc_bwd.cu's row stages (pre, cvt): block_m = 0 selects them; the head dim is a
    run-time argument there, so one compile per dtype and MMA policy serves every d."""
    return KernelSpec("tc_bwd", dtype, 32, 0, 0, 256, mma=mma)


def tc_bwd_est_regs(bm: int, d: int) -> int:
    return d + bm


def tc_bwd_tile_ok(bm: int, bn: int, threads: int, d: int) -> bool:
    """tc_bwd.cu's static shape rules: 16 keys per warp, and dQ's 16-row blocks x head-dim
    column groups (multiples of 16) cover the warps exactly."""
    warps = threads // 32
    qb = bm // 16
    if bn != 16 * warps or bm % 16 or qb == 0 or warps % qb:
        return False
    dw = d // (warps // qb)
    return dw * (warps // qb) == d and dw % 16 == 0


# Warp pairs (FEAT_PAIRS) on 64-query tiles from this head dim up: fwd+bwd on the H100
# (same-process A/B, alternating order), with S^T / dP^T split across the pair as well, gained
# 3-7% at d128 (64x128) and 8-19% at d96 (64x128, which spilled unpaired); at d64 pairs lost
# 1-4% (K and V fragments stay in registers there) (benchmarks/NOTES.md, seventh session).
# 128-query tiles always take them.
TC_BWD_PAIRS_MIN_HEAD_DIM = 96


def tc_bwd_pairs_ok(mma: int, bm: int, threads: int, d: int) -> bool:
    """tc_bwd.cu's FEAT_PAIRS shape rules: sm_80+, an even warp count, half the head dim a
    multiple of 16; and, below 128-query tiles, where it measured faster."""
    return (mma >= 80 and (threads // 32) % 2 == 0 and (d // 2) % 16 == 0
            and (bm >= 128 or d >= TC_BWD_PAIRS_MIN_HEAD_DIM))


def tc_bwd_splits_s(spec: KernelSpec) -> bool:
    """tc_bwd.cu's kS2D: warp pairs split S^T and dP^T too, on 128-query tiles and, in plain
    builds (with score modifiers d128 spilled), from d96."""
    return bool(spec.feat & FEAT_PAIRS) and (
        spec.block_m >= 128 or (spec.head_dim >= 96 and not spec.feat & FEAT_MODS))


def _plan_tc_bwd(device: DeviceInfo, problem: Problem, mma: int):
    d = head_dim_bucket(problem.head_dim)
    lim = f"{device.smem_per_block // 1024} KB/block, {device.smem_per_sm // 1024} KB/SM"
    budget = tc_bwd_budget(mma, problem.score_mods)
    if d > TC_BWD_MAX_HEAD_DIM or tc_bwd_est_regs(16, d) > budget:
        return None, (f"head dim {d}: dK + dV of 16 keys x d per warp need ~{d} fp32 "
                      f"registers per thread before S and dP (budget {budget})")
    mods = FEAT_MODS if problem.score_mods else 0
    for bm, bn, threads in TC_BWD_TILES:
        if not tc_bwd_tile_ok(bm, bn, threads, d) or tc_bwd_est_regs(bm, d) > budget:
            continue
        # Warp pairs where they apply (they need P^T's shared memory too), else the same tile
        # without them; 128-query tiles only with them.
        pairs = tc_bwd_pairs_ok(mma, bm, threads, d)
        if bm >= 128:
            feats = (mods | FEAT_PAIRS,) if pairs else ()
        else:
            feats = (mods | FEAT_PAIRS, mods) if pairs else (mods,)
        for feat in feats:
            key = (d, bm, bn, threads, bool(feat & FEAT_PAIRS))
            if key in TC_BWD_SPILLED or (mods and key in TC_BWD_SPILLED_MODS):
                continue
            spec = KernelSpec("tc_bwd", problem.dtype, d, bm, bn, threads, mma=mma, feat=feat)
            smem = spec.smem_bytes
            if smem > device.smem_per_block:
                continue
            ctas = ctas_per_sm(device, threads, smem)
            how = ("warp pairs share 32 keys for dK and dV (P^T and dS^T through shared "
                   "memory: half of Q and dO per warp)" if feat & FEAT_PAIRS else
                   f"{threads // 32} warps of 16 keys")
            unpaired = (f"; without warp pairs: their P^T buffer would exceed {lim}"
                        if pairs and not feat & FEAT_PAIRS else "")
            if tc_bwd_splits_s(spec):
                how += (f", and S^T and dP^T split across the pair (32 keys x {bm // 2} "
                        f"queries each)")
            return (spec, smem, ctas), (
                f"{bm}x{bn} tile, {how}: the first in TC_BWD_TILES "
                f"(largest key tile first: fewer Q/dO re-reads and dQ atomics per key) within "
                f"~{tc_bwd_est_regs(bm, d)} accumulator registers and {lim}{unpaired}")
    return None, f"no tensor-core backward tile for head dim {d} fits {lim}"


# Volta dK/dV tiles (block_m, block_n, threads), best first (tc70_bwd.cu): 16 keys per
# warp as in tc_bwd.cu; each quad pair holds half of the warp's dK and dV columns.
TC70_BWD_TILES = (
    (64, 64, 128),
    (32, 64, 128),
    (32, 32, 64),
)
# Estimated live fp32 registers per thread, d (dK + dV) + block_m (S^T + dP^T), as
# tc_bwd_est_regs. NVRTC 12.9, sm_70: est 160 compiled to 242-252 registers with no spills
# (d128 32x64, d96 64x64, plain and with modifiers); d128 64x64 (est 192) spilled 88 bytes.
TC70_BWD_MAX_EST_REGS = 160


def tc70_bwd_tile_ok(bm: int, bn: int, threads: int, d: int) -> bool:
    """tc70_bwd.cu's static shape rules: 16 keys per warp, dK/dV columns split in two
    16-column multiples, and dQ's 32-query x DW-column warp blocks (DW a multiple of 16)
    covering the tile."""
    warps = threads // 32
    rq = bm // 32
    if bn != 16 * warps or bm % 32 or rq == 0 or warps % rq or (d // 2) % 16:
        return False
    dw = d // (warps // rq)
    return dw * (warps // rq) == d and dw % 16 == 0


def _plan_tc70_bwd(device: DeviceInfo, problem: Problem, mma: int):
    """The first tile in TC70_BWD_TILES within the register estimate and shared memory that
    leaves >= 2 CTAs resident, else the first that fits: Volta has no cp.async, so a CTA
    waits out its Q/dO copy at every query step, and a second CTA has work to overlap it."""
    d = head_dim_bucket(problem.head_dim)
    lim = f"{device.smem_per_block // 1024} KB/block, {device.smem_per_sm // 1024} KB/SM"
    if d > TC_BWD_MAX_HEAD_DIM:
        return None, (f"head dim {d}: dK + dV of 16 keys x d per warp need ~{d} fp32 "
                      f"registers per thread before S and dP (budget {TC70_BWD_MAX_EST_REGS})")
    fits = []
    for bm, bn, threads in TC70_BWD_TILES:
        if not tc70_bwd_tile_ok(bm, bn, threads, d) or \
                tc_bwd_est_regs(bm, d) > TC70_BWD_MAX_EST_REGS:
            continue
        spec = KernelSpec("tc70_bwd", problem.dtype, d, bm, bn, threads, mma=mma,
                          feat=FEAT_MODS if problem.score_mods else 0)
        smem = spec.smem_bytes
        if smem <= device.smem_per_block:
            fits.append((spec, smem, ctas_per_sm(device, threads, smem)))
    if not fits:
        return None, f"no m8n8k4 backward tile for head dim {d} fits {lim}"
    best = next((x for x in fits if x[2] >= 2), fits[0])
    spec, smem, ctas = best
    return best, (f"{spec.block_m}x{spec.block_n} tile, {spec.threads // 32} warps of 16 keys: "
                  f"the first in TC70_BWD_TILES within ~{tc_bwd_est_regs(spec.block_m, d)} "
                  f"accumulator registers and {lim}"
                  + (" with >= 2 CTAs resident (no cp.async: a second CTA overlaps each "
                     "CTA's Q/dO copies)" if ctas >= 2 else ""))


def select_bwd_plan(device: DeviceInfo, problem: Problem, only: str | None = None) -> BwdPlan:
    """Kernels and tiles for the backward pass of ``problem`` on ``device``; pure.

    ``only`` (PORTATTN_PATH) names a forward path: "simt" keeps the backward on SIMT,
    "sm80"/"sm75"/"sm70" allow only that tensor-core policy for the dkdv stage (falling
    back to SIMT, with the reason, where it cannot run)."""
    validate_problem(problem)
    if only is not None and only not in PATH_NAMES:
        raise ValueError(f"path must be one of {PATH_NAMES}, got {only!r}")
    picked, simt_why = _plan_simt_bwd(device, problem)
    if picked is None:
        raise ValueError(f"no backward plan for {problem} on {device.describe()}: {simt_why}")
    simt_spec, simt_smem, simt_ctas = picked
    f = device.facts
    rejected = []
    chosen = None
    paths = {p.name: p for p in PATHS}
    for name, mma in TC_BWD_POLICIES.items():
        why = None
        if only is not None and only != name:
            why = f"excluded: PORTATTN_PATH={only}"
        else:
            why = _path_hw_reason(paths[name], f, problem.dtype)
        if why is None and chosen is not None:
            why = f"lower preference than {chosen[0]}"
        if why is None:
            planner = _plan_tc70_bwd if mma == 70 else _plan_tc_bwd
            tc, tile_why = planner(device, problem, mma)
            if tc is None:
                why = tile_why
            else:
                chosen = (name, tc, tile_why)
                continue
        rejected.append((name, why))
    if chosen is not None:
        name, (spec, smem, ctas), tile_why = chosen
        rows = tc_bwd_row_spec(problem.dtype, spec.mma)
        specs = {"pre": rows, "dkdv": spec, "dq": simt_spec, "cvt": rows}
        reason = (f"tensor-core dK/dV (+ atomic dQ) for {problem.dtype} on {f.name}; "
                  f"{tile_why}; pre and cvt in tc_bwd's row kernel, deterministic dq on "
                  f"SIMT {simt_spec.block_m}x{simt_spec.block_n}")
        rejected.append(("simt", f"dK/dV stage: lower preference than {name}"))
        return BwdPlan(path=name, specs=specs, smem_bytes=smem, ctas_per_sm=ctas,
                       reason=reason, rejected=tuple(rejected), plan_cc=device.plan_cc)
    specs = {stage: simt_spec for stage in BWD_STAGES}
    head = "no tensor-core backward applies"
    return BwdPlan(path="simt", specs=specs, smem_bytes=simt_smem, ctas_per_sm=simt_ctas,
                   reason=f"{head}; {simt_why}", rejected=tuple(rejected),
                   plan_cc=device.plan_cc)


def all_bwd_specs_for(device: DeviceInfo):
    """Every KernelSpec select_bwd_plan can return on ``device`` -> its plan (compile gate)."""
    specs = {}
    for dtype in DTYPES:
        for d in range(32, MAX_HEAD_DIM + 1, 32):
            for alibi in (False, True):
                plan = select_bwd_plan(device, Problem(dtype=dtype, head_dim=d, alibi=alibi))
                for spec in plan.specs.values():
                    specs.setdefault(spec, plan)
    return specs
