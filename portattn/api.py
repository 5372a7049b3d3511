"""Public entry points: flash_attn_func (flash_attn's names, defaults and layout) and explain."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .arch import Plan, Problem, detect, forced_path
from .arch.cache import bwd_plan, fwd_plan
from .arch.device import DeviceInfo
from .dropout import check_attn_probs, check_dropout_args
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
    dropout_p: float = 0.0       # a run-time argument of every kernel, not part of the plan

    def __str__(self) -> str:
        p = self.problem
        feats = [n for n, on in (("causal", p.causal), ("window", p.window != (-1, -1)),
                                 ("alibi", p.alibi), ("softcap", p.softcap), ("bias", p.bias)) if on]
        if self.dropout_p > 0:
            feats.append(f"dropout p={self.dropout_p:g} (Philox, same mask in the backward)")
        shape = (f"varlen batch of {p.batch} sequences, max_seqlen_q {p.seqlen_q}, "
                 f"max_seqlen_k {p.seqlen_k}" if p.varlen else
                 f"batch {p.batch}, seqlen_q {p.seqlen_q}, seqlen_k {p.seqlen_k}")
        head = (f"portattn on {self.device.describe()}\n"
                f"problem: {p.dtype}, {shape}, heads {p.nheads_q}/{p.nheads_kv}, "
                f"head dim {p.head_dim}"
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
    align_br: bool               # causal/window diagonal aligned bottom-right
    varlen: object = None        # varlen.Varlen for a packed batch (q/k/v then (1, tokens, ...))
    dropout_p: float = 0.0
    dropout_seed: int | None = None    # None until flash_attn_func draws one (torch only)
    dropout_offset: int = 0


def _check_4d(x: _arrays.ArrayView, name: str) -> None:
    if len(x.shape) != 4:
        raise ValueError(f"{name} must have 4 dims (batch, seqlen, nheads, headdim), "
                         f"got shape {x.shape}")
    # An empty array's strides are arbitrary (torch gives (1, 1, ...) to some): nothing is read.
    if x.shape[-1] > 1 and x.strides[-1] != 1 and all(x.shape):
        raise ValueError(f"{name}.stride(-1) must be 1 (contiguous head dim), got {x.strides[-1]}")


def _same_place(x: _arrays.ArrayView, ref: _arrays.ArrayView, name: str) -> None:
    if x.kind != ref.kind:
        raise TypeError(f"{name} must be a {ref.kind} array like q, got {x.kind}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as q (cuda:{ref.device}), "
                         f"got {x.device if x.device == 'cpu' else f'cuda:{x.device}'}")


def _int32_array(x, name: str, qv: _arrays.ArrayView, ndim: int, dims: str):
    """An int32 index array on q's device (kvcache's and varlen's index arguments)."""
    a = _arrays.view(x, name)
    _same_place(a, qv, name)
    if a.dtype != "int32":
        raise TypeError(f"{name}.dtype must be int32, got {a.dtype}")
    if len(a.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dim(s) ({dims}), got shape {a.shape}")
    if a.shape[-1] > 1 and a.strides[-1] != 1:
        raise ValueError(f"{name}.stride(-1) must be 1 (contiguous), got {a.strides[-1]}")
    return a


def _capturing(a: _arrays.ArrayView) -> bool:
    """Whether the caller's stream is capturing a CUDA graph (no host copy may run)."""
    if a.kind == "torch":
        import torch
        return torch.cuda.is_current_stream_capturing()
    stream = _arrays.stream_for(a)
    return bool(getattr(stream, "is_capturing", lambda: False)())


def _host_ints(a: _arrays.ArrayView) -> np.ndarray:
    """The values of a small device integer array (one copy to the host, which syncs)."""
    if _capturing(a):
        raise ValueError("check_indices=True copies index arrays to the host, which CUDA-graph "
                         "capture forbids: pass check_indices=False while capturing")
    if a.kind == "torch":
        return a.obj.detach().cpu().numpy().astype(np.int64)
    import cupy
    return cupy.asnumpy(cupy.asarray(a.obj)).astype(np.int64)


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
             deterministic, return_attn_probs, bias, causal_align, dropout_seed=None,
             dropout_offset=0, varlen=None) -> _Prepared:
    """Validated arguments, the problem and its plan. ``varlen`` (varlen.Varlen): q, k, v are
    a packed batch seen as one sequence of all tokens; the problem, ALiBi slopes and
    return_attn_probs's size then count its sequences and longest lengths."""
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

    nseq, max_q, max_k = ((varlen.nseq, varlen.max_q, varlen.max_k) if varlen is not None
                          else (batch, sq, sk))
    dropout_p = check_dropout_args(dropout_p, dropout_seed, dropout_offset, qv.kind)
    check_attn_probs(return_attn_probs, nseq, hq, max_q, max_k)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    softmax_scale, softcap, (left, right) = _score_options(
        d, softmax_scale, softcap, window_size, causal, causal_align)
    alibi = _alibi_view(alibi_slopes, qv, nseq, hq)

    bias_view, bias_strides = None, (0, 0, 0, 0)
    if bias is not None:
        bias_view = _arrays.view(bias, "bias")
        _same_place(bias_view, qv, "bias")
        if bias_view.dtype not in _BIAS_KINDS:
            raise TypeError(f"bias.dtype must be one of {tuple(_BIAS_KINDS)}, "
                            f"got {bias_view.dtype}")
        bias_strides = _broadcast_strides(bias_view, (batch, hq, sq, sk))

    problem = Problem(dtype=qv.dtype, head_dim=d, seqlen_q=max_q, seqlen_k=max_k, batch=nseq,
                      nheads_q=hq, nheads_kv=hkv, causal=bool(causal), window=(left, right),
                      alibi=alibi is not None, softcap=softcap > 0, bias=bias is not None,
                      varlen=varlen is not None, neg_scale=softmax_scale < 0)
    device = detect(qv.device)
    plan = fwd_plan(device, problem, forced_path())
    return _Prepared(device, problem, plan, qv, kv, vv, bias_view, bias_strides, alibi,
                     softmax_scale, softcap, (left, right), causal_align == "bottom_right",
                     varlen=varlen, dropout_p=dropout_p, dropout_seed=dropout_seed,
                     dropout_offset=int(dropout_offset))


def _vector_ok(x: _arrays.ArrayView) -> bool:
    """16-byte loads are safe when the base and every used row stride are 16-byte aligned."""
    strides = [s for s, n in zip(x.strides[:3], x.shape[:3]) if n > 1]
    return x.ptr % 16 == 0 and all((s * x.itemsize) % 16 == 0 for s in strides)


def _dropout_args(p: _Prepared) -> tuple:
    """The kernels' last four arguments (common.cuh): seed, offset, threshold, 1 / (1 - p);
    threshold 0 and scale 1 when dropout is off."""
    from .reference import dropout_threshold
    threshold = dropout_threshold(p.dropout_p)
    if threshold == 0:
        return np.uint64(0), np.uint32(0), np.uint32(0), np.float32(1.0)
    if p.dropout_seed is None:
        raise ValueError("dropout_seed must be set before launching with dropout_p > 0")
    return (np.uint64(p.dropout_seed), np.uint32(p.dropout_offset), np.uint32(threshold),
            np.float32(1.0 / (1.0 - p.dropout_p)))


def _seq_geometry(p: _Prepared):
    """(sequences, seqlen_q, seqlen_k, cu_q ptr, cu_k ptr) the kernels' grid and SeqSpan
    take: the dense shapes, or a varlen batch's count and longest lengths."""
    vl = p.varlen
    if vl is None:
        return p.q.shape[0], p.q.shape[1], p.k.shape[1], 0, 0
    return vl.nseq, vl.max_q, vl.max_k, vl.cu_q.ptr, vl.cu_k.ptr


def _row_strides(x: _arrays.ArrayView, p: _Prepared) -> tuple:
    """(batch, token, head) element strides; a varlen batch's tokens share one axis."""
    return (0 if p.varlen is not None else x.strides[0], x.strides[1], x.strides[2])


def _launch_args(p: _Prepared, ov: _arrays.ArrayView, lse_ptr: int) -> tuple:
    """The forward kernels' arguments in PORTATTN_FWD_PARAMS order (common.cuh), with
    out written through ``ov`` and lse to ``lse_ptr`` (0: not written)."""
    _, tokens_q, hq, d = p.q.shape
    hkv = p.k.shape[2]
    _, sq, sk, cu_q, cu_k = _seq_geometry(p)
    i64, i32 = np.int64, np.int32
    bias_ptr = p.bias.ptr if p.bias is not None else 0
    alibi_ptr, alibi_sb, alibi_sh = 0, 0, 0
    if p.alibi is not None:
        alibi_ptr = p.alibi.ptr
        alibi_sb, alibi_sh = (0, p.alibi.strides[0]) if len(p.alibi.shape) == 1 else p.alibi.strides
    vec = (_vector_ok(p.q) << 0) | (_vector_ok(p.k) << 1) | (_vector_ok(p.v) << 2)
    return (
        np.uint64(p.q.ptr), np.uint64(p.k.ptr), np.uint64(p.v.ptr), np.uint64(ov.ptr),
        np.uint64(lse_ptr),
        np.uint64(bias_ptr), np.uint64(alibi_ptr), np.uint64(cu_q), np.uint64(cu_k),
        *(i64(s) for s in _row_strides(p.q, p)), *(i64(s) for s in _row_strides(p.k, p)),
        *(i64(s) for s in _row_strides(p.v, p)), *(i64(s) for s in _row_strides(ov, p)),
        i64(0 if p.varlen is not None else hq * tokens_q), i64(tokens_q),
        *(i64(s) for s in p.bias_strides),
        i64(alibi_sb), i64(alibi_sh),
        i32(hq), i32(hq // hkv), i32(sq), i32(sk), i32(d),
        i32(p.window[0]), i32(p.window[1]), i32(p.align_br),
        np.float32(p.scale * LOG2E), np.float32(p.softcap * LOG2E),
        i32(_BIAS_KINDS[p.bias.dtype] if p.bias is not None else 0), i32(vec),
        *_dropout_args(p),
    )


def _launch(p: _Prepared, with_lse: bool):
    from .compile import get_function, launch
    import cupy
    batch, tokens_q, hq, d = p.q.shape
    out = _arrays.empty(p.q, (batch, tokens_q, hq, d), p.q.dtype)
    ov = _arrays.view(out, "out")
    lse = _arrays.empty(p.q, (batch, hq, tokens_q), "float32") if with_lse else None
    spec = p.plan.spec
    nseq, sq, sk, cu_q, cu_k = _seq_geometry(p)
    grid = -(-sq // spec.block_m) * nseq * hq
    if p.varlen is not None:     # (total_q, h, d) and (h, total_q), flash_attn's varlen shapes
        out, lse = out[0], (lse[0] if lse is not None else None)
    if grid == 0:
        return out, lse
    args = _launch_args(p, ov, _arrays.view(lse, "lse").ptr if lse is not None else 0)
    fn = get_function(spec, p.q.device)
    with cupy.cuda.Device(p.q.device):
        launch(fn, grid, spec.threads, None, args, _arrays.stream_ptr(p.q),
               smem=p.plan.smem_bytes)
    return out, lse


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False, *, bias=None, return_lse=False,
                    causal_align="bottom_right", dropout_seed=None, dropout_offset=0):
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

    Dropout: ``dropout_p`` in [0, 1) drops each probability independently and scales the
    kept ones by 1 / (1 - dropout_p) (lse stays the undropped softmax's). The mask is
    reference.dropout_mask_ref(dropout_seed, dropout_offset, ...): Philox4x32-10, a pure
    function of (seed, offset, batch, head, query, key), identical on every path and in
    the backward. ``dropout_seed`` (int in [0, 2**64)) and ``dropout_offset`` (int in
    [0, 2**32)) are keyword-only; with torch tensors and ``dropout_seed=None`` each call
    draws a seed from torch's default CPU generator (one torch.randint, no device sync),
    so ``torch.manual_seed`` makes runs reproducible, and the autograd Function keeps it
    for the backward. CuPy arrays need an explicit ``dropout_seed`` (the caller must pass
    the same seed to flash_attn_backward). ``return_attn_probs=True`` returns
    ``(out, lse, S_dmask)`` as flash_attn does: S_dmask (batch, nheads, seqlen_q,
    seqlen_k) float32 holds the softmax probabilities with dropped entries negated; a
    debugging aid for batch * nheads * seqlen_q * seqlen_k <= 2**26.

    torch tensors that require grad go through a torch.autograd.Function: loss.backward()
    fills q.grad, k.grad and v.grad (SIMT backward kernels; ``deterministic=True`` makes
    the gradients bit-identical across runs). For CuPy arrays see
    ``portattn.flash_attn_backward``.
    """
    p = _prepare(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                 window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                 deterministic=deterministic, return_attn_probs=return_attn_probs, bias=bias,
                 causal_align=causal_align, dropout_seed=dropout_seed,
                 dropout_offset=dropout_offset)
    from .backward import autograd_forward, needs_autograd
    from .dropout import attn_probs, draw_seed
    draw_seed(p)
    if needs_autograd(p):
        # The forward always writes lse here: the backward recomputes P from it.
        out, lse = autograd_forward(p, deterministic)
    else:
        out, lse = _launch(p, with_lse=return_lse or return_attn_probs)
    if return_attn_probs:
        return out, lse, attn_probs(p, lse)
    return (out, lse) if return_lse else out


def explain(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
            softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
            bias=None, return_lse=False, causal_align="bottom_right", dropout_seed=None,
            dropout_offset=0) -> Explanation:
    """The plan flash_attn_func would run for these arguments (same validation, no launch)."""
    p = _prepare(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                 window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                 deterministic=deterministic, return_attn_probs=return_attn_probs, bias=bias,
                 causal_align=causal_align, dropout_seed=dropout_seed,
                 dropout_offset=dropout_offset)
    return _explanation(p)


def _explanation(p: _Prepared) -> Explanation:
    from .backward import needs_autograd
    bwd = (bwd_plan(p.device, p.problem, forced_path()) if needs_autograd(p)
           else None)
    return Explanation(p.device, p.problem, p.plan, bwd, p.dropout_p)
