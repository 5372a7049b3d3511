"""The dropout generator that defines every kernel's mask (reference.dropout_mask_ref):
Philox4x32-10 against Random123's published known-answer vectors, the counter layout,
the threshold rule and the keep rate."""
from __future__ import annotations

import math

import numpy as np
import pytest

from portattn.reference import (attention_grad_ref, attention_probs_ref, attention_ref,
                                dropout_mask_ref, dropout_threshold, philox4x32_10)

# Random123 kat_vectors, "philox4x32 10" lines: counter (4 words), key (2), expected (4).
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    got = philox4x32_10(np.array(ctr, dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert got.dtype == np.uint32
    assert tuple(int(x) for x in got) == want


def test_philox_vectorised_equals_one_at_a_time():
    ctrs = np.array([c for c, _, _ in KAT], dtype=np.uint32)
    keys = np.array([k for _, k, _ in KAT], dtype=np.uint32)
    got = philox4x32_10(ctrs, keys)
    assert [tuple(int(x) for x in row) for row in got] == [w for _, _, w in KAT]


def test_mask_is_the_documented_counter_layout():
    seed, offset, b, h, sq, sk, p = 0x0123456789ABCDEF, 77, 2, 3, 5, 11, 0.37
    mask = dropout_mask_ref(seed, offset, b, h, sq, sk, p)
    thr = dropout_threshold(p)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                for j in range(sk):
                    words = philox4x32_10(
                        np.array([j >> 2, i, bi * h + hi, offset], dtype=np.uint32),
                        np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32))
                    assert mask[bi, hi, i, j] == (int(words[j & 3]) >= thr)


def test_mask_is_a_pure_function_of_the_element():
    big = dropout_mask_ref(5, 3, 3, 4, 40, 70, 0.5)
    # A smaller call is the leading block of a larger one (varlen sequences use that).
    assert np.array_equal(dropout_mask_ref(5, 3, 3, 4, 17, 33, 0.5), big[:, :, :17, :33])
    # A different seed or offset gives a different mask.
    assert not np.array_equal(dropout_mask_ref(6, 3, 3, 4, 40, 70, 0.5), big)
    assert not np.array_equal(dropout_mask_ref(5, 4, 3, 4, 40, 70, 0.5), big)
    assert np.array_equal(dropout_mask_ref(5, 3, 3, 4, 40, 70, 0.5), big)


def test_threshold_rule():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2 ** 31
    assert dropout_threshold(0.25) == 2 ** 30
    assert dropout_threshold(1.0 - 2.0 ** -40) == 2 ** 32 - 1
    assert dropout_threshold(2.0 ** -34) == 0          # 2^-2 rounds to 0
    for p in (0.1, 0.3, 0.9, 1e-7, 0.999999):
        keep = 1.0 - dropout_threshold(p) / 2.0 ** 32
        assert abs(keep - (1.0 - p)) <= 2.0 ** -32
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            dropout_threshold(bad)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_keep_rate_within_statistical_bounds(p):
    mask = dropout_mask_ref(2024, 0, 2, 4, 64, 130, p)
    n = mask.size
    keep = 1.0 - p
    # 6 standard deviations: a false failure is far less likely than 1e-8.
    assert abs(mask.mean() - keep) <= 6 * math.sqrt(keep * (1 - keep) / n) + 1e-12
    # Neighbouring keys share a Philox call; each word position keeps at the same rate.
    for e in range(4):
        sub = mask[..., e::4]
        assert abs(sub.mean() - keep) <= 6 * math.sqrt(keep * (1 - keep) / sub.size) + 1e-12


def test_rows_and_heads_are_not_correlated():
    mask = dropout_mask_ref(99, 0, 1, 2, 200, 256, 0.5).astype(np.float64)
    a, b = mask[0, 0], mask[0, 1]
    rows = mask[0, 0, 1:], mask[0, 0, :-1]
    for x, y in ((a, b), rows):
        corr = np.corrcoef(x.ravel(), y.ravel())[0, 1]
        assert abs(corr) < 6 / math.sqrt(x.size)


@pytest.mark.parametrize("name,value", [("seed", -1), ("seed", 2 ** 64), ("seed", 1.5),
                                        ("offset", -1), ("offset", 2 ** 32), ("offset", True)])
def test_mask_argument_validation(name, value):
    args = dict(seed=1, offset=0, batch=1, nheads=1, seqlen_q=2, seqlen_k=2, p=0.5)
    args[name] = value
    with pytest.raises(ValueError, match=name):
        dropout_mask_ref(**args)


def test_reference_with_generated_mask():
    rng = np.random.default_rng(0)
    b, sq, sk, hq, hkv, d, p = 2, 9, 13, 4, 2, 8, 0.3
    q = rng.standard_normal((b, sq, hq, d))
    k = rng.standard_normal((b, sk, hkv, d))
    v = rng.standard_normal((b, sk, hkv, d))
    mask = dropout_mask_ref(7, 0, b, hq, sq, sk, p)
    probs = attention_probs_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=mask)
    assert np.all(probs[~mask] == 0)
    undropped = attention_probs_ref(q, k, v, causal=True)
    np.testing.assert_allclose(probs[mask], undropped[mask] / (1 - p))
    out = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=mask)
    np.testing.assert_allclose(
        out, np.einsum("bhij,bjhd->bihd", probs, np.repeat(v, hq // hkv, axis=2)), atol=1e-12)
    dq, dk, dv = attention_grad_ref(q, k, v, rng.standard_normal(out.shape), causal=True,
                                    dropout_p=p, dropout_mask=mask)
    assert all(np.all(np.isfinite(g)) for g in (dq, dk, dv))
