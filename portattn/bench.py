"""`python -m portattn bench`: portattn's paths next to torch SDPA's backends, in one run.

Every number is taken in the same process on the same GPU: portattn's plans (native and
forced through PORTATTN_ARCH), SDPA's backends, and this GPU's measured instruction peaks,
so results are reported as ratios. FLOPs are 4*b*h*sq*sk*d, halved for causal.
"""
from __future__ import annotations

import datetime
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field

SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
# Which measured peak each path is judged against.
PATH_PEAK = {"simt": "fma_fp32"}
MATH_MEMORY_LIMIT = 24 << 30     # bytes the math backend may materialise for scores


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
    """TFLOP/s this GPU sustains for each instruction a path relies on."""
    import cupy
    import numpy as np
    from .compile import build_source
    mod = cupy.RawModule(code=build_source("peaks"), options=("-std=c++17",))
    fma = mod.get_function("fma_peak")
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    blocks, threads, iters = sms * 8, 256, 4096
    out = cupy.empty(blocks * threads, dtype=cupy.float32)
    args = (out, np.int32(iters), np.float32(0.9999999), np.float32(1e-7))
    ms = time_ms(lambda: fma((blocks,), (threads,), args), target_ms=100)
    flops = 2.0 * 8 * 16 * iters * blocks * threads
    return {"fma_fp32": flops / ms / 1e9}


def flops(row: Row) -> float:
    f = 4.0 * row.batch * row.nheads * row.seqlen * row.seqlen * row.head_dim
    return f / 2 if row.causal else f


def _portattn_runner(torch, q, k, v, causal, arch):
    from . import flash_attn_func, explain
    from .testing import forced_arch
    with forced_arch(arch):
        plan = explain(q, k, v, causal=causal).plan

    def run():
        with forced_arch(arch):
            flash_attn_func(q, k, v, causal=causal)
    return run, plan


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
              progress=sys.stderr) -> dict:
    """Time every combination; returns a JSON-able dict (device, peaks, rows)."""
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
        for arch in archs:
            name = "portattn" if arch is None else f"portattn@sm_{arch}"
            try:
                fn, plan = _portattn_runner(torch, q, k, v, c, arch)
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
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "peaks_tflops": peaks, "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    rows = result["rows"]
    impls = []
    for r in rows:
        for name in r["tflops"]:
            if name not in impls:
                impls.append(name)
    peak = result["peaks_tflops"]
    lines = [f"{result['device']} (sm_{result['cc']}, {result['sms']} SMs), {result['date']}; "
             f"measured peaks: " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in peak.items()),
             "TFLOP/s (x = portattn / baseline; % = portattn / its path's measured peak)"]
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
            path = r["notes"][i].split(":")[0]
            if PATH_PEAK.get(path) in peak:
                extra.append(f"{i} {100 * t / peak[PATH_PEAK[path]]:.0f}% of {PATH_PEAK[path]}")
            for b in ("sdpa_math", "sdpa_efficient", "sdpa_flash"):
                tb = r["tflops"].get(b)
                if tb:
                    extra.append(f"{t / tb:.2f}x {b}")
        lines.append(f"{r['dtype']:8} {r['head_dim']:>4} {r['seqlen']:>6} {str(r['causal']):6} "
                     + " ".join(cells) + ("   " + "; ".join(extra) if extra else ""))
    return "\n".join(lines)


def main(argv) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="portattn bench")
    ap.add_argument("--dtypes", default="float16,float32")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--causal", default="both", choices=("both", "on", "off"))
    ap.add_argument("--archs", default="native",
                    help="comma list of 'native' and sm_XX to force (PORTATTN_ARCH)")
    ap.add_argument("--baselines", default=",".join(SDPA_BACKENDS))
    ap.add_argument("--json", default=None, help="write the full results here")
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. the commit)")
    a = ap.parse_args(argv)
    from .arch import parse_arch
    archs = tuple(None if x == "native" else parse_arch(x, source="--archs")
                  for x in a.archs.split(","))
    causals = {"both": (False, True), "on": (True,), "off": (False,)}[a.causal]
    result = run_bench(tuple(a.dtypes.split(",")), tuple(int(x) for x in a.head_dims.split(",")),
                       tuple(int(x) for x in a.seqlens.split(",")), causals, archs,
                       tuple(b for b in a.baselines.split(",") if b))
    result["label"] = a.label
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
