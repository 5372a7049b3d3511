"""Reading the real GPU through CuPy, and the PORTATTN_ARCH override."""
from __future__ import annotations

import os
import threading

from .device import DeviceInfo
from .table import facts_for, parse_arch

ENV_ARCH = "PORTATTN_ARCH"
INSTALL_HINT = ("install CuPy for your CUDA: pip install 'portattn[cuda12]' (sm_50+), "
                "'portattn[cuda13]' (sm_75+) or 'portattn[cuda11]'")

_lock = threading.Lock()
_cache: dict = {}


def forced_arch() -> int | None:
    """The arch named by PORTATTN_ARCH (plans target it; kernels compile for the real GPU)."""
    value = os.environ.get(ENV_ARCH, "").strip()
    return parse_arch(value, source=ENV_ARCH) if value else None


ENV_PATH = "PORTATTN_PATH"


def forced_path() -> str | None:
    """The one path PORTATTN_PATH allows (for debugging and benchmarks), or None."""
    from .plan import PATH_NAMES
    value = os.environ.get(ENV_PATH, "").strip().lower()
    if not value:
        return None
    if value not in PATH_NAMES:
        raise ValueError(f"{ENV_PATH} must be one of {PATH_NAMES}, got {value!r}")
    return value


def import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(f"portattn needs CuPy to run kernels: {INSTALL_HINT}") from e
    return cupy


def gpu_status():
    """(True, '') if a CUDA GPU is usable, else (False, why)."""
    try:
        cupy = import_cupy()
    except RuntimeError as e:
        return False, str(e)
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or a driver too old for this CuPy
        return False, f"no usable CUDA driver ({type(e).__name__}: {e})"
    if n == 0:
        return False, "no CUDA GPU found"
    return True, ""


def _versions(cupy) -> dict:
    rt = cupy.cuda.runtime
    out = {"cupy": cupy.__version__}
    for key, fn in (("driver", rt.driverGetVersion), ("runtime", rt.runtimeGetVersion)):
        try:
            v = fn()
            out[key] = f"{v // 1000}.{v % 1000 // 10}"
        except Exception as e:
            out[key] = f"unknown ({type(e).__name__})"
    try:
        from cupy_backends.cuda.libs import nvrtc
        major, minor = nvrtc.getVersion()
        out["nvrtc"] = f"{major}.{minor}"
    except Exception as e:
        out["nvrtc"] = f"unavailable ({type(e).__name__}: {e})"
    return out


def nvrtc_archs() -> tuple:
    try:
        from cupy_backends.cuda.libs import nvrtc
        return tuple(int(a) for a in nvrtc.getSupportedArchs())
    except Exception:
        return ()


def detect(device_id: int | None = None) -> DeviceInfo:
    """DeviceInfo for a CUDA device (default: CuPy's current one), honouring PORTATTN_ARCH."""
    cupy = import_cupy()
    if device_id is None:
        device_id = cupy.cuda.runtime.getDevice()
    forced = forced_arch()
    key = (device_id, forced)
    with _lock:
        if key in _cache:
            return _cache[key]
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        real_cc = props["major"] * 10 + props["minor"]
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        plan_cc = forced if forced is not None else real_cc
        if forced is not None and forced > real_cc:
            raise ValueError(
                f"{ENV_ARCH}=sm_{forced} plans for features that this GPU "
                f"({name}, sm_{real_cc}) lacks; it must be sm_{real_cc} or older")
        facts = facts_for(plan_cc)
        info = DeviceInfo(
            plan_cc=plan_cc, facts=facts,
            smem_per_block=min(facts.smem_per_block_optin, props["sharedMemPerBlockOptin"]),
            smem_per_sm=min(facts.smem_per_sm, props["sharedMemPerMultiprocessor"]),
            sm_count=props["multiProcessorCount"], name=name, real_cc=real_cc,
            forced=forced is not None, device_id=device_id,
            versions=_versions(cupy), nvrtc_archs=nvrtc_archs(),
        )
        _cache[key] = info
        return info
