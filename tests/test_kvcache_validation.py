"""Argument validation of flash_attn_with_kvcache and explain_kvcache, and the decode plan,
with no GPU.

Fake __cuda_array_interface__ arrays carry pointers nobody dereferences; detect() is
replaced by a sentinel, so "valid" means "got as far as asking for the GPU". Index values
(cache_seqlens, block_table, cache_batch_idx) live on the GPU: the host copy is replaced
by a lookup of values registered per fake array.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import portattn
from portattn import kvcache
from portattn.arch import GATE_CCS, DecodeProblem, device_from_arch, select_decode_plan
from portattn.arch.device import DeviceInfo
from portattn.arch.plan_decode import (MAX_SPLITS, all_decode_specs_for, decode_head_dim,
                                       tc_head_dim)

from fakecuda import ReachedDetect, arr, fake_gpu

B, SQ, HQ, HKV, D, S = 2, 1, 8, 2, 64, 128
ENTRY_POINTS = [portattn.flash_attn_with_kvcache, portattn.explain_kvcache]


def base(b=B, sq=SQ, hq=HQ, hkv=HKV, d=D, s=S, dtype="float16"):
    return arr(b, sq, hq, d, dtype=dtype), arr(b, s, hkv, d, dtype=dtype), \
        arr(b, s, hkv, d, dtype=dtype)


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    fake_gpu(monkeypatch, kvcache, kvcache)


def reaches(fn, *args, **kw):
    with pytest.raises(ReachedDetect):
        fn(*args, **kw)


def refused(fn, exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("kw", [
    dict(), dict(causal=True), dict(window_size=(16, 0)), dict(softcap=30.0),
    dict(num_splits=1), dict(num_splits=MAX_SPLITS), dict(return_softmax_lse=True),
    dict(cache_seqlens=0), dict(cache_seqlens=S), dict(causal_align="top_left"),
    dict(check_indices=False),
], ids=repr)
def test_valid_calls_reach_detect(fn, kw):
    reaches(fn, *base(), **kw)


def test_valid_append_paged_and_indices_reach_detect():
    q, _, _ = base()
    kc = arr(10, 16, HKV, D)
    table = arr(B, 8, dtype="int32", values=[[0, 1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, -1, -1, -1, -1]])
    seqlens = arr(B, dtype="int32", values=[120, 60])
    k, v = arr(B, 3, HKV, D), arr(B, 3, HKV, D)
    reaches(portattn.flash_attn_with_kvcache, q, kc, kc, k, v, cache_seqlens=seqlens,
            block_table=table)
    idx = arr(B, dtype="int32", values=[3, 0])
    kc2 = arr(4, S, HKV, D)
    reaches(portattn.flash_attn_with_kvcache, q, kc2, kc2, k, v, cache_seqlens=seqlens,
            cache_batch_idx=idx, alibi_slopes=arr(HQ, dtype="float32"))


@pytest.mark.parametrize("name", ["cache_seqlens", "cache_batch_idx", "block_table"])
def test_int64_index_arrays_are_refused(name):
    q, kc, vc = base()
    shape = (B, 4) if name == "block_table" else (B,)
    kw = {name: arr(*shape, dtype="int64", values=np.zeros(shape))}
    refused(portattn.flash_attn_with_kvcache, TypeError, f"{name}.dtype must be int32, got int64",
            q, kc, vc, **kw)


def test_cache_seqlens_beyond_capacity_is_refused_before_launch():
    q, kc, vc = base()
    seqlens = arr(B, dtype="int32", values=[S, S + 1])
    refused(portattn.flash_attn_with_kvcache, ValueError,
            r"cache_seqlens \+ seqlen_new must be in 0..cache capacity = 128.*129",
            q, kc, vc, cache_seqlens=seqlens, check_indices=True)
    k = arr(B, 2, HKV, D)
    refused(portattn.flash_attn_with_kvcache, ValueError, "cache capacity = 128",
            q, kc, vc, k, k, cache_seqlens=S - 1)
    refused(portattn.flash_attn_with_kvcache, ValueError, "cache capacity",
            q, kc, vc, cache_seqlens=-1)
    negative = arr(B, dtype="int32", values=[-3, 0])
    refused(portattn.flash_attn_with_kvcache, ValueError, r"\[-3\]", q, kc, vc,
            cache_seqlens=negative, check_indices=True)


def test_block_table_out_of_range_is_refused_before_launch():
    q, _, _ = base()
    kc = arr(6, 16, HKV, D)
    seqlens = arr(B, dtype="int32", values=[40, 17])
    table = arr(B, 4, dtype="int32", values=[[0, 1, 6, -7], [2, 3, 99, 99]])
    refused(portattn.flash_attn_with_kvcache, ValueError,
            r"block_table entries .* \[0, num_blocks = 6\), got block_table\[0, 2\] = 6",
            q, kc, kc, cache_seqlens=seqlens, block_table=table, check_indices=True)
    # Entries past each row's keys are never read: unused pages may hold anything.
    ok = arr(B, 4, dtype="int32", values=[[0, 1, 5, -7], [2, 3, 99, 99]])
    reaches(portattn.flash_attn_with_kvcache, q, kc, kc, cache_seqlens=seqlens, block_table=ok,
            check_indices=True)


def test_cache_batch_idx_out_of_range_is_refused():
    q, _, _ = base()
    kc = arr(3, S, HKV, D)
    idx = arr(B, dtype="int32", values=[0, 3])
    refused(portattn.flash_attn_with_kvcache, ValueError,
            r"cache_batch_idx entries must be in \[0, k_cache.shape\[0\] = 3\), got \[3\]",
            q, kc, kc, cache_batch_idx=idx, check_indices=True)


def test_unchecked_indices_skip_the_host_copy(monkeypatch):
    def boom(a):
        raise AssertionError("host copy without check_indices")
    monkeypatch.setattr(kvcache, "_host_ints", boom)
    q, kc, vc = base()
    reaches(portattn.flash_attn_with_kvcache, q, kc, vc,
            cache_seqlens=arr(B, dtype="int32", values=[S + 5, 0]), check_indices=False)
    # Without index arrays there is nothing to copy, checked or not.
    reaches(portattn.flash_attn_with_kvcache, q, kc, vc, cache_seqlens=S)
    reaches(portattn.flash_attn_with_kvcache, q, kc, vc)


def test_indices_are_checked_by_default():
    q, kc, vc = base()
    refused(portattn.flash_attn_with_kvcache, ValueError, "cache capacity = 128", q, kc, vc,
            cache_seqlens=arr(B, dtype="int32", values=[S + 5, 0]))


def test_check_indices_off_from_the_environment(monkeypatch):
    monkeypatch.setenv(kvcache.CHECK_INDICES_ENV, "0")
    q, kc, vc = base()
    reaches(portattn.flash_attn_with_kvcache, q, kc, vc,
            cache_seqlens=arr(B, dtype="int32", values=[S + 5, 0]))
    refused(portattn.flash_attn_with_kvcache, ValueError, "cache capacity = 128", q, kc, vc,
            cache_seqlens=arr(B, dtype="int32", values=[S + 5, 0]), check_indices=True)


@pytest.mark.parametrize("make, exc, match", [
    (lambda: (arr(B, SQ, HQ, D), arr(B, S, HKV, D, dtype="float32"), arr(B, S, HKV, D)),
     TypeError, r"k_cache.dtype must equal q.dtype \(float16\), got float32"),
    (lambda: (arr(B, SQ, HQ, D), arr(B, S, HKV, D), arr(B, S + 1, HKV, D)),
     ValueError, r"v_cache.shape\[1\] \(seqlen_cache\) must equal k_cache.shape\[1\] = 128"),
    (lambda: (arr(B, SQ, HQ, D), arr(B, S, 3, D), arr(B, S, 3, D)),
     ValueError, r"nheads_q = 8\) must be a multiple of k_cache.shape\[2\]"),
    (lambda: (arr(B, SQ, HQ, D), arr(B, S, HKV, 32), arr(B, S, HKV, 32)),
     ValueError, r"k_cache.shape\[-1\] \(head dim\) must equal q.shape\[-1\] = 64, got 32"),
    (lambda: (arr(B, SQ, HQ, D), arr(B + 1, S, HKV, D), arr(B + 1, S, HKV, D)),
     ValueError, r"batch_cache\) must equal q.shape\[0\] = 2 when cache_batch_idx is None"),
    (lambda: (arr(B, SQ, HQ, 300), arr(B, S, HKV, 300), arr(B, S, HKV, 300)),
     ValueError, r"head dim\) must be in 1..256, got 300"),
    (lambda: (arr(B, HQ, D), arr(B, S, HKV, D), arr(B, S, HKV, D)),
     ValueError, r"q must have 4 dims"),
    (lambda: (arr(B, SQ, HQ, D, dtype="float64"),) * 3,
     TypeError, r"q.dtype must be one of"),
], ids=["cache dtype", "v_cache rows", "heads", "cache head dim", "batch_cache", "head dim",
        "q ndim", "float64"])
def test_bad_tensors_are_refused(make, exc, match):
    refused(portattn.flash_attn_with_kvcache, exc, match, *make())


@pytest.mark.parametrize("kw, exc, match", [
    (dict(k=arr(B, 1, HKV, D)), ValueError, "must be given together, got only k"),
    (dict(k=arr(B, 1, HKV, D), v=arr(B, 2, HKV, D), cache_seqlens=0), ValueError,
     r"v.shape must be \(batch, seqlen_new, nheads_kv, headdim\) = \(2, 1, 2, 64\)"),
    (dict(k=arr(B, 1, HKV, D, dtype="float32"), v=arr(B, 1, HKV, D, dtype="float32"),
          cache_seqlens=0), TypeError, r"k.dtype must equal q.dtype"),
    (dict(k=arr(B, 1, HKV, D), v=arr(B, 1, HKV, D)), ValueError,
     "cache_seqlens is required when appending"),
    (dict(num_splits=-1), ValueError, r"num_splits must be an int in 0..128"),
    (dict(num_splits=MAX_SPLITS + 1), ValueError, r"num_splits must be an int in 0..128"),
    (dict(num_splits=2.0), ValueError, "num_splits"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (dict(causal_align="middle"), ValueError, "causal_align"),
    (dict(cache_seqlens=True), TypeError, "cache_seqlens must be an int"),
    (dict(cache_seqlens=arr(B + 1, dtype="int32", values=[1, 2, 3])), ValueError,
     r"cache_seqlens.shape must be \(batch,\) = \(2,\)"),
    (dict(block_table=arr(B, 2, dtype="int32", values=[[0, 1], [0, 1]]),
          cache_batch_idx=arr(B, dtype="int32", values=[0, 1])), ValueError,
     "cache_batch_idx cannot be combined with block_table"),
    (dict(block_table=arr(B + 1, 2, dtype="int32", values=np.zeros((3, 2)))), ValueError,
     r"block_table.shape\[0\] \(batch\) must equal q.shape\[0\] = 2"),
    (dict(block_table=arr(B * 2, dtype="int32", values=np.zeros(4))), ValueError,
     r"block_table must have 2 dim"),
    (dict(alibi_slopes=arr(HQ, dtype="float16")), TypeError, "alibi_slopes.dtype must be float32"),
    (dict(alibi_slopes=arr(HKV, dtype="float32")), ValueError, r"alibi_slopes.shape must be"),
    (dict(return_softmax_lse=1), TypeError, "return_softmax_lse must be a bool"),
], ids=repr)
def test_bad_options_are_refused(kw, exc, match):
    refused(portattn.flash_attn_with_kvcache, exc, match, *base(), **kw)


def test_forced_paths():
    dev90 = device_from_arch(90)
    assert select_decode_plan(dev90, DecodeProblem("float16", 128), only="sm80").path == "sm80"
    assert select_decode_plan(dev90, DecodeProblem("float16", 128), only="simt").path == "simt"
    with pytest.raises(ValueError, match="float32 has no exact tensor-core form"):
        select_decode_plan(dev90, DecodeProblem("float32", 128), only="sm80")
    with pytest.raises(ValueError, match="sm_75 lacks m16n8k16"):
        select_decode_plan(device_from_arch(75), DecodeProblem("float16", 128), only="sm80")
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        select_decode_plan(dev90, DecodeProblem("bfloat16", 64, aligned=False), only="sm80")
    sm75 = select_decode_plan(dev90, DecodeProblem("float16", 128), only="sm75")
    assert sm75.path == "sm75" and sm75.spec.mma == 75
    with pytest.raises(ValueError, match="bf16 has no MMA before sm_80"):
        select_decode_plan(dev90, DecodeProblem("bfloat16", 128), only="sm75")
    with pytest.raises(ValueError, match="sm_70 lacks m16n8k8"):
        select_decode_plan(device_from_arch(70), DecodeProblem("float16", 128), only="sm75")
    with pytest.raises(ValueError, match="PORTATTN_PATH=sm70: KV-cache decoding has the simt"):
        select_decode_plan(dev90, DecodeProblem("float16", 128), only="sm70")


def test_tensor_cores_only_where_exact_and_aligned():
    for cc in GATE_CCS:
        for dtype in ("float16", "bfloat16", "float32"):
            for aligned in (True, False):
                plan = select_decode_plan(device_from_arch(cc),
                                          DecodeProblem(dtype, 128, aligned=aligned))
                want = ("sm80" if cc >= 80 and dtype != "float32" and aligned else
                        "sm75" if cc == 75 and dtype == "float16" and aligned else "simt")
                assert plan.path == want, (cc, dtype, aligned, plan.describe())
                assert plan.spec.mma == (int(want[2:]) if want != "simt" else 0)
                if want == "simt" and cc < 80 and dtype != "float32":
                    assert "tensor-core decode" in plan.rejected[0][0]
                    assert ("bf16 has no MMA" in plan.rejected[0][1] or "lacks m16n8k8"
                            in plan.rejected[0][1] or "aligned" in plan.rejected[0][1])


# ------------------------------------------------------------------------- the plan

def _h100() -> DeviceInfo:
    dev = device_from_arch(90)
    return DeviceInfo(plan_cc=90, facts=dev.facts, smem_per_block=dev.smem_per_block,
                      smem_per_sm=dev.smem_per_sm, sm_count=132, name="H100", real_cc=90)


def test_headline_decode_splits_to_fill_the_gpu_in_one_wave():
    plan = select_decode_plan(_h100(), DecodeProblem("float16", 128, 1, 32768, 8, 32, 8))
    assert plan.path == "sm80" and plan.spec.block_m == 8 and plan.row_tiles == 1
    assert plan.num_splits > 1
    assert 8 * 8 * plan.num_splits <= 132 * plan.ctas_per_sm
    assert "tensor-core" in plan.reason and "splits" in plan.reason
    simt = select_decode_plan(_h100(), DecodeProblem("float32", 128, 1, 32768, 8, 32, 8))
    assert simt.path == "simt" and simt.spec.block_m == 4 and "SIMT" in simt.reason
    long = select_decode_plan(_h100(), DecodeProblem("float16", 128, 1, 131072, 1, 32, 8))
    assert long.num_splits >= 32


def test_large_batches_and_short_caches_do_not_split():
    dev = _h100()
    assert select_decode_plan(dev, DecodeProblem("float16", 128, 1, 32768, 256, 32, 8)
                              ).num_splits == 1
    assert select_decode_plan(dev, DecodeProblem("float16", 128, 1, 300, 1, 32, 8)
                              ).num_splits == 1
    assert select_decode_plan(dev, DecodeProblem("float16", 128, 1, 300, 1, 32, 8,
                                                 num_splits=7)).num_splits == 7


@given(d=st.integers(1, 256), group=st.integers(1, 16), sq=st.integers(1, 40),
       cc=st.sampled_from(GATE_CCS), dtype=st.sampled_from(("float16", "bfloat16", "float32")),
       aligned=st.booleans())
def test_every_plan_uses_a_gated_spec(d, group, sq, cc, dtype, aligned):
    dev = device_from_arch(cc)
    plan = select_decode_plan(dev, DecodeProblem(dtype, d, sq, 4096, 2, 2 * group, 2,
                                                 aligned=aligned))
    gated = all_decode_specs_for(dev)
    assert plan.spec in gated and plan.append_spec in gated
    kd = tc_head_dim(d) if plan.path != "simt" else decode_head_dim(d)
    assert plan.spec.head_dim == kd >= d
    assert plan.spec.block_m * plan.row_tiles >= group * sq
    assert plan.num_splits >= 1 and plan.ctas_per_sm >= 1


def _param_format(params: str) -> str:
    """A C parameter list as the struct format compile.launch packs (pointers Q, long long
    q, int i, float f; native alignment)."""
    codes = []
    for p in params.replace("\\", " ").split(","):
        p = " ".join(p.split())
        if "*" in p:
            codes.append("Q")
        elif p.startswith("long long "):
            codes.append("q")
        elif p.startswith("int "):
            codes.append("i")
        elif p.startswith("float "):
            codes.append("f")
        else:
            raise AssertionError(f"unexpected kernel parameter {p!r}")
    out, run = "@", 1
    for i, c in enumerate(codes):
        if i + 1 < len(codes) and codes[i + 1] == c:
            run += 1
            continue
        out += f"{run}{c}" if run > 1 else c
        run = 1
    return out


def test_launch_formats_match_the_kernel_parameter_lists():
    """kvcache packs decode's arguments by hand-written struct formats; a parameter added
    to decode_fwd.cu without its format would shift every later argument."""
    import re
    from portattn.compile import kernel_files
    src = kernel_files()["decode_fwd.cu"]
    macro = re.search(r"#define PORTATTN_DECODE_PARAMS\(T\) \\\n(.*?vec_flags)\n", src, re.S)
    assert macro is not None
    assert _param_format(macro.group(1)) == kvcache._DECODE_FORMAT
    append = re.search(r"decode_append_kernel\(\n(.*?)\) \{", src, re.S)
    assert append is not None
    assert _param_format(append.group(1)) == kvcache._APPEND_FORMAT
