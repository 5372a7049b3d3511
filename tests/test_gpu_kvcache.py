"""flash_attn_with_kvcache against reference.attention_kvcache_ref on a real GPU, every
plannable arch forced: append, paged caches, cache_batch_idx, GQA packing, causal, window,
ALiBi, softcap, split counts, q lengths 1..16 and beyond, empty and full caches.

Skipped with a reason when no GPU is present; HYPOTHESIS_PROFILE=device draws more.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import portattn
from portattn.reference import attention_kvcache_ref
from portattn.testing import (compare, forced_arch, plannable_archs, poisoned_outputs,
                              random_inputs, to_device, to_numpy)

pytestmark = pytest.mark.gpu

HEAD_DIMS = (16, 40, 64, 72, 128, 200, 256)


ARCHS = plannable_archs()


@dataclass(frozen=True)
class Case:
    dtype: str = "float16"
    kind: str = "torch"
    arch: int | None = None
    batch: int = 2
    sq: int = 1
    hkv: int = 2
    group: int = 4
    d: int = 64
    capacity: int = 100
    page: int = 0               # 0: contiguous cache
    s_new: int = 0
    lens: str = "random"        # "random", "zero", "full"
    batch_idx: bool = False
    seqlens_int: bool = False
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    splits: int = 0
    seed: int = 0


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(("float16", "bfloat16", "float32")))
    page = draw(st.sampled_from((0, 0, 16, 64, 256, 5)))
    return Case(
        dtype=dtype, kind="torch" if dtype == "bfloat16" else draw(st.sampled_from(("torch", "cupy"))),
        arch=draw(st.sampled_from(ARCHS)), batch=draw(st.integers(1, 3)),
        sq=draw(st.one_of(st.integers(1, 16), st.sampled_from((17, 40)))),
        hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from((1, 2, 3, 4, 8))),
        d=draw(st.sampled_from(HEAD_DIMS)), capacity=draw(st.integers(1, 700)), page=page,
        s_new=draw(st.sampled_from((0, 0, 1, 3))),
        lens=draw(st.sampled_from(("random", "random", "zero", "full"))),
        batch_idx=page == 0 and draw(st.booleans()), seqlens_int=draw(st.booleans()),
        causal=draw(st.booleans()),
        window=(draw(st.sampled_from((-1, -1, 0, 7, 100))), draw(st.sampled_from((-1, 0, 3)))),
        softcap=draw(st.sampled_from((0.0, 0.0, 5.0))), alibi=draw(st.booleans()),
        splits=draw(st.sampled_from((0, 0, 1, 2, 3, 7))), seed=draw(st.integers(0, 2 ** 16)))


def _ints(a: np.ndarray, kind: str):
    if kind == "torch":
        import torch
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to("cuda")
    import cupy
    return cupy.asarray(np.ascontiguousarray(a, dtype=np.int32))


def run_case(c: Case):
    rng = np.random.default_rng(c.seed)
    hq = c.hkv * c.group
    capacity = c.capacity
    if c.page:
        blocks_per_row = -(-capacity // c.page)
        capacity = blocks_per_row * c.page
    s_new = min(c.s_new, capacity)
    room = capacity - s_new
    if c.seqlens_int:
        lens = np.full(c.batch, {"zero": 0, "full": room}.get(c.lens, int(rng.integers(0, room + 1))))
    else:
        lens = {"zero": np.zeros(c.batch, np.int64), "full": np.full(c.batch, room)}.get(
            c.lens, rng.integers(0, room + 1, c.batch))
    q = random_inputs(rng, (c.batch, c.sq, hq, c.d), c.dtype)
    knew = random_inputs(rng, (c.batch, s_new, c.hkv, c.d), c.dtype) if s_new else None
    vnew = random_inputs(rng, (c.batch, s_new, c.hkv, c.d), c.dtype) if s_new else None
    table = idx = None
    if c.page:
        nblocks = c.batch * blocks_per_row + 2
        table = rng.permutation(nblocks)[: c.batch * blocks_per_row].reshape(c.batch, -1)
        cache_shape = (nblocks, c.page, c.hkv, c.d)
    else:
        rows = c.batch + (2 if c.batch_idx else 0)
        if c.batch_idx:
            idx = rng.permutation(rows)[: c.batch]
        cache_shape = (rows, capacity, c.hkv, c.d)
    kc = random_inputs(rng, cache_shape, c.dtype)
    vc = random_inputs(rng, cache_shape, c.dtype)
    slopes = (rng.uniform(0.01, 0.5, hq).astype(np.float32) if c.alibi else None)
    seqlens_arg = int(lens[0]) if c.seqlens_int else lens

    opts = dict(causal=c.causal, window_size=c.window, softcap=c.softcap)
    ref_args = dict(k=knew, v=vnew, cache_seqlens=seqlens_arg if c.seqlens_int else lens,
                    cache_batch_idx=idx, block_table=table, alibi_slopes=slopes, **opts)
    out64, k_after, v_after, lse64 = attention_kvcache_ref(q, kc, vc, return_lse=True, **ref_args)
    low, _, _, lse_low = attention_kvcache_ref(q, kc, vc, return_lse=True, precision=c.dtype,
                                               **ref_args)

    dev = {n: to_device(a, c.kind, c.dtype) for n, a in (("q", q), ("kc", kc), ("vc", vc))}
    kw = dict(num_splits=c.splits, return_softmax_lse=True, **opts)
    if s_new:
        kw["k"], kw["v"] = to_device(knew, c.kind, c.dtype), to_device(vnew, c.kind, c.dtype)
    kw["cache_seqlens"] = seqlens_arg if c.seqlens_int else _ints(lens, c.kind)
    if table is not None:
        kw["block_table"] = _ints(table, c.kind)
    if idx is not None:
        kw["cache_batch_idx"] = _ints(idx, c.kind)
    if slopes is not None:
        kw["alibi_slopes"] = to_device(slopes, c.kind, "float32")
    with forced_arch(c.arch), poisoned_outputs():
        out, lse = portattn.flash_attn_with_kvcache(dev["q"], dev["kc"], dev["vc"], **kw)
        plan = portattn.explain_kvcache(dev["q"], dev["kc"], dev["vc"], **kw).plan
    c_out = compare(to_numpy(out), out64, low, c.dtype, "out")
    c_lse = compare(to_numpy(lse), lse64, lse_low, "float32" if c.dtype == "float32" else c.dtype,
                    "lse")
    k_ok = np.array_equal(to_numpy(dev["kc"]), k_after.astype(np.float64))
    v_ok = np.array_equal(to_numpy(dev["vc"]), v_after.astype(np.float64))
    return c_out, c_lse, k_ok, v_ok, plan


def check(c: Case):
    c_out, c_lse, k_ok, v_ok, plan = run_case(c)
    msg = f"{c}\n{c_out}\n{c_lse}\ncaches appended {k_ok}/{v_ok}\n{plan.describe()}"
    assert c_out.ok and c_lse.ok and k_ok and v_ok, msg


@given(cases())
@example(Case())
@example(Case(dtype="bfloat16", sq=1, group=4, hkv=2, d=128, capacity=1025, page=16, s_new=1,
              splits=0))
@example(Case(sq=16, group=8, hkv=1, d=256, capacity=97, s_new=3, causal=True, splits=3))
@example(Case(dtype="float32", kind="cupy", sq=17, group=3, d=40, capacity=17, lens="zero",
              s_new=0, splits=2))
@example(Case(sq=5, group=2, d=72, capacity=256, page=256, lens="full", s_new=0,
              window=(7, 0), alibi=True, softcap=5.0, splits=7))
@example(Case(sq=2, group=5, d=200, capacity=300, page=64, s_new=3, lens="zero",
              causal=True, alibi=True, splits=0, batch_idx=False))
@example(Case(sq=1, group=1, d=64, capacity=600, batch_idx=True, s_new=1, splits=2,
              window=(0, 0)))
@example(Case(dtype="bfloat16", sq=1, group=8, hkv=1, d=256, capacity=333, page=16, s_new=1,
              causal=True, splits=3))
@example(Case(sq=1, group=8, hkv=1, batch=1, d=128, capacity=4000, lens="full", splits=1))
@example(Case(dtype="bfloat16", sq=3, group=4, d=128, capacity=2000, lens="full", splits=0,
              alibi=True, softcap=5.0))
@example(Case(sq=2, group=3, d=33, capacity=150, s_new=1, splits=2))
def test_kvcache_matches_reference(c):
    check(c)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("splits", [1, 2, 5, 16])
def test_split_counts_agree_on_every_arch(arch, splits):
    check(Case(arch=arch, batch=2, sq=3, group=4, hkv=2, d=128, capacity=900, page=64,
               s_new=2, causal=True, alibi=True, splits=splits, seed=splits))


@pytest.mark.parametrize("arch", [None, 75])
@pytest.mark.parametrize("hint", [True, False])
def test_split_merge_is_exact_and_deterministic(arch, hint, monkeypatch):
    """The last CTA of each group merges the splits in split order: repeated calls are
    bit-identical and match the reference, with the L2 hint on the loads or without."""
    import torch
    from portattn.arch import plan_decode
    monkeypatch.setattr(plan_decode, "TC_L2_HINT", hint)
    c = Case(arch=arch, batch=3, sq=2, group=4, hkv=2, d=128, capacity=3000, lens="random",
             splits=7, alibi=True, seed=11)
    check(c)
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(3, 1, 16, 128, device="cuda", dtype=torch.float16, generator=g)
    kc = torch.randn(3, 5000, 4, 128, device="cuda", dtype=torch.float16, generator=g)
    vc = torch.randn(3, 5000, 4, 128, device="cuda", dtype=torch.float16, generator=g)
    lens = torch.tensor([5000, 17, 4321], device="cuda", dtype=torch.int32)
    with forced_arch(arch):
        runs = [portattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=n,
                                                 return_softmax_lse=True)
                for n in (9, 9, 9, 0, 0)]
    for out, lse in runs[1:3]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
    assert torch.equal(runs[3][0], runs[4][0]) and torch.equal(runs[3][1], runs[4][1])


def test_turing_tensor_core_decode_forced_on_this_gpu():
    """PORTATTN_PATH=sm75 runs the m16n8k8 decode kernel on any sm_75+ GPU."""
    from portattn.testing import forced_path
    with forced_path("sm75"):
        for d, page, sq, group in ((64, 0, 1, 8), (128, 16, 3, 4), (256, 0, 16, 1), (72, 64, 1, 5)):
            c = Case(sq=sq, group=group, d=d, capacity=777, page=page, s_new=1, causal=True,
                     splits=0, seed=d)
            c_out, c_lse, k_ok, v_ok, plan = run_case(c)
            assert plan.path == "sm75", plan.describe()
            assert c_out.ok and c_lse.ok and k_ok and v_ok, (c, c_out, c_lse)


def test_cache_seqlens_int64_refused_on_gpu():
    import torch
    q = torch.randn(1, 1, 4, 64, device="cuda", dtype=torch.float16)
    kc = torch.randn(1, 32, 1, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match="cache_seqlens.dtype must be int32, got int64"):
        portattn.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=torch.tensor([3], device="cuda"))
    with pytest.raises(ValueError, match="cache capacity = 32"):
        portattn.flash_attn_with_kvcache(
            q, kc, kc, cache_seqlens=torch.tensor([33], device="cuda", dtype=torch.int32))


@pytest.mark.parametrize("arch", [None, 70])
def test_unchecked_bad_indices_stay_inside_the_cache(arch):
    import torch
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.float16)
    kc = torch.randn(3, 64, 2, 128, device="cuda", dtype=torch.float16)
    knew = torch.randn(2, 1, 2, 128, device="cuda", dtype=torch.float16)
    lens = torch.tensor([70, -5], device="cuda", dtype=torch.int32)
    idx = torch.tensor([7, -1], device="cuda", dtype=torch.int32)
    with forced_arch(arch):
        out = portattn.flash_attn_with_kvcache(q, kc, kc.clone(), knew, knew, cache_seqlens=lens,
                                               cache_batch_idx=idx, check_indices=False)
        pages = torch.randn(4, 16, 2, 128, device="cuda", dtype=torch.float16)
        table = torch.tensor([[0, 9, -3, 1], [2, 3, 100, 0]], device="cuda", dtype=torch.int32)
        out2 = portattn.flash_attn_with_kvcache(q, pages, pages, cache_seqlens=lens,
                                                block_table=table, check_indices=False)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()


def test_cuda_graph_capture_needs_unchecked_indices():
    """A decode step with GPU index arrays captures into a CUDA graph with
    check_indices=False and replays to the eager result; the default check refuses to
    run inside the capture (its host copy is not capturable), and so does a capture on a
    stream that has no split-merge counters yet, each with a message saying so."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.float16, generator=g)
    kc = torch.randn(2, 3000, 2, 128, device="cuda", dtype=torch.float16, generator=g)
    vc = torch.randn(2, 3000, 2, 128, device="cuda", dtype=torch.float16, generator=g)
    lens = torch.tensor([2999, 1234], device="cuda", dtype=torch.int32)
    step = lambda **kw: portattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,  # noqa
                                                          num_splits=3, **kw)
    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(check_indices=False)  # compiles, and makes this stream's split-merge counters
    torch.cuda.current_stream().wait_stream(side)
    with pytest.raises(ValueError, match="merge counters per stream"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):  # its own, unwarmed stream
            step(check_indices=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = step(check_indices=False)
    q.copy_(torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())
    assert not torch.equal(out, eager)
    with pytest.raises(ValueError, match="CUDA-graph capture forbids"):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=side):
            step()
