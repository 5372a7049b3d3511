"""`python -m portattn bench`: portattn's paths next to torch SDPA's backends, in one run.

Every number is taken in the same process on the same GPU: portattn's plans (native and
forced through PORTATTN_ARCH), SDPA's backends, and this GPU's measured instruction peaks,
so results are reported as ratios. FLOPs are 4*b*h*sq*sk*d, halved for causal.
``--plot PATH.png`` draws the same numbers (needs matplotlib: ``portattn[bench]``).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
MODES = ("fwd",)
# Which measured peak each path is judged against; a path's bf16 rows use BF16_PEAK's.
PATH_PEAK = {"simt": "fma_fp32", "sm70": "mma_m8n8k4", "sm75": "mma_m16n8k8",
             "sm80": "mma_m16n8k16"}
BF16_PEAK = {"sm80": "mma_m16n8k16_bf16"}
# Tensor-core probes in kernels_cuda/peaks.cu: (peak key, oldest compute capability that has
# the instruction, FLOP per warp-wide instruction). The kernel is named "<key>_peak". From
# sm_80 on, ptxas emulates m8n8k4 in a called routine without HMMA (tools/peaks_gate.py), so
# there its peak is the emulation's: the rate a forced sm70 plan can reach on that GPU.
MMA_PROBES = (
    ("mma_m8n8k4", 70, 2 * 8 * 8 * 4 * 4),      # four 8x8x4 products per warp
    ("mma_m16n8k8", 75, 2 * 16 * 8 * 8),
    ("mma_m16n8k16", 80, 2 * 16 * 8 * 16),
    ("mma_m16n8k16_bf16", 80, 2 * 16 * 8 * 16),
)
MMA_PER_WARP_TRIP = 8 * 4      # mma_probe's chains x depth
MATH_MEMORY_LIMIT = 24 << 30     # bytes the math backend may materialise for scores


def peak_key(path: str, dtype: str):
    """The measured peak a row of ``path`` in ``dtype`` is judged against (None: none)."""
    if dtype == "bfloat16" and path in BF16_PEAK:
        return BF16_PEAK[path]
    return PATH_PEAK.get(path)


@dataclass
class Row:
    dtype: str
    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    nheads: int
    tflops: dict = field(default_factory=dict)      # impl -> TFLOP/s (None: n/a)
    notes: dict = field(default_factory=dict)       # impl -> why n/a, or the plan used


def _torch():
    try:
        import torch
    except ImportError as e:
        raise RuntimeError("portattn bench needs torch (for the SDPA baselines and timers)") from e
    if not torch.cuda.is_available():
        raise RuntimeError("portattn bench needs a CUDA GPU")
    return torch


def time_ms(fn, target_ms: float = 200.0, max_reps: int = 50) -> float:
    """Median of per-launch CUDA-event timings after a warm-up call."""
    torch = _torch()
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1), 1e-3)
    reps = int(min(max_reps, max(5, target_ms / est)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events)


def measure_peaks() -> dict:
    """TFLOP/s this GPU sustains for each instruction a path relies on; the MMA keys are
    absent where the GPU lacks the instruction."""
    import cupy
    import numpy as np
    from .compile import build_source
    mod = cupy.RawModule(code=build_source("peaks"), options=("-std=c++17",))
    fma = mod.get_function("fma_peak")
    dev = cupy.cuda.Device()
    sms, cc = dev.attributes["MultiProcessorCount"], int(dev.compute_capability)
    blocks, threads, iters = sms * 8, 256, 4096
    out = cupy.empty(blocks * threads, dtype=cupy.float32)
    args = (out, np.int32(iters), np.float32(0.9999999), np.float32(1e-7))
    ms = time_ms(lambda: fma((blocks,), (threads,), args), target_ms=100)
    flops = 2.0 * 8 * 16 * iters * blocks * threads
    peaks = {"fma_fp32": flops / ms / 1e9}
    # 4 CTAs of 128 threads per SM: one wave on every sm_70+ GPU as long as a probe stays
    # within 128 registers (ptxas: 44-108), and 4 warps x 8 chains per scheduler is far
    # more independent MMAs than the latency needs.
    blocks, threads, iters = sms * 4, 128, 2048
    for key, min_cc, flop in MMA_PROBES:
        if cc < min_cc:
            continue
        fn = mod.get_function(f"{key}_peak")
        args = (out, np.int32(iters), np.uint32(0x2545F491))
        ms = time_ms(lambda: fn((blocks,), (threads,), args), target_ms=100)
        total = float(flop) * MMA_PER_WARP_TRIP * iters * blocks * (threads // 32)
        peaks[key] = total / ms / 1e9
    return peaks


def compile_peaks(cc: int):
    """peaks.cu compiled by NVRTC alone for sm_``cc`` (no GPU): (cubin bytes, ptxas log)."""
    from cupy_backends.cuda.libs import nvrtc
    from .compile import nvrtc_compile
    try:
        cubin, log, _ = nvrtc_compile("peaks", cc)
    except nvrtc.NVRTCError as e:
        raise RuntimeError(f"NVRTC failed on peaks.cu for sm_{cc}:\n{e.log}") from e
    # CuPy hands the image back short of its final zero byte(s), which cuobjdump then
    # rejects; the ELF header says where the image ends.
    phoff, shoff = struct.unpack_from("<QQ", cubin, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    return cubin + b"\0" * max(0, end - len(cubin)), log


def find_cuobjdump():
    """$CUOBJDUMP, else cuobjdump on PATH, else None. NVRTC 12's cubins need a CUDA 12
    cuobjdump: CUDA 13's reports that they hold no device code."""
    return os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")


def sass_opcodes(cubin: bytes, cuobjdump: str) -> dict:
    """{kernel name: Counter of SASS opcodes with their modifiers} via ``cuobjdump -sass``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True,
                           check=False)
    if r.returncode or "Function :" not in r.stdout:
        raise RuntimeError(f"{cuobjdump} could not disassemble: {(r.stderr or r.stdout)[:300]}")
    found, current = {}, None
    for line in r.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = found.setdefault(m.group(1), Counter())
            continue
        m = re.search(r"\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", line)
        if m and current is not None:
            current[m.group(1)] += 1
    return found


def flops(row: Row) -> float:
    f = 4.0 * row.batch * row.nheads * row.seqlen * row.seqlen * row.head_dim
    return f / 2 if row.causal else f


def _portattn_runner(torch, q, k, v, causal, arch, path=None):
    from . import explain, flash_attn_func
    from .testing import forced_arch, forced_path
    with forced_arch(arch), forced_path(path):
        plan = explain(q, k, v, causal=causal).plan

    def run():
        with forced_arch(arch), forced_path(path):
            flash_attn_func(q, k, v, causal=causal)
    return run, plan


def impl_name(arch, path=None) -> str:
    return ("portattn" + ("" if arch is None else f"@sm_{arch}")
            + ("" if path is None else f":{path}"))


def _sdpa_runner(torch, backend, qt, kt, vt, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    f = torch.nn.functional.scaled_dot_product_attention

    def run():
        with sdpa_kernel(which):
            f(qt, kt, vt, is_causal=causal)
    return run


def run_bench(dtypes=("float16", "float32"), head_dims=(64, 128),
              seqlens=(512, 1024, 2048, 4096, 8192, 16384), causals=(False, True),
              archs=(None,), baselines=SDPA_BACKENDS, tokens=16384, hidden=2048,
              progress=sys.stderr, mode="fwd") -> dict:
    """Time every combination; returns a JSON-able dict (device, peaks, rows)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    torch = _torch()
    from .arch import detect
    dev = detect()
    peaks = measure_peaks()
    rows = []
    combos = [(dt, d, L, c) for dt in dtypes for d in head_dims for L in seqlens for c in causals]
    for n, (dt, d, L, c) in enumerate(combos, 1):
        batch, heads = max(1, tokens // L), max(1, hidden // d)
        row = Row(dt, d, L, c, batch, heads)
        print(f"\r[{n}/{len(combos)}] {dt} d{d} L{L} {'causal' if c else 'full'}   ",
              end="", file=progress, flush=True)
        tdt = getattr(torch, dt)
        q, k, v = (torch.randn(batch, L, heads, d, device="cuda", dtype=tdt) for _ in range(3))
        for entry in archs:
            arch, path = entry if isinstance(entry, tuple) else (entry, None)
            name = impl_name(arch, path)
            try:
                fn, plan = _portattn_runner(torch, q, k, v, c, arch, path)
                row.tflops[name] = flops(row) / time_ms(fn) / 1e9
                row.notes[name] = f"{plan.path}:{plan.spec.short()}"
            except Exception as e:   # a path that cannot run this shape is reported, not fatal
                row.tflops[name] = None
                row.notes[name] = f"{type(e).__name__}: {e}"[:200]
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        for be in baselines:
            name = f"sdpa_{be}"
            need = batch * heads * L * L * (4 if dt == "float32" else 2) * 3
            if be == "math" and need > MATH_MEMORY_LIMIT:
                row.tflops[name], row.notes[name] = None, f"skipped: would materialise {need >> 30} GB"
                continue
            try:
                row.tflops[name] = flops(row) / time_ms(_sdpa_runner(torch, be, qt, kt, vt, c)) / 1e9
            except Exception as e:
                row.tflops[name] = None
                row.notes[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
        rows.append(row)
    print(file=progress)
    return {
        "device": dev.name, "cc": dev.real_cc, "sms": dev.sm_count, "versions": dev.versions,
        "torch": torch.__version__, "mode": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "peaks_tflops": peaks, "rows": [asdict(r) for r in rows],
    }


def row_path(row: dict, impl: str):
    """The path a portattn column actually ran in this row (None if it did not run)."""
    if row["tflops"].get(impl) is None:
        return None
    return row["notes"].get(impl, "").split(":", 1)[0] or None


def _impls(result: dict) -> list:
    impls = []
    for r in result["rows"]:
        for name in r["tflops"]:
            if name not in impls:
                impls.append(name)
    return impls


def format_table(result: dict) -> str:
    rows = result["rows"]
    impls = _impls(result)
    peak = result["peaks_tflops"]
    lines = [f"{result['device']} (sm_{result['cc']}, {result['sms']} SMs), {result['date']}, "
             f"mode {result.get('mode', 'fwd')}; measured peaks: "
             + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in peak.items()),
             "TFLOP/s (x = portattn / baseline; % = portattn / the measured peak of the path "
             "it ran, in brackets)"]
    head = f"{'dtype':8} {'d':>4} {'L':>6} {'causal':6} " + " ".join(f"{i:>14}" for i in impls)
    lines.append(head)
    for r in rows:
        cells = []
        for i in impls:
            t = r["tflops"].get(i)
            cells.append(f"{'n/a' if t is None else f'{t:.2f}':>14}")
        extra = []
        for i in impls:
            t = r["tflops"].get(i)
            if not i.startswith("portattn") or t is None:
                continue
            path = row_path(r, i)
            key = peak_key(path, r["dtype"])
            if key in peak:
                extra.append(f"{i} [{path}] {100 * t / peak[key]:.0f}% of {key}")
            else:
                extra.append(f"{i} [{path}]")
            for b in ("sdpa_math", "sdpa_efficient", "sdpa_flash"):
                tb = r["tflops"].get(b)
                if tb:
                    extra.append(f"{t / tb:.2f}x {b}")
        lines.append(f"{r['dtype']:8} {r['head_dim']:>4} {r['seqlen']:>6} {str(r['causal']):6} "
                     + " ".join(cells) + ("   " + "; ".join(extra) if extra else ""))
    return "\n".join(lines)


def _seqlen_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot(result: dict, path: str) -> str:
    """One panel per (dtype, head dim, causal): TFLOP/s against seqlen, one line per
    implementation, grey dotted lines at the measured peaks the portattn lines are judged
    by. Raises ImportError without matplotlib."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    rows, impls, peak = result["rows"], _impls(result), result["peaks_tflops"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    shapes = list(dict.fromkeys((r["head_dim"], r["causal"]) for r in rows))
    colors = {i: f"C{n % 10}" for n, i in enumerate(impls)}
    labels = {}
    for i in impls:
        paths = sorted({p for r in rows for p in (row_path(r, i),) if p})
        labels[i] = f"{i} [{','.join(paths)}]" if i.startswith("portattn") and paths else i
    nrows, ncols = max(1, len(dtypes)), max(1, len(shapes))
    fig = Figure(figsize=(3.8 * ncols, 3.0 * nrows + 0.8), constrained_layout=True)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    handles = {}
    for a, dt in enumerate(dtypes):
        for b, (d, causal) in enumerate(shapes):
            ax = axes[a][b]
            panel = sorted((r for r in rows if (r["dtype"], r["head_dim"], r["causal"])
                            == (dt, d, causal)), key=lambda r: r["seqlen"])
            if not panel:
                ax.set_visible(False)
                continue
            peaks_here = set()
            for i in impls:
                pts = [(r["seqlen"], r["tflops"][i]) for r in panel
                       if r["tflops"].get(i) is not None]
                if not pts:
                    continue
                mine = i.startswith("portattn")
                (line,) = ax.plot([x for x, _ in pts], [y for _, y in pts], color=colors[i],
                                  marker="o" if mine else ".", linewidth=2.0 if mine else 1.2,
                                  linestyle="-" if mine else "--")
                handles.setdefault(labels[i], line)
                if mine:
                    peaks_here |= {peak_key(row_path(r, i), dt) for r in panel
                                   if row_path(r, i)}
            for key in sorted(k for k in peaks_here if k in peak):
                ax.axhline(peak[key], color="0.45", linestyle=":", linewidth=1.2)
                ax.annotate(f"{key} peak", (0.01, peak[key]), xycoords=("axes fraction", "data"),
                            va="bottom", fontsize=7, color="0.35")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            xs = [r["seqlen"] for r in panel]
            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _seqlen_label(int(v))))
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_title(f"{dt}, d={d}, {'causal' if causal else 'full'}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            if b == 0:
                ax.set_ylabel("TFLOP/s (log scale)")
            if a == nrows - 1:
                ax.set_xlabel("seqlen")
    title = (f"{result.get('device', '?')} (sm_{result.get('cc', '?')}), "
             f"{result.get('mode', 'fwd')}, {result.get('date', '')}")
    if result.get("label"):
        title += f", {result['label']}"
    fig.suptitle(title, fontsize=11)
    fig.legend(list(handles.values()), list(handles.keys()), loc="upper center",
               bbox_to_anchor=(0.5, 0.0), ncol=min(3, max(1, len(handles))), fontsize=8,
               frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_plot(result: dict, path: str, err=sys.stderr) -> bool:
    """plot(), or one line on ``err`` saying why not when matplotlib is missing."""
    try:
        plot(result, path)
    except ImportError:
        print(f"portattn bench: --plot {path} skipped: matplotlib is not installed "
              f"(pip install 'portattn[bench]')", file=err)
        return False
    return True


def parser():
    import argparse
    ap = argparse.ArgumentParser(prog="portattn bench")
    ap.add_argument("--mode", default="fwd", choices=MODES, help="what is timed")
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--causal", default="both", choices=("both", "on", "off"))
    ap.add_argument("--archs", default="native",
                    help="comma list of 'native' and sm_XX to force (PORTATTN_ARCH), each "
                         "optionally ':path' to force a path too (PORTATTN_PATH), e.g. "
                         "native:simt")
    ap.add_argument("--baselines", default=",".join(SDPA_BACKENDS))
    ap.add_argument("--json", default=None, help="write the full results here")
    ap.add_argument("--plot", default=None, metavar="PATH.png",
                    help="draw TFLOP/s against seqlen here (needs matplotlib)")
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. the commit)")
    return ap


def main(argv) -> int:
    a = parser().parse_args(argv)
    from .arch import parse_arch
    from .arch import PATH_NAMES
    archs = []
    for item in a.archs.split(","):
        arch, _, path = item.partition(":")
        if path and path not in PATH_NAMES:
            raise ValueError(f"--archs path must be one of {PATH_NAMES}, got {path!r}")
        archs.append((None if arch == "native" else parse_arch(arch, source="--archs"),
                      path or None))
    archs = tuple(archs)
    causals = {"both": (False, True), "on": (True,), "off": (False,)}[a.causal]
    result = run_bench(tuple(a.dtypes.split(",")), tuple(int(x) for x in a.head_dims.split(",")),
                       tuple(int(x) for x in a.seqlens.split(",")), causals, archs,
                       tuple(b for b in a.baselines.split(",") if b), mode=a.mode)
    result["label"] = a.label
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    if a.plot:
        write_plot(result, a.plot)
    return 0
