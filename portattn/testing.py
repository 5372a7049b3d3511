"""Checking kernels against reference.py: shared by the GPU tests and `report --selftest`.

Tolerance as flash_attn's tests do it: max|out - ref64| <= 2 * max|ref_lowp - ref64| + atol,
where ref_lowp is the reference computed in the input precision (reference.py's
``precision``) and atol is one unit in the last place of the input dtype at the output's
magnitude (it only matters where ref_lowp happens to be exact, e.g. seqlen_k == 1).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .reference import attention_grad_ref, attention_ref, round_to

EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -20}


@dataclass(frozen=True)
class Check:
    ok: bool
    err: float          # max |out - ref64|
    bound: float        # 2 * max |ref_lowp - ref64| + atol
    unwritten: int      # elements left NaN (the poison), or not matching a -inf reference
    what: str = "out"

    def __str__(self) -> str:
        state = "ok" if self.ok else "FAIL"
        extra = f", {self.unwritten} unwritten or wrongly infinite" if self.unwritten else ""
        return f"{self.what}: {state} err {self.err:.3g} <= bound {self.bound:.3g}{extra}"


def compare(out, ref64, ref_lowp, dtype: str, what: str = "out") -> Check:
    out = np.asarray(out, dtype=np.float64)
    ref64 = np.asarray(ref64, dtype=np.float64)
    finite_ref = np.isfinite(ref64)
    # lse may legitimately be -inf (fully masked rows): there out must equal ref exactly;
    # elsewhere out must be finite. Each offending element counts once.
    offending = np.where(finite_ref, ~np.isfinite(out), out != ref64)
    bad = int(np.sum(offending))
    if out.size == 0:
        return Check(True, 0.0, 0.0, 0, what)
    f = finite_ref & np.isfinite(out)
    err = float(np.max(np.abs(out[f] - ref64[f]), initial=0.0))
    base = float(np.max(np.abs(np.asarray(ref_lowp, np.float64)[f] - ref64[f]), initial=0.0))
    scale = max(1.0, float(np.max(np.abs(ref64[f]), initial=0.0)))
    bound = 2.0 * base + EPS[dtype] * scale
    return Check(err <= bound and bad == 0, err, bound, bad, what)


def to_numpy(x) -> np.ndarray:
    v = _arrays.view(x, "x")
    if v.kind == "torch":
        return x.detach().float().cpu().numpy().astype(np.float64)
    import cupy
    return cupy.asnumpy(x).astype(np.float64)


def to_device(a: np.ndarray, kind: str, dtype: str, device: int = 0):
    """``a`` (already representable in ``dtype``) as a ``kind`` array on the GPU."""
    if kind == "torch":
        import torch
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return t.to(device=f"cuda:{device}", dtype=getattr(torch, dtype))
    import cupy
    with cupy.cuda.Device(device):
        return cupy.asarray(np.asarray(a, dtype=np.float32).astype(dtype))


def random_inputs(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    """Normal(0, scale) values that are exactly representable in ``dtype`` (as float32)."""
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return round_to(x, dtype).astype(np.float32)


@contextlib.contextmanager
def poisoned_outputs():
    """Fill every output portattn allocates with NaN before launch."""
    old = _arrays.poison_outputs
    _arrays.poison_outputs = True
    try:
        yield
    finally:
        _arrays.poison_outputs = old


@contextlib.contextmanager
def _env(name: str, value):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def forced_arch(cc):
    """Plan as if on sm_``cc`` (None: the real GPU) for the duration."""
    return _env("PORTATTN_ARCH", None if cc is None else f"sm_{cc}")


def forced_path(path):
    """Allow only ``path`` (None: any) for the duration (PORTATTN_PATH)."""
    return _env("PORTATTN_PATH", path)


def check_forward(fn_kwargs: dict, arrays: dict, dtype: str, kind: str, flash_attn_func):
    """Run flash_attn_func on device copies of ``arrays`` (numpy q, k, v, optional bias /
    alibi_slopes) and compare out and lse with the float64 and same-precision references."""
    dev = {n: to_device(a, kind, dtype) for n, a in arrays.items() if n in ("q", "k", "v")}
    extra = {}
    if arrays.get("alibi_slopes") is not None:
        extra["alibi_slopes"] = to_device(arrays["alibi_slopes"], kind, "float32")
    bias = arrays.get("bias")
    if bias is not None:
        bdtype = "bool" if bias.dtype == np.bool_ else "float32"
        extra["bias"] = (to_device(bias, kind, "float32") if bdtype == "float32"
                         else _bool_to_device(bias, kind))
    with poisoned_outputs():
        out, lse = flash_attn_func(dev["q"], dev["k"], dev["v"], return_lse=True,
                                   **fn_kwargs, **extra)
    ref_kwargs = {k: v for k, v in fn_kwargs.items() if k not in ("deterministic",)}
    np_extra = {n: arrays[n] for n in ("alibi_slopes", "bias") if arrays.get(n) is not None}
    ref64, lse64 = attention_ref(arrays["q"], arrays["k"], arrays["v"], return_lse=True,
                                 **ref_kwargs, **np_extra)
    low, lse_low = attention_ref(arrays["q"], arrays["k"], arrays["v"], return_lse=True,
                                 precision=dtype, **ref_kwargs, **np_extra)
    c_out = compare(to_numpy(out), ref64, low, dtype, "out")
    # lse is fp32 whatever the input dtype; judge it against the input-precision reference.
    c_lse = compare(to_numpy(lse), lse64, lse_low, "float32" if dtype == "float32" else dtype,
                    "lse")
    return c_out, c_lse


# fp32 accumulation noise: a gradient that is exactly 0 in exact arithmetic (one visible
# key: dS = P (dP - delta) with dP == delta) comes out as the rounding difference of two
# fp32 dot products, relative to the size of the call's gradients.
GRAD_NOISE = 2.0 ** -20


def compare_grad(grad, ref64, ref_lowp, dtype: str, what: str, scale: float = 0.0) -> Check:
    """``compare`` for gradients: atol is one unit in the last place at the gradient's own
    magnitude (gradients are often far below 1, where compare's floor of 1 would hide
    errors), plus GRAD_NOISE times ``scale``, the largest reference gradient of the call."""
    grad = np.asarray(grad, dtype=np.float64)
    bad = int(np.sum(~np.isfinite(grad)))
    if grad.size == 0:
        return Check(bad == 0, 0.0, 0.0, bad, what)
    err = float(np.max(np.abs(np.where(np.isfinite(grad), grad, 0.0) - ref64)))
    base = float(np.max(np.abs(np.asarray(ref_lowp, np.float64) - ref64)))
    bound = 2.0 * base + EPS[dtype] * float(np.max(np.abs(ref64))) + GRAD_NOISE * scale
    return Check(err <= bound and bad == 0, err, bound, bad, what)


def check_backward(fn_kwargs: dict, arrays: dict, dtype: str, kind: str, *,
                   deterministic: bool = False, autograd: bool = False):
    """Gradients of device copies of ``arrays`` (numpy q, k, v, dout, optional bias /
    alibi_slopes) against attention_grad_ref in float64 and in ``dtype``: through
    loss.backward() (``autograd``, torch only) or portattn.flash_attn_backward.
    Returns (Check dq, Check dk, Check dv)."""
    import portattn
    dev = {n: to_device(arrays[n], kind, dtype) for n in ("q", "k", "v", "dout")}
    extra = {}
    if arrays.get("alibi_slopes") is not None:
        extra["alibi_slopes"] = to_device(arrays["alibi_slopes"], kind, "float32")
    bias = arrays.get("bias")
    if bias is not None:
        extra["bias"] = (_bool_to_device(bias, kind) if bias.dtype == np.bool_
                         else to_device(bias, kind, "float32"))
    with poisoned_outputs():
        if autograd:
            q, k, v = (dev[n].detach().requires_grad_(True) for n in ("q", "k", "v"))
            out = portattn.flash_attn_func(q, k, v, deterministic=deterministic, **fn_kwargs,
                                           **extra)
            out.backward(dev["dout"])
            grads = (q.grad, k.grad, v.grad)
        else:
            out, lse = portattn.flash_attn_func(dev["q"], dev["k"], dev["v"], return_lse=True,
                                                **fn_kwargs, **extra)
            grads = portattn.flash_attn_backward(dev["dout"], dev["q"], dev["k"], dev["v"],
                                                 out, lse, deterministic=deterministic,
                                                 **fn_kwargs, **extra)
    np_extra = {n: arrays[n] for n in ("alibi_slopes", "bias") if arrays.get(n) is not None}
    args = (arrays["q"], arrays["k"], arrays["v"], arrays["dout"])
    ref64 = attention_grad_ref(*args, **fn_kwargs, **np_extra)
    low = attention_grad_ref(*args, precision=dtype, **fn_kwargs, **np_extra)
    scale = max(float(np.max(np.abs(r), initial=0.0)) for r in ref64)
    return tuple(compare_grad(to_numpy(g), r, lo, dtype, name, scale)
                 for g, r, lo, name in zip(grads, ref64, low, ("dq", "dk", "dv")))


def check_varlen(fn_kwargs: dict, arrays: dict, cu_q: np.ndarray, cu_k: np.ndarray,
                 dtype: str, kind: str, *, grad: str = "function", deterministic=False,
                 extra_max: int = 0):
    """flash_attn_varlen_func on device copies of ``arrays`` (numpy packed q, k, v, dout,
    optional alibi_slopes) against attention_varlen_ref / attention_varlen_grad_ref in
    float64 and in ``dtype``. ``grad``: "" (forward only), "autograd" (torch) or
    "function" (flash_attn_varlen_backward). max_seqlen is the longest sequence plus
    ``extra_max``. Returns Checks of out and lse, then dq, dk, dv when ``grad``."""
    import portattn
    from .reference import attention_varlen_grad_ref, attention_varlen_ref, dropout_mask_ref
    dev = {n: to_device(arrays[n], kind, dtype) for n in ("q", "k", "v")}
    extra = {}
    if arrays.get("alibi_slopes") is not None:
        extra["alibi_slopes"] = to_device(arrays["alibi_slopes"], kind, "float32")
    cu = [_int32_to_device(c, kind) for c in (cu_q, cu_k)]
    call = (dev["q"], dev["k"], dev["v"], *cu, int(np.diff(cu_q).max()) + extra_max,
            int(np.diff(cu_k).max()) + extra_max)
    grads = None
    with poisoned_outputs():
        if grad == "autograd":
            q, k, v = (x.detach().requires_grad_(True) for x in call[:3])
            out, lse = portattn.flash_attn_varlen_func(
                q, k, v, *call[3:], return_lse=True, deterministic=deterministic,
                **fn_kwargs, **extra)
            out.backward(to_device(arrays["dout"], kind, dtype))
            grads = (q.grad, k.grad, v.grad)
        else:
            out, lse = portattn.flash_attn_varlen_func(*call, return_lse=True, **fn_kwargs,
                                                       **extra)
            if grad == "function":
                grads = portattn.flash_attn_varlen_backward(
                    to_device(arrays["dout"], kind, dtype), *call[:3], out, lse, *call[3:],
                    deterministic=deterministic, **fn_kwargs, **extra)
    ref_kwargs = {n: x for n, x in fn_kwargs.items() if n not in ("dropout_seed", "dropout_offset")}
    if arrays.get("alibi_slopes") is not None:
        ref_kwargs["alibi_slopes"] = arrays["alibi_slopes"]
    if fn_kwargs.get("dropout_p", 0.0) > 0.0:
        # The mask of sequence b is the top-left corner of batch row b's.
        ref_kwargs["dropout_mask"] = dropout_mask_ref(
            fn_kwargs["dropout_seed"], fn_kwargs.get("dropout_offset", 0), len(cu_q) - 1,
            arrays["q"].shape[1], int(np.diff(cu_q).max()), int(np.diff(cu_k).max()),
            fn_kwargs["dropout_p"])
    qkv = (arrays["q"], arrays["k"], arrays["v"])
    ref64, lse64 = attention_varlen_ref(*qkv, cu_q, cu_k, return_lse=True, **ref_kwargs)
    low, lse_low = attention_varlen_ref(*qkv, cu_q, cu_k, return_lse=True, precision=dtype,
                                        **ref_kwargs)
    checks = [compare(to_numpy(out), ref64, low, dtype, "out"),
              compare(to_numpy(lse), lse64, lse_low, "float32" if dtype == "float32" else dtype,
                      "lse")]
    if grads is not None:
        args = (*qkv, arrays["dout"], cu_q, cu_k)
        g64 = attention_varlen_grad_ref(*args, **ref_kwargs)
        glow = attention_varlen_grad_ref(*args, precision=dtype, **ref_kwargs)
        scale = max(float(np.max(np.abs(r), initial=0.0)) for r in g64)
        checks += [compare_grad(to_numpy(g), r, lo, dtype, name, scale)
                   for g, r, lo, name in zip(grads, g64, glow, ("dq", "dk", "dv"))]
    return tuple(checks)


def _int32_to_device(a: np.ndarray, kind: str):
    a = np.ascontiguousarray(a, dtype=np.int32)
    if kind == "torch":
        import torch
        return torch.from_numpy(a).to("cuda")
    import cupy
    return cupy.asarray(a)


def _bool_to_device(mask: np.ndarray, kind: str):
    if kind == "torch":
        import torch
        return torch.from_numpy(np.ascontiguousarray(mask)).to("cuda")
    import cupy
    return cupy.asarray(mask)


def plannable_archs() -> tuple:
    """None (native) and every table arch this GPU can stand in for (PORTATTN_ARCH); just
    (None,) without a GPU, so GPU tests still collect (and skip) on a CPU machine."""
    from .arch import KNOWN_CCS
    try:
        import cupy
        real = int(cupy.cuda.Device().compute_capability)
    except Exception:
        return (None,)
    return (None,) + tuple(c for c in KNOWN_CCS if c <= real)


BIAS_SHAPES = ("full", "sq_sk", "per_batch_keys", "per_head_rows")


def random_bias(rng: np.random.Generator, spec: str, b: int, h: int, sq: int, sk: int):
    """A bias for the GPU tests from "<shape>:<float|bool>", shape one of BIAS_SHAPES
    (broadcastable to (b, h, sq, sk)); bool masks keep about 80% of the keys."""
    shape_name, kind = spec.split(":")
    shape = {"full": (b, h, sq, sk), "sq_sk": (sq, sk), "per_batch_keys": (b, 1, 1, sk),
             "per_head_rows": (1, h, sq, 1)}[shape_name]
    if kind == "bool":
        return rng.random(shape) < 0.8
    return rng.standard_normal(shape).astype(np.float32)
