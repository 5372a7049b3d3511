"""attention_grad_ref against central finite differences of attention_ref and against an
independent formulation (the explicit softmax Jacobian, one row at a time)."""
from __future__ import annotations

import numpy as np
import pytest

from portattn.reference import attention_grad_ref, attention_ref

FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "causal_top_left": {"causal": True, "causal_align": "top_left"},
    "window": {"window_size": (2, 1)},
    "softcap": {"softcap": 1.5},
    "alibi": {"alibi_slopes": np.array([0.3, 0.7, 0.1, 0.5])},
    "bias": {"bias": "float"},
    "mask": {"bias": "bool"},
    "scale": {"softmax_scale": 0.9},
    "everything": {"causal": True, "window_size": (3, -1), "softcap": 2.0,
                   "alibi_slopes": np.array([0.2, 0.4, 0.6, 0.8]), "bias": "float"},
}


def _inputs(seed, b=2, sq=5, sk=6, hq=4, hkv=2, d=3, dv=4):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, hq, d))
    k = rng.standard_normal((b, sk, hkv, d))
    v = rng.standard_normal((b, sk, hkv, dv))
    g = rng.standard_normal((b, sq, hq, dv))
    return rng, q, k, v, g


def _kwargs(rng, feature, b, hq, sq, sk):
    kw = dict(FEATURES[feature])
    if kw.get("bias") == "float":
        kw["bias"] = rng.standard_normal((b, hq, sq, sk))
    elif kw.get("bias") == "bool":
        kw["bias"] = rng.random((1, hq, sq, sk)) < 0.7
    return kw


def _numeric_grads(q, k, v, g, kw, eps=1e-6):
    def loss(qq, kk, vv):
        return float(np.sum(attention_ref(qq, kk, vv, **kw) * g))

    grads = []
    for which in range(3):
        arrs = [q.copy(), k.copy(), v.copy()]
        x = arrs[which]
        gx = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + eps
            hi = loss(*arrs)
            x[idx] = old - eps
            lo = loss(*arrs)
            x[idx] = old
            gx[idx] = (hi - lo) / (2 * eps)
        grads.append(gx)
    return grads


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_matches_central_finite_differences(feature):
    rng, q, k, v, g = _inputs(sorted(FEATURES).index(feature))
    kw = _kwargs(rng, feature, 2, 4, 5, 6)
    got = attention_grad_ref(q, k, v, g, **kw)
    want = _numeric_grads(q, k, v, g, kw)
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, w, rtol=1e-6, atol=1e-7, err_msg=f"{feature} {name}")


def _jacobian_grads(q, k, v, g, *, scale, causal_off, softcap):
    """Independent: per (batch, head, row), J = diag(p) - p p^T applied to dP, no D trick;
    GQA by explicit repetition of K/V and summing the repeated gradients afterwards."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    grp = hq // hkv
    kr, vr = np.repeat(k, grp, axis=2), np.repeat(v, grp, axis=2)
    dq, dkr, dvr = np.zeros_like(q), np.zeros_like(kr), np.zeros_like(vr)
    for bi in range(b):
        for h in range(hq):
            for i in range(sq):
                x = kr[bi, :, h] @ q[bi, i, h] * scale
                t = softcap * np.tanh(x / softcap) if softcap else x
                vis = np.arange(sk) <= i + causal_off if causal_off is not None else \
                    np.ones(sk, bool)
                if not vis.any():
                    continue
                s = np.where(vis, t, -np.inf)
                p = np.exp(s - s.max())
                p /= p.sum()
                dvr[bi, :, h] += np.outer(p, g[bi, i, h])
                dp = vr[bi, :, h] @ g[bi, i, h]
                ds = (np.diag(p) - np.outer(p, p)) @ dp
                dx = ds * ((1 - np.tanh(x / softcap) ** 2) if softcap else 1.0) * scale
                dq[bi, i, h] = dx @ kr[bi, :, h]
                dkr[bi, :, h] += np.outer(dx, q[bi, i, h])
    fold = lambda a: a.reshape(a.shape[0], a.shape[1], hkv, grp, a.shape[3]).sum(axis=3)
    return dq, fold(dkr), fold(dvr)


@pytest.mark.parametrize("causal,softcap", [(False, 0.0), (True, 0.0), (True, 2.5)])
def test_matches_explicit_softmax_jacobian(causal, softcap):
    _, q, k, v, g = _inputs(7, sq=9, sk=4, hq=6, hkv=2, d=5, dv=3)
    got = attention_grad_ref(q, k, v, g, causal=causal, softcap=softcap, softmax_scale=0.7)
    want = _jacobian_grads(q, k, v, g, scale=0.7, causal_off=4 - 9 if causal else None,
                           softcap=softcap)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=1e-10, atol=1e-12)


def test_fully_masked_rows_give_zero_gradients_not_nan():
    _, q, k, v, g = _inputs(3, sq=8, sk=3)
    dq, dk, dv = attention_grad_ref(q, k, v, g, causal=True)   # rows 0..4 see no key
    assert np.all(np.isfinite(dq)) and np.all(dq[:, :5] == 0)
    mask = np.ones((8, 3), bool)
    mask[:, 1] = False                                          # key 1 is never seen
    dq, dk, dv = attention_grad_ref(q, k, v, g, bias=mask)
    assert np.all(dk[:, 1] == 0) and np.all(dv[:, 1] == 0)
    dq, dk, dv = attention_grad_ref(q, k[:, :0], v[:, :0], g)  # seqlen_k == 0
    assert dq.shape == q.shape and np.all(dq == 0) and dk.shape[1] == 0


def test_dropout_mask_matches_finite_differences():
    rng, q, k, v, g = _inputs(11, b=1, sq=3, sk=4, hq=2, hkv=1, d=2, dv=2)
    kw = dict(dropout_p=0.25, dropout_mask=rng.random((1, 2, 3, 4)) < 0.75, causal=True)
    for a, w in zip(attention_grad_ref(q, k, v, g, **kw), _numeric_grads(q, k, v, g, kw)):
        np.testing.assert_allclose(a, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_lowp_emulation_is_close_and_rounded(precision):
    _, q, k, v, g = _inputs(5, sq=7, sk=9, d=8, dv=8)
    ref = attention_grad_ref(q, k, v, g, causal=True, softcap=3.0)
    low = attention_grad_ref(q, k, v, g, causal=True, softcap=3.0, precision=precision)
    tol = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 6e-2}[precision]
    for a, w in zip(low, ref):
        assert np.abs(a - w).max() <= tol * max(1.0, np.abs(w).max())
        if precision == "float16":
            assert np.array_equal(a, a.astype(np.float16).astype(np.float64))


def test_dout_shape_is_validated():
    _, q, k, v, g = _inputs(1)
    with pytest.raises(ValueError, match="dout shape"):
        attention_grad_ref(q, k, v, g[:, :3])


@pytest.mark.parametrize("kw", [
    {}, {"causal": True}, {"causal": True, "causal_align": "top_left"},
    {"window_size": (1, 2), "softcap": 1.5,
     "alibi_slopes": np.array([[0.3, 0.7], [0.1, 0.5], [0.2, 0.4]])},
], ids=["plain", "causal", "causal_top_left", "features"])
def test_varlen_grad_matches_finite_differences(kw):
    """attention_varlen_grad_ref is the gradient of sum(attention_varlen_ref * dout),
    including a sequence with no queries (its keys get zero gradient) and one with no keys."""
    from portattn.reference import attention_varlen_grad_ref, attention_varlen_ref
    rng = np.random.default_rng(7)
    cu_q, cu_k = np.array([0, 3, 3, 7]), np.array([0, 4, 6, 6])
    q, k, v = (rng.standard_normal(s) for s in ((7, 2, 3), (6, 1, 3), (6, 1, 4)))
    dout = rng.standard_normal((7, 2, 4))
    grads = attention_varlen_grad_ref(q, k, v, dout, cu_q, cu_k, **kw)
    eps = 1e-6
    for x, g in zip((q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            x[idx] += eps
            hi = np.sum(attention_varlen_ref(q, k, v, cu_q, cu_k, **kw) * dout)
            x[idx] -= 2 * eps
            lo = np.sum(attention_varlen_ref(q, k, v, cu_q, cu_k, **kw) * dout)
            x[idx] += eps
            num[idx] = (hi - lo) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-7)
    assert not grads[1][4:].any() and not grads[2][4:].any()   # the query-less sequence's keys
    assert not grads[0][3:].any()                               # the key-less sequence's rows
