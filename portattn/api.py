"""Public entry points: flash_attn_func (flash_attn's names, defaults and layout) and explain."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .arch import Plan, Problem, detect, forced_path, select_plan
from .arch.device import DeviceInfo
from .spec import DTYPES, MAX_HEAD_DIM

LOG2E = 1.4426950408889634
CAUSAL_ALIGNS = ("bottom_right", "top_left")
_BIAS_KINDS = {"float32": 1, "float16": 2, "bfloat16": 3, "bool": 4}


@dataclass(frozen=True)
class Explanation:
    """What flash_attn_func would run for these arguments, and why."""
    device: DeviceInfo
    problem: Problem
    plan: Plan
    backward: object = None      # the BwdPlan loss.backward() would run, when grad is needed

    def __str__(self) -> str:
        p = self.problem
        feats = [n for n, on in (("causal", p.causal), ("window", p.window != (-1, -1)),
                                 ("alibi", p.alibi), ("softcap", p.softcap), ("bias", p.bias)) if on]
        head = (f"portattn on {self.device.describe()}\n"
                f"problem: {p.dtype}, batch {p.batch}, seqlen_q {p.seqlen_q}, seqlen_k "
                f"{p.seqlen_k}, heads {p.nheads_q}/{p.nheads_kv}, head dim {p.head_dim}"
                f"{', ' + ', '.join(feats) if feats else ''}")
        tail = "\n" + self.backward.describe() if self.backward is not None else ""
        return head + "\n" + self.plan.describe() + tail


@dataclass
class _Prepared:
    device: DeviceInfo
    problem: Problem
    plan: Plan
    q: _arrays.ArrayView
    k: _arrays.ArrayView
    v: _arrays.ArrayView
    bias: _arrays.ArrayView | None
    bias_strides: tuple
    alibi: _arrays.ArrayView | None
    scale: float
    softcap: float
    window: tuple
    diag_off: int


def _check_4d(x: _arrays.ArrayView, name: str) -> None:
    if len(x.shape) != 4:
        raise ValueError(f"{name} must have 4 dims (batch, seqlen, nheads, headdim), "
                         f"got shape {x.shape}")
    if x.shape[-1] > 1 and x.strides[-1] != 1:
        raise ValueError(f"{name}.stride(-1) must be 1 (contiguous head dim), got {x.strides[-1]}")


def _same_place(x: _arrays.ArrayView, ref: _arrays.ArrayView, name: str) -> None:
    if x.kind != ref.kind:
        raise TypeError(f"{name} must be a {ref.kind} array like q, got {x.kind}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as q (cuda:{ref.device}), "
                         f"got {x.device if x.device == 'cpu' else f'cuda:{x.device}'}")


def _broadcast_strides(b: _arrays.ArrayView, target: tuple) -> tuple:
    """Element strides of ``bias`` broadcast to ``target`` (stride 0 on broadcast dims)."""
    if len(b.shape) > 4:
        raise ValueError(f"bias must have at most 4 dims, got shape {b.shape}")
    shape = (1,) * (4 - len(b.shape)) + tuple(b.shape)
    strides = (0,) * (4 - len(b.strides)) + tuple(b.strides)
    for axis, (have, want) in enumerate(zip(shape, target)):
        if have not in (1, want):
            raise ValueError(f"bias shape {b.shape} does not broadcast to (batch, nheads, "
                             f"seqlen_q, seqlen_k) = {target}: dim {axis} is {have}, "
                             f"expected 1 or {want}")
    return tuple(0 if have == 1 else s for have, s in zip(shape, strides))


def _score_options(d, softmax_scale, softcap, window_size, causal, causal_align):
    """Validated (scale, softcap, (left, right)); causal sets right = 0. Shared by every
    entry point so flash_attn_func and flash_attn_with_kvcache refuse the same values."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    if (not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool)
            or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    if (not isinstance(softcap, numbers.Real) or isinstance(softcap, bool)
            or not (math.isfinite(softcap) and softcap >= 0)):
        raise ValueError(f"softcap must be a finite float >= 0, got {softcap!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1
                       for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1: unbounded), "
                         f"got {window_size!r}")
    if causal_align not in CAUSAL_ALIGNS:
        raise ValueError(f"causal_align must be one of {CAUSAL_ALIGNS}, got {causal_align!r}")
    left, right = int(window_size[0]), int(window_size[1])
    return float(softmax_scale), float(softcap), (left, 0 if causal else right)


def _alibi_view(alibi_slopes, qv: _arrays.ArrayView, batch: int, hq: int):
    if alibi_slopes is None:
        return None
    alibi = _arrays.view(alibi_slopes, "alibi_slopes")
    _same_place(alibi, qv, "alibi_slopes")
    if alibi.dtype != "float32":
        raise TypeError(f"alibi_slopes.dtype must be float32, got {alibi.dtype}")
    if alibi.shape not in ((hq,), (batch, hq)):
        raise ValueError(f"alibi_slopes.shape must be ({hq},) or ({batch}, {hq}), "
                         f"got {alibi.shape}")
    return alibi


def _prepare(q, k, v, *, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
             deterministic, return_attn_probs, bias, causal_align) -> _Prepared:
    qv, kv, vv = _arrays.view(q, "q"), _arrays.view(k, "k"), _arrays.view(v, "v")
    for name, x in (("q", qv), ("k", kv), ("v", vv)):
        if not x.on_gpu:
            raise ValueError(f"{name} must be on a CUDA device, got cpu")
    _same_place(kv, qv, "k")
    _same_place(vv, qv, "v")
    for name, x in (("q", qv), ("k", kv), ("v", vv)):
        _check_4d(x, name)
    if qv.dtype not in DTYPES:
        raise TypeError(f"q.dtype must be one of {DTYPES}, got {qv.dtype}")
    for name, x in (("k", kv), ("v", vv)):
        if x.dtype != qv.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({qv.dtype}), got {x.dtype}")
    batch, sq, hq, d = qv.shape
    _, sk, hkv, _ = kv.shape
    for name, x in (("k", kv), ("v", vv)):
        if x.shape[0] != batch:
            raise ValueError(f"{name}.shape[0] (batch) must equal q.shape[0] = {batch}, "
                             f"got {x.shape[0]}")
    if vv.shape[1] != sk:
        raise ValueError(f"v.shape[1] (seqlen_k) must equal k.shape[1] = {sk}, got {vv.shape[1]}")
    if vv.shape[2] != hkv:
        raise ValueError(f"v.shape[2] (nheads_kv) must equal k.shape[2] = {hkv}, got {vv.shape[2]}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q.shape[2] (nheads_q = {hq}) must be a multiple of k.shape[2] "
                         f"(nheads_kv), got {hkv}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q.shape[-1] (head dim) must be in 1..{MAX_HEAD_DIM}, got {d}")
    for name, x in (("k", kv), ("v", vv)):
        if x.shape[3] != d:
            raise ValueError(f"{name}.shape[-1] (head dim) must equal q.shape[-1] = {d}, "
                             f"got {x.shape[3]}")

    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if dropout_p > 0.0:
        raise NotImplementedError("dropout_p > 0 is not implemented yet in portattn; "
                                  "pass dropout_p=0.0")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs=True is not implemented yet in portattn "
                                  "(a debugging aid that arrives with dropout)")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    softmax_scale, softcap, (left, right) = _score_options(
        d, softmax_scale, softcap, window_size, causal, causal_align)
    diag_off = sk - sq if causal_align == "bottom_right" else 0
    alibi = _alibi_view(alibi_slopes, qv, batch, hq)

    bias_view, bias_strides = None, (0, 0, 0, 0)
    if bias is not None:
        bias_view = _arrays.view(bias, "bias")
        _same_place(bias_view, qv, "bias")
        if bias_view.dtype not in _BIAS_KINDS:
            raise TypeError(f"bias.dtype must be one of {tuple(_BIAS_KINDS)}, "
                            f"got {bias_view.dtype}")
        bias_strides = _broadcast_strides(bias_view, (batch, hq, sq, sk))

    problem = Problem(dtype=qv.dtype, head_dim=d, seqlen_q=sq, seqlen_k=sk, batch=batch,
                      nheads_q=hq, nheads_kv=hkv, causal=bool(causal), window=(left, right),
                      alibi=alibi is not None, softcap=softcap > 0, bias=bias is not None)
    device = detect(qv.device)
    plan = select_plan(device, problem, only=forced_path())
    return _Prepared(device, problem, plan, qv, kv, vv, bias_view, bias_strides, alibi,
                     softmax_scale, softcap, (left, right), diag_off)


def _vector_ok(x: _arrays.ArrayView) -> bool:
    """16-byte loads are safe when the base and every used row stride are 16-byte aligned."""
    strides = [s for s, n in zip(x.strides[:3], x.shape[:3]) if n > 1]
    return x.ptr % 16 == 0 and all((s * x.itemsize) % 16 == 0 for s in strides)


def _launch(p: _Prepared, with_lse: bool):
    from .compile import get_function
    import cupy
    batch, sq, hq, d = p.q.shape
    sk, hkv = p.k.shape[1], p.k.shape[2]
    out = _arrays.empty(p.q, (batch, sq, hq, d), p.q.dtype)
    ov = _arrays.view(out, "out")
    lse = _arrays.empty(p.q, (batch, hq, sq), "float32") if with_lse else None
    spec = p.plan.spec
    num_mb = -(-sq // spec.block_m)
    grid = num_mb * batch * hq
    if grid == 0:
        return out, lse
    i64, i32 = np.int64, np.int32
    bias_ptr = p.bias.ptr if p.bias is not None else 0
    alibi_ptr, alibi_sb, alibi_sh = 0, 0, 0
    if p.alibi is not None:
        alibi_ptr = p.alibi.ptr
        alibi_sb, alibi_sh = (0, p.alibi.strides[0]) if len(p.alibi.shape) == 1 else p.alibi.strides
    vec = (_vector_ok(p.q) << 0) | (_vector_ok(p.k) << 1) | (_vector_ok(p.v) << 2)
    args = (
        np.uint64(p.q.ptr), np.uint64(p.k.ptr), np.uint64(p.v.ptr), np.uint64(ov.ptr),
        np.uint64(_arrays.view(lse, "lse").ptr if lse is not None else 0),
        np.uint64(bias_ptr), np.uint64(alibi_ptr),
        *(i64(s) for s in (p.q.strides[0], p.q.strides[1], p.q.strides[2])),
        *(i64(s) for s in (p.k.strides[0], p.k.strides[1], p.k.strides[2])),
        *(i64(s) for s in (p.v.strides[0], p.v.strides[1], p.v.strides[2])),
        *(i64(s) for s in (ov.strides[0], ov.strides[1], ov.strides[2])),
        *(i64(s) for s in p.bias_strides),
        i64(alibi_sb), i64(alibi_sh),
        i32(hq), i32(hq // hkv), i32(sq), i32(sk), i32(d),
        i32(p.window[0]), i32(p.window[1]), i32(p.diag_off),
        np.float32(p.scale * LOG2E), np.float32(p.softcap * LOG2E),
        i32(_BIAS_KINDS[p.bias.dtype] if p.bias is not None else 0), i32(vec),
    )
    fn = get_function(spec, p.q.device)
    with cupy.cuda.Device(p.q.device), _arrays.stream_for(p.q):
        fn((grid,), (spec.threads,), args, shared_mem=p.plan.smem_bytes)
    return out, lse


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False, *, bias=None, return_lse=False,
                    causal_align="bottom_right"):
    """Exact attention softmax(q k^T * scale [+ mods]) v, flash_attn's API and layout.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_kv, headdim) with
    nheads % nheads_kv == 0 (GQA/MQA without copying K/V). torch CUDA tensors or CuPy
    arrays (fp16, bf16, fp32), zero-copy, on the caller's current stream; the result has
    q's type. Semantics are reference.py's: causal is aligned bottom-right when
    seqlen_q != seqlen_k (flash_attn >= 2.1) unless ``causal_align="top_left"`` (SDPA's
    is_causal); fully masked rows give 0.

    portattn keyword-only additions: ``bias`` (float additive bias or bool mask, True =
    attend, broadcastable to (batch, nheads, seqlen_q, seqlen_k)); ``return_lse`` returns
    (out, lse) with lse (batch, nheads, seqlen_q) float32, natural log, -inf for fully
    masked rows; ``causal_align``.

    torch tensors that require grad go through a torch.autograd.Function: loss.backward()
    fills q.grad, k.grad and v.grad (SIMT backward kernels; ``deterministic=True`` makes
    the gradients bit-identical across runs). For CuPy arrays see
    ``portattn.flash_attn_backward``.
    """
    p = _prepare(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                 window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                 deterministic=deterministic, return_attn_probs=return_attn_probs, bias=bias,
                 causal_align=causal_align)
    from .backward import autograd_forward, needs_autograd
    if needs_autograd(p):
        # The forward always writes lse here: the backward recomputes P from it.
        out, lse = autograd_forward(p, deterministic)
        return (out, lse) if return_lse else out
    out, lse = _launch(p, with_lse=return_lse)
    return (out, lse) if return_lse else out


def explain(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
            softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
            bias=None, return_lse=False, causal_align="bottom_right") -> Explanation:
    """The plan flash_attn_func would run for these arguments (same validation, no launch)."""
    p = _prepare(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                 window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                 deterministic=deterministic, return_attn_probs=return_attn_probs, bias=bias,
                 causal_align=causal_align)
    from .arch.plan_bwd import select_bwd_plan
    from .backward import needs_autograd
    bwd = (select_bwd_plan(p.device, p.problem, only=forced_path()) if needs_autograd(p)
           else None)
    return Explanation(p.device, p.problem, p.plan, bwd)
