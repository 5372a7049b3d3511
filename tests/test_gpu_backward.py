"""Backward kernels (dq, dk, dv) against reference.attention_grad_ref on a real GPU, every
plannable arch forced through PORTATTN_ARCH, through torch autograd and through
portattn.flash_attn_backward (torch and CuPy).

Tolerance (testing.compare_grad): max|grad - ref64| <= 2 * max|ref_lowp - ref64| + one ulp
of the input dtype at the gradient's magnitude, ref_lowp being the same-precision
emulation of a kernel that keeps P and dS in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import portattn
from portattn.testing import (BIAS_SHAPES, check_backward, forced_arch, plannable_archs,
                              random_bias, random_inputs, to_numpy)

pytestmark = pytest.mark.gpu

HEAD_DIMS = (1, 16, 40, 64, 72, 128, 200, 256)
SEQLENS = st.one_of(st.integers(1, 160), st.sampled_from((1, 17, 97)))
WINDOW_SIDES = (-1, 0, 1, 5, 33)


ARCHS = plannable_archs()


@dataclass(frozen=True)
class Case:
    dtype: str = "float16"
    kind: str = "torch"
    autograd: bool = True
    deterministic: bool = False
    arch: int | None = None
    batch: int = 1
    sq: int = 17
    sk: int = 17
    hkv: int = 1
    group: int = 1
    d: int = 64
    causal: bool = False
    align: str = "bottom_right"
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str = ""          # "", "heads", "batch_heads"
    bias: str = ""           # "" or "<shape>:<float|bool>"
    softmax_scale: float | None = None   # None: 1/sqrt(d); negative selects FEAT_MODS
    seed: int = 0


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(("float16", "bfloat16", "float32")))
    kind = "torch" if dtype == "bfloat16" else draw(st.sampled_from(("torch", "cupy")))
    bias = ""
    if draw(st.booleans()) and draw(st.booleans()):
        bias = f"{draw(st.sampled_from(BIAS_SHAPES))}:{draw(st.sampled_from(('float', 'bool')))}"
    return Case(
        dtype=dtype, kind=kind, autograd=kind == "torch" and draw(st.booleans()),
        deterministic=draw(st.booleans()), arch=draw(st.sampled_from(ARCHS)),
        batch=draw(st.integers(1, 2)), sq=draw(SEQLENS), sk=draw(SEQLENS),
        hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from((1, 2, 3))),
        d=draw(st.sampled_from(HEAD_DIMS)), causal=draw(st.booleans()),
        align=draw(st.sampled_from(("bottom_right", "top_left"))),
        window=(draw(st.sampled_from(WINDOW_SIDES)), draw(st.sampled_from(WINDOW_SIDES)))
        if draw(st.booleans()) else (-1, -1),
        softcap=draw(st.sampled_from((0.0, 0.0, 5.0, 30.0))),
        alibi=draw(st.sampled_from(("", "", "heads", "batch_heads"))),
        bias=bias, softmax_scale=draw(st.sampled_from((None, None, None, 0.5, -0.2))),
        seed=draw(st.integers(0, 2 ** 32 - 1)),
    )


def make_arrays(case: Case):
    rng = np.random.default_rng(case.seed)
    hq = case.hkv * case.group
    arrays = {
        "q": random_inputs(rng, (case.batch, case.sq, hq, case.d), case.dtype),
        "k": random_inputs(rng, (case.batch, case.sk, case.hkv, case.d), case.dtype),
        "v": random_inputs(rng, (case.batch, case.sk, case.hkv, case.d), case.dtype),
        "dout": random_inputs(rng, (case.batch, case.sq, hq, case.d), case.dtype),
    }
    if case.alibi:
        shape = (hq,) if case.alibi == "heads" else (case.batch, hq)
        arrays["alibi_slopes"] = rng.uniform(0.0, 0.5, shape).astype(np.float32)
    if case.bias:
        arrays["bias"] = random_bias(rng, case.bias, case.batch, hq, case.sq, case.sk)
    return arrays


def kwargs_of(case: Case):
    return dict(causal=case.causal, causal_align=case.align, window_size=case.window,
                softcap=case.softcap, softmax_scale=case.softmax_scale)


def run_case(case: Case):
    if case.autograd:
        pytest.importorskip("torch")
    with forced_arch(case.arch):
        checks = check_backward(kwargs_of(case), make_arrays(case), case.dtype, case.kind,
                                deterministic=case.deterministic, autograd=case.autograd)
    for c in checks:
        assert c.ok, f"{case}: {c}"


@settings(max_examples=30)
@given(case=cases())
@example(case=Case(sq=1, sk=1, d=1))
@example(case=Case(sq=17, sk=97, causal=True, d=40, kind="cupy", autograd=False))
@example(case=Case(sq=97, sk=17, causal=True, d=72, deterministic=True))   # masked rows
@example(case=Case(sq=97, sk=17, causal=True, align="top_left", d=200, dtype="float32",
                   kind="cupy", autograd=False))
@example(case=Case(sq=1025, sk=97, d=256, dtype="bfloat16", causal=True, hkv=2, group=2))
@example(case=Case(sq=97, sk=1025, d=128, window=(33, 5), alibi="batch_heads", batch=2))
@example(case=Case(sq=97, sk=130, d=64, hkv=2, group=3, softcap=30.0, bias="full:bool",
                   autograd=False))
@example(case=Case(sq=65, sk=129, d=72, bias="sq_sk:float", alibi="heads", softcap=5.0,
                   dtype="float32", deterministic=True, arch=61))
@example(case=Case(sq=129, sk=257, d=128, hkv=2, group=2, causal=True, arch=90))
@example(case=Case(sq=130, sk=200, d=64, causal=True, softmax_scale=-0.3, arch=90))
@example(case=Case(sq=257, sk=129, d=96, dtype="bfloat16", window=(40, 7), arch=86,
                   deterministic=True))
@example(case=Case(sq=200, sk=97, d=128, causal=True, align="top_left", arch=75,
                   kind="cupy", autograd=False))
def test_backward_matches_reference(case):
    run_case(case)


# Tensor-core dK/dV (tc_bwd.cu, tc70_bwd.cu) on every policy and tile plan_bwd can pick:
# the largest H100 tiles (64x128), the 99 KB tiles of sm_86, Turing's (m16n8k8) and
# Volta's (m8n8k4), at sizes that end one row/key past a query tile (BM 16/32/64) and a key
# tile (BN 32/64/128), with masks.
TC_BWD_CASES = [
    Case(arch=90, d=64, sq=129, sk=257, causal=True, hkv=2, group=3, seed=1),
    Case(arch=90, d=128, sq=65, sk=129, dtype="bfloat16", window=(33, 5), alibi="heads",
         seed=2),
    Case(arch=90, d=32, sq=300, sk=300, softcap=30.0, bias="full:bool", kind="cupy",
         autograd=False, seed=3),
    Case(arch=90, d=128, sq=97, sk=1025, deterministic=True, batch=2, seed=4),
    Case(arch=90, d=72, sq=1025, sk=97, causal=True, dtype="bfloat16", seed=5),
    # H100 warp-pair tiles: d64 128x128 (S^T / dP^T split too) and d128 64x128.
    Case(arch=90, d=64, sq=300, sk=257, window=(40, 7), deterministic=True, seed=19),
    Case(arch=90, d=40, sq=129, sk=385, causal=True, align="top_left", dtype="bfloat16",
         hkv=2, group=2, seed=20),
    Case(arch=90, d=128, sq=257, sk=129, causal=True, hkv=1, group=3, kind="cupy",
         autograd=False, seed=21),
    Case(arch=86, d=128, sq=129, sk=65, causal=True, align="top_left", seed=6),
    Case(arch=86, d=96, sq=33, sk=200, bias="sq_sk:float", dtype="bfloat16", seed=7),
    Case(arch=75, d=64, sq=129, sk=257, causal=True, hkv=2, group=2, seed=8),
    Case(arch=75, d=128, sq=17, sk=300, window=(5, 33), softcap=5.0, seed=9),
    Case(arch=75, d=40, sq=65, sk=1, alibi="batch_heads", batch=2, kind="cupy",
         autograd=False, seed=10),
    Case(arch=75, d=96, sq=300, sk=129, deterministic=True, causal=True, seed=11),
    # Volta's m8n8k4 (tc70_bwd.cu): 64x64 (d32, d64) and 32x32 (d96, d128) tiles.
    Case(arch=70, d=64, sq=129, sk=257, causal=True, hkv=2, group=2, seed=12),
    Case(arch=70, d=128, sq=33, sk=300, window=(5, 33), softcap=5.0, seed=13),
    Case(arch=70, d=40, sq=65, sk=1, alibi="batch_heads", batch=2, kind="cupy",
         autograd=False, seed=14),
    Case(arch=70, d=96, sq=300, sk=129, deterministic=True, causal=True, seed=15),
    Case(arch=70, d=32, sq=97, sk=65, bias="sq_sk:float", causal=True, align="top_left",
         seed=16),
    Case(arch=70, d=128, sq=200, sk=97, causal=True, softmax_scale=-0.3, hkv=2, group=3,
         seed=17),
    Case(arch=70, d=72, sq=1025, sk=130, bias="full:bool", seed=18),
]


@pytest.mark.parametrize("case", TC_BWD_CASES, ids=lambda c: f"sm{c.arch}-{c.dtype}-d{c.d}-"
                         f"{c.sq}x{c.sk}")
def test_tensor_core_backward_tiles(case):
    from portattn.testing import plannable_archs as archs
    if case.arch not in archs():
        pytest.skip(f"sm_{case.arch} cannot be planned on this GPU")
    with forced_arch(case.arch):
        from portattn.arch import Problem, detect, select_bwd_plan
        plan = select_bwd_plan(detect(0), Problem(dtype=case.dtype, head_dim=case.d))
    family = "tc70_bwd" if case.arch == 70 else "tc_bwd"
    assert plan.spec("dkdv").family == family, plan.describe()
    run_case(case)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a is not None] or [None])
def test_every_arch_forced(arch):
    run_case(Case(dtype="float16", arch=arch, sq=97, sk=130, d=72, hkv=2, group=2,
                  causal=True, seed=arch or 0))


@pytest.mark.parametrize("kind", ["torch", "cupy"])
def test_deterministic_is_bit_identical(kind):
    if kind == "torch":
        pytest.importorskip("torch")
    case = Case(kind=kind, sq=300, sk=257, d=64, hkv=2, group=2, causal=True, seed=11)
    arrays = make_arrays(case)
    from portattn.testing import to_device
    dev = {n: to_device(arrays[n], kind, "float16") for n in ("q", "k", "v", "dout")}
    out, lse = portattn.flash_attn_func(dev["q"], dev["k"], dev["v"], causal=True,
                                        return_lse=True)
    runs = [tuple(to_numpy(g) for g in portattn.flash_attn_backward(
        dev["dout"], dev["q"], dev["k"], dev["v"], out, lse, causal=True, deterministic=True))
        for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert np.array_equal(a, b)
    checks = check_backward(dict(causal=True), arrays, "float16", kind, deterministic=True)
    assert all(c.ok for c in checks), checks


def test_autograd_with_strided_inputs_and_lse_output():
    torch = pytest.importorskip("torch")
    from portattn.reference import attention_grad_ref
    b, s, h, d = 2, 77, 3, 40
    qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.float16, requires_grad=True)
    q, k, v = qkv.unbind(dim=2)
    out, lse = portattn.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert not lse.requires_grad
    g = torch.randn_like(out)
    (out * g).sum().backward()
    grads = qkv.grad.unbind(dim=2)
    args = [to_numpy(x) for x in (q, k, v, g)]
    ref = attention_grad_ref(*args, causal=True)
    low = attention_grad_ref(*args, causal=True, precision="float16")
    for got, r, lo in zip(grads, ref, low):
        err = np.abs(to_numpy(got) - r).max()
        assert err <= 2 * np.abs(lo - r).max() + 2 ** -10 * np.abs(r).max()


def test_loss_sum_backward_and_fully_masked_rows():
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 9, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 4, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 4, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    portattn.flash_attn_func(q, k, v, causal=True).sum().backward()   # dout: stride-0 ones
    assert torch.all(q.grad[:, :5] == 0) and not torch.isnan(q.grad).any()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert k.grad.shape == k.shape and v.grad.abs().sum() > 0
    with torch.no_grad():
        portattn.flash_attn_func(q, k, v)


def test_explain_mentions_backward_when_grad_is_needed():
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 8, 1, 72, device="cuda", dtype=torch.float16, requires_grad=True)
    e = portattn.explain(q, q, q, causal=True)
    assert e.backward is not None and f"backward path {e.backward.path}" in str(e)
    with torch.no_grad():
        assert portattn.explain(q, q, q).backward is None
