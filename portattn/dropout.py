"""Dropout's arguments and seed, and return_attn_probs's debug kernel (attn_probs.cu).

The mask itself is defined by ``reference.dropout_mask_ref`` (Philox4x32-10 over
(seed, offset, batch, head, query, key)); every kernel draws exactly that mask, so the
forward, the backward and this debug path agree element for element.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _arrays

# return_attn_probs materialises (batch, nheads, seqlen_q, seqlen_k) fp32: a debugging aid.
ATTN_PROBS_MAX_ELEMENTS = 1 << 26
# attn_probs.cu's tile: query rows per CTA, threads (one key per thread per step).
_PROBS_ROWS, _PROBS_THREADS = 8, 128


def check_dropout_args(dropout_p, dropout_seed, dropout_offset, kind: str) -> float:
    """Validated dropout_p (float); raises naming the argument before any launch.

    A CuPy caller must pass dropout_seed when dropout_p > 0: there is no generator to
    draw it from that the caller could replay, and the backward needs the same seed."""
    if (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real)
            or not 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if dropout_seed is not None:
        if (isinstance(dropout_seed, (bool, np.bool_))
                or not isinstance(dropout_seed, numbers.Integral)):
            raise TypeError(f"dropout_seed must be an int in [0, 2**64) or None, "
                            f"got {type(dropout_seed).__name__}")
        if not 0 <= int(dropout_seed) < 2 ** 64:
            raise ValueError(f"dropout_seed must be in [0, 2**64), got {int(dropout_seed)}")
    if isinstance(dropout_offset, (bool, np.bool_)) or not isinstance(dropout_offset,
                                                                     numbers.Integral):
        raise TypeError(f"dropout_offset must be an int in [0, 2**32), "
                        f"got {type(dropout_offset).__name__}")
    if not 0 <= int(dropout_offset) < 2 ** 32:
        raise ValueError(f"dropout_offset must be in [0, 2**32), got {int(dropout_offset)}")
    if dropout_p > 0.0 and dropout_seed is None and kind != "torch":
        raise ValueError("dropout_seed must be an int in [0, 2**64) when dropout_p > 0 with "
                         "CuPy arrays (no generator to draw it from; flash_attn_backward "
                         "needs the same seed), got None")
    return float(dropout_p)


def require_forward_seed(dropout_p, dropout_seed) -> None:
    """A backward called directly must redraw the forward's mask: it needs its seed."""
    if isinstance(dropout_p, (int, float)) and dropout_p > 0 and dropout_seed is None:
        raise ValueError("dropout_seed must be the forward's seed (an int in [0, 2**64)) "
                         f"when dropout_p = {dropout_p} > 0, got None")


def check_attn_probs(return_attn_probs, batch: int, hq: int, sq: int, sk: int) -> bool:
    if not isinstance(return_attn_probs, (bool, np.bool_)):
        raise TypeError(f"return_attn_probs must be a bool, "
                        f"got {type(return_attn_probs).__name__}")
    n = batch * hq * sq * sk
    if return_attn_probs and n > ATTN_PROBS_MAX_ELEMENTS:
        raise ValueError(f"return_attn_probs=True is a debugging aid for small shapes: "
                         f"batch * nheads * seqlen_q * seqlen_k must be <= "
                         f"{ATTN_PROBS_MAX_ELEMENTS} (2**26), got {batch} * {hq} * {sq} * "
                         f"{sk} = {n}")
    return bool(return_attn_probs)


def draw_seed(p) -> None:
    """Give ``p`` (api._Prepared) a seed when dropout is on and the caller passed none:
    one 63-bit draw from torch's default CPU generator (torch.randint, no device sync),
    so torch.manual_seed(s) makes the masks reproducible. CuPy callers were already
    refused (check_dropout_args)."""
    if p.dropout_p > 0.0 and p.dropout_seed is None:
        import torch
        p.dropout_seed = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64).item())


def attn_probs(p, lse):
    """(batch, nheads, seqlen_q, seqlen_k) float32 of q's kind: the softmax probabilities
    recomputed from q, k and the forward's lse, dropped entries negated (flash_attn's
    S_dmask; -0.0 where a dropped entry's probability is 0)."""
    from .api import _launch_args, _seq_geometry
    from .compile import get_function
    from .spec import KernelSpec, head_dim_bucket
    import cupy
    hq, d = p.q.shape[2:]
    # Varlen: (sequences, heads, max_seqlen_q, max_seqlen_k), zero past each sequence's end.
    batch, sq, sk, _, _ = _seq_geometry(p)
    alloc = _arrays.zeros if p.varlen is not None else _arrays.empty
    probs = alloc(p.q, (batch, hq, sq, sk), "float32")
    if batch * hq * sq * sk == 0:
        return probs
    spec = KernelSpec("attn_probs", p.q.dtype, head_dim_bucket(d), _PROBS_ROWS,
                      _PROBS_THREADS, _PROBS_THREADS)
    lv = _arrays.view(lse, "lse")
    args = _launch_args(p, p.q, lv.ptr) + (np.uint64(_arrays.view(probs, "probs").ptr),)
    grid = -(-sq // _PROBS_ROWS) * batch * hq
    with cupy.cuda.Device(p.q.device), _arrays.stream_for(p.q):
        get_function(spec, p.q.device)((grid,), (_PROBS_THREADS,), args)
    return probs
