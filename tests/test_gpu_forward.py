"""Forward kernels against reference.py on a real GPU, every plannable arch forced.

Skipped with a reason when no GPU is present; run on the device machine with
HYPOTHESIS_PROFILE=device for fresh draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import portattn
from portattn.testing import (BIAS_SHAPES, check_forward, forced_arch, forced_path,
                              plannable_archs, random_bias, random_inputs, to_numpy)

pytestmark = pytest.mark.gpu

HEAD_DIMS = (1, 16, 40, 64, 72, 96, 128, 200, 256)
SEQLENS = st.one_of(st.integers(1, 300), st.sampled_from((1, 17, 97, 1025)))
WINDOW_SIDES = (-1, 0, 1, 5, 33, 200)


ARCHS = plannable_archs()


@dataclass(frozen=True)
class Case:
    dtype: str = "float16"
    kind: str = "torch"
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
    q_scale: float = 1.0
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
        dtype=dtype, kind=kind, arch=draw(st.sampled_from(ARCHS)),
        batch=draw(st.integers(1, 2)), sq=draw(SEQLENS), sk=draw(SEQLENS),
        hkv=draw(st.integers(1, 2)), group=draw(st.sampled_from((1, 2, 3))),
        d=draw(st.sampled_from(HEAD_DIMS)), causal=draw(st.booleans()),
        align=draw(st.sampled_from(("bottom_right", "top_left"))),
        window=(draw(st.sampled_from(WINDOW_SIDES)), draw(st.sampled_from(WINDOW_SIDES)))
        if draw(st.booleans()) else (-1, -1),
        softcap=draw(st.sampled_from((0.0, 0.0, 5.0, 30.0))),
        alibi=draw(st.sampled_from(("", "", "heads", "batch_heads"))),
        bias=bias, q_scale=draw(st.sampled_from((0.3, 1.0, 3.0))),
        softmax_scale=draw(st.sampled_from((None, None, None, 0.5, -0.2))),
        seed=draw(st.integers(0, 2 ** 32 - 1)),
    )


def run_case(case: Case):
    rng = np.random.default_rng(case.seed)
    hq = case.hkv * case.group
    arrays = {
        "q": random_inputs(rng, (case.batch, case.sq, hq, case.d), case.dtype, case.q_scale),
        "k": random_inputs(rng, (case.batch, case.sk, case.hkv, case.d), case.dtype),
        "v": random_inputs(rng, (case.batch, case.sk, case.hkv, case.d), case.dtype),
    }
    if case.alibi:
        shape = (hq,) if case.alibi == "heads" else (case.batch, hq)
        arrays["alibi_slopes"] = rng.uniform(0.0, 0.5, shape).astype(np.float32)
    if case.bias:
        arrays["bias"] = random_bias(rng, case.bias, case.batch, hq, case.sq, case.sk)
    kwargs = dict(causal=case.causal, causal_align=case.align, window_size=case.window,
                  softcap=case.softcap, softmax_scale=case.softmax_scale)
    with forced_arch(case.arch):
        c_out, c_lse = check_forward(kwargs, arrays, case.dtype, case.kind,
                                     portattn.flash_attn_func)
    assert c_out.ok, f"{case}: {c_out}"
    assert c_lse.ok, f"{case}: {c_lse}"


@given(case=cases())
@example(case=Case(sq=1, sk=1, d=1))
@example(case=Case(sq=17, sk=97, causal=True, d=40))
@example(case=Case(sq=97, sk=17, causal=True, d=72))           # rows with no visible key
@example(case=Case(sq=97, sk=17, causal=True, align="top_left", d=200, dtype="float32",
                   kind="cupy"))
@example(case=Case(sq=1025, sk=1025, d=256, dtype="bfloat16", causal=True))
@example(case=Case(sq=1025, sk=97, d=128, window=(33, 5), alibi="batch_heads", batch=2))
@example(case=Case(sq=97, sk=1025, d=64, hkv=2, group=3, softcap=30.0, bias="full:bool"))
@example(case=Case(sq=300, sk=257, d=64, causal=True, softmax_scale=-0.3))   # reversed max
@example(case=Case(sq=129, sk=300, d=128, window=(40, 3), softmax_scale=-0.1, dtype="bfloat16"))
def test_forward_matches_reference(case):
    run_case(case)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a is not None] or [None])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_every_arch_forced(arch, dtype):
    run_case(Case(dtype=dtype, arch=arch, sq=97, sk=130, d=72, hkv=2, group=2, causal=True,
                  seed=arch or 0))


@pytest.mark.parametrize("path", ["simt", "sm75", "sm80", "sm70"])
def test_each_path_forced_on_this_gpu(path):
    # PORTATTN_PATH runs a path this GPU would not pick by itself (e.g. SIMT for fp16 on
    # sm_80+), with this GPU's own limits; a path the GPU cannot run raises instead. sm70
    # is planned as sm_70 (PORTATTN_ARCH): natively sm_75+ rejects m8n8k4 as emulated.
    import cupy
    cc = int(cupy.cuda.Device().compute_capability)
    need = {"simt": 50, "sm75": 75, "sm80": 80, "sm70": 70}[path]
    if cc < need:
        pytest.skip(f"{path} needs sm_{need}+")
    with forced_path(path), forced_arch(70 if path == "sm70" else None):
        run_case(Case(dtype="float16", sq=130, sk=97, d=72, hkv=2, group=2, causal=True,
                      softcap=20.0, seed=need, arch=70 if path == "sm70" else None))
        q = cupy.zeros((1, 8, 1, 64), dtype=cupy.float16)
        assert portattn.explain(q, q, q).plan.path == path


@pytest.mark.parametrize("case", [
    Case(sq=1, sk=1, d=1),
    Case(sq=17, sk=97, d=40, causal=True, hkv=2, group=3),
    Case(sq=97, sk=17, d=72, causal=True, align="top_left", kind="cupy"),
    Case(sq=130, sk=97, d=96, window=(33, 5), alibi="batch_heads", batch=2),
    Case(sq=1025, sk=1025, d=128, causal=True, softcap=30.0),
    Case(sq=97, sk=1025, d=160, hkv=2, group=2, bias="full:bool"),
    Case(sq=200, sk=300, d=190, window=(0, 1), bias="per_head_rows:float", q_scale=3.0),
    Case(sq=65, sk=129, d=224, causal=True, alibi="heads"),
    Case(sq=300, sk=257, d=256, softcap=5.0, bias="sq_sk:float", batch=2),
])
def test_volta_m8n8k4_path_forced(case):
    # Volta's m8n8k4 path runs on any newer GPU (ptxas emulates the instruction there) when
    # planned as sm_70: every feature and head-dim bucket, with PORTATTN_PATH pinning it.
    import cupy
    if int(cupy.cuda.Device().compute_capability) < 70:
        pytest.skip("mma.m8n8k4 needs sm_70+")
    with forced_path("sm70"):
        run_case(Case(**{**case.__dict__, "arch": 70, "seed": case.d}))
        with forced_arch(70):
            q = cupy.zeros((1, 8, 1, case.d), dtype=cupy.float16)
            assert portattn.explain(q, q, q).plan.path == "sm70"


def _torch():
    return pytest.importorskip("torch")


def test_strided_and_misaligned_inputs():
    torch = _torch()
    from portattn.reference import attention_ref
    b, s, h, d = 2, 77, 3, 40
    qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.float16)
    q, k, v = qkv.unbind(dim=2)                      # strides (s*3*h*d, 3*h*d, d, 1)
    buf = torch.randn(b, s, h, d + 1, device="cuda", dtype=torch.float16)
    v_mis = buf[..., 1:]                             # base pointer 2 bytes off: scalar loads
    for vv in (v, v_mis):
        out = portattn.flash_attn_func(q, k, vv, causal=True)
        ref = attention_ref(to_numpy(q), to_numpy(k), to_numpy(vv), causal=True)
        low = attention_ref(to_numpy(q), to_numpy(k), to_numpy(vv), causal=True,
                            precision="float16")
        err = np.abs(to_numpy(out) - ref).max()
        assert err <= 2 * np.abs(low - ref).max() + 2 ** -10 * max(1, np.abs(ref).max())


def test_fully_masked_rows_are_zero_with_neg_inf_lse():
    torch = _torch()
    q = torch.randn(1, 9, 2, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 4, 2, 64, device="cuda", dtype=torch.float16)
    out, lse = portattn.flash_attn_func(q, k, k, causal=True, return_lse=True)
    assert torch.all(out[:, :5] == 0) and not torch.isnan(out).any()
    assert torch.all(torch.isneginf(lse[:, :, :5])) and torch.isfinite(lse[:, :, 5:]).all()
    mask = torch.ones(9, 4, dtype=torch.bool, device="cuda")
    mask[3] = False
    out = portattn.flash_attn_func(q, k, k, bias=mask)
    assert torch.all(out[:, 3] == 0) and torch.all(out[:, 4] != 0)


def test_offsets_past_2_31_elements():
    torch = _torch()
    d, s, h = 64, 32, 2
    big = 2 ** 31 + 4096
    storage = torch.empty(big + s * h * d, dtype=torch.float16, device="cuda")
    storage[-s * h * d:].normal_()
    storage[:s * h * d].normal_()
    x = storage.as_strided((2, s, h, d), (big, h * d, d, 1))
    out = portattn.flash_attn_func(x, x, x)
    from portattn.reference import attention_ref
    xs = to_numpy(x)
    ref = attention_ref(xs, xs, xs)
    assert np.abs(to_numpy(out) - ref).max() < 5e-3
    del storage


def test_torch_side_stream_and_types():
    torch = _torch()
    q = torch.randn(2, 65, 4, 128, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = portattn.flash_attn_func(q, q, q)
    s.synchronize()
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and out.is_contiguous()
    ref = portattn.flash_attn_func(q, q, q)
    assert torch.equal(out, ref)                     # same kernel, same inputs: bit-equal


def test_cupy_and_cuda_array_interface_inputs():
    import cupy
    rng = np.random.default_rng(5)
    q = cupy.asarray(rng.standard_normal((1, 33, 2, 64)).astype(np.float16))

    class Producer:                                   # a bare __cuda_array_interface__ object
        def __init__(self, a):
            self.a = a
            self.__cuda_array_interface__ = a.__cuda_array_interface__

    out = portattn.flash_attn_func(q, q, q)
    out2 = portattn.flash_attn_func(Producer(q), Producer(q), Producer(q))
    assert isinstance(out, cupy.ndarray) and isinstance(out2, cupy.ndarray)
    assert bool(cupy.all(out == out2))


def test_autograd_backward_runs_not_ignored():
    torch = _torch()
    q = torch.randn(1, 8, 1, 32, device="cuda", dtype=torch.float16, requires_grad=True)
    out = portattn.flash_attn_func(q, q, q)
    assert out.requires_grad
    out.float().pow(2).sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape and torch.isfinite(q.grad).all()
    assert q.grad.abs().sum() > 0
    with torch.no_grad():
        assert not portattn.flash_attn_func(q, q, q).requires_grad


def test_explain_names_the_plan_that_runs():
    torch = _torch()
    q = torch.randn(1, 8, 1, 72, device="cuda", dtype=torch.float16)
    e = portattn.explain(q, q, q, causal=True)
    assert e.plan == portattn.select_plan(e.device, e.problem)
    assert e.plan.spec.head_dim == 96          # 72 runs padded inside the kernel
    text = str(e)
    assert "why:" in text and f"path {e.plan.path}" in text
    assert all(f"not {p}:" in text for p in ("sm80", "sm75", "sm70", "simt") if p != e.plan.path)


def test_cuda_array_interface_pointing_at_host_memory_is_refused():
    host = np.zeros((1, 8, 1, 32), dtype=np.float16)

    class HostProducer:
        __cuda_array_interface__ = {"shape": host.shape, "typestr": "<f2", "version": 3,
                                    "data": (host.ctypes.data, False), "strides": None}

    with pytest.raises(ValueError, match="q must be on a CUDA device"):
        portattn.flash_attn_func(HostProducer(), HostProducer(), HostProducer())
