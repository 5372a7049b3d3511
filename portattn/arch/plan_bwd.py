"""Backward plan: which kernels and tiles compute dQ, dK and dV on a device, and why.

Pure and table-driven like ``select_plan``. A backward plan is one spec per stage
(``BWD_STAGES``: pre, dkdv, dq, cvt), so another family (a tensor-core dK/dV kernel, say)
slots in by returning its own specs for the stages it implements. This release has the SIMT
family only, on every arch; its one kernel takes the stage as a run-time argument, so all
four stages name the same spec (one compile per dtype, head-dim bucket and tile).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..spec import DTYPES, MAX_HEAD_DIM, KernelSpec, head_dim_bucket
from .device import DeviceInfo
from .plan import PATH_NAMES, TARGET_WARPS_PER_SM, Problem, ctas_per_sm, validate_problem

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


def select_bwd_plan(device: DeviceInfo, problem: Problem, only: str | None = None) -> BwdPlan:
    """Kernels and tiles for the backward pass of ``problem`` on ``device``; pure.

    ``only`` (PORTATTN_PATH) names the forward's path; the backward runs SIMT whatever it
    is, since no tensor-core backward exists yet, and says so in the reason."""
    validate_problem(problem)
    if only is not None and only not in PATH_NAMES:
        raise ValueError(f"path must be one of {PATH_NAMES}, got {only!r}")
    picked, why = _plan_simt_bwd(device, problem)
    if picked is None:
        raise ValueError(f"no backward plan for {problem} on {device.describe()}: {why}")
    spec, smem, ctas = picked
    specs = {stage: spec for stage in BWD_STAGES}
    rejected = tuple((p, "no tensor-core backward kernel in this release of portattn")
                     for p in PATH_NAMES if p != "simt")
    head = "the only backward family in this release"
    if only is not None and only != "simt":
        head += f" (PORTATTN_PATH={only} applies to the forward)"
    return BwdPlan(path="simt", specs=specs, smem_bytes=smem, ctas_per_sm=ctas,
                   reason=f"{head}; {why}", rejected=rejected, plan_cc=device.plan_cc)


def all_bwd_specs_for(device: DeviceInfo):
    """Every KernelSpec select_bwd_plan can return on ``device`` -> its plan (compile gate)."""
    specs = {}
    for dtype in DTYPES:
        for d in range(32, MAX_HEAD_DIM + 1, 32):
            plan = select_bwd_plan(device, Problem(dtype=dtype, head_dim=d))
            for spec in plan.specs.values():
                specs.setdefault(spec, plan)
    return specs
