"""flash_attn_with_kvcache: attention against a contiguous or paged KV cache, with the new
keys/values appended in place, GQA packing and split-KV (Flash-Decoding)."""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import numpy as np

from . import _arrays
from .api import (LOG2E, _alibi_view, _check_4d, _host_ints, _int32_array, _same_place,
                  _score_options, _vector_ok)
from .arch import detect, forced_path
from .arch.device import DeviceInfo
from .arch.cache import decode_plan
from .arch.plan_decode import MAX_SPLITS, DecodePlan, DecodeProblem
from .spec import DTYPES, MAX_HEAD_DIM


@dataclass(frozen=True)
class KVCacheExplanation:
    """What flash_attn_with_kvcache would run for these arguments, and why."""
    device: DeviceInfo
    problem: DecodeProblem
    plan: DecodePlan

    def __str__(self) -> str:
        p = self.problem
        head = (f"portattn on {self.device.describe()}\n"
                f"kvcache problem: {p.dtype}, batch {p.batch}, seqlen_q {p.seqlen_q}, longest "
                f"row {p.seqlen_k} keys, heads {p.nheads_q}/{p.nheads_kv}, head dim "
                f"{p.head_dim}, {'paged' if p.paged else 'contiguous'} cache")
        return head + "\n" + self.plan.describe()


@dataclass
class _KV:
    device: DeviceInfo
    problem: DecodeProblem
    plan: DecodePlan
    q: _arrays.ArrayView
    k_cache: _arrays.ArrayView
    v_cache: _arrays.ArrayView
    k: _arrays.ArrayView | None
    v: _arrays.ArrayView | None
    seqlens: _arrays.ArrayView | None
    seqlen_const: int
    cache_idx: _arrays.ArrayView | None
    block_table: _arrays.ArrayView | None
    alibi: _arrays.ArrayView | None
    capacity: int
    scale: float
    softcap: float
    window: tuple
    top_left: bool


# Index values live on the GPU, so checking them before launch needs a host copy: a sync
# (0.11-0.26 ms per decode step on an H100, benchmarks/h100_decode_*) that CUDA-graph capture
# forbids. On by default, so a bad index raises before launch; check_indices=False, or this
# variable set to 0, skips it (flash_attn never checks), and the kernels then clamp
# out-of-range values inside the cache.
CHECK_INDICES_ENV = "PORTATTN_CHECK_INDICES"


def _prepare(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table,
             softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits,
             return_softmax_lse, causal_align, check_indices) -> _KV:
    qv = _arrays.view(q, "q")
    kc, vc = _arrays.view(k_cache, "k_cache"), _arrays.view(v_cache, "v_cache")
    if not qv.on_gpu:
        raise ValueError("q must be on a CUDA device, got cpu")
    for name, x in (("k_cache", kc), ("v_cache", vc)):
        _same_place(x, qv, name)
    paged = block_table is not None
    rows = "(num_blocks, page_size" if paged else "(batch_cache, seqlen_cache"
    for name, x in (("q", qv), ("k_cache", kc), ("v_cache", vc)):
        if len(x.shape) != 4:
            what = "(batch, seqlen_q, nheads, headdim)" if name == "q" else \
                f"{rows}, nheads_kv, headdim)"
            raise ValueError(f"{name} must have 4 dims {what}, got shape {x.shape}")
        _check_4d(x, name)
    if qv.dtype not in DTYPES:
        raise TypeError(f"q.dtype must be one of {DTYPES}, got {qv.dtype}")
    for name, x in (("k_cache", kc), ("v_cache", vc)):
        if x.dtype != qv.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({qv.dtype}), got {x.dtype}")
    batch, sq, hq, d = qv.shape
    nrows, slots, hkv, _ = kc.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q.shape[-1] (head dim) must be in 1..{MAX_HEAD_DIM}, got {d}")
    for axis, what in ((0, rows.split(", ")[0][1:]), (1, rows.split(", ")[1]), (2, "nheads_kv")):
        if vc.shape[axis] != kc.shape[axis]:
            raise ValueError(f"v_cache.shape[{axis}] ({what}) must equal k_cache.shape[{axis}] "
                             f"= {kc.shape[axis]}, got {vc.shape[axis]}")
    for name, x in (("k_cache", kc), ("v_cache", vc)):
        if x.shape[3] != d:
            raise ValueError(f"{name}.shape[-1] (head dim) must equal q.shape[-1] = {d}, "
                             f"got {x.shape[3]}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q.shape[2] (nheads_q = {hq}) must be a multiple of k_cache.shape[2] "
                         f"(nheads_kv), got {hkv}")

    if (k is None) != (v is None):
        raise ValueError("k and v (new keys and values) must be given together, got only "
                         f"{'k' if v is None else 'v'}")
    kn = vn = None
    s_new = 0
    if k is not None:
        kn, vn = _arrays.view(k, "k"), _arrays.view(v, "v")
        for name, x in (("k", kn), ("v", vn)):
            _same_place(x, qv, name)
            _check_4d(x, name)
            if x.dtype != qv.dtype:
                raise TypeError(f"{name}.dtype must equal q.dtype ({qv.dtype}), got {x.dtype}")
            want = (batch, kn.shape[1], hkv, d)
            if tuple(x.shape) != want:
                raise ValueError(f"{name}.shape must be (batch, seqlen_new, nheads_kv, headdim) "
                                 f"= {want}, got {x.shape}")
        s_new = kn.shape[1]

    table = cidx = None
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (paged "
                             "cache): pass one of them")
        table = _int32_array(block_table, "block_table", qv, 2, "batch, max_blocks_per_seq")
        if table.shape[0] != batch:
            raise ValueError(f"block_table.shape[0] (batch) must equal q.shape[0] = {batch}, "
                             f"got {table.shape[0]}")
        if slots < 1:
            raise ValueError(f"k_cache.shape[1] (page_size) must be >= 1, got {slots}")
        capacity = table.shape[1] * slots
    else:
        capacity = slots
        if cache_batch_idx is None:
            if nrows != batch:
                raise ValueError(f"k_cache.shape[0] (batch_cache) must equal q.shape[0] = "
                                 f"{batch} when cache_batch_idx is None, got {nrows}")
        else:
            cidx = _int32_array(cache_batch_idx, "cache_batch_idx", qv, 1, "batch")
            if cidx.shape[0] != batch:
                raise ValueError(f"cache_batch_idx.shape must be (batch,) = ({batch},), "
                                 f"got {cidx.shape}")

    seq_view, seqlen_const = None, capacity
    if cache_seqlens is None:
        pass
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        seqlen_const = int(cache_seqlens)
        if not 0 <= seqlen_const <= capacity - s_new:
            raise ValueError(f"cache_seqlens + seqlen_new must be in 0..cache capacity = "
                             f"{capacity}, got cache_seqlens = {seqlen_const} with seqlen_new "
                             f"= {s_new}")
    else:
        if isinstance(cache_seqlens, bool):
            raise TypeError("cache_seqlens must be an int or an int32 array of shape (batch,), "
                            "got bool")
        seq_view = _int32_array(cache_seqlens, "cache_seqlens", qv, 1, "batch")
        if seq_view.shape[0] != batch:
            raise ValueError(f"cache_seqlens.shape must be (batch,) = ({batch},), "
                             f"got {seq_view.shape}")
    if cache_seqlens is None and s_new:
        raise ValueError(f"cache_seqlens is required when appending k/v (seqlen_new = {s_new}):"
                         f" without it the cache is taken as full ({capacity} keys)")

    softmax_scale, softcap, (left, right) = _score_options(
        d, softmax_scale, softcap, window_size, causal, causal_align)
    if (not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool)
            or not 0 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be an int in 0..{MAX_SPLITS} (0: the plan chooses), "
                         f"got {num_splits!r}")
    if check_indices is None:
        check_indices = os.environ.get(CHECK_INDICES_ENV, "1") not in ("", "0")
    for name, flag in (("return_softmax_lse", return_softmax_lse), ("causal", causal),
                       ("check_indices", check_indices)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    alibi = _alibi_view(alibi_slopes, qv, batch, hq)

    # Index values live on the GPU: one host copy each checks them before any launch.
    longest = capacity if seq_view is not None or cache_seqlens is None else seqlen_const + s_new
    if check_indices and (seq_view is not None or table is not None or cidx is not None):
        lens = np.full(batch, seqlen_const, dtype=np.int64)
        if seq_view is not None:
            lens = _host_ints(seq_view)
            bad = (lens < 0) | (lens + s_new > capacity)
            if np.any(bad):
                raise ValueError(
                    f"cache_seqlens + seqlen_new must be in 0..cache capacity = {capacity} "
                    f"(seqlen_new = {s_new}), got cache_seqlens = "
                    f"{lens[bad].tolist()[:8]} at batch rows {np.nonzero(bad)[0].tolist()[:8]}")
        total = lens + s_new
        longest = int(total.max(initial=0))
        if cidx is not None:
            rows_ = _host_ints(cidx)
            bad = (rows_ < 0) | (rows_ >= nrows)
            if np.any(bad):
                raise ValueError(f"cache_batch_idx entries must be in [0, k_cache.shape[0] = "
                                 f"{nrows}), got {rows_[bad].tolist()[:8]}")
        if table is not None:
            pages = _host_ints(table)
            need = -(-total // slots)
            used = np.arange(table.shape[1])[None, :] < need[:, None]
            bad = used & ((pages < 0) | (pages >= nrows))
            if np.any(bad):
                bi, bj = (int(x[0]) for x in np.nonzero(bad))
                raise ValueError(f"block_table entries covering the keys must be in "
                                 f"[0, num_blocks = {nrows}), got block_table[{bi}, {bj}] = "
                                 f"{int(pages[bi, bj])}")

    aligned = d % 8 == 0 and all(_vector_ok(x) for x in (qv, kc, vc))
    problem = DecodeProblem(dtype=qv.dtype, head_dim=d, seqlen_q=sq, seqlen_k=longest,
                            batch=batch, nheads_q=hq, nheads_kv=hkv, paged=paged,
                            num_splits=int(num_splits), aligned=aligned)
    device = detect(qv.device)
    plan = decode_plan(device, problem, forced_path())
    return _KV(device, problem, plan, qv, kc, vc, kn, vn, seq_view, seqlen_const, cidx, table,
               alibi, capacity, softmax_scale, softcap, (left, right),
               causal_align == "top_left")


# Split-merge counters, one int32 per (batch, KV head, row tile) group, per (device, stream):
# zero between launches, because the CTA that merges a group resets its counter, and
# launches on one stream never overlap. Grown (zeroed on the stream) when a call needs more.
_COUNTERS: dict = {}


def _counters(device, n: int, stream_ptr: int):
    key = (device, stream_ptr)
    buf = _COUNTERS.get(key)
    if buf is None or buf.size < n:
        import cupy
        stream = cupy.cuda.ExternalStream(stream_ptr, device)
        # Allocating (and zeroing) is not capturable; a graph must find them in place.
        if getattr(stream, "is_capturing", lambda: False)():
            raise ValueError(
                "split-KV decoding keeps its merge counters per stream, and this stream has "
                "none yet: run the call once on the capturing stream before CUDA-graph capture "
                "(torch.cuda.graph captures on its own stream unless given stream=), or pass "
                "num_splits=1")
        with cupy.cuda.Device(device), stream:
            buf = cupy.zeros(max(n, 4096), dtype=cupy.int32)
        _COUNTERS[key] = buf
    return buf


def _ptr(a) -> int:
    return a.ptr if a is not None else 0


# decode_fwd.cu's parameter lists as struct formats (compile.launch): pointers, 64-bit
# strides, ints, floats, in PORTATTN_DECODE_PARAMS order, then decode_append_kernel's.
_DECODE_FORMAT = "@12Q15q14i2f2i"
_APPEND_FORMAT = "@7Q13q7iq"


def _launch(p: _KV, with_lse: bool):
    from .compile import get_function, launch
    import cupy
    batch, sq, hq, d = p.q.shape
    hkv = p.k_cache.shape[2]
    out = _arrays.empty(p.q, (batch, sq, hq, d), p.q.dtype)
    ov = _arrays.view(out, "out")
    lse = _arrays.empty(p.q, (batch, hq, sq), "float32") if with_lse else None
    paged = p.block_table is not None
    page_size = p.k_cache.shape[1] if paged else 0
    page_shift = page_size.bit_length() - 1 if paged and page_size & (page_size - 1) == 0 else -1
    bt_sb = p.block_table.strides[0] if paged else 0
    nblocks = p.k_cache.shape[0]
    kc, vc = p.k_cache, p.v_cache
    plan = p.plan
    dev = p.q.device
    stream = _arrays.stream_ptr(p.q)
    with cupy.cuda.Device(dev):
        splits = plan.num_splits
        part = part_lse = counters = None
        if splits > 1 and batch > 0 and sq > 0:
            # First: under capture, missing counters raise before anything is launched.
            counters = _counters(dev, batch * hkv * plan.row_tiles, stream)
            part = _arrays.empty(p.q, (splits, batch * hq * sq, d), "float32")
            part_lse = _arrays.empty(p.q, (splits, batch * hq * sq), "float32")
        if p.k is not None and p.k.shape[1] > 0 and batch > 0:
            total = batch * p.k.shape[1] * hkv * d
            spec = plan.append_spec
            blocks = min(-(-total // spec.threads), 65535)
            launch(get_function(spec, dev), blocks, spec.threads, _APPEND_FORMAT, (
                _ptr(p.k), _ptr(p.v), _ptr(kc), _ptr(vc), _ptr(p.seqlens), _ptr(p.cache_idx),
                _ptr(p.block_table), *p.k.strides[:3], *p.v.strides[:3], *kc.strides[:3],
                *vc.strides[:3], bt_sb, p.seqlen_const, p.k.shape[1], hkv, d,
                max(page_size, 1), nblocks, p.capacity, total), stream)
        if batch == 0 or sq == 0:
            return out, lse
        grid = batch * hkv * plan.grid
        alibi_sb, alibi_sh = 0, 0
        if p.alibi is not None:
            alibi_sb, alibi_sh = ((0, p.alibi.strides[0]) if len(p.alibi.shape) == 1
                                  else p.alibi.strides)
        vec = ((_vector_ok(p.q) << 0) | (_vector_ok(kc) << 1) | (_vector_ok(vc) << 2)
               | (plan.l2_hint << 3))
        spec = plan.spec
        launch(get_function(spec, dev), grid, spec.threads, _DECODE_FORMAT, (
            p.q.ptr, kc.ptr, vc.ptr, ov.ptr, _arrays.view(lse, "lse").ptr if lse is not None else 0,
            _arrays.view(part, "part").ptr if part is not None else 0,
            _arrays.view(part_lse, "part_lse").ptr if part is not None else 0,
            counters.data.ptr if counters is not None else 0, _ptr(p.seqlens),
            _ptr(p.cache_idx), _ptr(p.block_table), _ptr(p.alibi),
            *p.q.strides[:3], *kc.strides[:3], *vc.strides[:3], *ov.strides[:3],
            bt_sb, alibi_sb, alibi_sh,
            batch, p.seqlen_const, p.k.shape[1] if p.k is not None else 0, hq, hq // hkv, sq,
            d, max(page_size, 1), page_shift, nblocks, p.capacity, p.window[0], p.window[1],
            int(p.top_left), p.scale * LOG2E, p.softcap * LOG2E, splits, vec), stream)
    return out, lse


def _refuse_autograd(q: _arrays.ArrayView) -> None:
    if q.kind != "torch":
        return
    import torch
    if torch.is_grad_enabled() and q.obj.requires_grad:
        raise NotImplementedError(
            "flash_attn_with_kvcache has no backward pass (flash_attn's has none either): "
            "call under torch.no_grad() (or detach q) for inference")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                            cache_batch_idx=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False, *,
                            causal_align="bottom_right", check_indices=None):
    """Attention of q against a KV cache, flash_attn's names, defaults and layout.

    q: (batch, seqlen_q, nheads, headdim). k_cache/v_cache: (batch_cache, seqlen_cache,
    nheads_kv, headdim), or paged (num_blocks, page_size, nheads_kv, headdim) with
    ``block_table`` (batch, max_blocks_per_seq) int32; any page size >= 1. ``k``/``v``
    (batch, seqlen_new, nheads_kv, headdim), if given, are written into the caches in
    place at ``cache_seqlens`` (int or (batch,) int32) before attending; row b then sees
    cache_seqlens[b] + seqlen_new keys, causal aligned bottom-right to that length.
    ``cache_batch_idx`` (batch,) int32 picks each row's cache row (not with block_table).
    ``num_splits``: 0 lets the plan split the keys across CTAs (Flash-Decoding) from the
    SM count, batch x heads and length; n > 0 forces n. Returns out, and (out, lse) with
    lse (batch, nheads, seqlen_q) float32 when ``return_softmax_lse``.

    portattn keyword-only additions: ``causal_align`` as in flash_attn_func;
    ``check_indices``: True (the default None means True unless PORTATTN_CHECK_INDICES=0)
    copies cache_seqlens, block_table and cache_batch_idx to the host before launch (one
    sync) and raises ValueError naming any out-of-range value. False skips that sync, as
    flash_attn does (needed under CUDA-graph capture); out-of-range values are then clamped
    inside the cache (never read or written out of bounds, but the result is meaningless).
    Without index arrays (cache_seqlens None or an int) nothing is copied either way.
    """
    p = _prepare(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table,
                 softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits,
                 return_softmax_lse, causal_align, check_indices)
    _refuse_autograd(p.q)
    out, lse = _launch(p, with_lse=return_softmax_lse)
    return (out, lse) if return_softmax_lse else out


def explain_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                    cache_batch_idx=None, block_table=None, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, num_splits=0,
                    return_softmax_lse=False, *, causal_align="bottom_right",
                    check_indices=None) -> KVCacheExplanation:
    """The plan flash_attn_with_kvcache would run (same validation, nothing launched)."""
    p = _prepare(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table,
                 softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits,
                 return_softmax_lse, causal_align, check_indices)
    return KVCacheExplanation(p.device, p.problem, p.plan)
