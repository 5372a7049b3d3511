"""Argument validation of flash_attn_func and explain, with no GPU.

Every check runs before detect() touches CUDA, so fake device arrays (objects exposing
__cuda_array_interface__ with a pointer nobody dereferences) exercise all of it here. A
call that passes validation reaches detect(): tests replace it with a sentinel, so
"valid" means exactly "got as far as asking for the GPU", not merely "raised something
else". Messages must name the argument and show both the expected and the actual value.
"""
from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import portattn
from portattn import _arrays, api
from portattn.arch import device_from_arch

from fakecuda import ReachedDetect, arr

ENTRY_POINTS = [portattn.flash_attn_func, portattn.explain]
B, SQ, SK, HQ, HKV, D = 2, 8, 16, 4, 2, 64


def qkv(b=B, sq=SQ, sk=SK, hq=HQ, hkv=HKV, d=D, dtype="float16"):
    return arr(b, sq, hq, d, dtype=dtype), arr(b, sk, hkv, d, dtype=dtype), \
        arr(b, sk, hkv, d, dtype=dtype)


@pytest.fixture(autouse=True)
def no_forced_arch(monkeypatch):
    # A stray PORTATTN_ARCH in the environment would change what detect() raises.
    monkeypatch.delenv("PORTATTN_ARCH", raising=False)


@pytest.fixture(autouse=True)
def fake_pointers_live_on_device_0(monkeypatch):
    # The fake arrays' pointers are not device memory; where a driver exists it would say
    # so. Pin the lookup so these tests mean the same on a GPU machine as on CI.
    monkeypatch.setattr(_arrays, "_cai_device", lambda ptr, name: 0)


@pytest.fixture
def sentinel_detect(monkeypatch):
    def fake(device_id):
        raise ReachedDetect(device_id)
    monkeypatch.setattr(api, "detect", fake)


@pytest.fixture
def table_detect(monkeypatch):
    """detect() answering with a GPU-less sm_80 so explain() can return its plan."""
    monkeypatch.setattr(api, "detect", lambda device_id: device_from_arch(80))


def reaches_detect(fn, q, k, v, **kw):
    with pytest.raises(ReachedDetect):
        fn(q, k, v, **kw)


# ------------------------------------------------------------ getting past validation

def test_valid_call_gets_past_validation_to_real_detect():
    # The real detect(): on a machine with no driver it raises, and what it raises must
    # not be a validation error (that would mean a valid argument was refused). With a
    # GPU, explain() simply returns the plan.
    try:
        ex = portattn.explain(*qkv())
    except Exception as e:
        assert type(e) not in (ValueError, TypeError, NotImplementedError), repr(e)
    else:
        # The fake arrays are float16: whichever path runs, it is this GPU's own choice.
        assert ex.device.has_gpu and ex.plan == portattn.select_plan(ex.device, ex.problem)


def test_flash_attn_func_valid_call_fails_after_validation_without_gpu():
    from portattn.arch.detect import gpu_status
    if gpu_status()[0]:
        pytest.skip("a GPU is present: the fake pointer must not be launched on")
    with pytest.raises(Exception) as info:
        portattn.flash_attn_func(*qkv())
    assert type(info.value) not in (ValueError, TypeError, NotImplementedError)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("kw", [
    dict(),
    dict(causal=True),
    dict(window_size=(3, 0)),
    dict(window_size=[-1, 5]),
    dict(window_size=(np.int64(4), np.int32(-1))),
    dict(softmax_scale=0.125),
    dict(softmax_scale=2),
    dict(softmax_scale=np.float64(0.5)),
    dict(softcap=30.0),
    dict(softcap=0),
    dict(dropout_p=0.0),
    dict(dropout_p=0),
    dict(deterministic=True),
    dict(causal_align="top_left"),
    dict(return_lse=True),
], ids=repr)
def test_valid_options_reach_detect(sentinel_detect, fn, kw):
    reaches_detect(fn, *qkv(), **kw)


@pytest.mark.parametrize("shape", [(HQ,), (B, HQ)])
def test_alibi_shapes_accepted(sentinel_detect, shape):
    reaches_detect(portattn.explain, *qkv(), alibi_slopes=arr(*shape, dtype="float32"))


@pytest.mark.parametrize("shape, dtype", [
    ((SQ, SK), "float32"),
    ((B, 1, 1, SK), "float32"),
    ((1, HQ, SQ, 1), "float16"),
    ((B, HQ, SQ, SK), "float32"),
    ((SK,), "float32"),
    ((), "float32"),
    ((SQ, SK), "bool"),
    ((B, HQ, SQ, SK), "bool"),
])
def test_bias_shapes_accepted(sentinel_detect, shape, dtype):
    reaches_detect(portattn.explain, *qkv(), bias=arr(*shape, dtype=dtype))


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 1), (6, 3), (8, 2)])
def test_gqa_and_mqa_head_counts_accepted(sentinel_detect, hq, hkv):
    reaches_detect(portattn.flash_attn_func, *qkv(hq=hq, hkv=hkv))


@pytest.mark.parametrize("d", [1, 2, 33, 255, 256])
def test_head_dim_range_accepted(sentinel_detect, d):
    reaches_detect(portattn.flash_attn_func, *qkv(d=d))


def test_float32_and_noncontiguous_rows_accepted(sentinel_detect):
    # Only the head dim must be contiguous; padded row strides are flash_attn-legal.
    q = arr(B, SQ, HQ, D, dtype="float32", strides=(SQ * HQ * 128 * 4, HQ * 128 * 4, 128 * 4, 4))
    k = arr(B, SK, HKV, D, dtype="float32")
    reaches_detect(portattn.flash_attn_func, q, k, k)


def test_head_dim_one_ignores_last_stride(sentinel_detect):
    # With a single element in the head dim its stride is meaningless (torch reports
    # anything there for expanded/sliced views).
    q = arr(B, SQ, HQ, 1, strides=(SQ * HQ * 2 * 2, HQ * 2 * 2, 2 * 2, 6))
    k = arr(B, SK, HKV, 1)
    reaches_detect(portattn.flash_attn_func, q, k, k)


def test_detect_gets_the_arrays_device(sentinel_detect):
    with pytest.raises(ReachedDetect) as info:
        portattn.explain(*qkv())
    assert info.value.args == (0,)   # no driver to ask: CAI arrays are taken as device 0


# ------------------------------------------------------------- what the plan is given

def test_explain_problem_mirrors_arguments(table_detect):
    q, k, v = qkv(b=3, sq=5, sk=11, hq=6, hkv=2, d=72)
    ex = portattn.explain(q, k, v, causal=True, window_size=(4, 9), softcap=5.0,
                          alibi_slopes=arr(6, dtype="float32"), bias=arr(5, 11, dtype="bool"))
    p = ex.problem
    assert (p.dtype, p.batch, p.seqlen_q, p.seqlen_k, p.nheads_q, p.nheads_kv, p.head_dim) == \
        ("float16", 3, 5, 11, 6, 2, 72)
    # causal clamps the right window to the diagonal whatever window_size said.
    assert p.causal and p.window == (4, 0)
    assert p.alibi and p.softcap and p.bias
    assert ex.plan.spec.head_dim == 96
    text = str(ex)
    assert "causal, window, alibi, softcap, bias" in text and "head dim 72" in text


def test_explain_problem_defaults(table_detect):
    p = portattn.explain(*qkv()).problem
    assert p.window == (-1, -1)
    assert not (p.causal or p.alibi or p.softcap or p.bias)


@pytest.mark.parametrize("align, bottom_right", [("bottom_right", True), ("top_left", False)])
def test_prepare_scale_diagonal_and_bias_strides(table_detect, align, bottom_right):
    q, k, v = qkv(dtype="float32")
    p = api._prepare(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True,
                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                     deterministic=False, return_attn_probs=False,
                     bias=arr(B, 1, 1, SK, dtype="float32"), causal_align=align)
    assert p.scale == pytest.approx(1 / math.sqrt(D))
    assert p.align_br is bottom_right and p.window == (-1, 0)
    # Broadcast dims get stride 0 so the kernel re-reads the same bias row.
    assert p.bias_strides == (SK, 0, 0, 1)


def test_prepare_bias_2d_strides(table_detect):
    q, k, v = qkv()
    p = api._prepare(q, k, v, dropout_p=0.0, softmax_scale=0.5, causal=False,
                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                     deterministic=False, return_attn_probs=False,
                     bias=arr(SQ, SK, dtype="float32"), causal_align="bottom_right")
    assert p.bias_strides == (0, 0, SK, 1) and p.scale == 0.5


# ------------------------------------------------------------------- invalid arrays

def _raises(fn, exc, pattern, q, k, v, **kw):
    with pytest.raises(exc, match=pattern) as info:
        fn(q, k, v, **kw)
    # Validation errors are exactly these types; a subclass from somewhere deeper (e.g.
    # CuPy's errors) would mean the check did not run first.
    assert type(info.value) is exc
    return info.value


@pytest.fixture(params=ENTRY_POINTS, ids=["flash_attn_func", "explain"])
def fn(request, sentinel_detect):
    return request.param


@pytest.mark.parametrize("bad, typename", [(np.zeros((B, SQ, HQ, D), np.float16), "numpy.ndarray"),
                                           ([[1.0]], "builtins.list"), (None, "builtins.NoneType")])
def test_q_not_an_array(fn, bad, typename):
    _, k, v = qkv()
    _raises(fn, TypeError, rf"^q must be a torch CUDA tensor, a CuPy array or an object with "
            rf"__cuda_array_interface__, got {re.escape(typename)}$", bad, k, v)


def test_k_and_v_not_arrays(fn):
    q, k, v = qkv()
    _raises(fn, TypeError, r"^k must be .*got numpy\.ndarray", q, np.zeros(3), v)
    _raises(fn, TypeError, r"^v must be .*got builtins\.list", q, k, [0.0])


def test_unsupported_typestr(fn):
    q, k, v = qkv()
    _raises(fn, TypeError, r"^k has unsupported __cuda_array_interface__ typestr '<i2'",
            q, arr(B, SK, HKV, D, dtype="int16"), v)


def test_q_3d(fn):
    _, k, v = qkv()
    _raises(fn, ValueError, r"^q must have 4 dims \(batch, seqlen, nheads, headdim\), "
            r"got shape \(2, 8, 64\)$", arr(B, SQ, D), k, v)


def test_v_5d(fn):
    q, k, _ = qkv()
    _raises(fn, ValueError, r"^v must have 4 dims .*got shape \(2, 16, 2, 64, 1\)$",
            q, k, arr(B, SK, HKV, D, 1))


def test_last_stride_not_one(fn):
    _, k, v = qkv()
    # Byte strides of a view taking every other element of the head dim.
    q = arr(B, SQ, HQ, D, strides=(SQ * HQ * D * 4, HQ * D * 4, D * 4, 4))
    _raises(fn, ValueError, r"^q\.stride\(-1\) must be 1 \(contiguous head dim\), got 2$",
            q, k, v)


def test_strides_not_whole_elements(fn):
    _, k, v = qkv()
    q = arr(B, SQ, HQ, D, strides=(SQ * HQ * D * 2, HQ * D * 2, D * 2 + 1, 2))
    _raises(fn, ValueError, r"^q has strides .* that are not whole elements$", q, k, v)


@pytest.mark.parametrize("dtype", ["float64", "bool", "int32"])
def test_q_dtype_unsupported(fn, dtype):
    q, k, v = qkv(dtype=dtype)
    _raises(fn, TypeError, rf"^q\.dtype must be one of \('float16', 'bfloat16', 'float32'\), "
            rf"got {dtype}$", q, k, v)


def test_k_dtype_differs(fn):
    q, _, v = qkv()
    _raises(fn, TypeError, r"^k\.dtype must equal q\.dtype \(float16\), got float32$",
            q, arr(B, SK, HKV, D, dtype="float32"), v)


def test_v_dtype_differs(fn):
    q, k, _ = qkv(dtype="float32")
    _raises(fn, TypeError, r"^v\.dtype must equal q\.dtype \(float32\), got float16$",
            q, k, arr(B, SK, HKV, D, dtype="float16"))


def test_batch_mismatch(fn):
    q, _, v = qkv()
    _raises(fn, ValueError, r"^k\.shape\[0\] \(batch\) must equal q\.shape\[0\] = 2, got 3$",
            q, arr(3, SK, HKV, D), v)
    q, k, _ = qkv()
    _raises(fn, ValueError, r"^v\.shape\[0\] \(batch\) must equal q\.shape\[0\] = 2, got 1$",
            q, k, arr(1, SK, HKV, D))


def test_v_seqlen_mismatch(fn):
    q, k, _ = qkv()
    _raises(fn, ValueError, r"^v\.shape\[1\] \(seqlen_k\) must equal k\.shape\[1\] = 16, got 17$",
            q, k, arr(B, SK + 1, HKV, D))


def test_v_heads_mismatch(fn):
    q, k, _ = qkv()
    _raises(fn, ValueError, r"^v\.shape\[2\] \(nheads_kv\) must equal k\.shape\[2\] = 2, got 4$",
            q, k, arr(B, SK, 4, D))


@pytest.mark.parametrize("hq, hkv", [(6, 4), (4, 3), (1, 2), (4, 0)])
def test_heads_not_a_multiple(fn, hq, hkv):
    _raises(fn, ValueError, rf"^q\.shape\[2\] \(nheads_q = {hq}\) must be a multiple of "
            rf"k\.shape\[2\] \(nheads_kv\), got {hkv}$", *qkv(hq=hq, hkv=hkv))


@pytest.mark.parametrize("d", [0, 257, 320])
def test_head_dim_out_of_range(fn, d):
    _raises(fn, ValueError, rf"^q\.shape\[-1\] \(head dim\) must be in 1\.\.256, got {d}$",
            *qkv(d=d))


def test_k_head_dim_differs(fn):
    q, _, v = qkv()
    _raises(fn, ValueError, r"^k\.shape\[-1\] \(head dim\) must equal q\.shape\[-1\] = 64, "
            r"got 32$", q, arr(B, SK, HKV, 32), v)
    q, k, _ = qkv()
    _raises(fn, ValueError, r"^v\.shape\[-1\] \(head dim\) must equal q\.shape\[-1\] = 64, "
            r"got 128$", q, k, arr(B, SK, HKV, 128))


# ------------------------------------------------------------------ invalid options

@pytest.mark.parametrize("p", [0.1, 0.5, 1e-9])
def test_dropout_with_seed_reaches_detect(fn, p):
    reaches_detect(fn, *qkv(), dropout_p=p, dropout_seed=2 ** 64 - 1, dropout_offset=7)


@pytest.mark.parametrize("p", [0.1, 1e-9])
def test_dropout_without_seed_refused_for_non_torch_arrays(fn, p):
    _raises(fn, ValueError, r"^dropout_seed must be an int in \[0, 2\*\*64\) when dropout_p > 0 "
            r"with CuPy arrays .*got None$", *qkv(), dropout_p=p)


@pytest.mark.parametrize("p", [1.5, -0.1, 1.0, float("nan"), "0"])
def test_dropout_out_of_range(fn, p):
    _raises(fn, ValueError, rf"^dropout_p must be a float in \[0, 1\), got {re.escape(repr(p))}$",
            *qkv(), dropout_p=p)


def test_return_attn_probs_small_shapes_reach_detect(fn):
    reaches_detect(fn, *qkv(), return_attn_probs=True)
    reaches_detect(fn, *qkv(), return_attn_probs=True, dropout_p=0.2, dropout_seed=1)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "0.1", None])
def test_softmax_scale_not_finite(fn, scale):
    if scale is None:
        # None means 1/sqrt(d): it must reach detect, not be refused.
        with pytest.raises(ReachedDetect):
            fn(*qkv(), softmax_scale=None)
        return
    _raises(fn, ValueError, rf"^softmax_scale must be a finite float, got "
            rf"{re.escape(repr(scale))}$", *qkv(), softmax_scale=scale)


@pytest.mark.parametrize("cap", [-1, -1e-6, float("inf"), float("nan"), "1"])
def test_softcap_invalid(fn, cap):
    _raises(fn, ValueError, rf"^softcap must be a finite float >= 0, got {re.escape(repr(cap))}$",
            *qkv(), softcap=cap)


@pytest.mark.parametrize("window", [(-2, 0), (1,), "ab", (1.5, 2), (0, -3), (1, 2, 3), None,
                                    (1, "2")])
def test_window_size_invalid(fn, window):
    _raises(fn, ValueError, rf"^window_size must be a pair of ints >= -1 \(-1: unbounded\), "
            rf"got {re.escape(repr(window))}$", *qkv(), window_size=window)


@pytest.mark.parametrize("align", ["middle", "bottom-right", None])
def test_causal_align_invalid(fn, align):
    _raises(fn, ValueError, rf"^causal_align must be one of \('bottom_right', 'top_left'\), "
            rf"got {re.escape(repr(align))}$", *qkv(), causal_align=align)


@pytest.mark.parametrize("det, typename", [("yes", "str"), (1, "int"), (None, "NoneType")])
def test_deterministic_not_bool(fn, det, typename):
    _raises(fn, TypeError, rf"^deterministic must be a bool, got {typename}$", *qkv(),
            deterministic=det)


@pytest.mark.parametrize("kw", [dict(softmax_scale=np.float32(0.125)),
                                dict(softcap=np.float32(30.0)),
                                dict(dropout_p=np.float32(0.0))], ids=repr)
def test_numpy_float32_scalars_accepted(sentinel_detect, kw):
    reaches_detect(portattn.explain, *qkv(), **kw)


# ------------------------------------------------------------------ alibi and bias

def test_alibi_dtype(fn):
    _raises(fn, TypeError, r"^alibi_slopes\.dtype must be float32, got float16$", *qkv(),
            alibi_slopes=arr(HQ, dtype="float16"))


@pytest.mark.parametrize("shape", [(HQ + 1,), (HKV,), (B + 1, HQ), (HQ, B), (1, HQ), (B, HQ, 1)])
def test_alibi_shape(fn, shape):
    _raises(fn, ValueError, rf"^alibi_slopes\.shape must be \(4,\) or \(2, 4\), got "
            rf"{re.escape(str(shape))}$", *qkv(), alibi_slopes=arr(*shape, dtype="float32"))


def test_alibi_not_an_array(fn):
    _raises(fn, TypeError, r"^alibi_slopes must be .*got numpy\.ndarray$", *qkv(),
            alibi_slopes=np.zeros(HQ, np.float32))


@pytest.mark.parametrize("shape, axis, have, want", [
    ((SQ + 1, SK), 2, SQ + 1, SQ),
    ((SK + 1,), 3, SK + 1, SK),
    ((B + 1, 1, 1, SK), 0, B + 1, B),
    ((1, HKV, SQ, SK), 1, HKV, HQ),    # per-kv-head bias is not a thing: heads are q heads
])
def test_bias_not_broadcastable(fn, shape, axis, have, want):
    _raises(fn, ValueError, rf"^bias shape {re.escape(str(shape))} does not broadcast to "
            rf"\(batch, nheads, seqlen_q, seqlen_k\) = \(2, 4, 8, 16\): dim {axis} is {have}, "
            rf"expected 1 or {want}$", *qkv(), bias=arr(*shape, dtype="float32"))


def test_bias_5d(fn):
    _raises(fn, ValueError, r"^bias must have at most 4 dims, got shape \(1, 2, 4, 8, 16\)$",
            *qkv(), bias=arr(1, B, HQ, SQ, SK, dtype="float32"))


@pytest.mark.parametrize("dtype", ["float64", "int32"])
def test_bias_dtype(fn, dtype):
    _raises(fn, TypeError, rf"^bias\.dtype must be one of \('float32', 'float16', 'bfloat16', "
            rf"'bool'\), got {dtype}$", *qkv(), bias=arr(SQ, SK, dtype=dtype))


def test_torch_cpu_tensor_refused(sentinel_detect):
    torch = pytest.importorskip("torch")
    q = torch.zeros(B, SQ, HQ, D, dtype=torch.float16)
    _, k, v = qkv()
    with pytest.raises(ValueError, match=r"^q must be on a CUDA device, got cpu$"):
        portattn.flash_attn_func(q, k, v)


def test_torch_cpu_bias_refused(sentinel_detect):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^bias must be a cai array like q, got torch$"):
        portattn.explain(*qkv(), bias=torch.zeros(SQ, SK))


# ----------------------------------------------------------------------- properties

@given(b=st.integers(1, 4), sq=st.integers(0, 4096), sk=st.integers(0, 4096),
       hkv=st.integers(1, 8), group=st.integers(1, 8), d=st.integers(1, 256),
       dtype=st.sampled_from(["float16", "float32"]), causal=st.booleans())
def test_any_valid_shape_is_planned(b, sq, sk, hkv, group, d, dtype, causal):
    # Not a fixture: hypothesis reruns the body, and detect() answers with a table arch.
    saved = api.detect
    api.detect = lambda device_id: device_from_arch(75)
    try:
        ex = portattn.explain(*qkv(b=b, sq=sq, sk=sk, hq=hkv * group, hkv=hkv, d=d,
                                   dtype=dtype), causal=causal)
    finally:
        api.detect = saved
    p = ex.problem
    assert (p.batch, p.seqlen_q, p.seqlen_k, p.nheads_q, p.nheads_kv, p.head_dim) == \
        (b, sq, sk, hkv * group, hkv, d)
    assert ex.plan.spec.head_dim >= d and ex.plan.smem_bytes <= 64 * 1024


@given(d=st.integers(257, 1000), hkv=st.integers(1, 4))
def test_any_large_head_dim_is_refused(d, hkv):
    with pytest.raises(ValueError, match=rf"^q\.shape\[-1\] \(head dim\) must be in 1\.\.256, "
                       rf"got {d}$"):
        portattn.explain(*qkv(hq=hkv, hkv=hkv, d=d))


# ------------------------------------------------------------------------- imports

def test_import_needs_no_cupy_or_torch():
    # Importing must work (and be cheap) on a machine with neither, e.g. to print
    # `portattn report --arch` on a laptop; CuPy is imported at the first launch.
    code = ("import sys, portattn, portattn.arch, portattn.report, portattn.testing; "
            "print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('cupy', 'cupy_backends', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------ dropout arguments

@pytest.mark.parametrize("seed, exc, pattern", [
    (-1, ValueError, r"^dropout_seed must be in \[0, 2\*\*64\), got -1$"),
    (2 ** 64, ValueError, r"^dropout_seed must be in \[0, 2\*\*64\), got 18446744073709551616$"),
    (1.0, TypeError, r"^dropout_seed must be an int in \[0, 2\*\*64\) or None, got float$"),
    (True, TypeError, r"^dropout_seed must be an int in \[0, 2\*\*64\) or None, got bool$"),
    ("1", TypeError, r"^dropout_seed must be an int in \[0, 2\*\*64\) or None, got str$"),
])
def test_dropout_seed_invalid(fn, seed, exc, pattern):
    _raises(fn, exc, pattern, *qkv(), dropout_p=0.1, dropout_seed=seed)


@pytest.mark.parametrize("offset, exc, pattern", [
    (-1, ValueError, r"^dropout_offset must be in \[0, 2\*\*32\), got -1$"),
    (2 ** 32, ValueError, r"^dropout_offset must be in \[0, 2\*\*32\), got 4294967296$"),
    (None, TypeError, r"^dropout_offset must be an int in \[0, 2\*\*32\), got NoneType$"),
    (0.5, TypeError, r"^dropout_offset must be an int in \[0, 2\*\*32\), got float$"),
])
def test_dropout_offset_invalid(fn, offset, exc, pattern):
    _raises(fn, exc, pattern, *qkv(), dropout_p=0.1, dropout_seed=3, dropout_offset=offset)


def test_numpy_integer_seed_and_offset_accepted(sentinel_detect):
    reaches_detect(portattn.explain, *qkv(), dropout_p=0.3, dropout_seed=np.uint64(2 ** 63),
                   dropout_offset=np.int32(5))


def test_return_attn_probs_size_limit(fn):
    # 2 * 4 * 4096 * 2049 elements > 2**26: refused, naming the limit and the product.
    q, k, v = qkv(sq=4096, sk=2049)
    _raises(fn, ValueError, r"^return_attn_probs=True is a debugging aid for small shapes: "
            r"batch \* nheads \* seqlen_q \* seqlen_k must be <= 67108864 \(2\*\*26\), got "
            r"2 \* 4 \* 4096 \* 2049 = 67141632$", q, k, v, return_attn_probs=True)
    q, k, v = qkv(sq=4096, sk=2048)     # exactly 2**26 is allowed
    reaches_detect(fn, q, k, v, return_attn_probs=True)


@pytest.mark.parametrize("flag, typename", [(1, "int"), ("yes", "str"), (None, "NoneType")])
def test_return_attn_probs_not_bool(fn, flag, typename):
    _raises(fn, TypeError, rf"^return_attn_probs must be a bool, got {typename}$", *qkv(),
            return_attn_probs=flag)


def test_explain_says_dropout_is_on(table_detect):
    text = str(portattn.explain(*qkv(), dropout_p=0.25, dropout_seed=9))
    assert "dropout p=0.25" in text
    assert "dropout" not in str(portattn.explain(*qkv()))
