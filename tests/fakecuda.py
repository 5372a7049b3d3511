"""Fake device arrays for the validation tests (no GPU): objects exposing
__cuda_array_interface__ as any producer (Numba, ...) describes one, with a pointer nobody
dereferences. Index values a test needs "on the GPU" are registered in VALUES by pointer."""
from __future__ import annotations

import itertools

import numpy as np

TYPESTR = {"float16": "<f2", "float32": "<f4", "float64": "<f8", "bool": "|b1",
           "int16": "<i2", "int32": "<i4", "int64": "<i8"}
ITEMSIZE = {"float16": 2, "float32": 4, "float64": 8, "bool": 1, "int16": 2, "int32": 4,
            "int64": 8}
VALUES: dict = {}
_pointers = itertools.count(1 << 20, 1 << 12)     # distinct, 16-byte aligned


class FakeCudaArray:
    def __init__(self, shape, dtype="float16", strides=None, values=None):
        self.ptr = next(_pointers)
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": TYPESTR[dtype], "data": (self.ptr, False),
            "strides": None if strides is None else tuple(strides), "version": 3}
        if values is not None:
            VALUES[self.ptr] = np.asarray(values, dtype=np.int64).reshape(shape)


def arr(*shape, dtype="float16", strides=None, values=None):
    return FakeCudaArray(shape, dtype, strides, values)


class ReachedDetect(Exception):
    """Raised by the stand-in for detect(): validation accepted every argument."""


def fake_gpu(monkeypatch, detect_owner, host_ints_owner=None):
    """No GPU, but a call that passes validation reaches detect() (imported into
    ``detect_owner``) and raises ReachedDetect there. Index values read by
    ``host_ints_owner._host_ints`` come from VALUES. Fake pointers live on device 0, and a
    stray PORTATTN_ARCH / PORTATTN_PATH cannot change what detect() sees."""
    monkeypatch.delenv("PORTATTN_ARCH", raising=False)
    monkeypatch.delenv("PORTATTN_PATH", raising=False)
    from portattn import _arrays
    monkeypatch.setattr(_arrays, "_cai_device", lambda ptr, name: 0)
    if host_ints_owner is not None:
        monkeypatch.setattr(host_ints_owner, "_host_ints", lambda a: VALUES[a.ptr])

    def sentinel(device_id):
        raise ReachedDetect(device_id)
    monkeypatch.setattr(detect_owner, "detect", sentinel)
