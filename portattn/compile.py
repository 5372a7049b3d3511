"""Run-time compilation: one frozen KernelSpec -> one cupy.RawModule.

Local ``#include "x.cuh"`` lines are inlined, so NVRTC needs no include path and CuPy's
disk cache (keyed on the source text, which would not see included headers) is keyed on
everything compiled. A header line carries a schema version and a digest of every file in
kernels_cuda/, so editing any kernel file, or changing how sources are assembled, changes
every key. CuPy's disk cache is the only disk cache; this module adds a per-process one.
"""
from __future__ import annotations

import hashlib
import re
import struct
import threading
from functools import lru_cache
from importlib import resources

from .spec import KernelSpec

SCHEMA_VERSION = 1
KERNEL_PACKAGE = "portattn.kernels_cuda"
COMPILE_OPTIONS = ("-std=c++17",)
DEFAULT_SMEM_LIMIT = 48 * 1024
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel; ``log`` is NVRTC's log and ``spec`` the KernelSpec."""

    def __init__(self, spec: KernelSpec, log: str, arch: str = ""):
        self.spec, self.log, self.arch = spec, log, arch
        super().__init__(f"NVRTC failed to compile {spec}{' for ' + arch if arch else ''}:\n{log}")

    def __reduce__(self):
        # The compile gate's worker processes send it back pickled: rebuilt from the same
        # three fields (the default would call __init__ with the message alone).
        return type(self), (self.spec, self.log, self.arch)


@lru_cache(maxsize=None)
def kernel_files() -> dict:
    root = resources.files(KERNEL_PACKAGE)
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith((".cu", ".cuh"))}


@lru_cache(maxsize=None)
def sources_digest() -> str:
    h = hashlib.sha256(f"schema {SCHEMA_VERSION}".encode())
    for name, text in kernel_files().items():
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=None)
def build_source(family: str) -> str:
    files = kernel_files()
    done = set()

    def inline(name: str) -> str:
        if name not in files:
            raise FileNotFoundError(f"kernel source {name!r} is not in {KERNEL_PACKAGE}")
        if name in done:
            return ""
        done.add(name)
        return _INCLUDE.sub(lambda m: inline(m.group(1)), files[name])

    body = inline(f"{family}.cu")
    return f"// portattn schema {SCHEMA_VERSION} kernels {sources_digest()}\n{body}"


_lock = threading.Lock()
_functions: dict = {}


def get_function(spec: KernelSpec, device_id: int):
    """The compiled kernel for ``spec`` on ``device_id``; compiled at most once per process."""
    key = (device_id, spec)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    import cupy
    with _lock:
        fn = _functions.get(key)
        if fn is not None:
            return fn
        with cupy.cuda.Device(device_id):
            module = cupy.RawModule(code=build_source(spec.family), options=COMPILE_OPTIONS,
                                    name_expressions=[spec.name_expression])
            try:
                fn = module.get_function(spec.name_expression)
            except cupy.cuda.compiler.CompileException as e:
                raise KernelCompileError(spec, e.get_message() if hasattr(e, "get_message")
                                         else str(e)) from e
            if spec.smem_bytes > DEFAULT_SMEM_LIMIT:
                fn.max_dynamic_shared_size_bytes = spec.smem_bytes
        _functions[key] = fn
        return fn


_NUMPY_CODES = {"uint64": "Q", "int64": "q", "uint32": "I", "int32": "i", "float32": "f"}
_formats: dict = {}


def numpy_format(args: tuple) -> str:
    """The struct format of a tuple of NumPy scalars (the forward/backward launch tuples)."""
    types = tuple(type(a) for a in args)
    fmt = _formats.get(types)
    if fmt is None:
        import numpy as np
        fmt = _formats[types] = "@" + "".join(_NUMPY_CODES[np.dtype(t).name] for t in types)
    return fmt


def launch(fn, grid: int, block: int, fmt: str | None, args: tuple, stream: int,
           smem: int = 0) -> None:
    """Launch ``fn`` on ``stream`` with ``args`` packed into one parameter buffer
    (cuLaunchKernel's CU_LAUNCH_PARAM_BUFFER_POINTER) by struct format ``fmt``, whose
    native alignment is the kernel parameter layout; ``fmt`` None: ``args`` are NumPy
    scalars and their types give it. CuPy converts each argument instead; for decode's ~50
    that was a large part of ~190 us of host time per call (~75 us now, with the plan
    cache; benchmarks/NOTES.md, eighth session), which small decode kernels wait on."""
    import ctypes
    from cupy_backends.cuda.api import driver
    buf = ctypes.create_string_buffer(struct.pack(fmt or numpy_format(args), *args))
    size = ctypes.c_size_t(ctypes.sizeof(buf) - 1)
    # CU_LAUNCH_PARAM_BUFFER_POINTER (1), CU_LAUNCH_PARAM_BUFFER_SIZE (2), CU_LAUNCH_PARAM_END.
    extra = (ctypes.c_void_p * 5)(1, ctypes.addressof(buf), 2, ctypes.addressof(size), 0)
    driver.launchKernel(fn.kernel.ptr, grid, 1, 1, block, 1, 1, smem, stream, 0,
                        ctypes.addressof(extra))


def nvrtc_compile(family: str, cc: int, name_expressions=()):
    """Compile kernels_cuda/``family``.cu for sm_``cc`` with NVRTC alone (no GPU or driver).

    Returns (cubin, ptxas_log, {name_expression: lowered_name}); NVRTCError on failure,
    with the log in ``error.log``."""
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(build_source(family), f"{family}.cu", [], [])
    try:
        for expr in name_expressions:
            nvrtc.addNameExpression(prog, expr)
        opts = list(COMPILE_OPTIONS) + [f"--gpu-architecture=sm_{cc}", "-Xptxas=-v"]
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            e.log = nvrtc.getProgramLog(prog)
            raise
        lowered = {expr: nvrtc.getLoweredName(prog, expr) for expr in name_expressions}
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog), lowered
    finally:
        nvrtc.destroyProgram(prog)


def compile_cubin(spec: KernelSpec, cc: int):
    """Compile ``spec`` for sm_``cc`` with no GPU. Returns (lowered_name, ptxas_log);
    used by the compile gate."""
    from cupy_backends.cuda.libs import nvrtc
    try:
        _, log, lowered = nvrtc_compile(spec.family, cc, (spec.name_expression,))
    except nvrtc.NVRTCError as e:
        raise KernelCompileError(spec, e.log, f"sm_{cc}") from e
    return lowered[spec.name_expression], log
