"""Argument validation of flash_attn_backward and the backward plan, with no GPU.

Fake __cuda_array_interface__ arrays carry shapes and dtypes; detect() answers with a
GPU-less sm_80 and the launch is replaced by a sentinel, so "valid" means "got as far as
launching" and every error must come before it.
"""
from __future__ import annotations

import pytest

import portattn
from portattn import _arrays, api, backward
from portattn.arch import GATE_CCS, Problem, device_from_arch, select_bwd_plan
from portattn.arch.plan_bwd import BWD_STAGES, all_bwd_specs_for, simt_bwd_regs
from portattn.spec import KernelSpec

from fakecuda import arr

B, SQ, SK, HQ, HKV, D = 2, 8, 16, 4, 2, 64


class ReachedLaunch(Exception):
    pass


@pytest.fixture(autouse=True)
def fake_gpu(monkeypatch):
    monkeypatch.delenv("PORTATTN_ARCH", raising=False)
    monkeypatch.delenv("PORTATTN_PATH", raising=False)
    monkeypatch.setattr(_arrays, "_cai_device", lambda ptr, name: 0)
    monkeypatch.setattr(api, "detect", lambda device_id: device_from_arch(80))

    def launch(p, plan, dout, out, lse, deterministic):
        raise ReachedLaunch(plan, deterministic)
    monkeypatch.setattr(backward, "_launch_bwd", launch)


def good(**over):
    a = dict(dout=arr(B, SQ, HQ, D), q=arr(B, SQ, HQ, D), k=arr(B, SK, HKV, D),
             v=arr(B, SK, HKV, D), out=arr(B, SQ, HQ, D), lse=arr(B, HQ, SQ, dtype="float32"))
    a.update(over)
    return a


def call(a, **kw):
    return portattn.flash_attn_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"],
                                        **kw)


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"deterministic": True},
                                {"window_size": (3, 1), "softcap": 5.0},
                                {"causal_align": "top_left"}], ids=repr)
def test_valid_call_reaches_launch(kw):
    with pytest.raises(ReachedLaunch) as info:
        call(good(), **kw)
    plan, det = info.value.args
    assert plan.path == "sm80" and det == kw.get("deterministic", False)   # fp16 on sm_80


@pytest.mark.parametrize("name,bad,exc,match", [
    ("dout", arr(B, SQ, HQ, D, dtype="float32"), TypeError, r"dout.dtype must equal q.dtype"),
    ("dout", arr(B, SQ + 1, HQ, D), ValueError, r"dout.shape must equal q.shape"),
    ("out", arr(B, SQ, HQ, D, strides=(2 * SQ * HQ * D * 2, 2 * HQ * D * 2, 2 * D * 2, 4)),
     ValueError, r"out.stride\(-1\) must be 1"),
    ("out", arr(B, SQ, HQ), ValueError, r"out must have 4 dims"),
    ("lse", arr(B, HQ, SQ), TypeError, r"lse.dtype must be float32"),
    ("lse", arr(B, SQ, HQ, dtype="float32"), ValueError, r"lse.shape must be \(batch, nheads, "
                                                          r"seqlen_q\) = \(2, 4, 8\), got "
                                                          r"\(2, 8, 4\)"),
    ("lse", object(), TypeError, r"lse must be a torch CUDA tensor"),
])
def test_bad_gradient_inputs_are_refused_before_launch(name, bad, exc, match):
    with pytest.raises(exc, match=match):
        call(good(**{name: bad}))


@pytest.mark.parametrize("kw,exc,match", [
    ({"dropout_p": 0.1}, ValueError, r"dropout_seed must be the forward's seed"),
    ({"dropout_p": 0.1, "dropout_seed": -1}, ValueError, r"dropout_seed must be in"),
    ({"dropout_p": 0.1, "dropout_seed": 1, "dropout_offset": 2 ** 32}, ValueError,
     r"dropout_offset must be in"),
    ({"deterministic": 1}, TypeError, "deterministic must be a bool"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"causal_align": "middle"}, ValueError, "causal_align"),
])
def test_bad_options_are_refused(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(good(), **kw)


def test_q_k_mismatch_is_the_forward_validation():
    with pytest.raises(ValueError, match=r"q.shape\[2\] \(nheads_q = 4\) must be a multiple"):
        call(good(k=arr(B, SK, 3, D), v=arr(B, SK, 3, D)))


def test_explain_mentions_backward_plan_only_when_grad_is_needed():
    e = portattn.explain(arr(B, SQ, HQ, D), arr(B, SK, HKV, D), arr(B, SK, HKV, D))
    assert e.backward is None and "backward" not in str(e)


# ------------------------------------------------------------ the backward plan, pure

@pytest.mark.parametrize("cc", GATE_CCS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [1, 40, 64, 72, 128, 200, 256])
def test_bwd_plan_fits_the_arch(cc, dtype, d):
    dev = device_from_arch(cc)
    plan = select_bwd_plan(dev, Problem(dtype=dtype, head_dim=d))
    assert set(plan.specs) == set(BWD_STAGES)
    main = plan.spec("dkdv")
    assert main.smem_bytes <= dev.smem_per_block and plan.ctas_per_sm >= 1
    simt = plan.spec("dq")   # deterministic dq is always SIMT's kernel (run-time stage)
    assert simt.family == "simt_bwd" and plan.spec("pre") == plan.spec("cvt")
    acc, s = simt_bwd_regs(simt.block_m, simt.block_n, simt.threads, simt.tx, simt.head_dim)
    assert acc <= 128 and s <= 32 and simt.smem_bytes <= dev.smem_per_block
    tc = (cc >= 80 and dtype != "float32") or (cc == 75 and dtype == "float16")
    volta = cc in (70, 72) and dtype == "float16"
    assert (main.family == "tc_bwd") == (tc and d <= 128), plan.describe()
    assert (main.family == "tc70_bwd") == (volta and d <= 128), plan.describe()
    if main.family in ("tc_bwd", "tc70_bwd"):   # pre and cvt: tc_bwd's row kernel (no smem)
        rows = plan.spec("pre")
        assert (rows.family, rows.block_m, rows.smem_bytes, rows.mma) == ("tc_bwd", 0, 0, main.mma)
    else:
        assert all(plan.spec(st) == main for st in BWD_STAGES)
    assert "why:" in plan.describe() and f"sm_{cc}" in plan.describe()
    assert all(sp.dtype == dtype for sp in plan.specs.values())


def test_bwd_plan_is_pure_and_forced_path_is_explained():
    dev = device_from_arch(75)
    p = Problem(dtype="float16", head_dim=64)
    assert select_bwd_plan(dev, p) == select_bwd_plan(dev, p)
    assert select_bwd_plan(dev, p).path == "sm75"
    assert select_bwd_plan(dev, p, only="simt").path == "simt"
    volta = select_bwd_plan(dev, p, only="sm70")   # Turing runs m8n8k4 only emulated
    assert volta.path == "simt" and "emulated" in dict(volta.rejected)["sm70"]
    assert select_bwd_plan(device_from_arch(70), p, only="sm70").path == "sm70"
    assert select_bwd_plan(device_from_arch(90), p, only="sm75").spec("dkdv").mma == 75
    with pytest.raises(ValueError, match="path must be one of"):
        select_bwd_plan(dev, p, only="wgmma")


def test_all_bwd_specs_cover_every_plan():
    dev = device_from_arch(61)
    specs = all_bwd_specs_for(dev)
    for dtype in ("float16", "float32"):
        for d in (32, 96, 256):
            plan = select_bwd_plan(dev, Problem(dtype=dtype, head_dim=d))
            assert set(plan.specs.values()) <= set(specs)


def test_bwd_spec_names_and_existing_families_unchanged():
    s = KernelSpec("simt_bwd", "float16", 64, 32, 32, 128, 8)
    assert s.name_expression == "portattn::simt_bwd_kernel<portattn::half_t, 64, 32, 32, 128, 8>"
    assert s.short() == "simt_bwd/float16/d64/32x32/t128"
    f = KernelSpec("simt_fwd", "float16", 64, 64, 64, 128, 8)
    assert f.name_expression == "portattn::simt_fwd_kernel<portattn::half_t, 64, 64, 64, 128, 8>"
    assert s.smem_bytes == 4 * (2 * 64 * 33 * 2 + 2 * 32 * 33 + 2 * 32)
