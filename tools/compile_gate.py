"""Compile gate: every KernelSpec select_plan and select_bwd_plan can return, compiled by
NVRTC to each arch's SASS with no GPU present; fails on any spill or on shared memory beyond
the arch's limit.

    python tools/compile_gate.py [--archs 50,61,...] [--jobs N]

Prints one row per (arch, spec): registers, shared memory (static + the plan's dynamic),
spill bytes, stack frame and the theoretical CTAs per SM (registers, smem, threads).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from portattn.arch import GATE_CCS, all_specs_for, device_from_arch, facts_for  # noqa: E402
from portattn.arch.plan_bwd import all_bwd_specs_for  # noqa: E402
from portattn.arch.plan_decode import all_decode_specs_for  # noqa: E402
from portattn.arch.plan import ctas_per_sm  # noqa: E402
from portattn.compile import compile_cubin  # noqa: E402
from portattn.spec import FEAT_MODS, FEAT_PAIRS  # noqa: E402

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclass
class GateRow:
    cc: int
    spec: object
    regs: int
    static_smem: int
    dynamic_smem: int
    spill_stores: int
    spill_loads: int
    stack: int
    ctas_per_sm: int
    problems: list

    def line(self) -> str:
        s = self.spec
        var = "+".join(["mods"] * bool(s.feat & FEAT_MODS) +
                       ["pairs"] * bool(s.feat & FEAT_PAIRS) +
                       [f"min{s.min_ctas}"] * (s.min_ctas > 1)) or "-"
        return (f"sm_{self.cc:<3} {s.family:9} {s.dtype:9} d{s.head_dim:<4} "
                f"{s.block_m:>3}x{s.block_n:<3} {var:9} {s.threads:>4} {self.regs:>5} "
                f"{(self.static_smem + self.dynamic_smem) / 1024:>7.1f} "
                f"{self.spill_stores:>5}/{self.spill_loads:<5} {self.stack:>5} {self.ctas_per_sm:>6}"
                + ("  " + "; ".join(self.problems) if self.problems else ""))


HEADER = (f"{'arch':6} {'family':9} {'dtype':9} {'hdim':5} {'tile':7} {'variant':9} {'thr':>4} "
          f"{'regs':>5} "
          f"{'smem KB':>7} {'spill st/ld':>11} {'stack':>5} {'CTA/SM':>6}")


def parse_ptxas(log: str, lowered: str):
    """(regs, static smem, stack, spill stores, spill loads) for entry ``lowered``."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        m = _ENTRY.search(line)
        if not m or m.group(1) != lowered:
            continue
        props = used = None
        for follow in lines[i + 1:i + 6]:
            props = props or _PROPS.search(follow)
            used = used or _USED.search(follow)
        if props and used:
            return (int(used.group(1)), int(used.group(2) or 0), int(props.group(1)),
                    int(props.group(2)), int(props.group(3)))
    raise RuntimeError(f"no ptxas report for {lowered} in:\n{log}")


def regs_ctas(regs: int, threads: int, facts) -> int:
    # Registers are allocated per warp in units of 256 (8 per thread).
    per_warp = -(-regs * 32 // 256) * 256
    return facts.regs_per_sm // (per_warp * (threads // 32))


def gate_one(args) -> GateRow:
    cc, spec, plan_smem = args
    facts = facts_for(cc)
    lowered, log = compile_cubin(spec, cc)
    regs, static, stack, st, ld = parse_ptxas(log, lowered)
    dev = device_from_arch(cc)
    ctas = min(ctas_per_sm(dev, spec.threads, plan_smem + static), regs_ctas(regs, spec.threads, facts))
    problems = []
    if st or ld:
        problems.append(f"SPILLS {st}/{ld} bytes")
    if static + plan_smem > dev.smem_per_block:
        problems.append(f"smem {static + plan_smem} > {dev.smem_per_block} per block")
    if ctas < 1:
        problems.append("cannot be resident (registers or smem)")
    return GateRow(cc, spec, regs, static, plan_smem, st, ld, stack, ctas, problems)


def jobs_for(ccs):
    for cc in ccs:
        for spec, plan in all_specs_for(device_from_arch(cc)).items():
            yield cc, spec, plan.smem_bytes
        for spec in all_bwd_specs_for(device_from_arch(cc)):
            yield cc, spec, spec.smem_bytes
        for spec in all_decode_specs_for(device_from_arch(cc)):
            yield cc, spec, spec.smem_bytes


def run_gate(ccs=GATE_CCS, jobs: int | None = None):
    work = list(jobs_for(ccs))
    jobs = jobs or min(len(work), os.cpu_count() or 1)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            rows = list(ex.map(gate_one, work, chunksize=2))
    else:
        rows = [gate_one(w) for w in work]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(str(c) for c in GATE_CCS))
    ap.add_argument("--jobs", type=int, default=None)
    a = ap.parse_args(argv)
    rows = run_gate(tuple(int(x) for x in a.archs.split(",")), a.jobs)
    print(HEADER)
    for r in rows:
        print(r.line())
    bad = [r for r in rows if r.problems]
    print(f"{len(rows)} kernels on {len(set(r.cc for r in rows))} archs: "
          f"{len(bad)} violation(s), max registers {max(r.regs for r in rows)}, "
          f"total spills {sum(r.spill_stores + r.spill_loads for r in rows)} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
