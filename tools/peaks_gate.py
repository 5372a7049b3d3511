"""Peaks gate: kernels_cuda/peaks.cu compiled by NVRTC to each arch's SASS with no GPU.

    python tools/peaks_gate.py [--archs 61,70,75,80,86,89,90] [--cuobjdump PATH]

One row per (arch, probe kernel): registers, spills, and with a disassembler the tensor-core
(HMMA) instructions ptxas emitted. Fails on an NVRTC error, a missing kernel, any spill, a
probe that needs more than 128 registers (measure_peaks runs them as 4 CTAs x 128 threads
per SM in one wave), or, when cuobjdump is found, a probe without HMMA on an arch that
executes its instruction natively.

cuobjdump must read CUDA 12 cubins (NVRTC 12.x): a CUDA 13 cuobjdump or nvdisasm rejects
them as holding no device code. Found as --cuobjdump, $CUOBJDUMP, or on PATH.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from portattn.bench import MMA_PROBES, compile_peaks, sass_opcodes  # noqa: E402

DEFAULT_CCS = (61, 70, 75, 80, 86, 89, 90)
MAX_REGS = 128
# ptxas lowers m8n8k4 on sm_80 and newer to a called software routine (CALL.REL, HFMA2 and
# FFMA, no HMMA): forcing the Volta path there measures that emulation, not tensor cores.
NATIVE_BELOW = {"mma_m8n8k4": 80}
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def ptxas_entries(log: str) -> dict:
    """{entry: (registers, spill store bytes, spill load bytes)} from NVRTC's -Xptxas=-v log."""
    out, name, spill = {}, None, (0, 0)
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            name, spill = m.group(1), (0, 0)
            continue
        m = _SPILL.search(line)
        if m and name:
            spill = (int(m.group(1)), int(m.group(2)))
        m = _USED.search(line)
        if m and name:
            out[name] = (int(m.group(1)),) + spill
            name = None
    return out


def gate_arch(cc: int, cuobjdump: str | None):
    """Rows (kernel, regs, spills, HMMA count or None, problems) for sm_``cc``."""
    cubin, log = compile_peaks(cc)
    entries = ptxas_entries(log)
    sass = sass_opcodes(cubin, cuobjdump) if cuobjdump else None
    rows = []
    for key, min_cc, _ in (("fma_fp32", 0, 0),) + MMA_PROBES:
        kernel = "fma_peak" if key == "fma_fp32" else f"{key}_peak"
        problems = []
        if kernel not in entries:
            rows.append((kernel, None, None, None, ["not compiled"]))
            continue
        regs, st, ld = entries[kernel]
        if st or ld:
            problems.append(f"SPILLS {st}/{ld} bytes")
        if regs > MAX_REGS:
            problems.append(f"{regs} registers > {MAX_REGS}")
        hmma = None
        if sass is not None:
            ops = sass.get(kernel, {})
            hmma = sum(n for op, n in ops.items() if op.startswith("HMMA"))
            native = key != "fma_fp32" and min_cc <= cc < NATIVE_BELOW.get(key, 10 ** 6)
            if native and not hmma:
                problems.append("no HMMA where the instruction is native")
            if key != "fma_fp32" and cc < min_cc and hmma:
                problems.append("HMMA in a kernel that should be empty here")
        rows.append((kernel, regs, (st, ld), hmma, problems))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(str(c) for c in DEFAULT_CCS))
    ap.add_argument("--cuobjdump", default=None, help="default: $CUOBJDUMP, then PATH")
    a = ap.parse_args(argv)
    from portattn.bench import find_cuobjdump
    tool = a.cuobjdump or find_cuobjdump()
    print(f"disassembler: {tool or 'none found (ptxas report only)'}")
    print(f"{'arch':6} {'kernel':24} {'regs':>5} {'spill st/ld':>11} {'HMMA':>6}")
    bad = 0
    for cc in (int(x) for x in a.archs.split(",")):
        for kernel, regs, spill, hmma, problems in gate_arch(cc, tool):
            sp = "-" if spill is None else f"{spill[0]}/{spill[1]}"
            print(f"sm_{cc:<3} {kernel:24} {regs if regs is not None else '-':>5} {sp:>11} "
                  f"{'-' if hmma is None else hmma:>6}"
                  + ("  " + "; ".join(problems) if problems else ""))
            bad += bool(problems)
    print(f"{bad} problem row(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
