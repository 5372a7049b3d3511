"""Argument validation of flash_attn_varlen_func, explain_varlen and
flash_attn_varlen_backward, with no GPU.

Fake __cuda_array_interface__ arrays carry pointers nobody dereferences; cu_seqlens values
"on the GPU" are registered per fake array and read by a stand-in for the host copy.
detect() is replaced by a sentinel, so "valid" means "got as far as asking for the GPU".
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import portattn
from portattn import api, varlen
from portattn.arch import device_from_arch

from fakecuda import ReachedDetect, arr, fake_gpu

HQ, HKV, D = 8, 2, 64
LENS_Q, LENS_K = [3, 0, 5], [4, 2, 0]
ENTRY_POINTS = [portattn.flash_attn_varlen_func, portattn.explain_varlen]


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    fake_gpu(monkeypatch, api, varlen)


def cu(lengths, dtype="int32"):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return arr(len(offsets), dtype=dtype, values=offsets)


def call(fn=portattn.flash_attn_varlen_func, lens_q=LENS_Q, lens_k=LENS_K, hq=HQ, hkv=HKV,
         d=D, dtype="float16", cu_q=None, cu_k=None, max_q=None, max_k=None, **kw):
    tq, tk = sum(lens_q), sum(lens_k)
    q = kw.pop("q", arr(tq, hq, d, dtype=dtype))
    k = kw.pop("k", arr(tk, hkv, d, dtype=dtype))
    v = kw.pop("v", arr(tk, hkv, d, dtype=dtype))
    return fn(q, k, v, cu_q if cu_q is not None else cu(lens_q),
              cu_k if cu_k is not None else cu(lens_k),
              max(lens_q, default=0) if max_q is None else max_q,
              max(lens_k, default=0) if max_k is None else max_k, **kw)


def reaches(**kw):
    with pytest.raises(ReachedDetect):
        call(**kw)


def refused(exc, match, **kw):
    with pytest.raises(exc, match=match):
        call(**kw)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("kw", [
    dict(),
    dict(causal=True),
    dict(causal=True, causal_align="top_left"),
    dict(window_size=(2, 1)),
    dict(softcap=20.0),
    dict(return_lse=True),
    dict(deterministic=True),
    dict(max_q=100, max_k=7),                       # larger than the longest is allowed
    dict(lens_q=[0], lens_k=[0]),                   # one empty sequence
    dict(lens_q=[4, 4], lens_k=[9, 1], hkv=8),
    dict(alibi_slopes=arr(HQ, dtype="float32")),
    dict(alibi_slopes=arr(3, HQ, dtype="float32")),
    dict(dropout_p=0.25, dropout_seed=7, dropout_offset=3),
    dict(return_attn_probs=True),
], ids=repr)
def test_valid_calls_reach_detect(fn, kw):
    reaches(fn=fn, **kw)


@given(lens=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300)), min_size=1,
                     max_size=12))
@example(lens=[(1, 1)])
@example(lens=[(0, 5), (17, 0), (97, 1025)])
def test_any_nonnegative_lengths_are_accepted(lens):
    reaches(lens_q=[a for a, _ in lens], lens_k=[b for _, b in lens])


@pytest.mark.parametrize("kw, exc, match", [
    (dict(q=arr(1, 8, HQ, D)), ValueError, r"q must have 3 dims \(total_q, nheads, headdim\)"),
    (dict(v=arr(5, HKV, D)), ValueError, r"v.shape\[0\] \(total_k\) must equal k.shape\[0\] = 6, got 5"),
    (dict(v=arr(6, 1, D)), ValueError, r"v.shape\[1\] \(nheads_kv\) must equal k.shape\[1\] = 2, got 1"),
    (dict(cu_q=cu(LENS_Q, dtype="int64")), TypeError, r"cu_seqlens_q.dtype must be int32, got int64"),
    (dict(cu_k=arr(2, 2, dtype="int32", values=[[0, 1], [2, 6]])), ValueError,
     r"cu_seqlens_k must have 1 dim\(s\) \(batch \+ 1,\), got shape \(2, 2\)"),
    (dict(cu_q=arr(1, dtype="int32", values=[0])), ValueError, r"cu_seqlens_q must have batch \+ 1 >= 2 entries, got shape \(1,\)"),
    (dict(cu_q=arr(4, dtype="int32", strides=(8,), values=[0, 3, 3, 8])), ValueError,
     r"cu_seqlens_q.stride\(-1\) must be 1 \(contiguous\), got 2"),
    (dict(cu_k=cu([4, 2])), ValueError, r"cu_seqlens_k.shape must equal cu_seqlens_q.shape = \(4,\)"),
    (dict(cu_q=arr(4, dtype="int32", values=[0, 5, 3, 8])), ValueError,
     r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q\[1\] = 5 > cu_seqlens_q\[2\] = 3"),
    (dict(cu_k=arr(4, dtype="int32", values=[1, 4, 6, 6])), ValueError, r"cu_seqlens_k\[0\] must be 0, got 1"),
    (dict(cu_q=arr(4, dtype="int32", values=[0, 3, 3, 7])), ValueError,
     r"cu_seqlens_q\[-1\] must equal q.shape\[0\] \(total_q\) = 8, got 7"),
    (dict(max_q=4), ValueError, r"max_seqlen_q must be >= the longest sequence \(5, sequence 2\), got 4"),
    (dict(max_k=-1), ValueError, r"max_seqlen_k must be an int >= 0, got -1"),
    (dict(max_q=2.5), ValueError, r"max_seqlen_q must be an int >= 0, got 2.5"),
    (dict(max_q=True), ValueError, r"max_seqlen_q must be an int >= 0, got True"),
    (dict(check_indices=1), TypeError, r"check_indices must be a bool, got int"),
    (dict(alibi_slopes=arr(2, HQ, dtype="float32")), ValueError,
     r"alibi_slopes.shape must be \(8,\) or \(3, 8\), got \(2, 8\)"),
    (dict(q=arr(8, HQ, D, dtype="float32")), TypeError, r"k.dtype must equal q.dtype \(float32\)"),
    (dict(hkv=3), ValueError, r"q.shape\[1\] \(nheads = 8\) must be a multiple of k.shape\[1\] "
                              r"\(nheads_kv\), got 3"),
    (dict(k=arr(6, HKV, 32), v=arr(6, HKV, 32)), ValueError,
     r"k.shape\[-1\] \(head dim\) must equal q.shape\[-1\] = 64, got 32"),
    (dict(window_size=(1, 2, 3)), ValueError, r"window_size must be a pair"),
    (dict(dropout_p=0.1), ValueError, r"dropout_seed must be an int in \[0, 2\*\*64\) when dropout_p > 0"),
    (dict(lens_q=[4096, 1], lens_k=[4096, 1], hq=4, hkv=4, return_attn_probs=True), ValueError,
     r"batch \* nheads \* seqlen_q \* seqlen_k must be <= 67108864 \(2\*\*26\), got 2 \* 4 \* 4096 \* 4096"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_arguments_raise_before_launch(kw, exc, match):
    refused(exc, match, **kw)


def test_unchecked_offsets_are_trusted():
    # check_indices=False skips the host copy (CUDA-graph capture): values are not read.
    reaches(cu_q=arr(4, dtype="int32", values=[0, 5, 3, 8]), check_indices=False)


def test_explain_varlen_plans_for_the_longest_sequence(monkeypatch):
    monkeypatch.setattr(api, "detect", lambda device_id: device_from_arch(80))
    ex = call(fn=portattn.explain_varlen, causal=True)
    p = ex.problem
    assert (p.batch, p.seqlen_q, p.seqlen_k, p.varlen, p.causal) == (3, 5, 4, True, True)
    assert ex.plan == portattn.select_plan(ex.device, p)
    assert "varlen batch of 3 sequences, max_seqlen_q 5, max_seqlen_k 4" in str(ex)


@pytest.mark.parametrize("which, shape, match", [
    ("dout", (8, HQ, 32), r"dout.shape must be \(total_q, nheads, headdim\) = \(8, 8, 64\)"),
    ("out", (1, 8, HQ, D), r"out.shape must be \(total_q, nheads, headdim\)"),
    ("lse", (HQ, 7), r"lse.shape must be \(nheads, total_q\) = \(8, 8\), got \(8, 7\)"),
])
def test_varlen_backward_checks_gradient_shapes(monkeypatch, which, shape, match):
    monkeypatch.setattr(api, "detect", lambda device_id: device_from_arch(80))
    grads = dict(dout=arr(8, HQ, D), out=arr(8, HQ, D), lse=arr(HQ, 8, dtype="float32"))
    grads[which] = arr(*shape, dtype="float32" if which == "lse" else "float16")
    q, k, v = arr(8, HQ, D), arr(6, HKV, D), arr(6, HKV, D)
    with pytest.raises(ValueError, match=match):
        portattn.flash_attn_varlen_backward(grads["dout"], q, k, v, grads["out"], grads["lse"],
                                            cu(LENS_Q), cu(LENS_K), 5, 4)


def test_varlen_backward_with_dropout_needs_the_forward_seed(monkeypatch):
    monkeypatch.setattr(api, "detect", lambda device_id: device_from_arch(80))
    q, k, v = arr(8, HQ, D), arr(6, HKV, D), arr(6, HKV, D)
    with pytest.raises(ValueError, match=r"dropout_seed must be the forward's seed"):
        portattn.flash_attn_varlen_backward(arr(8, HQ, D), q, k, v, arr(8, HQ, D),
                                            arr(HQ, 8, dtype="float32"), cu(LENS_Q), cu(LENS_K),
                                            5, 4, dropout_p=0.1)
