"""Dropout on a real GPU, every forward path (PORTATTN_ARCH forces sm_61 SIMT, sm_70, sm_75
and sm_80 tensor cores, plus the native plan) and the backward: outputs and gradients
against reference.py with the mask reference.dropout_mask_ref draws for the same seed and
offset (so the kernels and the reference must agree on every mask element), the keep rate,
the same mask in forward and backward, reproducibility, and return_attn_probs's S_dmask.

Tolerance as everywhere: max|x - ref64| <= 2 * max|ref_lowp - ref64| + atol
(testing.compare / compare_grad), ref_lowp computed with the same mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import portattn
from portattn.reference import (attention_grad_ref, attention_probs_ref, attention_ref,
                                dropout_mask_ref)
from portattn.testing import (compare, compare_grad, forced_arch, plannable_archs,
                              poisoned_outputs, random_inputs, to_device, to_numpy)

pytestmark = pytest.mark.gpu

ARCHS = plannable_archs()
# One arch per forward path (sm_61 SIMT, sm_70 m8n8k4, sm_75 m16n8k8, sm_80 m16n8k16) and
# the native plan: the paths dropout is written into, with a bounded number of compiles.
PATH_ARCHS = tuple(a for a in ARCHS if a in (None, 61, 70, 75, 80))
HEAD_DIMS = (16, 40, 64, 72, 128, 256)
SEQLENS = st.one_of(st.integers(1, 150), st.sampled_from((1, 17, 97)))
WINDOW_SIDES = (-1, 0, 3, 33)


@dataclass(frozen=True)
class Case:
    dtype: str = "float16"
    kind: str = "torch"
    autograd: bool = False
    arch: int | None = None
    batch: int = 1
    sq: int = 17
    sk: int = 17
    hkv: int = 1
    group: int = 1
    d: int = 64
    causal: bool = False
    window: tuple = (-1, -1)
    p: float = 0.3
    drop_seed: int = 1234
    offset: int = 0
    seed: int = 0


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(("float16", "bfloat16", "float32")))
    kind = "torch" if dtype == "bfloat16" else draw(st.sampled_from(("torch", "cupy")))
    return Case(
        dtype=dtype, kind=kind, autograd=kind == "torch" and draw(st.booleans()),
        arch=draw(st.sampled_from(PATH_ARCHS)), batch=draw(st.integers(1, 2)),
        sq=draw(SEQLENS), sk=draw(SEQLENS), hkv=draw(st.integers(1, 2)),
        group=draw(st.sampled_from((1, 2, 3))), d=draw(st.sampled_from(HEAD_DIMS)),
        causal=draw(st.booleans()),
        window=(draw(st.sampled_from(WINDOW_SIDES)), draw(st.sampled_from(WINDOW_SIDES)))
        if draw(st.booleans()) else (-1, -1),
        p=draw(st.sampled_from((0.1, 0.3, 0.5, 0.9))),
        drop_seed=draw(st.integers(0, 2 ** 64 - 1)),
        offset=draw(st.sampled_from((0, 1, 2 ** 32 - 1))),
        seed=draw(st.integers(0, 2 ** 32 - 1)),
    )


def make_arrays(case: Case):
    rng = np.random.default_rng(case.seed)
    hq = case.hkv * case.group
    return {
        "q": random_inputs(rng, (case.batch, case.sq, hq, case.d), case.dtype),
        "k": random_inputs(rng, (case.batch, case.sk, case.hkv, case.d), case.dtype),
        "v": random_inputs(rng, (case.batch, case.sk, case.hkv, case.d), case.dtype),
        "dout": random_inputs(rng, (case.batch, case.sq, hq, case.d), case.dtype),
    }


def options(case: Case):
    return dict(causal=case.causal, window_size=case.window)


def mask_of(case: Case):
    return dropout_mask_ref(case.drop_seed, case.offset, case.batch, case.hkv * case.group,
                            case.sq, case.sk, case.p)


def run_case(case: Case):
    """Forward (out, lse) and backward (dq, dk, dv) against the references with the mask."""
    if case.kind == "torch":
        pytest.importorskip("torch")
    a = make_arrays(case)
    mask = mask_of(case)
    drop = dict(dropout_p=case.p, dropout_seed=case.drop_seed, dropout_offset=case.offset)
    dev = {n: to_device(a[n], case.kind, case.dtype) for n in ("q", "k", "v", "dout")}
    with forced_arch(case.arch), poisoned_outputs():
        if case.autograd:
            q, k, v = (dev[n].detach().requires_grad_(True) for n in ("q", "k", "v"))
            out, lse = portattn.flash_attn_func(q, k, v, return_lse=True, **drop,
                                                **options(case))
            out.backward(dev["dout"])
            grads = (q.grad, k.grad, v.grad)
        else:
            out, lse = portattn.flash_attn_func(dev["q"], dev["k"], dev["v"], return_lse=True,
                                                **drop, **options(case))
            grads = portattn.flash_attn_backward(dev["dout"], dev["q"], dev["k"], dev["v"], out,
                                                 lse, **drop, **options(case))
    ref_kw = dict(options(case), dropout_p=case.p, dropout_mask=mask)
    qkv = (a["q"], a["k"], a["v"])
    ref64, lse64 = attention_ref(*qkv, return_lse=True, **ref_kw)
    low, lse_low = attention_ref(*qkv, return_lse=True, precision=case.dtype, **ref_kw)
    checks = [compare(to_numpy(out), ref64, low, case.dtype, "out"),
              compare(to_numpy(lse), lse64, lse_low,
                      "float32" if case.dtype == "float32" else case.dtype, "lse")]
    g64 = attention_grad_ref(*qkv, a["dout"], **ref_kw)
    glow = attention_grad_ref(*qkv, a["dout"], precision=case.dtype, **ref_kw)
    scale = max(float(np.max(np.abs(r), initial=0.0)) for r in g64)
    checks += [compare_grad(to_numpy(g), r, lo, case.dtype, name, scale)
               for g, r, lo, name in zip(grads, g64, glow, ("dq", "dk", "dv"))]
    for c in checks:
        assert c.ok, f"{case}: {c}"


@settings(max_examples=15, deadline=None)
@given(case=cases())
@example(case=Case(sq=1, sk=1, d=40))
@example(case=Case(sq=17, sk=97, d=72, causal=True, kind="cupy", arch=80))
@example(case=Case(sq=97, sk=17, d=40, causal=True, arch=75, hkv=2, group=2))  # masked rows
@example(case=Case(sq=97, sk=130, d=72, arch=70, window=(33, 3), p=0.9, autograd=True))
@example(case=Case(sq=257, sk=300, d=64, causal=True, p=0.3, autograd=True))   # 128x128 pairs
@example(case=Case(sq=1025, sk=97, d=64, dtype="bfloat16", arch=61, causal=True, p=0.5,
                   drop_seed=2 ** 64 - 1, offset=2 ** 32 - 1))
@example(case=Case(sq=65, sk=129, d=128, dtype="float32", kind="cupy", hkv=2, group=3))
def test_dropout_matches_reference_with_generated_mask(case):
    run_case(case)


@pytest.mark.parametrize("arch", PATH_ARCHS)
def test_every_path_forced(arch):
    run_case(Case(arch=arch, sq=97, sk=130, d=72, hkv=2, group=2, causal=True, p=0.25,
                  drop_seed=77 + (arch or 0), autograd=True))


def _probs_case(arch, dtype="float16", p=0.3, **kw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    b, sq, sk, hq, hkv, d = 2, 65, 300, 4, 2, 40
    q = random_inputs(rng, (b, sq, hq, d), dtype)
    k = random_inputs(rng, (b, sk, hkv, d), dtype)
    v = random_inputs(rng, (b, sk, hkv, d), dtype)
    dev = [to_device(x, "torch", dtype) for x in (q, k, v)]
    with forced_arch(arch), poisoned_outputs():
        out, lse, s_dmask = portattn.flash_attn_func(*dev, dropout_p=p, dropout_seed=99,
                                                     return_attn_probs=True, **kw)
    assert isinstance(s_dmask, torch.Tensor) and s_dmask.dtype == torch.float32
    assert tuple(s_dmask.shape) == (b, hq, sq, sk)
    return (q, k, v), to_numpy(out), to_numpy(lse), s_dmask.cpu().numpy(), (b, hq, sq, sk)


@pytest.mark.parametrize("arch", PATH_ARCHS)
def test_attn_probs_sign_pattern_is_the_reference_mask(arch):
    p = 0.3
    (q, k, v), out, _, s, (b, hq, sq, sk) = _probs_case(arch, p=p, causal=True)
    mask = dropout_mask_ref(99, 0, b, hq, sq, sk, p)
    assert np.array_equal(np.signbit(s), ~mask)          # -0.0 where a dropped P is 0
    probs = attention_probs_ref(q, k, v, causal=True)    # undropped softmax
    assert np.max(np.abs(np.abs(s) - probs)) <= 3e-5
    # Keep rate over the whole call: 6 standard deviations.
    assert abs(mask.mean() - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / mask.size)
    assert abs((~np.signbit(s)).mean() - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / mask.size)
    # The output is the reference's with that mask.
    ref = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=mask)
    low = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=mask,
                        precision="float16")
    assert compare(out, ref, low, "float16").ok


def test_attn_probs_without_dropout_are_the_softmax():
    (q, k, v), _, _, s, _ = _probs_case(None, dtype="bfloat16", p=0.0, window_size=(5, 2),
                                        softcap=20.0)
    assert not np.any(np.signbit(s))
    probs = attention_probs_ref(q, k, v, window_size=(5, 2), softcap=20.0)
    assert np.max(np.abs(s - probs)) <= 3e-5


@pytest.mark.parametrize("kind", ["torch", "cupy"])
@pytest.mark.parametrize("arch", PATH_ARCHS)
def test_same_seed_reproduces_and_other_seeds_differ(kind, arch):
    if kind == "torch":
        pytest.importorskip("torch")
    case = Case(kind=kind, sq=70, sk=90, d=64, hkv=2, group=2, causal=True)
    a = make_arrays(case)
    dev = [to_device(a[n], kind, "float16") for n in ("q", "k", "v")]

    def run(**drop):
        with forced_arch(arch):
            return to_numpy(portattn.flash_attn_func(*dev, causal=True, **drop))
    base = run(dropout_p=0.4, dropout_seed=10)
    assert np.array_equal(base, run(dropout_p=0.4, dropout_seed=10))
    assert not np.array_equal(base, run(dropout_p=0.4, dropout_seed=11))
    assert not np.array_equal(base, run(dropout_p=0.4, dropout_seed=10, dropout_offset=1))
    # p = 0 with a seed is plain attention, bit for bit.
    assert np.array_equal(run(), run(dropout_p=0.0, dropout_seed=10))


def test_torch_manual_seed_makes_drawn_seeds_reproducible():
    torch = pytest.importorskip("torch")
    case = Case(sq=50, sk=61, d=64, hkv=1, group=2, causal=True, p=0.2)
    a = make_arrays(case)
    dev = {n: to_device(a[n], "torch", "float16") for n in ("q", "k", "v", "dout")}

    def run():
        q, k, v = (dev[n].detach().requires_grad_(True) for n in ("q", "k", "v"))
        out = portattn.flash_attn_func(q, k, v, dropout_p=case.p, causal=True)
        out.backward(dev["dout"])
        return [to_numpy(x) for x in (out, q.grad, k.grad, v.grad)]
    torch.manual_seed(123)
    first = run()
    torch.manual_seed(123)
    second = run()
    for x, y in zip(first, second):
        assert np.array_equal(x, y)
    # The drawn seed is torch's next CPU draw, and the autograd backward used it too.
    torch.manual_seed(123)
    drawn = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64).item())
    mask = dropout_mask_ref(drawn, 0, 1, 2, case.sq, case.sk, case.p)
    kw = dict(causal=True, dropout_p=case.p, dropout_mask=mask)
    qkv = (a["q"], a["k"], a["v"])
    assert compare(first[0], attention_ref(*qkv, **kw),
                   attention_ref(*qkv, precision="float16", **kw), "float16").ok
    g64 = attention_grad_ref(*qkv, a["dout"], **kw)
    glow = attention_grad_ref(*qkv, a["dout"], precision="float16", **kw)
    scale = max(float(np.max(np.abs(r))) for r in g64)
    for got, r, lo in zip(first[1:], g64, glow):
        assert compare_grad(got, r, lo, "float16", "grad", scale).ok


def test_explain_says_dropout_is_on():
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    assert "dropout p=0.1" in str(portattn.explain(q, q, q, dropout_p=0.1))
