"""NumPy reference implementation of attention: the semantics every kernel is tested against.

This module is the project's definition of what "attention" means.  Every GPU kernel
in ``portattn`` must agree with these functions up to floating-point tolerance; where a
kernel and this module disagree, this module is right.  It is a test oracle for small
shapes: it materialises the full (batch, nheads_q, seqlen_q, seqlen_k) score tensor.

Layout (as in flash_attn)
-------------------------
``q`` is (batch, seqlen_q, nheads_q, headdim), ``k`` is (batch, seqlen_k, nheads_kv,
headdim) and ``v`` is (batch, seqlen_k, nheads_kv, headdim_v); ``headdim_v`` may differ
from ``headdim``.  The output is (batch, seqlen_q, nheads_q, headdim_v) and the
log-sum-exp is (batch, nheads_q, seqlen_q).

GQA / MQA
    ``nheads_q`` must be a multiple of ``nheads_kv``; query head ``h`` reads kv head
    ``h // (nheads_q // nheads_kv)``.

Scores, in this order, for query row ``i`` and key column ``j`` of head ``h``:
    1. ``s = (q_i . k_j) * softmax_scale`` (default scale ``1 / sqrt(headdim)``);
    2. if ``softcap > 0``: ``s = softcap * tanh(s / softcap)``;
    3. ALiBi: ``s -= slope[h] * |i + off - j|`` (slopes (nheads_q,) or (batch, nheads_q));
    4. a float ``bias`` is added (``-inf`` entries therefore act as a mask);
    5. masks: a position that is not allowed gets ``s = -inf``.

Diagonal offset ``off``
    ``off = seqlen_k - seqlen_q`` for ``causal_align="bottom_right"`` (flash_attn >= 2.1:
    the last query row sees the last key) and ``off = 0`` for ``"top_left"`` (PyTorch
    SDPA ``is_causal``: query ``i`` sees keys ``0..i``).  Causal, the local window and
    ALiBi all use the same ``off``.

Local window and causal
    ``window_size=(left, right)``, ``-1`` meaning unbounded on that side: key ``j`` is
    allowed iff ``i + off - left <= j <= i + off + right`` (a bound whose value is -1 is
    not applied).  ``causal=True`` forces ``right = 0`` and keeps ``left``, so causal is
    exactly the window ``(left, 0)``; plain causal is the window ``(-1, 0)``.

Bias / mask
    ``bias`` must broadcast (NumPy rules, aligned on trailing dims) to (batch, nheads_q,
    seqlen_q, seqlen_k).  A bool bias is a mask whose True means "may attend" (as
    PyTorch SDPA's boolean ``attn_mask``); a float bias is added to the scores.  A bias
    must not contain ``+inf`` or NaN.

Softmax and log-sum-exp
    ``P = softmax_j(s)``; ``out_i = sum_j P_ij v_j``.  ``lse_i`` is the natural-log
    log-sum-exp of the final scores (after softcap, ALiBi, bias and masks) over ``j``.
    A fully masked row (every score ``-inf``, including ``seqlen_k == 0``) has ``P = 0``,
    output 0 and ``lse = -inf``; it never produces NaN.

Dropout
    If ``dropout_mask`` (bool, broadcastable to (batch, nheads_q, seqlen_q, seqlen_k),
    True = keep) is given, the probabilities multiplied with ``V`` are
    ``P * mask / (1 - dropout_p)``.  ``dropout_p`` must lie in [0, 1), and
    ``dropout_p > 0`` requires a mask.  ``lse`` is always that of the undropped softmax.

Dropout generator (``dropout_mask_ref``: the mask every kernel draws)
    Philox4x32-10 (Salmon et al., SC'11, as in Random123): key ``(seed mod 2^32,
    seed >> 32)`` for a ``seed`` in [0, 2^64); element (b, h, i, j) uses the counter
    ``(j >> 2, i, b * nheads + h mod 2^32, offset)`` for an ``offset`` in [0, 2^32), and
    word ``j & 3`` of the four 32-bit outputs is its uniform ``u``.  ``b`` is the batch
    (varlen: sequence) index, ``h`` the query head, ``i``/``j`` the query and key position
    inside the sequence.  The element is kept iff ``u >= threshold``, with
    ``threshold = min(round(p * 2^32), 2^32 - 1)`` (round half to even; p * 2^32 is exact
    in float64), so the keep probability is ``1 - threshold / 2^32``, within 2^-32 of
    ``1 - p``.  One Philox call serves four consecutive keys of one row, so a kernel
    never evaluates it more than once per four elements.

Precision
    ``precision="float64"`` (default) computes everything in float64.  ``"float32"``,
    ``"float16"`` and ``"bfloat16"`` give the *same-precision reference* used to set
    tolerances (flash_attn's method: ``max|out - ref64| <= 2 * max|ref_lowp - ref64| +
    atol``).  It emulates a low-precision kernel: q, k, v and a float bias are rounded
    to the precision; ``S = QK^T`` is accumulated in float32; scaling, softcap, ALiBi
    (float32 slopes), softmax and lse are float32; ``P`` (after dropout) is rounded to
    the precision; ``P V`` is accumulated in float32; the output is rounded to the
    precision.  Results are returned as float64 arrays holding those rounded values;
    lse holds float32 values.

Rounding
    ``round_to(x, precision)`` rounds to nearest, ties to even.  float16 and bfloat16
    values are produced from float32 (non-float32 input is first converted to float32),
    which is also what PyTorch does when casting float64 to a 16-bit type.
    ``round_to_bfloat16`` keeps NaN a NaN (quietened), infinities as they are, and
    rounds finite values that overflow to infinity.

Variable length (``attention_varlen_ref``)
    Packed tokens as in flash_attn's varlen API: q (total_q, nheads_q, headdim), k
    (total_k, nheads_kv, headdim), v (total_k, nheads_kv, headdim_v); ``cu_seqlens_q``
    and ``cu_seqlens_k`` are integer arrays of length batch + 1, non-decreasing, starting
    at 0 and ending at the total.  Sequence ``b`` attends only within itself, with its own
    seqlens and hence its own ``off``.  Zero-length sequences are allowed.  ALiBi slopes
    (batch, nheads_q) are indexed by the sequence index.  ``bias`` is not supported; a
    ``dropout_mask`` broadcasts to (batch, nheads_q, max_seqlen_q, max_seqlen_k) and
    sequence ``b`` uses its top-left (seqlen_q_b, seqlen_k_b) corner.  The output is
    (total_q, nheads_q, headdim_v) and lse is (nheads_q, total_q).

KV cache (``attention_kvcache_ref``)
    As flash_attn_with_kvcache.  The cache is (batch_cache, seqlen_cache, nheads_kv, d),
    or paged (num_blocks, page_size, nheads_kv, d) when ``block_table`` (batch,
    max_blocks_per_seq) is given; logical position ``p`` of batch row ``b`` then lives in
    page ``block_table[b, p // page_size]`` at offset ``p % page_size``.  The capacity of
    a row is ``seqlen_cache`` (or ``max_blocks_per_seq * page_size`` when paged).
    ``cache_batch_idx`` (batch,) picks the cache row of each batch row (not with a
    ``block_table``).  ``cache_seqlens`` (int or (batch,)) is the number of valid keys
    already in each row (default: the full capacity).  New ``k``/``v`` (batch, seqlen_new,
    nheads_kv, d) are written at positions ``cache_seqlens[b] ... cache_seqlens[b] +
    seqlen_new - 1`` of copies of the caches (the inputs are never modified; the copies
    keep the caches' dtypes and are returned), then row ``b`` attends to the first
    ``seqlen_k_b = cache_seqlens[b] + seqlen_new`` keys of the updated cache, with
    ``off = seqlen_k_b - seqlen_q`` for bottom-right alignment.  ``bias`` and
    ``dropout_mask`` broadcast to (batch, nheads_q, seqlen_q, capacity), indexed by
    logical key position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PRECISIONS",
    "CAUSAL_ALIGNS",
    "round_to_bfloat16",
    "round_to",
    "attention_ref",
    "attention_probs_ref",
    "attention_varlen_ref",
    "attention_varlen_grad_ref",
    "attention_kvcache_ref",
    "attention_grad_ref",
    "philox4x32_10",
    "dropout_threshold",
    "dropout_mask_ref",
]

PRECISIONS = ("float64", "float32", "float16", "bfloat16")
CAUSAL_ALIGNS = ("bottom_right", "top_left")


def round_to_bfloat16(x) -> np.ndarray:
    """Round to the nearest bfloat16 value (ties to even); return it as a float32 array.

    Non-float32 input is first converted to float32.  NaN stays NaN (made quiet, sign
    kept), +-inf stay +-inf, finite values beyond the bfloat16 range round to +-inf, and
    subnormals round like any other value (bfloat16 shares float32's exponent range).
    """
    with np.errstate(over="ignore"):
        x32 = np.array(x, dtype=np.float32, copy=True, ndmin=0)
    # Work on a 1-d array: NumPy *scalar* integer arithmetic warns on wrap-around.
    bits = x32.reshape(-1).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    # Adding 0x7FFF plus the kept lsb carries into the kept bits exactly when the dropped
    # half is above the midpoint, or at the midpoint with an odd kept lsb.  The sum cannot
    # leave 32 bits for non-NaN inputs; NaN lanes are replaced below anyway.
    rounded = (bits + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)
    # A NaN whose payload lives only in the dropped bits would truncate to inf, so set
    # the quiet bit, which survives the truncation.
    quiet_nan = (bits | np.uint32(0x00400000)) & np.uint32(0xFFFF0000)
    out_bits = np.where(np.isnan(x32.reshape(-1)), quiet_nan, rounded).astype(np.uint32)
    return out_bits.view(np.float32).reshape(x32.shape)


def round_to(x, precision: str) -> np.ndarray:
    """Round ``x`` to ``precision`` (one of ``PRECISIONS``), to nearest with ties to even.

    Returns float64 for "float64", float32 for "float32", float16 for "float16" and a
    float32 array holding bfloat16 values for "bfloat16" (NumPy has no bfloat16).
    """
    _check_precision(precision)
    if precision == "float64":
        return np.array(x, dtype=np.float64, copy=True, ndmin=0)
    # Overflowing to +-inf is the correct result of rounding out-of-range values.
    with np.errstate(over="ignore"):
        x32 = np.array(x, dtype=np.float32, copy=True, ndmin=0)
        if precision == "float32":
            return x32
        if precision == "float16":
            return x32.astype(np.float16)
    return round_to_bfloat16(x32)


@dataclass(frozen=True)
class _Options:
    softmax_scale: float
    causal_align: str
    left: int
    right: int
    softcap: float
    dropout_p: float
    precision: str


def _check_precision(precision) -> None:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _as_real_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"{name}.dtype must be a real (floating or integer) dtype, got {arr.dtype}"
        )
    return arr


def _require_ndim(arr: np.ndarray, name: str, dims: str) -> None:
    expected = dims.count(",") + 1
    if arr.ndim != expected:
        raise ValueError(
            f"{name}.ndim must be {expected} ({dims}), got {arr.ndim} "
            f"(shape {_shape_str(arr.shape)})"
        )


def _require_dim(arr, name, axis, what, ref_name, ref_value) -> None:
    if arr.shape[axis] != ref_value:
        raise ValueError(
            f"{name}.shape[{axis}] ({what}) must equal {ref_name} = {ref_value}, "
            f"got {arr.shape[axis]}"
        )


def _check_heads(q, k, q_axis: int, k_axis: int, d_axis: int) -> None:
    hq, hkv, d = q.shape[q_axis], k.shape[k_axis], q.shape[d_axis]
    if hkv < 1:
        raise ValueError(f"k.shape[{k_axis}] (nheads_kv) must be >= 1, got {hkv}")
    if hq % hkv != 0:
        raise ValueError(
            f"q.shape[{q_axis}] (nheads_q) must be a multiple of k.shape[{k_axis}] "
            f"(nheads_kv) = {hkv}, got {hq}"
        )
    if d < 1:
        raise ValueError(f"q.shape[{d_axis}] (headdim) must be >= 1, got {d}")


def _validate_options(
    *, headdim, softmax_scale, causal, causal_align, window_size, softcap, dropout_p, precision
) -> _Options:
    _check_precision(precision)
    if causal_align not in CAUSAL_ALIGNS:
        raise ValueError(f"causal_align must be one of {CAUSAL_ALIGNS}, got {causal_align!r}")
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(
            f"window_size must be a pair (left, right), got {window_size!r}"
        ) from None
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"window_size {side} must be an int >= -1, got {value!r}")
        if value < -1:
            raise ValueError(f"window_size {side} must be >= -1 (-1 = unbounded), got {value}")
    left, right = int(left), int(right)
    if causal:
        right = 0
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    softcap = float(softcap)
    if not (softcap >= 0.0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite value >= 0 (0 = off), got {softcap}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return _Options(softmax_scale, causal_align, left, right, softcap, dropout_p, precision)


def _check_dropout_mask(dropout_mask, dropout_p: float, target: tuple, target_desc: str):
    if dropout_mask is None:
        if dropout_p > 0.0:
            raise ValueError(
                f"dropout_p = {dropout_p} > 0 requires dropout_mask (bool, True = keep), got None"
            )
        return None
    mask = np.asarray(dropout_mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"dropout_mask.dtype must be bool (True = keep), got {mask.dtype}")
    return _broadcast(mask, "dropout_mask", target, target_desc)


def _broadcast(arr: np.ndarray, name: str, target: tuple, target_desc: str) -> np.ndarray:
    try:
        if np.broadcast_shapes(arr.shape, target) != tuple(target):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{name} must be broadcastable to {target_desc} = {_shape_str(target)}, "
            f"got shape {_shape_str(arr.shape)}"
        ) from None
    return np.broadcast_to(arr, target)


def _check_bias(bias, target: tuple, target_desc: str):
    if bias is None:
        return None
    arr = np.asarray(bias)
    if arr.dtype != np.bool_ and not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"bias.dtype must be bool (mask) or a real float dtype, got {arr.dtype}")
    return _broadcast(arr, "bias", target, target_desc)


def _check_slopes(alibi_slopes, batch: int, hq: int) -> np.ndarray | None:
    """Return slopes as (batch, nheads_q) float64, or None."""
    if alibi_slopes is None:
        return None
    slopes = _as_real_array(alibi_slopes, "alibi_slopes")
    if slopes.shape == (hq,):
        return np.broadcast_to(slopes.astype(np.float64), (batch, hq))
    if slopes.shape == (batch, hq):
        return slopes.astype(np.float64)
    raise ValueError(
        f"alibi_slopes shape must be (nheads_q,) = ({hq},) or (batch, nheads_q) = "
        f"({batch}, {hq}), got {_shape_str(slopes.shape)}"
    )


def _diagonal_offset(sq: int, sk: int, align: str) -> int:
    return sk - sq if align == "bottom_right" else 0


def _window(sq: int, sk: int, opts, work):
    """(allowed (sq, sk) bool, |i + off - j| in ``work``): the window and causal mask and the
    ALiBi distance, from the options' alignment and (left, right)."""
    off = _diagonal_offset(sq, sk, opts.causal_align)
    rel = np.arange(sq)[:, None] + off - np.arange(sk)[None, :]
    allowed = np.ones((sq, sk), dtype=bool)
    if opts.left >= 0:
        allowed &= rel <= opts.left
    if opts.right >= 0:
        allowed &= -rel <= opts.right
    return allowed, np.abs(rel).astype(work)


def _attend(q, k, v, opts: _Options, slopes, bias, dropout_mask, want_probs: bool):
    """Core of every public function, on validated inputs.

    q (b, sq, hq, d), k (b, sk, hkv, d), v (b, sk, hkv, dv) real arrays; slopes
    (b, hq) float64 or None; bias and dropout_mask already broadcast to (b, hq, sq, sk)
    or None.  Returns out (b, sq, hq, dv), lse (b, hq, sq) and P (b, hq, sq, sk) or None,
    all float64.
    """
    b, sq, hq, _ = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    lowp = opts.precision != "float64"
    work = np.float32 if lowp else np.float64

    def prepare(x):
        return round_to(x, opts.precision).astype(work, copy=False)

    q, k, v = prepare(q), prepare(k), prepare(v)
    kv_head = np.arange(hq) // (hq // hkv)

    allowed, distance = _window(sq, sk, opts, work)

    scale = work(opts.softmax_scale)
    softcap = work(opts.softcap)
    keep_scale = work(1.0) / (work(1.0) - work(opts.dropout_p))

    out = np.empty((b, sq, hq, dv), dtype=np.float64)
    lse = np.empty((b, hq, sq), dtype=np.float64)
    probs = np.empty((b, hq, sq, sk), dtype=np.float64) if want_probs else None

    # One batch row at a time keeps the live score tensor at (hq, sq, sk).
    for bi in range(b):
        qb = q[bi].transpose(1, 0, 2)
        kb = k[bi][:, kv_head, :].transpose(1, 2, 0)
        vb = v[bi][:, kv_head, :].transpose(1, 0, 2)
        s = np.matmul(qb, kb) * scale
        if opts.softcap > 0.0:
            s = softcap * np.tanh(s / softcap)
        if slopes is not None:
            s = s - slopes[bi].astype(work)[:, None, None] * distance
        row_allowed = np.broadcast_to(allowed, s.shape)
        if bias is not None:
            if bias.dtype == np.bool_:
                row_allowed = row_allowed & bias[bi]
            else:
                s = s + prepare(bias[bi])
        s = np.where(row_allowed, s, work(-np.inf))

        row_max = s.max(axis=-1, keepdims=True, initial=-np.inf)
        empty_row = row_max == -np.inf
        shift = np.where(empty_row, work(0.0), row_max)
        e = np.exp(s - shift)
        denom = e.sum(axis=-1, keepdims=True)
        p = e / np.where(empty_row, work(1.0), denom)
        with np.errstate(divide="ignore"):
            row_lse = np.where(empty_row, work(-np.inf), shift + np.log(denom))

        if dropout_mask is not None:
            p = np.where(dropout_mask[bi], p * keep_scale, work(0.0))
        if lowp:
            p = prepare(p)
        ob = np.matmul(p, vb)
        if lowp:
            ob = prepare(ob)

        out[bi] = ob.transpose(1, 0, 2)
        lse[bi] = row_lse[..., 0]
        if want_probs:
            probs[bi] = p
    return out, lse, probs


def _prepare_dense(q, k, v, softmax_scale, causal, causal_align, window_size, softcap,
                   alibi_slopes, bias, dropout_p, dropout_mask, precision):
    q = _as_real_array(q, "q")
    k = _as_real_array(k, "k")
    v = _as_real_array(v, "v")
    _require_ndim(q, "q", "batch, seqlen_q, nheads_q, headdim")
    _require_ndim(k, "k", "batch, seqlen_k, nheads_kv, headdim")
    _require_ndim(v, "v", "batch, seqlen_k, nheads_kv, headdim_v")
    _require_dim(k, "k", 0, "batch", "q.shape[0]", q.shape[0])
    _require_dim(v, "v", 0, "batch", "q.shape[0]", q.shape[0])
    _require_dim(v, "v", 1, "seqlen_k", "k.shape[1]", k.shape[1])
    _require_dim(v, "v", 2, "nheads_kv", "k.shape[2]", k.shape[2])
    _require_dim(k, "k", 3, "headdim", "q.shape[3]", q.shape[3])
    _check_heads(q, k, 2, 2, 3)
    opts = _validate_options(
        headdim=q.shape[3], softmax_scale=softmax_scale, causal=causal,
        causal_align=causal_align, window_size=window_size, softcap=softcap,
        dropout_p=dropout_p, precision=precision,
    )
    b, sq, hq, _ = q.shape
    target = (b, hq, sq, k.shape[1])
    desc = "(batch, nheads_q, seqlen_q, seqlen_k)"
    slopes = _check_slopes(alibi_slopes, b, hq)
    bias = _check_bias(bias, target, desc)
    mask = _check_dropout_mask(dropout_mask, opts.dropout_p, target, desc)
    return q, k, v, opts, slopes, bias, mask


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, causal_align="bottom_right",
                  window_size=(-1, -1), softcap=0.0, alibi_slopes=None, bias=None,
                  dropout_p=0.0, dropout_mask=None, return_lse=False, precision="float64"):
    """Exact attention on dense batched inputs (see the module docstring for all rules).

    Args:
        q: (batch, seqlen_q, nheads_q, headdim).
        k: (batch, seqlen_k, nheads_kv, headdim); nheads_q % nheads_kv == 0.
        v: (batch, seqlen_k, nheads_kv, headdim_v).
        softmax_scale: multiplies q.k; default 1 / sqrt(headdim).
        causal: restrict to keys j <= i + off (forces window right = 0).
        causal_align: "bottom_right" (off = seqlen_k - seqlen_q) or "top_left" (off = 0).
        window_size: (left, right); key j allowed iff i+off-left <= j <= i+off+right,
            -1 = unbounded on that side.
        softcap: if > 0, s = softcap * tanh(s / softcap), before ALiBi and bias.
        alibi_slopes: (nheads_q,) or (batch, nheads_q); adds -slope * |i + off - j|.
        bias: broadcastable to (batch, nheads_q, seqlen_q, seqlen_k); bool = mask with
            True = may attend, float = added to the scores.
        dropout_p: in [0, 1); > 0 requires dropout_mask.
        dropout_mask: bool, broadcastable like bias, True = keep; applied as
            P * mask / (1 - dropout_p).
        return_lse: also return the log-sum-exp of the undropped scores.
        precision: "float64", or "float32"/"float16"/"bfloat16" for the same-precision
            reference (rounded values returned as float64).

    Returns:
        out (batch, seqlen_q, nheads_q, headdim_v) float64, and if return_lse also
        lse (batch, nheads_q, seqlen_q) float64.  Fully masked rows give out = 0 and
        lse = -inf, never NaN.

    Raises:
        ValueError: on any malformed argument; the message names it.
    """
    args = _prepare_dense(q, k, v, softmax_scale, causal, causal_align, window_size, softcap,
                          alibi_slopes, bias, dropout_p, dropout_mask, precision)
    out, lse, _ = _attend(*args, want_probs=False)
    return (out, lse) if return_lse else out


def attention_probs_ref(q, k, v, *, softmax_scale=None, causal=False,
                        causal_align="bottom_right", window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, bias=None, dropout_p=0.0, dropout_mask=None,
                        precision="float64"):
    """The probabilities P (batch, nheads_q, seqlen_q, seqlen_k) float64 that attention_ref uses.

    Same arguments and rules as ``attention_ref``.  P is exactly the matrix multiplied
    with V, so ``out[b, i, h] = sum_j P[b, h, i, j] * v[b, j, h // group]``: it includes
    the dropout mask and 1 / (1 - dropout_p) when a mask is given, and for a low
    ``precision`` it holds the rounded values.  Rows sum to 1 without dropout; fully
    masked rows are all 0.
    """
    args = _prepare_dense(q, k, v, softmax_scale, causal, causal_align, window_size, softcap,
                          alibi_slopes, bias, dropout_p, dropout_mask, precision)
    return _attend(*args, want_probs=True)[2]


def attention_grad_ref(q, k, v, dout, *, softmax_scale=None, causal=False,
                       causal_align="bottom_right", window_size=(-1, -1), softcap=0.0,
                       alibi_slopes=None, bias=None, dropout_p=0.0, dropout_mask=None,
                       precision="float64"):
    """Analytical gradients (dq, dk, dv) of ``sum(attention_ref(q, k, v, ...) * dout)``.

    Same arguments and rules as ``attention_ref``, plus ``dout`` (batch, seqlen_q,
    nheads_q, headdim_v).  With P the softmax, Pd the matrix multiplied with V (P with
    dropout applied), x = q.k * scale and s the final scores:

        dV = Pd^T dO,  dP = (dO V^T) [* mask / (1 - p)],  D_i = sum_j P_ij dP_ij,
        dS = P * (dP - D),  dx = dS * (1 - tanh(x / softcap)^2) (1 without softcap),
        dQ = scale * dx K,  dK = scale * dx^T Q.

    ALiBi and the bias are additive, so they only pass dS through (no bias gradient is
    returned); masked positions and fully masked rows have P = 0 and contribute nothing.
    GQA/MQA: dK and dV of a kv head are summed over the query heads of its group.

    ``precision`` other than "float64" emulates a kernel that keeps P and dS in float32:
    q, k, v, dout and a float bias are rounded to the precision, everything is computed
    in float32, P is recomputed from a float32 lse the way the kernels store it (natural
    log, computed in the log2 domain), the sums over the sequence (dQ over keys, dK and dV
    over queries) accumulate one term after another as register accumulators do,
    ``D_i = rowsum(dO * O)`` uses the output as a
    kernel of that precision stores it (``attention_ref(..., precision=precision)``), and
    dq, dk, dv are rounded to the precision.  Returns float64 arrays (batch, seqlen, nheads, headdim) shaped
    like q, k and v.
    """
    args = _prepare_dense(q, k, v, softmax_scale, causal, causal_align, window_size, softcap,
                          alibi_slopes, bias, dropout_p, dropout_mask, precision)
    q, k, v, opts, slopes, bias, mask = args
    dout = _as_real_array(dout, "dout")
    want = q.shape[:3] + v.shape[3:]
    if dout.shape != want:
        raise ValueError(f"dout shape must be (batch, seqlen_q, nheads_q, headdim_v) = "
                         f"{_shape_str(want)}, got {_shape_str(dout.shape)}")
    out_lowp = None
    if opts.precision != "float64":
        out_lowp = _attend(q, k, v, opts, slopes, bias, mask, want_probs=False)[0]
    return _attend_grad(q, k, v, dout, opts, slopes, bias, mask, out_lowp)


def _attend_grad(q, k, v, dout, opts: _Options, slopes, bias, dropout_mask, out_lowp):
    b, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    lowp = opts.precision != "float64"
    work = np.float32 if lowp else np.float64

    def prepare(x):
        return round_to(x, opts.precision).astype(work, copy=False)

    q, k, v, dout = prepare(q), prepare(k), prepare(v), prepare(dout)
    kv_head = np.arange(hq) // group
    allowed, distance = _window(sq, sk, opts, work)
    scale = work(opts.softmax_scale)
    softcap = work(opts.softcap)
    keep_scale = work(1.0) / (work(1.0) - work(opts.dropout_p))

    dq = np.empty((b, sq, hq, d), dtype=np.float64)
    dk = np.empty((b, sk, hkv, d), dtype=np.float64)
    dvv = np.empty((b, sk, hkv, dv), dtype=np.float64)
    for bi in range(b):
        qb = q[bi].transpose(1, 0, 2)                       # (hq, sq, d)
        kb = k[bi][:, kv_head, :].transpose(1, 0, 2)        # (hq, sk, d)
        vb = v[bi][:, kv_head, :].transpose(1, 0, 2)        # (hq, sk, dv)
        gb = dout[bi].transpose(1, 0, 2)                    # (hq, sq, dv)
        x = np.matmul(qb, kb.transpose(0, 2, 1)) * scale
        s = softcap * np.tanh(x / softcap) if opts.softcap > 0.0 else x
        if slopes is not None:
            s = s - slopes[bi].astype(work)[:, None, None] * distance
        row_allowed = np.broadcast_to(allowed, s.shape)
        if bias is not None:
            if bias.dtype == np.bool_:
                row_allowed = row_allowed & bias[bi]
            else:
                s = s + prepare(bias[bi])
        s = np.where(row_allowed, s, work(-np.inf))
        p = _probs_from_lse(s) if lowp else _softmax(s)

        pd, dp = p, np.matmul(gb, vb.transpose(0, 2, 1))
        if dropout_mask is not None:
            pd = np.where(dropout_mask[bi], p * keep_scale, work(0.0))
            dp = np.where(dropout_mask[bi], dp * keep_scale, work(0.0))
        if out_lowp is None:
            delta = (p * dp).sum(axis=-1, keepdims=True)
        else:
            ob = out_lowp[bi].astype(work).transpose(1, 0, 2)
            delta = (gb * ob).sum(axis=-1, keepdims=True)
        ds = p * (dp - delta)
        if opts.softcap > 0.0:
            ds = ds * (work(1.0) - np.tanh(x / softcap) ** 2)

        if lowp:
            # One accumulator per kv head runs over its group's heads, then their rows.
            def grouped(x):
                return x.reshape(hkv, group * x.shape[1], x.shape[2])
            dq_h = _sequential_sum(ds.transpose(0, 2, 1), kb) * scale
            dk_g = _sequential_sum(grouped(ds), grouped(qb)) * scale
            dv_g = _sequential_sum(grouped(pd), grouped(gb))
        else:
            dq_h = np.matmul(ds, kb) * scale                     # (hq, sq, d)
            dk_g = (np.matmul(ds.transpose(0, 2, 1), qb) * scale).reshape(
                hkv, group, sk, d).sum(axis=1)
            dv_g = np.matmul(pd.transpose(0, 2, 1), gb).reshape(hkv, group, sk, dv).sum(axis=1)
        dq[bi] = dq_h.transpose(1, 0, 2)
        dk[bi] = dk_g.transpose(1, 0, 2)
        dvv[bi] = dv_g.transpose(1, 0, 2)
    if lowp:
        dq, dk, dvv = (round_to(x, opts.precision).astype(np.float64) for x in (dq, dk, dvv))
    return dq, dk, dvv


def _sequential_sum(a, b):
    """sum_t a[:, t, :, None] * b[:, t, None, :] accumulated one t after another, as a
    kernel's fp32 register accumulators add the rows of a sequence (a BLAS matmul sums in
    blocks and is more accurate than any such kernel)."""
    out = np.zeros((a.shape[0], a.shape[2], b.shape[2]), dtype=a.dtype)
    for t in range(a.shape[1]):
        out += a[:, t, :, None] * b[:, t, None, :]
    return out


def _softmax(s):
    row_max = s.max(axis=-1, keepdims=True, initial=-np.inf)
    empty_row = row_max == -np.inf
    e = np.exp(s - np.where(empty_row, s.dtype.type(0.0), row_max))
    return e / np.where(empty_row, s.dtype.type(1.0), e.sum(axis=-1, keepdims=True))


def _probs_from_lse(s):
    """float32 P as a backward kernel recomputes it: the forward keeps scores and lse in the
    log2 domain and stores lse in float32 natural log; the backward converts it back and
    takes P = exp2(s2 - lse2). The round trip's rounding (relative 2^-24 of |lse|) is part
    of what a same-precision kernel cannot avoid."""
    f32 = np.float32
    s2 = s.astype(f32) * f32(_LOG2E)
    m2 = s2.max(axis=-1, keepdims=True, initial=-np.inf)
    empty_row = m2 == -np.inf
    shift = np.where(empty_row, f32(0.0), m2)
    denom = np.exp2(s2 - shift).sum(axis=-1, keepdims=True, dtype=f32)
    with np.errstate(divide="ignore"):
        lse_nat = ((shift + np.log2(np.where(empty_row, f32(1.0), denom))) * f32(_LN2)).astype(f32)
    lse2 = np.where(empty_row, f32(np.inf), lse_nat * f32(_LOG2E))
    return np.exp2(s2 - lse2).astype(f32)


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _check_cu_seqlens(cu, name: str, total: int, total_name: str) -> np.ndarray:
    arr = np.asarray(cu)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}.dtype must be an integer dtype (int32), got {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"{name} must have shape (batch + 1,), got {_shape_str(arr.shape)}")
    arr = arr.astype(np.int64)
    if arr[0] != 0:
        raise ValueError(f"{name}[0] must equal 0, got {arr[0]}")
    if arr[-1] != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {arr[-1]}")
    if np.any(np.diff(arr) < 0):
        raise ValueError(f"{name} must be non-decreasing, got {arr.tolist()}")
    return arr


def _prepare_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, causal_align,
                    window_size, softcap, alibi_slopes, dropout_p, dropout_mask, precision):
    """Checked varlen arguments: (q, k, v, cu_q, cu_k, opts, slopes (batch, hq) or None,
    dropout mask broadcast to (batch, hq, max_seqlen_q, max_seqlen_k) or None)."""
    q = _as_real_array(q, "q")
    k = _as_real_array(k, "k")
    v = _as_real_array(v, "v")
    _require_ndim(q, "q", "total_q, nheads_q, headdim")
    _require_ndim(k, "k", "total_k, nheads_kv, headdim")
    _require_ndim(v, "v", "total_k, nheads_kv, headdim_v")
    _require_dim(v, "v", 0, "total_k", "k.shape[0]", k.shape[0])
    _require_dim(v, "v", 1, "nheads_kv", "k.shape[1]", k.shape[1])
    _require_dim(k, "k", 2, "headdim", "q.shape[2]", q.shape[2])
    _check_heads(q, k, 1, 1, 2)
    opts = _validate_options(
        headdim=q.shape[2], softmax_scale=softmax_scale, causal=causal,
        causal_align=causal_align, window_size=window_size, softcap=softcap,
        dropout_p=dropout_p, precision=precision,
    )
    cu_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], "q.shape[0] (total_q)")
    cu_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], "k.shape[0] (total_k)")
    if cu_k.shape[0] != cu_q.shape[0]:
        raise ValueError(
            f"cu_seqlens_k.shape[0] (batch + 1) must equal cu_seqlens_q.shape[0] = "
            f"{cu_q.shape[0]}, got {cu_k.shape[0]}"
        )
    batch, hq = cu_q.shape[0] - 1, q.shape[1]
    max_sq = int(np.diff(cu_q).max(initial=0))
    max_sk = int(np.diff(cu_k).max(initial=0))
    slopes = _check_slopes(alibi_slopes, batch, hq)
    mask = _check_dropout_mask(
        dropout_mask, opts.dropout_p, (batch, hq, max_sq, max_sk),
        "(batch, nheads_q, max_seqlen_q, max_seqlen_k)",
    )
    return q, k, v, cu_q, cu_k, opts, slopes, mask


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale=None,
                         causal=False, causal_align="bottom_right", window_size=(-1, -1),
                         softcap=0.0, alibi_slopes=None, bias=None, dropout_p=0.0,
                         dropout_mask=None, return_lse=False, precision="float64"):
    """Attention on packed variable-length sequences, as flash_attn_varlen_func.

    Args:
        q: (total_q, nheads_q, headdim); k: (total_k, nheads_kv, headdim);
        v: (total_k, nheads_kv, headdim_v).
        cu_seqlens_q, cu_seqlens_k: integer (batch + 1,), non-decreasing, from 0 to the
            totals; sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] and likewise for k/v.
            Zero-length sequences are allowed.
        alibi_slopes: (nheads_q,) or (batch, nheads_q), indexed by sequence.
        bias: not supported (ValueError if given).
        dropout_mask: bool, broadcastable to (batch, nheads_q, max_seqlen_q, max_seqlen_k);
            sequence b uses [b, :, :seqlen_q_b, :seqlen_k_b].
        Other options as ``attention_ref``; each sequence has its own off.

    Returns:
        out (total_q, nheads_q, headdim_v) float64, and if return_lse also
        lse (nheads_q, total_q) float64.
    """
    if bias is not None:
        raise ValueError("bias is not supported by attention_varlen_ref; pass bias=None")
    q, k, v, cu_q, cu_k, opts, slopes, mask = _prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, causal_align, window_size,
        softcap, alibi_slopes, dropout_p, dropout_mask, precision)
    batch, hq = cu_q.shape[0] - 1, q.shape[1]

    out = np.zeros((q.shape[0], hq, v.shape[2]), dtype=np.float64)
    lse = np.full((hq, q.shape[0]), -np.inf, dtype=np.float64)
    for bi in range(batch):
        q0, q1, k0, k1 = cu_q[bi], cu_q[bi + 1], cu_k[bi], cu_k[bi + 1]
        if q1 == q0:
            continue
        out_b, lse_b, _ = _attend(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], opts,
            None if slopes is None else slopes[bi:bi + 1],
            None,
            None if mask is None else mask[bi:bi + 1, :, : q1 - q0, : k1 - k0],
            want_probs=False,
        )
        out[q0:q1] = out_b[0]
        lse[:, q0:q1] = lse_b[0]
    return (out, lse) if return_lse else out


def attention_varlen_grad_ref(q, k, v, dout, cu_seqlens_q, cu_seqlens_k, *,
                              softmax_scale=None, causal=False, causal_align="bottom_right",
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              dropout_p=0.0, dropout_mask=None, precision="float64"):
    """Gradients (dq, dk, dv) of ``sum(attention_varlen_ref(...) * dout)``.

    Arguments as ``attention_varlen_ref`` plus ``dout`` (total_q, nheads_q, headdim_v); each
    sequence's gradients are ``attention_grad_ref``'s for that sequence alone (so keys of a
    sequence with no queries, and queries with no keys, get zero gradients). Returns
    float64 arrays shaped like q, k and v.
    """
    q, k, v, cu_q, cu_k, opts, slopes, full = _prepare_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, causal_align, window_size,
        softcap, alibi_slopes, dropout_p, dropout_mask, precision)
    dout = _as_real_array(dout, "dout")
    batch = cu_q.shape[0] - 1
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for bi in range(batch):
        q0, q1, k0, k1 = cu_q[bi], cu_q[bi + 1], cu_k[bi], cu_k[bi + 1]
        if q1 == q0 or k1 == k0:
            continue
        mask = None if full is None else full[bi:bi + 1, :, : q1 - q0, : k1 - k0]
        g = attention_grad_ref(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], dout[None, q0:q1],
            softmax_scale=opts.softmax_scale, causal=causal, causal_align=causal_align,
            window_size=window_size, softcap=softcap,
            alibi_slopes=None if slopes is None else slopes[bi:bi + 1],
            dropout_p=dropout_p, dropout_mask=mask, precision=precision,
        )
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv



# Philox4x32-10 constants (Random123): round multipliers and the Weyl key increments.
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 of ``counter`` (..., 4) under ``key`` (..., 2), both uint32-valued
    and broadcast against each other; returns the (..., 4) uint32 outputs.

    Each of the 10 rounds maps (c0, c1, c2, c3) to (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2),
    hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)) with 64-bit products split into 32-bit halves; the
    key grows by (W0, W1) between rounds.
    """
    ctr = np.asarray(counter, dtype=np.uint64) & np.uint64(_U32)
    key = np.asarray(key, dtype=np.uint64) & np.uint64(_U32)
    ctr, key = np.broadcast_arrays(ctr[..., :, None], key[..., None, :])
    c = [ctr[..., i, 0].copy() for i in range(4)]
    k0, k1 = key[..., 0, 0].copy(), key[..., 0, 1].copy()
    mask, m0, m1 = np.uint64(_U32), np.uint64(_PHILOX_M0), np.uint64(_PHILOX_M1)
    for rnd in range(10):
        if rnd:
            k0 = (k0 + np.uint64(_PHILOX_W0)) & mask
            k1 = (k1 + np.uint64(_PHILOX_W1)) & mask
        p0 = c[0] * m0           # < 2^64: both factors are below 2^32
        p1 = c[2] * m1
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask,
             (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return np.stack(c, axis=-1).astype(np.uint32)


def dropout_threshold(dropout_p: float) -> int:
    """The 32-bit threshold for ``dropout_p`` in [0, 1): a uniform u is kept iff
    u >= threshold, so the keep probability is 1 - threshold / 2^32."""
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return min(round(p * 2.0 ** 32), _U32)


def _check_uint(value, name: str, bits: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int in [0, 2^{bits}), got {value!r}")
    if not 0 <= int(value) < 2 ** bits:
        raise ValueError(f"{name} must be in [0, 2^{bits}), got {int(value)}")
    return int(value)


def dropout_mask_ref(seed, offset, batch, nheads, seqlen_q, seqlen_k, p) -> np.ndarray:
    """The keep mask (batch, nheads, seqlen_q, seqlen_k) bool (True = keep) that every
    portattn kernel draws for ``dropout_p = p`` with ``dropout_seed = seed`` (in
    [0, 2^64)) and ``dropout_offset = offset`` (in [0, 2^32)); see "Dropout generator" in
    the module docstring.  Element (b, h, i, j) depends on (seed, offset, b, h, i, j)
    alone, so any sub-block of a larger call's mask is the same block here."""
    seed = _check_uint(seed, "seed", 64)
    offset = _check_uint(offset, "offset", 32)
    dims = {}
    for name, value in (("batch", batch), ("nheads", nheads), ("seqlen_q", seqlen_q),
                        ("seqlen_k", seqlen_k)):
        dims[name] = _check_uint(value, name, 31)
    b, h, sq, sk = dims["batch"], dims["nheads"], dims["seqlen_q"], dims["seqlen_k"]
    threshold = dropout_threshold(p)
    groups = -(-sk // 4)
    ctr = np.empty((b, h, sq, groups, 4), dtype=np.uint64)
    ctr[..., 0] = np.arange(groups, dtype=np.uint64)
    ctr[..., 1] = np.arange(sq, dtype=np.uint64)[:, None]
    bh = (np.arange(b, dtype=np.uint64)[:, None] * np.uint64(h)
          + np.arange(h, dtype=np.uint64)[None, :]) & np.uint64(_U32)
    ctr[..., 2] = bh[:, :, None, None]
    ctr[..., 3] = offset
    words = philox4x32_10(ctr, (seed & _U32, seed >> 32))
    keep = words.reshape(b, h, sq, groups * 4)[..., :sk] >= np.uint32(threshold)
    return np.ascontiguousarray(keep)


def _check_index_array(arr, name: str, shape_desc: str, shape: tuple) -> np.ndarray:
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}.dtype must be an integer dtype (int32), got {a.dtype}")
    if a.shape != shape:
        raise ValueError(
            f"{name} shape must be {shape_desc} = {_shape_str(shape)}, got {_shape_str(a.shape)}"
        )
    return a.astype(np.int64)


def attention_kvcache_ref(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens=None,
                          cache_batch_idx=None, block_table=None, softmax_scale=None,
                          causal=False, causal_align="bottom_right", window_size=(-1, -1),
                          softcap=0.0, alibi_slopes=None, bias=None, dropout_p=0.0,
                          dropout_mask=None, return_lse=False, precision="float64"):
    """Attention against a (possibly paged) KV cache, as flash_attn_with_kvcache.

    Args:
        q: (batch, seqlen_q, nheads_q, headdim).
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_kv, headdim[_v]), or paged
            (num_blocks, page_size, nheads_kv, headdim[_v]) when block_table is given.
        k, v: optional new keys/values (batch, seqlen_new, nheads_kv, headdim[_v]),
            written into copies of the caches at cache_seqlens[b] onwards.
        cache_seqlens: int or integer (batch,): valid keys already cached per row
            (default: the full capacity).  cache_seqlens + seqlen_new must fit.
        cache_batch_idx: integer (batch,): cache row used by each batch row (default
            0..batch-1, then batch_cache must equal batch).  Not with block_table.
        block_table: integer (batch, max_blocks_per_seq): page indices into the paged
            cache; entries covering the attended keys must be in [0, num_blocks).
        bias, dropout_mask: broadcastable to (batch, nheads_q, seqlen_q, capacity),
            indexed by logical key position.
        Other options as ``attention_ref``, with off = seqlen_k_b - seqlen_q per row,
        seqlen_k_b = cache_seqlens[b] + seqlen_new.

    Returns:
        (out, k_cache_after, v_cache_after), plus lse (batch, nheads_q, seqlen_q) last
        if return_lse.  out is (batch, seqlen_q, nheads_q, headdim_v) float64; the
        caches are updated copies with the input caches' dtypes and shapes.
    """
    q = _as_real_array(q, "q")
    k_cache = _as_real_array(k_cache, "k_cache")
    v_cache = _as_real_array(v_cache, "v_cache")
    paged = block_table is not None
    rows = "num_blocks, page_size" if paged else "batch_cache, seqlen_cache"
    _require_ndim(q, "q", "batch, seqlen_q, nheads_q, headdim")
    _require_ndim(k_cache, "k_cache", f"{rows}, nheads_kv, headdim")
    _require_ndim(v_cache, "v_cache", f"{rows}, nheads_kv, headdim_v")
    _require_dim(v_cache, "v_cache", 0, rows.split(", ")[0], "k_cache.shape[0]", k_cache.shape[0])
    _require_dim(v_cache, "v_cache", 1, rows.split(", ")[1], "k_cache.shape[1]", k_cache.shape[1])
    _require_dim(v_cache, "v_cache", 2, "nheads_kv", "k_cache.shape[2]", k_cache.shape[2])
    _require_dim(k_cache, "k_cache", 3, "headdim", "q.shape[3]", q.shape[3])
    _check_heads(q, k_cache, 2, 2, 3)
    opts = _validate_options(
        headdim=q.shape[3], softmax_scale=softmax_scale, causal=causal,
        causal_align=causal_align, window_size=window_size, softcap=softcap,
        dropout_p=dropout_p, precision=precision,
    )
    b, sq, hq, _ = q.shape
    hkv = k_cache.shape[2]

    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values), got only one")
    s_new = 0
    if k is not None:
        k = _as_real_array(k, "k")
        v = _as_real_array(v, "v")
        _require_ndim(k, "k", "batch, seqlen_new, nheads_kv, headdim")
        _require_ndim(v, "v", "batch, seqlen_new, nheads_kv, headdim_v")
        _require_dim(k, "k", 0, "batch", "q.shape[0]", b)
        _require_dim(v, "v", 0, "batch", "q.shape[0]", b)
        _require_dim(v, "v", 1, "seqlen_new", "k.shape[1]", k.shape[1])
        _require_dim(k, "k", 2, "nheads_kv", "k_cache.shape[2]", hkv)
        _require_dim(v, "v", 2, "nheads_kv", "k_cache.shape[2]", hkv)
        _require_dim(k, "k", 3, "headdim", "q.shape[3]", q.shape[3])
        _require_dim(v, "v", 3, "headdim_v", "v_cache.shape[3]", v_cache.shape[3])
        s_new = k.shape[1]

    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (paged cache)")
        table = np.asarray(block_table)
        if table.ndim != 2 or table.shape[0] != b:
            raise ValueError(
                f"block_table shape must be (batch, max_blocks_per_seq) with batch = {b}, "
                f"got {_shape_str(table.shape)}"
            )
        table = _check_index_array(table, "block_table", "(batch, max_blocks_per_seq)",
                                   table.shape)
        page_size = k_cache.shape[1]
        if page_size < 1:
            raise ValueError(f"k_cache.shape[1] (page_size) must be >= 1, got {page_size}")
        capacity = table.shape[1] * page_size
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None:
            if k_cache.shape[0] != b:
                raise ValueError(
                    f"k_cache.shape[0] (batch_cache) must equal q.shape[0] = {b} when "
                    f"cache_batch_idx is None, got {k_cache.shape[0]}"
                )
            cache_rows = np.arange(b)
        else:
            cache_rows = _check_index_array(cache_batch_idx, "cache_batch_idx", "(batch,)", (b,))
            bad = (cache_rows < 0) | (cache_rows >= k_cache.shape[0])
            if np.any(bad):
                raise ValueError(
                    f"cache_batch_idx entries must be in [0, k_cache.shape[0] = "
                    f"{k_cache.shape[0]}), got {cache_rows[bad].tolist()}"
                )

    if cache_seqlens is None:
        seqlens = np.full(b, capacity, dtype=np.int64)
    elif np.ndim(cache_seqlens) == 0:
        seqlens = np.full(b, int(_check_index_array(cache_seqlens, "cache_seqlens", "()", ())),
                          dtype=np.int64)
    else:
        seqlens = _check_index_array(cache_seqlens, "cache_seqlens", "(batch,)", (b,))
    if np.any(seqlens < 0):
        raise ValueError(f"cache_seqlens must be >= 0, got {seqlens.tolist()}")
    if np.any(seqlens + s_new > capacity):
        raise ValueError(
            f"cache_seqlens + seqlen_new must be <= cache capacity = {capacity}, got "
            f"cache_seqlens = {seqlens.tolist()} with seqlen_new = {s_new}"
        )
    seqlens_k = seqlens + s_new

    if paged:
        for bi in range(b):
            needed = table[bi, : -(-int(seqlens_k[bi]) // page_size)]
            bad = (needed < 0) | (needed >= k_cache.shape[0])
            if np.any(bad):
                raise ValueError(
                    f"block_table[{bi}] entries must be in [0, num_blocks = "
                    f"{k_cache.shape[0]}), got {needed[bad].tolist()}"
                )

    target = (b, hq, sq, capacity)
    desc = "(batch, nheads_q, seqlen_q, capacity)"
    slopes = _check_slopes(alibi_slopes, b, hq)
    bias = _check_bias(bias, target, desc)
    mask = _check_dropout_mask(dropout_mask, opts.dropout_p, target, desc)

    k_after = np.array(k_cache, copy=True)
    v_after = np.array(v_cache, copy=True)

    def locate(bi, positions):
        """(cache row or page indices, slot indices) of logical positions of batch row bi."""
        if paged:
            return table[bi, positions // page_size], positions % page_size
        return np.full_like(positions, cache_rows[bi]), positions

    if s_new:
        for bi in range(b):
            rows_idx, slots = locate(bi, np.arange(seqlens[bi], seqlens_k[bi]))
            k_after[rows_idx, slots] = k[bi]
            v_after[rows_idx, slots] = v[bi]

    out = np.empty((b, sq, hq, v_cache.shape[3]), dtype=np.float64)
    lse = np.empty((b, hq, sq), dtype=np.float64)
    for bi in range(b):
        skb = int(seqlens_k[bi])
        rows_idx, slots = locate(bi, np.arange(skb))
        out_b, lse_b, _ = _attend(
            q[bi:bi + 1], k_after[rows_idx, slots][None], v_after[rows_idx, slots][None], opts,
            None if slopes is None else slopes[bi:bi + 1],
            None if bias is None else bias[bi:bi + 1, :, :, :skb],
            None if mask is None else mask[bi:bi + 1, :, :, :skb],
            want_probs=False,
        )
        out[bi] = out_b[0]
        lse[bi] = lse_b[0]
    return (out, k_after, v_after, lse) if return_lse else (out, k_after, v_after)
