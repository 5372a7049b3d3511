"""Backward pass: flash_attn_backward (torch tensors or CuPy arrays) and the torch autograd
Function that flash_attn_func uses when an input requires grad.

Stages (kernels_cuda/simt_bwd.cu), all on the caller's current stream:
  pre   delta = rowsum(dout * out), lse in the log2 domain (fp32, (batch, heads, seqlen_q));
        in atomic mode it also zeroes the dQ buffer;
  dkdv  dK, dV per key tile; dQ added to an fp32 buffer with atomics, or, with
        deterministic=True, not at all;
  dq    (deterministic only) dQ per query tile, no atomics: bit-identical across runs;
  cvt   (atomic mode only) dq = buffer * softmax_scale in the input type.
"""
from __future__ import annotations

import numpy as np

from . import _arrays
from .api import (LOG2E, _BIAS_KINDS, _check_4d, _launch, _prepare, _Prepared, _row_strides,
                  _dropout_args, _same_place, _seq_geometry, _vector_ok)
from .arch import forced_path
from .arch.cache import bwd_plan
from .arch.plan_bwd import BWD_STAGES, BwdPlan
from .dropout import require_forward_seed


def flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        deterministic=False, *, bias=None, causal_align="bottom_right",
                        dropout_p=0.0, dropout_seed=None, dropout_offset=0):
    """Gradients (dq, dk, dv) of attention, for torch CUDA tensors or CuPy arrays.

    ``out`` and ``lse`` are what ``flash_attn_func(q, k, v, ..., return_lse=True)``
    returned for the same arguments; ``dout`` is the gradient of the loss with respect to
    ``out`` (shape and dtype of ``out``). Options mean what they mean in flash_attn_func
    and must be the same as in the forward call. GQA/MQA: dk and dv are summed over the
    query heads of each group. ``bias`` and ``alibi_slopes`` get no gradient.
    ``deterministic=True`` computes dq without atomics, so repeated calls give
    bit-identical gradients. Returns new contiguous arrays of q's kind and dtype.
    With dropout, pass the forward's ``dropout_p``, ``dropout_seed`` and ``dropout_offset``
    (required: the backward redraws the forward's mask from them).
    """
    require_forward_seed(dropout_p, dropout_seed)
    p = _prepare(q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                 window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                 deterministic=deterministic, return_attn_probs=False, bias=bias,
                 causal_align=causal_align, dropout_seed=dropout_seed,
                 dropout_offset=dropout_offset)
    dv_, ov, lv = _check_grad_inputs(p, dout, out, lse)
    plan = bwd_plan(p.device, p.problem, forced_path())
    return _launch_bwd(p, plan, dv_, ov, lv, deterministic)


def _check_grad_inputs(p: _Prepared, dout, out, lse):
    views = []
    for name, x in (("dout", dout), ("out", out)):
        xv = _arrays.view(x, name)
        _same_place(xv, p.q, name)
        _check_4d(xv, name)
        if xv.dtype != p.q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({p.q.dtype}), got {xv.dtype}")
        if tuple(xv.shape) != tuple(p.q.shape):
            raise ValueError(f"{name}.shape must equal q.shape {tuple(p.q.shape)} "
                             f"(batch, seqlen_q, nheads, headdim), got {tuple(xv.shape)}")
        views.append(xv)
    lv = _arrays.view(lse, "lse")
    _same_place(lv, p.q, "lse")
    if lv.dtype != "float32":
        raise TypeError(f"lse.dtype must be float32 (flash_attn_func's return_lse), "
                        f"got {lv.dtype}")
    batch, sq, hq, _ = p.q.shape
    if tuple(lv.shape) != (batch, hq, sq):
        raise ValueError(f"lse.shape must be (batch, nheads, seqlen_q) = {(batch, hq, sq)}, "
                         f"got {tuple(lv.shape)}")
    return views[0], views[1], lv


def _launch_bwd(p: _Prepared, plan: BwdPlan, dout: _arrays.ArrayView, out: _arrays.ArrayView,
                lse: _arrays.ArrayView, deterministic: bool):
    from .compile import get_function, launch
    import cupy
    batch, sq, hq, d = p.q.shape
    sk, hkv = p.k.shape[1], p.k.shape[2]
    dq = _arrays.empty(p.q, (batch, sq, hq, d), p.q.dtype)
    dk = _arrays.empty(p.q, (batch, sk, hkv, d), p.q.dtype)
    dv = _arrays.empty(p.q, (batch, sk, hkv, d), p.q.dtype)
    dqv, dkv, dvv = (_arrays.view(x, n) for x, n in ((dq, "dq"), (dk, "dk"), (dv, "dv")))
    rows = batch * hq * sq
    lse2 = _arrays.empty(p.q, (max(rows, 1),), "float32")
    delta = _arrays.empty(p.q, (max(rows, 1),), "float32")
    # The atomic dQ's accumulator; the pre stage zeroes it row by row.
    acc = None if deterministic else _arrays.empty(p.q, (batch, sq, hq, d), "float32")

    i64, i32, u64 = np.int64, np.int32, np.uint64
    alibi_ptr, alibi_sb, alibi_sh = 0, 0, 0
    if p.alibi is not None:
        alibi_ptr = p.alibi.ptr
        alibi_sb, alibi_sh = (0, p.alibi.strides[0]) if len(p.alibi.shape) == 1 else p.alibi.strides
    vec = (_vector_ok(p.q) | _vector_ok(p.k) << 1 | _vector_ok(p.v) << 2
           | _vector_ok(out) << 3 | _vector_ok(dout) << 4)

    # pre and cvt run per token row: a varlen batch is one dense sequence of all its tokens
    # there. dkdv and dq tile sequences: a varlen batch gives each CTA its own (SeqSpan).
    packed = p.varlen is not None
    nseq, max_q, max_k, cu_q, cu_k = _seq_geometry(p)

    def args(stage, dq_accum):
        by_seq = packed and stage in ("dkdv", "dq")

        def strides(x):
            return tuple(i64(s) for s in (_row_strides(x, p) if by_seq else x.strides[:3]))

        geometry = (nseq, max_q, max_k) if by_seq else (batch, sq, sk)
        return (
            u64(p.q.ptr), u64(p.k.ptr), u64(p.v.ptr), u64(out.ptr), u64(dout.ptr), u64(lse.ptr),
            u64(_arrays.view(lse2, "lse2").ptr), u64(_arrays.view(delta, "delta").ptr),
            u64(_arrays.view(dq_accum, "dq_accum").ptr if dq_accum is not None else 0),
            u64(dqv.ptr), u64(dkv.ptr), u64(dvv.ptr),
            u64(p.bias.ptr if p.bias is not None else 0), u64(alibi_ptr),
            u64(cu_q if by_seq else 0), u64(cu_k if by_seq else 0),
            *strides(p.q), *strides(p.k), *strides(p.v), *strides(out), *strides(dout),
            *(i64(s) for s in lse.strides), i64(0 if by_seq else hq * sq), i64(sq),
            *strides(dqv), *strides(dkv), *strides(dvv),
            *(i64(s) for s in p.bias_strides), i64(alibi_sb), i64(alibi_sh),
            i32(geometry[0]), i32(hq), i32(hq // hkv), *(i32(n) for n in geometry[1:]), i32(d),
            i32(p.window[0]), i32(p.window[1]), i32(p.align_br),
            np.float32(p.scale * LOG2E), np.float32(p.softcap * LOG2E), np.float32(p.scale),
            i32(_BIAS_KINDS[p.bias.dtype] if p.bias is not None else 0), i32(vec),
            i32(BWD_STAGES.index(stage)), *_dropout_args(p),
        )

    dev = p.q.device
    main = plan.spec("dkdv")
    stream = _arrays.stream_ptr(p.q)
    with cupy.cuda.Device(dev):
        if rows:
            pre = plan.spec("pre")   # pre_lanes(d) lanes per query row
            per_cta = pre.threads // 32 * (32 // pre_lanes(d))
            launch(get_function(pre, dev), -(-rows // per_cta), pre.threads, None,
                   args("pre", acc), stream)
        if nseq * hkv * max_k:
            grid = -(-max_k // main.block_n) * nseq * hkv
            launch(get_function(main, dev), grid, main.threads, None, args("dkdv", acc),
                   stream, smem=main.smem_bytes)
        if rows and deterministic:
            dqs = plan.spec("dq")
            grid = -(-max_q // dqs.block_m) * nseq * hq
            launch(get_function(dqs, dev), grid, dqs.threads, None, args("dq", None),
                   stream, smem=dqs.smem_bytes)
        elif rows:
            cvt = plan.spec("cvt")   # grid-stride loop over dq's elements
            grid = min(-(-(rows * d) // (4 * cvt.threads)), 1 << 20)   # 4 per thread
            launch(get_function(cvt, dev), grid, cvt.threads, None, args("cvt", acc),
                   stream)
    if packed:
        return dq[0], dk[0], dv[0]
    return dq, dk, dv


def pre_lanes(d: int) -> int:
    """Lanes per query row in the pre stage: d / 8 rounded up to a power of two, 4..32
    (common.cuh's pre_lanes, which the kernel uses)."""
    return 4 if d <= 32 else 8 if d <= 64 else 16 if d <= 128 else 32


_FUNCTION = None


def _function_class():
    """The torch.autograd.Function, built on first use so torch stays optional."""
    global _FUNCTION
    if _FUNCTION is not None:
        return _FUNCTION
    import torch

    class FlashAttnFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, prepared, deterministic):
            out, lse = _launch(prepared, with_lse=True)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.prepared = prepared
            ctx.deterministic = deterministic
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse = ctx.saved_tensors
            p = ctx.prepared
            if dout.dtype != out.dtype:
                dout = dout.to(out.dtype)
            if dout.shape[-1] > 1 and dout.stride(-1) != 1:
                dout = dout.contiguous()
            if p.varlen is not None:   # the launchers see one sequence of all tokens
                dout, out, lse = dout.unsqueeze(0), out.unsqueeze(0), lse.unsqueeze(0)
            dov, ov, lv = _check_grad_inputs(p, dout, out, lse)
            plan = bwd_plan(p.device, p.problem, forced_path())
            dq, dk, dv = _launch_bwd(p, plan, dov, ov, lv, ctx.deterministic)
            return dq, dk, dv, None, None

    _FUNCTION = FlashAttnFunction
    return _FUNCTION


def needs_autograd(p: _Prepared) -> bool:
    if p.q.kind != "torch":
        return False
    import torch
    return torch.is_grad_enabled() and any(x.obj.requires_grad for x in (p.q, p.k, p.v))


def autograd_forward(p: _Prepared, deterministic: bool, inputs: tuple = None):
    """(out, lse) through the autograd Function, so loss.backward() reaches q, k and v
    (``inputs``: the caller's tensors when p's views differ from them, as in varlen)."""
    q, k, v = inputs if inputs is not None else (p.q.obj, p.k.obj, p.v.obj)
    return _function_class().apply(q, k, v, p, deterministic)
