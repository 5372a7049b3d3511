"""compute-sanitizer over portattn's forward and backward kernels, every forced arch, on a
GPU machine.

    python tools/sanitize.py [--tool memcheck|racecheck|initcheck|synccheck|all]
                             [--archs native,sm_80,sm_75,sm_70,sm_61]
                             [--dtypes float16,bfloat16,float32] [--jobs 4]
                             [--timeout 300] [--log-dir DIR]

For each tool (``all`` = memcheck and racecheck; a comma list also works) and each arch
(``native`` plans for the real GPU, ``sm_XX`` forces that plan through PORTATTN_ARCH), this
script re-runs itself as a child process under

    compute-sanitizer --tool TOOL --error-exitcode 99 python tools/sanitize.py --child ...

and the child pushes a handful of tiny shapes chosen to sit on tile boundaries through
portattn.flash_attn_func for each dtype, checking each result against reference.py:

    tiny       sq=1,  sk=1,   d=40                (a head dim that fills no vector width)
    edge       sq=65, sk=129, d=64, GQA 2/1, causal (one row/column past a 64 tile)
    window     sq=64, sk=64,  d=128, window (16, 8)
    features   sq=47, sk=33,  d=96, batch 2, causal bottom-right (14 fully masked rows),
               softcap, ALiBi and a float bias
    tc_bwd     sq=129, sk=257, d=128, GQA 4/2, causal (one row/key past tc_bwd.cu's 64-row
               query step and 128-key tile on sm_80+, its 16x64 tile on sm_75)
    varlen     a packed batch of 4 sequences, (sq, sk) = (65, 129), (0, 3), (17, 0),
               (1, 1), d=64, GQA 2/1, causal: forward and backward (flash_attn_varlen_*)

bfloat16 needs torch; without torch the child uses CuPy arrays and skips it. Archs newer
than the real GPU are skipped. A first child without the sanitizer compiles every kernel
(CuPy's cache in ~/.cupy/kernel_cache is shared, so the sanitized children only load them)
and shows whether a failure is the sanitizer's or plain wrong results.

Inside the children torch's caching allocator is off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) and
CuPy's memory pool is bypassed, so every tensor is its own allocation and memcheck sees an
access past its end instead of landing silently in a neighbour in the same pool block.

compute-sanitizer runs with ``--report-api-errors no`` unless --sanitizer-args says
otherwise: torch and CuPy make CUDA calls that fail by design, and a failing call of
portattn's own already raises in the child.

Prints one row per (tool, arch): cases ok, the verdict and the sanitizer's summary line,
then the first error lines of each failure. Exit status 0 only if every row passed. The
sanitizer is ``compute-sanitizer`` on PATH, else the newest /usr/local/cuda*/bin one.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)

ERROR_EXIT = 99
TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
ALL_TOOLS = ("memcheck", "racecheck")
DEFAULT_ARCHS = "native,sm_80,sm_75,sm_70,sm_61"
DEFAULT_DTYPES = "float16,bfloat16,float32"
# CUDA calls that fail on purpose inside torch and CuPy (probing, lazy loading) would count
# as errors; a failing call of portattn's own raises in the child and fails its case anyway.
DEFAULT_SANITIZER_ARGS = "--report-api-errors no"
_SUMMARY = re.compile(r"=+ (?:ERROR|RACECHECK|LEAK) SUMMARY: .*")
_CASE = re.compile(r"^CASE (ok|FAIL|SKIP) ", re.M)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    sq: int
    sk: int
    hq: int
    hkv: int
    d: int
    kwargs: dict = field(default_factory=dict)
    alibi: bool = False
    bias: bool = False


SHAPES = (
    Shape("tiny", 1, 1, 1, 1, 1, 40),
    Shape("edge", 1, 65, 129, 2, 1, 64, {"causal": True}),
    Shape("window", 1, 64, 64, 1, 1, 128, {"window_size": (16, 8)}),
    Shape("features", 2, 47, 33, 2, 2, 96, {"causal": True, "softcap": 5.0}, alibi=True,
          bias=True),
    Shape("tc_bwd", 1, 129, 257, 4, 2, 128, {"causal": True}),
)

# (seqlen_q, seqlen_k) per sequence of the varlen case, as two tuples.
VARLEN_LENS = ((65, 0, 17, 1), (129, 3, 0, 1))

# ---------------------------------------------------------------- child: run the cases

def _child(archs: list, dtypes: list) -> int:
    import numpy as np

    import cupy

    import portattn
    from portattn.arch import parse_arch
    from portattn.testing import (check_backward, check_forward, check_varlen, forced_arch,
                                  random_inputs, to_device)

    cupy.cuda.set_allocator(None)
    try:
        import torch  # noqa: F401
        kind = "torch"
    except ImportError:
        kind = "cupy"
    real_cc = int(cupy.cuda.Device().compute_capability)
    failed = 0
    for arch in archs:
        cc = None if arch == "native" else parse_arch(arch, source="--archs")
        if cc is not None and cc > real_cc:
            print(f"CASE SKIP {arch}: newer than this GPU (sm_{real_cc})", flush=True)
            continue
        for dtype in dtypes:
            if dtype == "bfloat16" and kind != "torch":
                print(f"CASE SKIP {arch} {dtype}: needs torch", flush=True)
                continue
            for n, s in enumerate(SHAPES):
                rng = np.random.default_rng(n)
                arrays = {
                    "q": random_inputs(rng, (s.batch, s.sq, s.hq, s.d), dtype),
                    "k": random_inputs(rng, (s.batch, s.sk, s.hkv, s.d), dtype),
                    "v": random_inputs(rng, (s.batch, s.sk, s.hkv, s.d), dtype),
                }
                extra = {}
                if s.alibi:
                    arrays["alibi_slopes"] = rng.uniform(0.0, 0.5, (s.hq,)).astype(np.float32)
                    extra["alibi_slopes"] = to_device(arrays["alibi_slopes"], kind, "float32")
                if s.bias:
                    arrays["bias"] = rng.standard_normal((s.sq, s.sk)).astype(np.float32)
                    extra["bias"] = to_device(arrays["bias"], kind, "float32")
                what = f"{arch} {dtype} {s.name}"
                try:
                    with forced_arch(cc):
                        dev = [to_device(arrays[x], kind, dtype) for x in "qkv"]
                        plan = portattn.explain(*dev, **s.kwargs, **extra).plan
                        c_out, c_lse = check_forward(dict(s.kwargs), arrays, dtype, kind,
                                                     portattn.flash_attn_func)
                        # Backward: atomic dQ on even shapes, the deterministic dQ kernel
                        # on odd ones, so both run under every tool.
                        arrays["dout"] = random_inputs(rng, (s.batch, s.sq, s.hq, s.d), dtype)
                        grads = check_backward(dict(s.kwargs), arrays, dtype, kind,
                                               deterministic=bool(n % 2))
                except Exception as e:  # reported per case, the others still run
                    failed += 1
                    print(f"CASE FAIL {what}: {type(e).__name__}: {e}", flush=True)
                    continue
                ok = c_out.ok and c_lse.ok and all(g.ok for g in grads)
                failed += not ok
                print(f"CASE {'ok' if ok else 'FAIL'} {what} [{plan.path}:{plan.spec.short()}]:"
                      f" {c_out}; {c_lse}; " + "; ".join(str(g) for g in grads), flush=True)
            # A packed varlen batch: sequences ending mid-tile, an empty one, one with no
            # keys, GQA and causal; CTAs past a short sequence's end must return untouched.
            rng = np.random.default_rng(len(SHAPES))
            cu_q, cu_k = (np.cumsum([0, *lens]).astype(np.int32) for lens in VARLEN_LENS)
            arrays = {n: random_inputs(rng, (int(cu[-1]), h, 64), dtype) for n, cu, h in
                      (("q", cu_q, 2), ("k", cu_k, 1), ("v", cu_k, 1), ("dout", cu_q, 2))}
            what = f"{arch} {dtype} varlen"
            try:
                with forced_arch(cc):
                    checks = check_varlen({"causal": True}, arrays, cu_q, cu_k, dtype, kind)
            except Exception as e:
                failed += 1
                print(f"CASE FAIL {what}: {type(e).__name__}: {e}", flush=True)
                continue
            ok = all(c.ok for c in checks)
            failed += not ok
            print(f"CASE {'ok' if ok else 'FAIL'} {what}: " + "; ".join(map(str, checks)),
                  flush=True)
    cupy.cuda.runtime.deviceSynchronize()
    return 1 if failed else 0


# ---------------------------------------------------------------- parent: drive the children

def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidates = ["/usr/local/cuda/bin/compute-sanitizer"]
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/compute-sanitizer"), reverse=True)
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


@dataclass
class Outcome:
    tool: str
    arch: str
    rc: int | None
    seconds: float
    log: str

    @property
    def counts(self) -> tuple:
        marks = _CASE.findall(self.log)
        return marks.count("ok"), marks.count("FAIL"), marks.count("SKIP")

    @property
    def summary(self) -> str:
        lines = _SUMMARY.findall(self.log)
        return "; ".join(x.strip("= ").strip() for x in lines) or "-"

    @property
    def verdict(self) -> str:
        ok, bad, skip = self.counts
        if self.rc is None:
            return "TIMEOUT"
        if self.rc == ERROR_EXIT and self.tool != "none":
            return "SANITIZER ERRORS"
        if self.rc != 0 or bad:
            return f"FAIL (rc {self.rc})"
        if ok:
            return "pass"
        return "skipped" if skip else "FAIL (no cases ran)"

    @property
    def passed(self) -> bool:
        return self.verdict in ("pass", "skipped")

    def first_errors(self, n: int = 12) -> list:
        """The sanitizer's error lines, failed cases and a child's exception, first n."""
        lines = self.log.splitlines()
        keep = [x for x in lines
                if (x.startswith("=========") and "SUMMARY" not in x
                    and "COMPUTE-SANITIZER" not in x and x.strip("= "))
                or x.startswith("CASE FAIL")]
        own = [x for x in lines if x.strip() and not x.startswith("=")]
        if "Traceback (most recent call last)" in self.log and own:
            keep.append(own[-1])
        if not keep and self.rc not in (0, None):
            keep = lines[-n:]
        return keep[:n]


def _run_child(sanitizer, tool, archs, dtypes, timeout, extra_args) -> Outcome:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--archs", ",".join(archs),
           "--dtypes", ",".join(dtypes)]
    if tool != "none":
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", str(ERROR_EXIT),
               *extra_args, *cmd]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.pop("PORTATTN_ARCH", None)
    t0 = time.time()
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors="replace", timeout=timeout, env=env, check=False)
        rc, log = r.returncode, r.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        rc, log = None, out.decode(errors="replace") if isinstance(out, bytes) else out
    return Outcome(tool, ",".join(archs), rc, time.time() - t0, log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", default="all",
                    help=f"all ({'+'.join(ALL_TOOLS)}) or a comma list of {', '.join(TOOLS)}")
    ap.add_argument("--archs", default=DEFAULT_ARCHS)
    ap.add_argument("--dtypes", default=DEFAULT_DTYPES)
    ap.add_argument("--jobs", type=int, default=4, help="sanitized children run at once")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    ap.add_argument("--log-dir", default=None, help="write each child's full output here")
    ap.add_argument("--sanitizer-args", default=DEFAULT_SANITIZER_ARGS,
                    help="extra compute-sanitizer arguments, space separated (default: "
                         "%(default)s; pass '' for the sanitizer's own defaults)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    archs = [x.strip() for x in a.archs.split(",") if x.strip()]
    dtypes = [x.strip() for x in a.dtypes.split(",") if x.strip()]
    if a.child:
        return _child(archs, dtypes)

    tools = ALL_TOOLS if a.tool == "all" else tuple(t.strip() for t in a.tool.split(","))
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        ap.error(f"unknown --tool {unknown}; choose from all, {', '.join(TOOLS)}")
    from portattn.arch import parse_arch
    for x in archs:
        if x != "native":
            parse_arch(x, source="--archs")
    sanitizer = find_sanitizer()
    if sanitizer is None:
        print("compute-sanitizer not found on PATH or under /usr/local/cuda*/bin",
              file=sys.stderr)
        return 2
    print(f"sanitizer: {sanitizer}; python: {sys.executable}", flush=True)

    warm = _run_child(sanitizer, "none", archs, dtypes, a.timeout * 2, [])
    print(f"  none (compile + reference check, no sanitizer): {warm.verdict}, "
          f"{warm.seconds:.0f} s", flush=True)
    if warm.rc != 0 and not warm.counts[0]:
        print("the unsanitized child ran no case; not starting the sanitizer:")
        for line in warm.first_errors(20):
            print(f"    {line}")
        return 1
    jobs = [(t, x) for t in tools for x in archs]
    extra = a.sanitizer_args.split()

    def go(job):
        out = _run_child(sanitizer, job[0], [job[1]], dtypes, a.timeout, extra)
        print(f"  {out.tool} {out.arch}: {out.verdict}, {out.seconds:.0f} s", flush=True)
        return out

    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        outcomes = [warm] + list(ex.map(go, jobs))

    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)
        for o in outcomes:
            name = f"{o.tool}_{o.arch.replace(',', '+')}.log"
            with open(os.path.join(a.log_dir, name), "w") as f:
                f.write(o.log)
    print(f"\n{'tool':10} {'arch':30} {'ok/fail/skip':>12} {'secs':>5}  {'verdict':17} summary")
    for o in outcomes:
        ok, bad, skip = o.counts
        print(f"{o.tool:10} {o.arch[:30]:30} {f'{ok}/{bad}/{skip}':>12} {o.seconds:>5.0f}  "
              f"{o.verdict:17} {o.summary}")
    failures = [o for o in outcomes if not o.passed]
    for o in failures:
        print(f"\n--- {o.tool} {o.arch}: {o.verdict}")
        for line in o.first_errors():
            print(f"    {line}")
    print(f"\n{len(outcomes) - len(failures)}/{len(outcomes)} runs passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
