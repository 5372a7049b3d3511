"""`python -m portattn bench`: portattn's paths next to torch SDPA's backends, in one run.

Every number is taken in the same process on the same GPU: portattn's plans (native and
forced through PORTATTN_ARCH), SDPA's backends, and this GPU's measured instruction peaks,
so results are reported as ratios. FLOPs are 4*b*h*sq*sk*d, halved for causal.
``--plot PATH.png`` draws the same numbers (needs matplotlib: ``portattn[bench]``).

Modes: ``fwd`` times the forward; ``fwd_bwd`` times forward + backward (3.5x the forward's
FLOPs: the backward counts 2.5x) and judges portattn by the peak of its backward plan's
path; ``bwd_memory`` measures the memory the backward allocates at long seqlens (32k, 64k)
to show it is O(seqlen * headdim) per head; ``decode`` is bench_decode.py.
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
MODES = ("fwd", "fwd_bwd", "bwd_memory")
DTYPE_NAMES = ("float16", "bfloat16", "float32")
BWD_FLOP_FACTOR = 2.5          # backward FLOPs per forward FLOP (flash_attn's convention)
# What each mode runs unless told otherwise. fwd_bwd stops at 8k and leaves out math (it
# materialises seqlen^2 scores and their gradients): the SIMT backward is slow enough that
# the default run must stay within a few minutes.
MODE_DEFAULTS = {
    "fwd": {"dtypes": "float16,float32", "head_dims": "64,128",
            "seqlens": "512,1024,2048,4096,8192,16384", "causal": "both",
            "baselines": ",".join(SDPA_BACKENDS)},
    "fwd_bwd": {"dtypes": "float16,bfloat16", "head_dims": "64,128",
                "seqlens": "1024,2048,4096,8192", "causal": "both",
                "baselines": "flash,efficient"},
    "bwd_memory": {"dtypes": "float16", "head_dims": "64,128", "seqlens": "32768,65536",
                   "causal": "off", "baselines": "efficient"},
}
MEMORY_HEADS = 2               # bwd_memory runs batch 1 x this many heads
# Rates assumed by the run-time estimate printed before a fwd_bwd / bwd_memory run
# (TFLOP/s of fwd+bwd on an H100, on the low side so the estimate is an upper bound).
GUESS_TFLOPS = {"portattn": 12.0, "portattn_det": 8.0, "sdpa": 50.0, "sdpa_math": 4.0}
COMPILE_S_PER_SPEC = 3.0       # NVRTC + load on a fresh machine
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


@dataclass
class MemRow:
    dtype: str
    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    nheads: int
    extra_bytes: dict = field(default_factory=dict)  # impl -> bytes the backward added (None: n/a)
    bwd_ms: dict = field(default_factory=dict)       # impl -> the measured backward's time
    notes: dict = field(default_factory=dict)

    @property
    def grad_bytes(self) -> int:
        """dq + dk + dv themselves, which every backward must allocate."""
        return 3 * self.batch * self.seqlen * self.nheads * self.head_dim * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


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


def flops(row, mode: str = "fwd") -> float:
    """FLOPs of one timed call: 4*b*h*L*L*d for the forward, halved for causal; fwd_bwd and
    bwd_memory add the backward's 2.5x."""
    f = 4.0 * row.batch * row.nheads * row.seqlen * row.seqlen * row.head_dim
    f = f / 2 if row.causal else f
    return f if mode == "fwd" else f * (1 + BWD_FLOP_FACTOR)


def _portattn_runner(torch, q, k, v, causal, arch, path=None):
    from . import explain, flash_attn_func
    from .testing import forced_arch, forced_path
    with forced_arch(arch), forced_path(path):
        plan = explain(q, k, v, causal=causal).plan

    def run():
        with forced_arch(arch), forced_path(path):
            flash_attn_func(q, k, v, causal=causal)
    return run, plan


def impl_name(arch, path=None, deterministic=False) -> str:
    return ("portattn" + ("" if arch is None else f"@sm_{arch}")
            + ("" if path is None else f":{path}") + ("+det" if deterministic else ""))


def _grad_leaves(torch, *xs):
    return tuple(x.detach().requires_grad_(True) for x in xs)


def _portattn_fwd_bwd_runner(torch, q, k, v, dout, causal, arch, path=None,
                             deterministic=False):
    """Forward + backward through the autograd Function; the note names the backward plan
    first (its path is what the row's % is judged by), then the forward's."""
    from . import explain, flash_attn_func
    from .testing import forced_arch, forced_path
    q, k, v = _grad_leaves(torch, q, k, v)
    with forced_arch(arch), forced_path(path), torch.enable_grad():
        ex = explain(q, k, v, causal=causal, deterministic=deterministic)
    if ex.backward is None:
        raise RuntimeError("explain() returned no backward plan for inputs that require grad")
    bwd = ex.backward
    note = (f"{bwd.path}:{bwd.spec('dkdv').short()}; fwd {ex.plan.path} "
            f"{ex.plan.spec.short()}")

    def run():
        # autograd.grad rather than out.backward: no .grad accumulation kernels are timed.
        with forced_arch(arch), forced_path(path), torch.enable_grad():
            out = flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)
            torch.autograd.grad(out, (q, k, v), dout)
    return run, note


def _sdpa_backend(backend: str):
    """torch's SDPBackend member for a --baselines name; an error (reported in the row's
    note) where this torch lacks it."""
    from torch.nn.attention import SDPBackend
    return getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[backend])


def _sdpa_runner(torch, backend, qt, kt, vt, causal):
    from torch.nn.attention import sdpa_kernel
    which = _sdpa_backend(backend)
    f = torch.nn.functional.scaled_dot_product_attention

    def run():
        with sdpa_kernel(which):
            f(qt, kt, vt, is_causal=causal)
    return run


def _sdpa_fwd_bwd_runner(torch, backend, qt, kt, vt, dout_t, causal):
    """SDPA forward + backward on (b, h, s, d) tensors transposed before timing."""
    from torch.nn.attention import sdpa_kernel
    which = _sdpa_backend(backend)
    f = torch.nn.functional.scaled_dot_product_attention
    qt, kt, vt = _grad_leaves(torch, qt, kt, vt)

    def run():
        with sdpa_kernel(which), torch.enable_grad():
            out = f(qt, kt, vt, is_causal=causal)
            torch.autograd.grad(out, (qt, kt, vt), dout_t)
    return run


def math_bytes(row, mode: str = "fwd") -> int:
    """What SDPA's math backend would materialise: scores, probabilities and (with the
    backward) their gradients, seqlen^2 each."""
    n = row.batch * row.nheads * row.seqlen * row.seqlen * _itemsize(row.dtype)
    return n * (3 if mode == "fwd" else 8)


def bench_rows(dtypes, head_dims, seqlens, causals, tokens=16384, hidden=2048) -> list:
    """The fwd / fwd_bwd configurations: batch x heads fill ``tokens`` x ``hidden``."""
    return [Row(dt, d, L, c, max(1, tokens // L), max(1, hidden // d))
            for dt in dtypes for d in head_dims for L in seqlens for c in causals]


def memory_rows(dtypes, head_dims, seqlens, causals, heads=MEMORY_HEADS) -> list:
    return [MemRow(dt, d, L, c, 1, heads)
            for dt in dtypes for d in head_dims for L in seqlens for c in causals]


def _timed_seconds(call_s: float, target_ms: float = 200.0, max_reps: int = 50) -> float:
    """Wall time time_ms() spends on a call of ``call_s`` seconds (warm-up, probe, reps)."""
    reps = int(min(max_reps, max(5, target_ms / max(call_s * 1e3, 1e-3))))
    return (2 + reps) * call_s


def estimate_seconds(rows, mode: str, archs=(None,), baselines=(), deterministic=False) -> float:
    """Upper-bound guess of a fwd_bwd or bwd_memory run's wall time from GUESS_TFLOPS,
    including kernel compiles; printed before the run so a slow config is seen up front."""
    pa_rate = GUESS_TFLOPS["portattn_det" if deterministic else "portattn"] * 1e12
    total, specs = 0.0, set()
    for r in rows:
        f = flops(r, "fwd_bwd")
        for be in baselines:
            if be == "math" and math_bytes(r, mode) > MATH_MEMORY_LIMIT:
                continue
            rate = GUESS_TFLOPS["sdpa_math" if be == "math" else "sdpa"] * 1e12
            total += 2 * f / rate if mode == "bwd_memory" else _timed_seconds(f / rate)
        for entry in archs:
            # bwd_memory runs a warm-up fwd+bwd and a measured one
            total += 2 * f / pa_rate if mode == "bwd_memory" else _timed_seconds(f / pa_rate)
            specs.add((r.dtype, r.head_dim, entry))
    # A forward and a backward spec per (dtype, head dim, arch), plus the peak probes.
    return total + COMPILE_S_PER_SPEC * (2 * len(specs) + (1 if mode == "fwd_bwd" else 0))


def _arch_entries(archs):
    return [entry if isinstance(entry, tuple) else (entry, None) for entry in archs]


def _error_note(e: Exception) -> str:
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def _print_estimate(seconds: float, n: int, progress) -> None:
    print(f"portattn bench: {n} configs, estimated {seconds / 60:.1f} min "
          f"(at {GUESS_TFLOPS['portattn']:g} TFLOP/s fwd+bwd for portattn's SIMT backward)",
          file=progress, flush=True)


def run_bench(dtypes=("float16", "float32"), head_dims=(64, 128),
              seqlens=(512, 1024, 2048, 4096, 8192, 16384), causals=(False, True),
              archs=(None,), baselines=SDPA_BACKENDS, tokens=16384, hidden=2048,
              progress=sys.stderr, mode="fwd", deterministic=False,
              heads=MEMORY_HEADS) -> dict:
    """Time every combination; returns a JSON-able dict (device, peaks, rows).

    ``mode="bwd_memory"`` hands over to run_bwd_memory (batch 1 x ``heads``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "bwd_memory":
        return run_bwd_memory(dtypes, head_dims, seqlens, causals, archs, baselines,
                              heads=heads, progress=progress, deterministic=deterministic)
    if deterministic and mode != "fwd_bwd":
        raise ValueError(f"deterministic applies to the backward (mode fwd_bwd or "
                         f"bwd_memory), got mode {mode!r}")
    torch = _torch()
    from .arch import detect
    dev = detect()
    combos = bench_rows(dtypes, head_dims, seqlens, causals, tokens, hidden)
    estimate = None
    if mode == "fwd_bwd":
        estimate = estimate_seconds(combos, mode, archs, baselines, deterministic)
        _print_estimate(estimate, len(combos), progress)
    started = datetime.datetime.now(datetime.timezone.utc)
    peaks = measure_peaks()
    rows = []
    for n, row in enumerate(combos, 1):
        dt, d, L, c, batch, heads_ = (row.dtype, row.head_dim, row.seqlen, row.causal,
                                      row.batch, row.nheads)
        print(f"\r[{n}/{len(combos)}] {dt} d{d} L{L} {'causal' if c else 'full'}   ",
              end="", file=progress, flush=True)
        tdt = getattr(torch, dt)
        q, k, v = (torch.randn(batch, L, heads_, d, device="cuda", dtype=tdt) for _ in range(3))
        dout = torch.randn_like(q) if mode == "fwd_bwd" else None
        for arch, path in _arch_entries(archs):
            name = impl_name(arch, path, deterministic)
            try:
                if mode == "fwd_bwd":
                    fn, note = _portattn_fwd_bwd_runner(torch, q, k, v, dout, c, arch, path,
                                                        deterministic)
                else:
                    fn, plan = _portattn_runner(torch, q, k, v, c, arch, path)
                    note = f"{plan.path}:{plan.spec.short()}"
                row.tflops[name] = flops(row, mode) / time_ms(fn) / 1e9
                row.notes[name] = note
            except Exception as e:   # a path that cannot run this shape is reported, not fatal
                row.tflops[name] = None
                row.notes[name] = f"{type(e).__name__}: {e}"[:200]
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        dout_t = dout.transpose(1, 2).contiguous() if dout is not None else None
        for be in baselines:
            name = f"sdpa_{be}"
            need = math_bytes(row, mode)
            if be == "math" and need > MATH_MEMORY_LIMIT:
                row.tflops[name] = None
                row.notes[name] = f"skipped: would materialise {need >> 30} GB"
                continue
            try:
                fn = (_sdpa_fwd_bwd_runner(torch, be, qt, kt, vt, dout_t, c) if mode == "fwd_bwd"
                      else _sdpa_runner(torch, be, qt, kt, vt, c))
                row.tflops[name] = flops(row, mode) / time_ms(fn) / 1e9
            except Exception as e:   # SDPA lacks this backend for the shape, dtype or GPU
                row.tflops[name] = None
                row.notes[name] = _error_note(e)
        del q, k, v, qt, kt, vt, dout, dout_t
        torch.cuda.empty_cache()
        rows.append(row)
    print(file=progress)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": dev.name, "cc": dev.real_cc, "sms": dev.sm_count, "versions": dev.versions,
        "torch": torch.__version__, "mode": mode, "deterministic": deterministic,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "estimate_s": estimate, "elapsed_s": (now - started).total_seconds(),
        "peaks_tflops": peaks, "rows": [asdict(r) for r in rows],
    }


def _bwd_extra_bytes(torch, forward, inputs, dout):
    """(bytes, ms): the peak allocated during a backward above what was allocated when it
    started (the forward's saved tensors and output excluded; dq, dk, dv included), and the
    backward's time. A warm-up forward + backward first, so compiles and workspaces that
    outlive a call are not counted."""
    out = forward()
    torch.autograd.grad(out, inputs, dout)
    del out
    torch.cuda.synchronize()
    out = forward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    grads = torch.autograd.grad(out, inputs, dout)
    e1.record()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del grads, out
    return extra, e0.elapsed_time(e1)


def _portattn_memory(torch, q, k, v, dout, causal, arch, path, deterministic):
    from . import flash_attn_func
    from .testing import forced_arch, forced_path
    q, k, v = _grad_leaves(torch, q, k, v)

    def forward():
        return flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)
    with forced_arch(arch), forced_path(path), torch.enable_grad():
        return _bwd_extra_bytes(torch, forward, (q, k, v), dout)


def _sdpa_memory(torch, backend, qt, kt, vt, dout_t, causal):
    from torch.nn.attention import sdpa_kernel
    which = _sdpa_backend(backend)
    qt, kt, vt = _grad_leaves(torch, qt, kt, vt)

    def forward():
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    with sdpa_kernel(which), torch.enable_grad():
        return _bwd_extra_bytes(torch, forward, (qt, kt, vt), dout_t)


def run_bwd_memory(dtypes=("float16",), head_dims=(64, 128), seqlens=(32768, 65536),
                   causals=(False,), archs=(None,), baselines=("efficient",),
                   heads=MEMORY_HEADS, progress=sys.stderr, deterministic=False) -> dict:
    """Extra memory of the backward at long seqlens, batch 1 x ``heads``: portattn (each
    arch entry) next to SDPA's backends."""
    torch = _torch()
    from .arch import detect
    dev = detect()
    combos = memory_rows(dtypes, head_dims, seqlens, causals, heads)
    estimate = estimate_seconds(combos, "bwd_memory", archs, baselines, deterministic)
    _print_estimate(estimate, len(combos), progress)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for n, row in enumerate(combos, 1):
        dt, d, L, c = row.dtype, row.head_dim, row.seqlen, row.causal
        print(f"\r[{n}/{len(combos)}] {dt} d{d} L{L} {'causal' if c else 'full'}   ",
              end="", file=progress, flush=True)
        tdt = getattr(torch, dt)
        q, k, v, dout = (torch.randn(row.batch, L, row.nheads, d, device="cuda", dtype=tdt)
                         for _ in range(4))
        for arch, path in _arch_entries(archs):
            name = impl_name(arch, path, deterministic)
            try:
                row.extra_bytes[name], row.bwd_ms[name] = _portattn_memory(
                    torch, q, k, v, dout, c, arch, path, deterministic)
            except Exception as e:   # a path that cannot run this shape is reported, not fatal
                row.extra_bytes[name] = None
                row.notes[name] = _error_note(e)
            torch.cuda.empty_cache()
        qt, kt, vt, dt_ = (x.transpose(1, 2).contiguous() for x in (q, k, v, dout))
        for be in baselines:
            name = f"sdpa_{be}"
            need = math_bytes(row, "bwd_memory")
            if be == "math" and need > MATH_MEMORY_LIMIT:
                row.extra_bytes[name] = None
                row.notes[name] = f"skipped: would materialise {need >> 30} GB"
                continue
            try:
                row.extra_bytes[name], row.bwd_ms[name] = _sdpa_memory(torch, be, qt, kt, vt,
                                                                       dt_, c)
            except Exception as e:   # SDPA lacks this backend for the shape, dtype or GPU
                row.extra_bytes[name] = None
                row.notes[name] = _error_note(e)
            torch.cuda.empty_cache()
        del q, k, v, dout, qt, kt, vt, dt_
        torch.cuda.empty_cache()
        rows.append(row)
    print(file=progress)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": dev.name, "cc": dev.real_cc, "sms": dev.sm_count, "versions": dev.versions,
        "torch": torch.__version__, "mode": "bwd_memory", "deterministic": deterministic,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "estimate_s": estimate, "elapsed_s": (now - started).total_seconds(),
        "peaks_tflops": {}, "rows": [dict(asdict(r), grad_bytes=r.grad_bytes) for r in rows],
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
    if result.get("mode") == "fwd_bwd":
        lines.append(f"fwd_bwd: one forward + backward per call, FLOPs = {1 + BWD_FLOP_FACTOR:g}x "
                     f"the forward's (backward {BWD_FLOP_FACTOR:g}x); portattn's path and % are "
                     f"its backward plan's"
                     + (", deterministic=True" if result.get("deterministic") else "")
                     + _run_time(result))
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
    return "\n".join(lines + _why_not(rows, "tflops"))


def _why_not(rows, key: str) -> list:
    """One line per distinct reason an implementation was n/a (a backend SDPA lacks, a
    path that cannot run the shape), so the table says it without the JSON."""
    seen = {}
    for r in rows:
        for impl, value in r[key].items():
            note = r["notes"].get(impl)
            if value is None and note:
                seen.setdefault((impl, note), 0)
                seen[(impl, note)] += 1
    return [f"n/a {impl} ({n} row{'s' if n > 1 else ''}): {note}"
            for (impl, note), n in seen.items()]


def _run_time(result: dict) -> str:
    est, took = result.get("estimate_s"), result.get("elapsed_s")
    if est is None or took is None:
        return ""
    return f"; ran {took:.0f} s (estimated {est:.0f} s)"


def format_memory_table(result: dict) -> str:
    """bwd_memory's table: extra MiB during the backward and bytes per (seqlen x headdim x
    heads), which stays flat across seqlen when the backward is O(seqlen * d)."""
    rows = result["rows"]
    impls = []
    for r in rows:
        impls += [i for i in r["extra_bytes"] if i not in impls]
    lines = [f"{result['device']} (sm_{result['cc']}, {result['sms']} SMs), {result['date']}, "
             f"mode bwd_memory"
             + (", deterministic=True" if result.get("deterministic") else "") + _run_time(result),
             "extra = peak allocated during the backward - allocated when it started (dq, dk, "
             "dv included: 'grads'); B/elem = extra / (batch x seqlen x heads x headdim)"]
    lines.append(f"{'dtype':8} {'d':>4} {'L':>6} {'causal':6} {'bxh':>5} {'grads MiB':>9} "
                 + " ".join(f"{i + ' MiB':>20} {'B/elem':>7}" for i in impls))
    for r in rows:
        elems = r["batch"] * r["seqlen"] * r["nheads"] * r["head_dim"]
        cells = []
        for i in impls:
            x = r["extra_bytes"].get(i)
            cells.append(f"{'n/a':>20} {'':>7}" if x is None
                         else f"{x / 2**20:>20.1f} {x / elems:>7.2f}")
        extra = []
        for i in impls:
            ms = r.get("bwd_ms", {}).get(i)
            if ms:
                bwd = flops(_RowView(r)) * BWD_FLOP_FACTOR
                extra.append(f"{i} backward {ms:.0f} ms, {bwd / ms / 1e9:.1f} TFLOP/s")
        lines.append(f"{r['dtype']:8} {r['head_dim']:>4} {r['seqlen']:>6} {str(r['causal']):6} "
                     f"{str(r['batch']) + 'x' + str(r['nheads']):>5} "
                     f"{r['grad_bytes'] / 2**20:>9.1f} "
                     + " ".join(cells) + ("   " + "; ".join(extra) if extra else ""))
    return "\n".join(lines + _why_not(rows, "extra_bytes"))


class _RowView:
    """Attribute access to a row dict, for flops()."""
    def __init__(self, d: dict):
        self.__dict__.update(d)


def format_result(result: dict) -> str:
    if result.get("mode") == "bwd_memory":
        return format_memory_table(result)
    return format_table(result)


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
    """plot(), or one line on ``err`` saying why not when matplotlib is missing (or the
    mode, bwd_memory, has no TFLOP/s to draw)."""
    if result.get("mode") == "bwd_memory":
        print(f"portattn bench: --plot {path} skipped: mode bwd_memory has no plot (the "
              f"table and --json have its numbers)", file=err)
        return False
    try:
        plot(result, path)
    except ImportError:
        print(f"portattn bench: --plot {path} skipped: matplotlib is not installed "
              f"(pip install 'portattn[bench]')", file=err)
        return False
    return True


def parser():
    import argparse

    def per_mode(key):
        return "; ".join(f"{m}: {MODE_DEFAULTS[m][key]}" for m in MODES)
    ap = argparse.ArgumentParser(
        prog="portattn bench",
        description="portattn next to torch SDPA's backends and this GPU's measured peaks. "
                    "--mode fwd: forward TFLOP/s. --mode fwd_bwd: forward + backward "
                    f"TFLOP/s, FLOPs = {1 + BWD_FLOP_FACTOR:g}x the forward's, batch x heads "
                    "filling the GPU as in fwd; prints its estimated run time first. "
                    "--mode bwd_memory: peak memory the backward allocates beyond what is "
                    f"live after the forward, batch 1 x --heads, and that per (seqlen x "
                    "headdim x heads) element, O(seqlen * d) when flat across seqlen. "
                    "--mode decode: KV-cache decoding (its own options; see --mode decode "
                    "--help).")
    ap.add_argument("--mode", default="fwd", choices=MODES, help="what is measured")
    ap.add_argument("--dtypes", default=None, help=f"default per mode: {per_mode('dtypes')}")
    ap.add_argument("--head-dims", default=None, help=f"default: {per_mode('head_dims')}")
    ap.add_argument("--seqlens", default=None, help=f"default: {per_mode('seqlens')}")
    ap.add_argument("--causal", default=None, choices=("both", "on", "off"),
                    help=f"default: {per_mode('causal')}")
    ap.add_argument("--archs", default="native",
                    help="comma list of 'native' and sm_XX to force (PORTATTN_ARCH), each "
                         "optionally ':path' to force a path too (PORTATTN_PATH), e.g. "
                         "native:simt")
    ap.add_argument("--baselines", default=None,
                    help=f"SDPA backends among {','.join(SDPA_BACKENDS)} ('' for none); "
                         f"default: {per_mode('baselines')}")
    ap.add_argument("--deterministic", action="store_true",
                    help="fwd_bwd and bwd_memory: portattn's backward with deterministic=True "
                         "(columns named ...+det)")
    ap.add_argument("--heads", type=int, default=MEMORY_HEADS,
                    help="bwd_memory: heads (batch is 1)")
    ap.add_argument("--json", default=None, help="write the full results here")
    ap.add_argument("--plot", default=None, metavar="PATH.png",
                    help="draw TFLOP/s against seqlen here (needs matplotlib; fwd, fwd_bwd)")
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. the commit)")
    return ap


def _int_list(text: str, flag: str, lo: int, hi=None) -> tuple:
    out = []
    for item in text.split(","):
        try:
            n = int(item)
        except ValueError:
            raise ValueError(f"{flag} must be a comma list of integers, got {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise ValueError(f"{flag} values must be in [{lo}, {hi if hi else 'inf'}], got {n}")
        out.append(n)
    return tuple(out)


def options(a) -> dict:
    """run_bench's keyword arguments from parsed flags, with the mode's defaults filled in;
    ValueError naming the flag for anything the run would trip over."""
    from .arch import PATH_NAMES, parse_arch
    from .spec import MAX_HEAD_DIM
    defaults = MODE_DEFAULTS[a.mode]

    def get(key):
        value = getattr(a, key)
        return defaults[key] if value is None else value
    dtypes = tuple(get("dtypes").split(","))
    for dt in dtypes:
        if dt not in DTYPE_NAMES:
            raise ValueError(f"--dtypes must be among {DTYPE_NAMES}, got {dt!r}")
    baselines = tuple(b for b in get("baselines").split(",") if b)
    for be in baselines:
        if be not in SDPA_BACKENDS:
            raise ValueError(f"--baselines must be among {SDPA_BACKENDS}, got {be!r}")
    archs = []
    for item in a.archs.split(","):
        arch, _, path = item.partition(":")
        if path and path not in PATH_NAMES:
            raise ValueError(f"--archs path must be one of {PATH_NAMES}, got {path!r}")
        archs.append((None if arch == "native" else parse_arch(arch, source="--archs"),
                      path or None))
    if a.deterministic and a.mode == "fwd":
        raise ValueError("--deterministic applies to the backward: use it with --mode "
                         "fwd_bwd or bwd_memory, got --mode fwd")
    if a.heads < 1:
        raise ValueError(f"--heads must be >= 1, got {a.heads}")
    causals = {"both": (False, True), "on": (True,), "off": (False,)}[get("causal")]
    return {"dtypes": dtypes,
            "head_dims": _int_list(get("head_dims"), "--head-dims", 1, MAX_HEAD_DIM),
            "seqlens": _int_list(get("seqlens"), "--seqlens", 1),
            "causals": causals, "archs": tuple(archs), "baselines": baselines,
            "mode": a.mode, "deterministic": a.deterministic, "heads": a.heads}


def main(argv) -> int:
    argv = list(argv)
    if "--mode=decode" in argv or any(x == "--mode" and argv[i + 1:i + 2] == ["decode"]
                                      for i, x in enumerate(argv)):
        from .bench_decode import main as decode_main
        return decode_main(argv)
    a = parser().parse_args(argv)
    result = run_bench(**options(a))
    result["label"] = a.label
    print(format_result(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    if a.plot:
        write_plot(result, a.plot)
    return 0
