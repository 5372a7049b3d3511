"""Zero-copy views of torch CUDA tensors and CuPy arrays: pointer, shape, strides, dtype."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

_TORCH_DTYPES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16",
                 "torch.float32": "float32", "torch.bool": "bool", "torch.float64": "float64",
                 "torch.int32": "int32", "torch.int64": "int64", "torch.uint8": "uint8"}
# Tests set this (testing.poisoned_outputs) so that an element a kernel fails to write
# shows up as NaN instead of stale memory that may hold a right answer.
poison_outputs = False
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "bool": 1, "float64": 8,
            "int32": 4, "int64": 8, "uint8": 1}


# Not frozen: a frozen dataclass's __init__ goes through object.__setattr__ per field, and a
# decode call builds several of these (host time per call is what a decode loop pays).
@dataclass
class ArrayView:
    kind: str            # "torch", "cupy", or "cai" (any __cuda_array_interface__)
    obj: object
    shape: tuple
    strides: tuple       # in elements
    dtype: str
    device: object       # "cpu" for torch CPU tensors, else the CUDA device index
    ptr: int
    itemsize: int

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


def with_leading_axis(x: ArrayView) -> ArrayView:
    """The same memory seen with an extra leading axis of length 1 (e.g. a packed varlen
    batch as a batch of one sequence)."""
    lead = x.shape[0] * x.strides[0] if x.shape else 1
    return dataclasses.replace(x, shape=(1,) + tuple(x.shape), strides=(lead,) + tuple(x.strides))


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_cupy(x) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


_torch_dtype_names: dict = {}


def view(x, name: str) -> ArrayView:
    if isinstance(x, ArrayView):
        return x
    if _is_torch(x):
        dtype = _torch_dtype_names.get(x.dtype)
        if dtype is None:
            text = str(x.dtype)
            dtype = _torch_dtype_names[x.dtype] = _TORCH_DTYPES.get(
                text, text.replace("torch.", ""))
        dev = x.get_device()
        return ArrayView("torch", x, tuple(x.shape), x.stride(), dtype,
                         dev if dev >= 0 else "cpu", x.data_ptr(), x.element_size())
    if _is_cupy(x):
        itemsize = x.dtype.itemsize
        if any(s % itemsize for s in x.strides):
            raise ValueError(f"{name} has strides {x.strides} that are not whole elements")
        return ArrayView("cupy", x, tuple(x.shape), tuple(s // itemsize for s in x.strides),
                         x.dtype.name, x.device.id, x.data.ptr, itemsize)
    cai = getattr(x, "__cuda_array_interface__", None)
    if isinstance(cai, dict):
        return _view_cai(x, cai, name)
    raise TypeError(f"{name} must be a torch CUDA tensor, a CuPy array or an object with "
                    f"__cuda_array_interface__, got {type(x).__module__}.{type(x).__qualname__}")


_TYPESTR = {"f2": "float16", "f4": "float32", "f8": "float64", "b1": "bool", "i4": "int32",
            "i8": "int64", "u1": "uint8"}


def _view_cai(x, cai: dict, name: str) -> ArrayView:
    """Any producer of the CUDA array interface (Numba, ...); results come back as CuPy."""
    typestr = str(cai.get("typestr", ""))
    dtype = _TYPESTR.get(typestr[1:])
    if dtype is None:
        raise TypeError(f"{name} has unsupported __cuda_array_interface__ typestr {typestr!r}")
    itemsize = ITEMSIZE[dtype]
    shape = tuple(int(n) for n in cai["shape"])
    strides = cai.get("strides")
    if strides is None:
        strides, acc = [], itemsize
        for n in reversed(shape):
            strides.insert(0, acc)
            acc *= max(n, 1)
    if any(int(s) % itemsize for s in strides):
        raise ValueError(f"{name} has strides {tuple(strides)} that are not whole elements")
    ptr = int(cai["data"][0])
    return ArrayView("cai", x, shape, tuple(int(s) // itemsize for s in strides), dtype,
                     _cai_device(ptr, name), ptr, itemsize)


def _cai_device(ptr: int, name: str):
    """The device owning ``ptr``. With no driver to ask (a GPU-less machine) validation
    still runs and device 0 is assumed; the launch would fail at detect() anyway."""
    cupy = sys.modules.get("cupy")
    if cupy is None or ptr == 0:
        return 0
    try:
        attrs = cupy.cuda.runtime.pointerGetAttributes(ptr)
    except Exception:
        return 0
    if attrs.device < 0 or attrs.type not in (2, 3):   # cudaMemoryTypeDevice / Managed
        raise ValueError(f"{name} must be on a CUDA device, got a pointer to host memory "
                         f"(__cuda_array_interface__ data {ptr:#x})")
    return int(attrs.device)


def empty(like: ArrayView, shape, dtype: str):
    """An uninitialised contiguous array of ``like``'s library (CuPy for CAI producers)."""
    if like.kind == "torch":
        import torch
        out = torch.empty(shape, dtype=getattr(torch, dtype), device=f"cuda:{like.device}")
        if poison_outputs:
            out.fill_(float("nan"))
        return out
    import cupy
    with cupy.cuda.Device(like.device):
        out = cupy.empty(shape, dtype=_cupy_dtype(dtype))
        if poison_outputs:
            out.fill(float("nan"))
        return out


def zeros(like: ArrayView, shape, dtype: str):
    """``empty`` filled with zeros (never poisoned: the zeros are part of the result)."""
    x = empty(like, shape, dtype)
    if like.kind == "torch":
        x.zero_()
    else:
        x.fill(0)
    return x


def _cupy_dtype(dtype: str):
    import numpy as np
    if dtype == "bfloat16":
        import cupy
        bf16 = getattr(cupy, "bfloat16", None)
        if bf16 is None:
            raise TypeError("this CuPy has no bfloat16 dtype; pass torch tensors for bfloat16")
        return bf16
    return np.dtype(dtype)


def stream_ptr(like: ArrayView) -> int:
    """The caller's current stream as a raw handle (torch's for torch inputs, else CuPy's)."""
    if like.kind == "torch":
        import torch
        # The raw handle without building a torch.cuda.Stream object (several microseconds
        # per call); the public route where this private one is missing.
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw is not None:
            return raw(like.device)
        return torch.cuda.current_stream(like.device).cuda_stream
    import cupy
    with cupy.cuda.Device(like.device):
        return cupy.cuda.get_current_stream().ptr


def stream_for(like: ArrayView):
    """The caller's current stream, as a CuPy stream object."""
    import cupy
    if like.kind == "torch":
        import torch
        ts = torch.cuda.current_stream(like.device)
        if hasattr(cupy.cuda.Stream, "from_external") and hasattr(ts, "__cuda_stream__"):
            return cupy.cuda.Stream.from_external(ts)
        return cupy.cuda.ExternalStream(ts.cuda_stream, like.device)
    with cupy.cuda.Device(like.device):
        return cupy.cuda.get_current_stream()
