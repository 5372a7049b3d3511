"""flash_attn_varlen_func: packed variable-length batches, flash_attn's varlen API.

Sequence b of a packed batch is tokens [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q (and of
out and lse) and [cu_seqlens_k[b], cu_seqlens_k[b+1]) of k and v. The forward and backward
kernels are the dense ones: q, k, v are passed as a batch of one sequence of all tokens
(a leading axis of 1, zero-copy), and the kernels move each CTA to its own sequence through
``SeqSpan`` in common.cuh. The grid covers the longest sequence (max_seqlen_q); CTAs past
the end of a shorter one return at once.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .api import _host_ints, _int32_array, _prepare, _Prepared
from .arch import forced_path
from .dropout import attn_probs, draw_seed, require_forward_seed


@dataclass(frozen=True)
class Varlen:
    """The packing of a varlen call, as the launchers need it."""
    cu_q: _arrays.ArrayView
    cu_k: _arrays.ArrayView
    nseq: int
    max_q: int
    max_k: int
    total_q: int


def _check_offsets(cu: np.ndarray, name: str, total: int, total_name: str,
                   max_len: int, max_name: str) -> None:
    if cu[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {cu[0]}")
    steps = np.diff(cu)
    if np.any(steps < 0):
        b = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must be non-decreasing, got {name}[{b}] = {cu[b]} > "
                         f"{name}[{b + 1}] = {cu[b + 1]}")
    if cu[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {cu[-1]}")
    longest = int(steps.max(initial=0))
    if longest > max_len:
        raise ValueError(f"{max_name} must be >= the longest sequence ({longest}, sequence "
                         f"{int(np.argmax(steps))}), got {max_len}")


def _leading_one(x, name: str) -> _arrays.ArrayView:
    return _arrays.with_leading_axis(_arrays.view(x, name))


def _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                    alibi_slopes, check_indices, return_attn_probs, **options) -> _Prepared:
    qv, kv, vv = _arrays.view(q, "q"), _arrays.view(k, "k"), _arrays.view(v, "v")
    for name, x, dims in (("q", qv, "total_q, nheads, headdim"),
                          ("k", kv, "total_k, nheads_kv, headdim"),
                          ("v", vv, "total_k, nheads_kv, headdim")):
        if len(x.shape) != 3:
            raise ValueError(f"{name} must have 3 dims ({dims}) in a varlen call, got shape "
                             f"{x.shape}")
    if vv.shape[0] != kv.shape[0]:
        raise ValueError(f"v.shape[0] (total_k) must equal k.shape[0] = {kv.shape[0]}, "
                         f"got {vv.shape[0]}")
    if vv.shape[1] != kv.shape[1]:
        raise ValueError(f"v.shape[1] (nheads_kv) must equal k.shape[1] = {kv.shape[1]}, "
                         f"got {vv.shape[1]}")
    if kv.shape[1] == 0 or qv.shape[1] % kv.shape[1]:
        raise ValueError(f"q.shape[1] (nheads = {qv.shape[1]}) must be a multiple of "
                         f"k.shape[1] (nheads_kv), got {kv.shape[1]}")
    for name, x in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < 0:
            raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    if not isinstance(check_indices, bool):
        raise TypeError(f"check_indices must be a bool, got {type(check_indices).__name__}")
    if not qv.on_gpu:
        raise ValueError("q must be on a CUDA device, got cpu")
    cu_q = _int32_array(cu_seqlens_q, "cu_seqlens_q", qv, 1, "batch + 1,")
    cu_k = _int32_array(cu_seqlens_k, "cu_seqlens_k", qv, 1, "batch + 1,")
    if cu_q.shape[0] < 2:
        raise ValueError(f"cu_seqlens_q must have batch + 1 >= 2 entries, got shape {cu_q.shape}")
    if cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seqlens_k.shape must equal cu_seqlens_q.shape = {cu_q.shape} "
                         f"(batch + 1,), got {cu_k.shape}")
    if check_indices:
        _check_offsets(_host_ints(cu_q), "cu_seqlens_q", qv.shape[0], "q.shape[0] (total_q)",
                       max_seqlen_q, "max_seqlen_q")
        _check_offsets(_host_ints(cu_k), "cu_seqlens_k", kv.shape[0], "k.shape[0] (total_k)",
                       max_seqlen_k, "max_seqlen_k")
    packing = Varlen(cu_q, cu_k, cu_q.shape[0] - 1, int(max_seqlen_q), int(max_seqlen_k),
                     qv.shape[0])
    # The packed tensors as one dense sequence: every dense check (dtypes, heads, head dim,
    # strides, options) applies as is; the plan counts sequences and their longest lengths.
    return _prepare(_leading_one(q, "q"), _leading_one(k, "k"), _leading_one(v, "v"),
                    alibi_slopes=alibi_slopes, bias=None, return_attn_probs=return_attn_probs,
                    varlen=packing, **options)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, *, return_lse=False,
                           causal_align="bottom_right", check_indices=True, dropout_seed=None,
                           dropout_offset=0):
    """Attention over a packed batch of variable-length sequences (flash_attn's varlen API).

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_kv, headdim), nheads a multiple
    of nheads_kv. cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) on q's device, starting at
    0, non-decreasing, ending at total_q / total_k; zero-length sequences are allowed.
    max_seqlen_q / max_seqlen_k: ints >= the longest sequence. Each sequence attends only
    within itself, causal aligned bottom-right to its own lengths (``causal_align``);
    alibi_slopes (nheads,) or (batch, nheads) indexed by sequence. Returns out (total_q,
    nheads, headdim), and (out, lse) with ``return_lse``, lse (nheads, total_q) float32.
    torch inputs that require grad get gradients through autograd, as flash_attn_func.
    Dropout (``dropout_p``, ``dropout_seed``, ``dropout_offset``) is flash_attn_func's, with
    batch index b the sequence and query/key indices counted inside it;
    ``return_attn_probs=True`` returns (out, lse, S_dmask), S_dmask (batch, nheads,
    max_seqlen_q, max_seqlen_k) float32, zero past each sequence's lengths.

    ``check_indices`` (default True) copies cu_seqlens to the host (one sync) and raises on
    bad values before any launch; False skips that (e.g. inside CUDA-graph capture) and
    trusts the values, as flash_attn does.
    """
    p = _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        alibi_slopes=alibi_slopes, check_indices=check_indices,
                        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                        window_size=window_size, softcap=softcap, deterministic=deterministic,
                        return_attn_probs=return_attn_probs, causal_align=causal_align,
                        dropout_seed=dropout_seed, dropout_offset=dropout_offset)
    from .api import _launch
    from .backward import autograd_forward, needs_autograd
    draw_seed(p)
    if needs_autograd(p):
        out, lse = autograd_forward(p, deterministic, (q, k, v))
    else:
        out, lse = _launch(p, with_lse=return_lse or return_attn_probs)
    if return_attn_probs:
        return out, lse, attn_probs(p, lse)
    return (out, lse) if return_lse else out


def explain_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                   softcap=0.0, alibi_slopes=None, deterministic=False,
                   return_attn_probs=False, *, return_lse=False, causal_align="bottom_right",
                   check_indices=True, dropout_seed=None, dropout_offset=0):
    """The plan flash_attn_varlen_func would run for these arguments (same validation)."""
    p = _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        alibi_slopes=alibi_slopes, check_indices=check_indices,
                        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                        window_size=window_size, softcap=softcap, deterministic=deterministic,
                        return_attn_probs=return_attn_probs, causal_align=causal_align,
                        dropout_seed=dropout_seed, dropout_offset=dropout_offset)
    from .api import _explanation
    return _explanation(p)


def flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, *, causal_align="bottom_right",
                               dropout_p=0.0, dropout_seed=None, dropout_offset=0,
                               check_indices=True):
    """Gradients (dq, dk, dv) of flash_attn_varlen_func, for torch tensors or CuPy arrays.

    ``out`` and ``lse`` are what ``flash_attn_varlen_func(..., return_lse=True)`` returned
    for the same arguments; ``dout`` has out's shape (total_q, nheads, headdim) and dtype.
    Returns dq (total_q, nheads, headdim), dk and dv (total_k, nheads_kv, headdim).
    With dropout, pass the forward's ``dropout_p``, ``dropout_seed`` and ``dropout_offset``.
    """
    require_forward_seed(dropout_p, dropout_seed)
    p = _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        alibi_slopes=alibi_slopes, check_indices=check_indices,
                        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                        window_size=window_size, softcap=softcap, deterministic=deterministic,
                        return_attn_probs=False, causal_align=causal_align,
                        dropout_seed=dropout_seed, dropout_offset=dropout_offset)
    total_q, hq = p.varlen.total_q, p.problem.nheads_q
    for name, x, want in (("dout", dout, tuple(p.q.shape[1:])), ("out", out, tuple(p.q.shape[1:])),
                          ("lse", lse, (hq, total_q))):
        shape = tuple(_arrays.view(x, name).shape)
        if shape != want:
            dims = "(nheads, total_q)" if name == "lse" else "(total_q, nheads, headdim)"
            raise ValueError(f"{name}.shape must be {dims} = {want}, got {shape}")
    from .arch.cache import bwd_plan
    from .backward import _check_grad_inputs, _launch_bwd
    dov, ov, lv = _check_grad_inputs(p, _leading_one(dout, "dout"), _leading_one(out, "out"),
                                     _leading_one(lse, "lse"))
    plan = bwd_plan(p.device, p.problem, forced_path())
    return _launch_bwd(p, plan, dov, ov, lv, deterministic)
