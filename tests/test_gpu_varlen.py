"""flash_attn_varlen_func (forward, lse and gradients) against reference.attention_varlen_ref
and attention_varlen_grad_ref on a real GPU, every plannable arch forced through
PORTATTN_ARCH, torch autograd and portattn.flash_attn_varlen_backward (torch and CuPy).

Tolerance as everywhere: max|x - ref64| <= 2 * max|ref_lowp - ref64| + one ulp of the
input dtype (testing.compare / compare_grad).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import portattn
from portattn.testing import check_varlen, forced_arch, plannable_archs, random_inputs

pytestmark = pytest.mark.gpu

HEAD_DIMS = (16, 40, 64, 72, 128, 200, 256)
LENGTHS = st.one_of(st.integers(0, 150), st.sampled_from((0, 1, 17, 97)))
ARCHS = plannable_archs()


@dataclass(frozen=True)
class Case:
    lens: tuple = ((17, 17),)        # (seqlen_q, seqlen_k) per sequence
    dtype: str = "float16"
    kind: str = "torch"
    grad: str = "autograd"           # "", "autograd" (torch), "function" (varlen_backward)
    deterministic: bool = False
    arch: int | None = None
    hkv: int = 1
    group: int = 1
    d: int = 64
    causal: bool = False
    align: str = "bottom_right"
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str = ""                  # "", "heads", "batch_heads"
    extra_max: int = 0               # max_seqlen beyond the longest sequence
    dropout: float = 0.0
    seed: int = 0


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(("float16", "bfloat16", "float32")))
    kind = "torch" if dtype == "bfloat16" else draw(st.sampled_from(("torch", "cupy")))
    grads = ("", "autograd", "function") if kind == "torch" else ("", "function")
    return Case(
        lens=tuple(draw(st.lists(st.tuples(LENGTHS, LENGTHS), min_size=1, max_size=5))),
        dtype=dtype, kind=kind, grad=draw(st.sampled_from(grads)),
        deterministic=draw(st.booleans()), arch=draw(st.sampled_from(ARCHS)),
        hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from((1, 2, 3))),
        d=draw(st.sampled_from(HEAD_DIMS)), causal=draw(st.booleans()),
        align=draw(st.sampled_from(("bottom_right", "top_left"))),
        window=(draw(st.sampled_from((-1, 0, 3, 40))), draw(st.sampled_from((-1, 0, 3, 40))))
        if draw(st.booleans()) else (-1, -1),
        softcap=draw(st.sampled_from((0.0, 0.0, 10.0))),
        alibi=draw(st.sampled_from(("", "", "heads", "batch_heads"))),
        extra_max=draw(st.sampled_from((0, 0, 5))),
        dropout=draw(st.sampled_from((0.0, 0.0, 0.0, 0.17))),
        seed=draw(st.integers(0, 2 ** 32 - 1)),
    )


def offsets(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def run_case(case: Case):
    if case.kind == "torch":
        pytest.importorskip("torch")
    rng = np.random.default_rng(case.seed)
    hq = case.hkv * case.group
    cu_q = offsets([a for a, _ in case.lens])
    cu_k = offsets([b for _, b in case.lens])
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    arrays = {
        "q": random_inputs(rng, (tq, hq, case.d), case.dtype),
        "k": random_inputs(rng, (tk, case.hkv, case.d), case.dtype),
        "v": random_inputs(rng, (tk, case.hkv, case.d), case.dtype),
        "dout": random_inputs(rng, (tq, hq, case.d), case.dtype),
    }
    if case.alibi:
        shape = (hq,) if case.alibi == "heads" else (len(case.lens), hq)
        arrays["alibi_slopes"] = rng.uniform(0.0, 0.5, shape).astype(np.float32)
    opts = dict(causal=case.causal, causal_align=case.align, window_size=case.window,
                softcap=case.softcap)
    if case.dropout:
        opts.update(dropout_p=case.dropout, dropout_seed=case.seed, dropout_offset=case.seed % 7)
    with forced_arch(case.arch):
        checks = check_varlen(opts, arrays, cu_q, cu_k, case.dtype, case.kind, grad=case.grad,
                              deterministic=case.deterministic, extra_max=case.extra_max)
    for c in checks:
        assert c.ok, f"{case}: {c}"


@settings(max_examples=30)
@given(case=cases())
@example(case=Case(lens=((1, 1),), d=16))
@example(case=Case(lens=((17, 97), (0, 5), (97, 17), (3, 0)), causal=True, d=40))
@example(case=Case(lens=((97, 17), (1025, 1025)), causal=True, align="top_left", d=72,
                   kind="cupy", grad="function"))
@example(case=Case(lens=((130, 129), (1, 200)), d=128, hkv=2, group=2, window=(40, 3),
                   alibi="batch_heads", dtype="bfloat16", deterministic=True))
@example(case=Case(lens=((65, 64), (64, 65)), d=200, softcap=10.0, dtype="float32",
                   kind="cupy", grad="function", extra_max=5))
@example(case=Case(lens=((33, 300), (0, 0), (129, 1)), d=256, group=3, causal=True,
                   deterministic=True, arch=75))
@example(case=Case(lens=((50, 70), (20, 10)), d=64, causal=True, arch=70, alibi="heads"))
@example(case=Case(lens=((50, 70), (20, 10)), d=72, causal=True, arch=61, grad="function"))
@example(case=Case(lens=((97, 130), (0, 4), (17, 1)), d=64, group=2, causal=True, dropout=0.17,
                   seed=5))
@example(case=Case(lens=((33, 65), (64, 17)), d=40, dropout=0.17, kind="cupy", grad="function",
                   arch=70, seed=11))
def test_varlen_matches_reference(case):
    run_case(case)


@pytest.mark.parametrize("arch", ARCHS)
def test_varlen_equals_dense_per_sequence(arch):
    """Each sequence of a packed batch gives what flash_attn_func gives on it alone."""
    torch = pytest.importorskip("torch")
    lens = [(97, 130), (1, 1), (64, 17)]
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(sum(a for a, _ in lens), 4, 64, device="cuda", dtype=torch.float16,
                    generator=g)
    k = torch.randn(sum(b for _, b in lens), 2, 64, device="cuda", dtype=torch.float16,
                    generator=g)
    v = torch.randn_like(k)
    cu_q = torch.tensor(offsets([a for a, _ in lens]), device="cuda")
    cu_k = torch.tensor(offsets([b for _, b in lens]), device="cuda")
    with forced_arch(arch):
        out = portattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 97, 130, causal=True)
        for i in range(len(lens)):
            qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            dense = portattn.flash_attn_func(q[None, qs], k[None, ks], v[None, ks], causal=True)
            assert torch.equal(out[qs], dense[0]), f"sequence {i} on sm_{arch}"


@pytest.mark.parametrize("arch", [None, 75, 61])
def test_varlen_attn_probs(arch):
    """return_attn_probs on a packed batch: without dropout each sequence's block equals the
    dense call's on that sequence alone; with dropout the signs are dropout_mask_ref's
    corner for that sequence; zero outside every sequence's lengths."""
    torch = pytest.importorskip("torch")
    from portattn.reference import dropout_mask_ref
    lens = [(17, 40), (0, 3), (33, 9)]
    cu_q = torch.tensor(offsets([a for a, _ in lens]), device="cuda")
    cu_k = torch.tensor(offsets([b for _, b in lens]), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(50, 2, 64, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(52, 1, 64, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn_like(k)
    with forced_arch(arch):
        _, _, probs = portattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 40, causal=True,
                                                      return_attn_probs=True)
        _, _, dropped = portattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 40, causal=True,
                                                        dropout_p=0.3, dropout_seed=42,
                                                        return_attn_probs=True)
        assert probs.shape == dropped.shape == (3, 2, 33, 40)
        mask = torch.from_numpy(dropout_mask_ref(42, 0, 3, 2, 33, 40, 0.3)).to("cuda")
        for i, (sq, sk) in enumerate(lens):
            qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            _, _, dense = portattn.flash_attn_func(q[None, qs], k[None, ks], v[None, ks],
                                                   causal=True, return_attn_probs=True)
            assert torch.equal(probs[i, :, :sq, :sk], dense[0]), f"sequence {i}"
            block = dropped[i, :, :sq, :sk]
            assert torch.equal(block.abs(), dense[0].abs())
            assert torch.equal(~torch.signbit(block), mask[i, :, :sq, :sk])
            for x in (probs, dropped):
                assert not x[i, :, sq:].any() and not x[i, :, :, sk:].any()
