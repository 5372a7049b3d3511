"""CPU tests of portattn.reference, the oracle every GPU kernel is checked against.

The central test compares attention_ref with an independent scalar formulation written
straight from the rules in the module docstring; the others check invariants that any
correct attention must satisfy and the helper forms (varlen, kv cache, rounding).
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from portattn.reference import (
    attention_kvcache_ref,
    attention_probs_ref,
    attention_ref,
    attention_varlen_ref,
    round_to,
    round_to_bfloat16,
)

TIGHT = dict(rtol=1e-12, atol=1e-12)

BIAS_SHAPES = {
    "full": lambda b, h, q, k: (b, h, q, k),
    "qk": lambda b, h, q, k: (q, k),
    "11qk": lambda b, h, q, k: (1, 1, q, k),
    "b11k": lambda b, h, q, k: (b, 1, 1, k),
    "h1k": lambda b, h, q, k: (h, 1, k),
    "k": lambda b, h, q, k: (k,),
    "q1": lambda b, h, q, k: (q, 1),
    "bh11": lambda b, h, q, k: (b, h, 1, 1),
    "scalar": lambda b, h, q, k: (),
}


def make_params(**overrides):
    """A full case description with harmless defaults, for @example pins."""
    params = dict(
        b=1, sq=1, sk=1, hkv=1, group=1, d=4, dv=4, seed=0, scale=None, causal=False,
        align="bottom_right", window=(-1, -1), softcap=0.0, alibi=None, bias_kind=None,
        bias_shape="full", dropout_p=0.0,
    )
    params.update(overrides)
    return params


def build(params):
    """Arrays and attention_ref keyword arguments for a case description."""
    p = params
    rng = np.random.default_rng(p["seed"])
    b, sq, sk, hkv, d, dv = p["b"], p["sq"], p["sk"], p["hkv"], p["d"], p["dv"]
    hq = hkv * p["group"]
    q = rng.standard_normal((b, sq, hq, d))
    k = rng.standard_normal((b, sk, hkv, d))
    v = rng.standard_normal((b, sk, hkv, dv))
    kwargs = dict(
        softmax_scale=p["scale"], causal=p["causal"], causal_align=p["align"],
        window_size=p["window"], softcap=p["softcap"],
    )
    if p["alibi"] == "h":
        kwargs["alibi_slopes"] = rng.uniform(0.0, 1.0, hq)
    elif p["alibi"] == "bh":
        kwargs["alibi_slopes"] = rng.uniform(0.0, 1.0, (b, hq))
    if p["bias_kind"] is not None:
        shape = BIAS_SHAPES[p["bias_shape"]](b, hq, sq, sk)
        if p["bias_kind"] == "bool":
            kwargs["bias"] = rng.random(shape) < 0.7
        else:
            kwargs["bias"] = rng.standard_normal(shape)
    if p["dropout_p"] > 0.0:
        kwargs["dropout_p"] = p["dropout_p"]
        kwargs["dropout_mask"] = rng.random((b, hq, sq, sk)) >= p["dropout_p"]
    return q, k, v, kwargs


@st.composite
def cases(draw, positional=True, bias=True, dropout=True, min_sk=1):
    """Tiny random cases; positional=False leaves out causal, window, ALiBi and bias."""
    params = make_params(
        b=draw(st.integers(1, 2)),
        sq=draw(st.integers(1, 7)),
        sk=draw(st.integers(min_sk, 7)),
        hkv=draw(st.integers(1, 3)),
        group=draw(st.integers(1, 3)),
        d=draw(st.integers(1, 8)),
        dv=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**32 - 1)),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        softcap=draw(st.one_of(st.just(0.0), st.floats(0.1, 10.0))),
    )
    if positional:
        params.update(
            causal=draw(st.booleans()),
            align=draw(st.sampled_from(["bottom_right", "top_left"])),
            window=(draw(st.integers(-1, 8)), draw(st.integers(-1, 8))),
            alibi=draw(st.sampled_from([None, "h", "bh"])),
        )
    if positional and bias:
        params.update(
            bias_kind=draw(st.sampled_from([None, "bool", "float"])),
            bias_shape=draw(st.sampled_from(sorted(BIAS_SHAPES))),
        )
    if dropout:
        params["dropout_p"] = draw(st.sampled_from([0.0, 0.0, 0.25, 0.6]))
    return params


def brute_force(q, k, v, *, softmax_scale=None, causal=False, causal_align="bottom_right",
                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, bias=None,
                dropout_p=0.0, dropout_mask=None):
    """Scalar loops over (b, h, i, j), written from the rules without sharing any code."""
    b, sq, hq, d = q.shape
    sk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    off = sk - sq if causal_align == "bottom_right" else 0
    left, right = window_size
    slopes = None if alibi_slopes is None else np.broadcast_to(alibi_slopes, (b, hq))
    full_bias = None if bias is None else np.broadcast_to(bias, (b, hq, sq, sk))
    out = np.zeros((b, sq, hq, dv))
    lse = np.zeros((b, hq, sq))
    for bi in range(b):
        for h in range(hq):
            hk = h // group
            for i in range(sq):
                scores = {}
                for j in range(sk):
                    if causal and j > i + off:
                        continue
                    if left != -1 and j < i + off - left:
                        continue
                    if right != -1 and j > i + off + right:
                        continue
                    is_mask = full_bias is not None and full_bias.dtype == bool
                    if is_mask and not full_bias[bi, h, i, j]:
                        continue
                    s = math.fsum(float(q[bi, i, h, t]) * float(k[bi, j, hk, t]) for t in range(d))
                    s *= scale
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= float(slopes[bi, h]) * abs(i + off - j)
                    if full_bias is not None and full_bias.dtype != bool:
                        s += float(full_bias[bi, h, i, j])
                    scores[j] = s
                if not scores:
                    lse[bi, h, i] = -math.inf
                    continue
                m = max(scores.values())
                z = math.fsum(math.exp(s - m) for s in scores.values())
                lse[bi, h, i] = m + math.log(z)
                for j, s in scores.items():
                    p = math.exp(s - m) / z
                    if dropout_mask is not None:
                        p = p / (1.0 - dropout_p) if dropout_mask[bi, h, i, j] else 0.0
                    out[bi, i, h, :] += p * v[bi, j, hk, :]
    return out, lse


@given(params=cases())
@example(params=make_params())
@example(params=make_params(sq=5, sk=2, causal=True))
@example(params=make_params(sq=6, sk=3, causal=True, window=(1, 3), alibi="bh"))
@example(params=make_params(sq=3, sk=6, causal=True, align="top_left", alibi="h"))
@example(params=make_params(sq=7, sk=1, b=2, hkv=2, group=3, bias_kind="bool", bias_shape="q1"))
@example(params=make_params(sq=4, sk=4, window=(0, 0), softcap=0.5, bias_kind="float",
                            bias_shape="b11k", dropout_p=0.6))
def test_matches_scalar_formulation(params):
    q, k, v, kwargs = build(params)
    out, lse = attention_ref(q, k, v, return_lse=True, **kwargs)
    want_out, want_lse = brute_force(q, k, v, **kwargs)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_allclose(out, want_out, **TIGHT)
    np.testing.assert_allclose(lse, want_lse, **TIGHT)
    assert not np.isnan(out).any() and not np.isnan(lse).any()


@given(params=cases(dropout=False))
@example(params=make_params(sq=5, sk=2, causal=True))
def test_probs_rows_sum_to_one_and_give_output(params):
    q, k, v, kwargs = build(params)
    probs = attention_probs_ref(q, k, v, **kwargs)
    out, lse = attention_ref(q, k, v, return_lse=True, **kwargs)
    sums = probs.sum(axis=-1)
    masked = np.isneginf(lse)
    np.testing.assert_allclose(sums[~masked], 1.0, **TIGHT)
    assert (probs[masked] == 0).all()
    assert (probs >= 0).all()
    group = q.shape[2] // k.shape[2]
    v_rep = np.repeat(v, group, axis=2)
    np.testing.assert_allclose(np.einsum("bhij,bjhd->bihd", probs, v_rep), out, **TIGHT)


@given(params=cases(positional=False, dropout=False), perm_seed=st.integers(0, 2**32 - 1))
def test_permuting_keys_and_values_together_changes_nothing(params, perm_seed):
    q, k, v, kwargs = build(params)
    perm = np.random.default_rng(perm_seed).permutation(k.shape[1])
    out, lse = attention_ref(q, k, v, return_lse=True, **kwargs)
    out_p, lse_p = attention_ref(q, k[:, perm], v[:, perm], return_lse=True, **kwargs)
    np.testing.assert_allclose(out_p, out, **TIGHT)
    np.testing.assert_allclose(lse_p, lse, **TIGHT)


@given(params=cases(dropout=False))
@example(params=make_params(sq=5, sk=2, causal=True, window=(-1, -1)))
def test_causal_is_window_with_right_zero(params):
    q, k, v, kwargs = build(params)
    left, right = kwargs["window_size"]
    for align in ("bottom_right", "top_left"):
        kwargs.update(causal_align=align)
        causal = attention_ref(q, k, v, return_lse=True, **{**kwargs, "causal": True})
        windowed = attention_ref(q, k, v, return_lse=True,
                                 **{**kwargs, "causal": False, "window_size": (left, 0)})
        for got, want in zip(causal, windowed):
            np.testing.assert_array_equal(got, want)
    plain = attention_ref(q, k, v, causal=True)
    np.testing.assert_array_equal(plain, attention_ref(q, k, v, window_size=(-1, 0)))


def test_alignments_agree_when_square():
    q, k, v, _ = build(make_params(b=2, sq=5, sk=5, hkv=2, group=2, seed=3))
    for opts in (dict(causal=True), dict(window_size=(2, 1)), dict(alibi_slopes=np.ones(4))):
        np.testing.assert_array_equal(
            attention_ref(q, k, v, causal_align="top_left", **opts),
            attention_ref(q, k, v, causal_align="bottom_right", **opts),
        )


def _strict_run(fn, *args, **kwargs):
    """Call fn with every NumPy floating-point warning turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            return fn(*args, **kwargs)


@pytest.mark.parametrize("precision", ["float64", "float32", "float16", "bfloat16"])
def test_fully_masked_rows_are_zero_with_neg_inf_lse(precision):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 5, 2, 4))
    k = rng.standard_normal((2, 2, 1, 4))
    v = rng.standard_normal((2, 2, 1, 3))

    out, lse = _strict_run(attention_ref, q, k, v, causal=True, return_lse=True,
                           precision=precision)
    # bottom-right: off = 2 - 5 = -3, so rows 0..2 see no key at all.
    assert (out[:, :3] == 0).all() and np.isneginf(lse[:, :, :3]).all()
    assert np.isfinite(out[:, 3:]).all() and np.isfinite(lse[:, :, 3:]).all()

    mask = np.ones((5, 2), dtype=bool)
    mask[1] = False
    out, lse = _strict_run(attention_ref, q, k, v, bias=mask, return_lse=True,
                           precision=precision)
    assert (out[:, 1] == 0).all() and np.isneginf(lse[:, :, 1]).all()
    assert np.isfinite(lse[:, :, [0, 2, 3, 4]]).all()

    float_mask = np.where(mask, 0.0, -np.inf)
    out_f, lse_f = _strict_run(attention_ref, q, k, v, bias=float_mask, return_lse=True,
                               precision=precision)
    np.testing.assert_array_equal(out_f, out)
    np.testing.assert_array_equal(lse_f, lse)

    out, lse = _strict_run(attention_ref, q, k[:, :0], v[:, :0], return_lse=True,
                           precision=precision)
    assert out.shape == (2, 5, 2, 3) and (out == 0).all() and np.isneginf(lse).all()

    probs = _strict_run(attention_probs_ref, q, k, v, causal=True, precision=precision)
    assert (probs[:, :, :3] == 0).all() and not np.isnan(probs).any()


@given(params=cases())
def test_gqa_equals_repeated_kv_heads(params):
    q, k, v, kwargs = build(params)
    group = q.shape[2] // k.shape[2]
    got = attention_ref(q, k, v, return_lse=True, **kwargs)
    want = attention_ref(q, np.repeat(k, group, axis=2), np.repeat(v, group, axis=2),
                         return_lse=True, **kwargs)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@given(params=cases(positional=False, dropout=False))
def test_lse_is_log_sum_exp_of_scores(params):
    q, k, v, kwargs = build(params)
    group = q.shape[2] // k.shape[2]
    scale = kwargs["softmax_scale"] or 1.0 / math.sqrt(q.shape[3])
    scores = np.einsum("bihd,bjhd->bhij", q, np.repeat(k, group, axis=2)) * scale
    if kwargs["softcap"] > 0:
        scores = kwargs["softcap"] * np.tanh(scores / kwargs["softcap"])
    _, lse = attention_ref(q, k, v, return_lse=True, **kwargs)
    np.testing.assert_allclose(lse, np.log(np.exp(scores).sum(axis=-1)), **TIGHT)


def test_lse_does_not_overflow_for_large_scores():
    q = np.full((1, 1, 1, 1), 100.0)
    k = np.array([[[[100.0]], [[99.0]]]])
    v = np.ones((1, 2, 1, 1))
    out, lse = attention_ref(q, k, v, softmax_scale=1.0, return_lse=True)
    assert lse[0, 0, 0] == pytest.approx(10000.0 + math.log1p(math.exp(-100.0)), rel=1e-15)
    assert out[0, 0, 0, 0] == pytest.approx(1.0, rel=1e-15)


@given(params=cases(dropout=False), p=st.sampled_from([0.1, 0.5, 0.9]))
def test_dropout_scales_kept_probabilities_and_keeps_lse(params, p):
    q, k, v, kwargs = build(params)
    mask = np.random.default_rng(params["seed"] + 1).random(
        (q.shape[0], q.shape[2], q.shape[1], k.shape[1])) >= p
    plain_probs = attention_probs_ref(q, k, v, **kwargs)
    _, plain_lse = attention_ref(q, k, v, return_lse=True, **kwargs)
    dropped = dict(kwargs, dropout_p=p, dropout_mask=mask)
    out, lse = attention_ref(q, k, v, return_lse=True, **dropped)
    probs = attention_probs_ref(q, k, v, **dropped)
    np.testing.assert_array_equal(lse, plain_lse)
    np.testing.assert_allclose(probs, plain_probs * mask / (1.0 - p), **TIGHT)
    v_rep = np.repeat(v, q.shape[2] // k.shape[2], axis=2)
    np.testing.assert_allclose(out, np.einsum("bhij,bjhd->bihd", probs, v_rep), **TIGHT)


BF16_BIT_CASES = [
    (0x3F800000, 0x3F80),  # 1.0 is representable
    (0x3F800001, 0x3F80),  # just above 1.0 truncates
    (0x3F807FFF, 0x3F80),  # just below the midpoint rounds down
    (0x3F808000, 0x3F80),  # midpoint, kept lsb even: stays
    (0x3F808001, 0x3F81),  # just above the midpoint rounds up
    (0x3F818000, 0x3F82),  # midpoint, kept lsb odd: rounds up to even
    (0xBF818000, 0xBF82),  # same for negatives (round half to even magnitude)
    (0x3FFF8000, 0x4000),  # carry into the exponent: 1.99.. -> 2.0
    (0x7F7F7FFF, 0x7F7F),  # largest value that stays finite
    (0x7F7F8000, 0x7F80),  # midpoint above the largest bf16 overflows to inf
    (0xFF7FFFFF, 0xFF80),  # overflow to -inf
    (0x7F800000, 0x7F80),  # inf
    (0xFF800000, 0xFF80),  # -inf
    (0x00000000, 0x0000),  # +0
    (0x80000000, 0x8000),  # -0 keeps its sign
    (0x00008000, 0x0000),  # subnormal midpoint, even: to zero
    (0x00018000, 0x0002),  # subnormal midpoint, odd: up
    (0x007FFFFF, 0x0080),  # largest subnormal rounds up to the smallest normal
]


@pytest.mark.parametrize("bits, want", BF16_BIT_CASES)
def test_bfloat16_hand_checked_patterns(bits, want):
    x = np.array([bits], dtype=np.uint32).view(np.float32)
    got = round_to_bfloat16(x).view(np.uint32)[0]
    assert got == np.uint32(want) << np.uint32(16), f"{bits:#010x} -> {got:#010x}"


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFC00001])
def test_bfloat16_nan_stays_nan(bits):
    x = np.array([bits], dtype=np.uint32).view(np.float32)
    got = round_to_bfloat16(x)
    assert np.isnan(got).all()
    assert np.signbit(got[0]) == np.signbit(x[0])


def test_bfloat16_exact_on_every_representable_value():
    bf_bits = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    x = bf_bits.view(np.float32)
    finite_or_inf = ~np.isnan(x)
    got = round_to_bfloat16(x).view(np.uint32)
    np.testing.assert_array_equal(got[finite_or_inf], bf_bits[finite_or_inf])
    assert np.isnan(round_to_bfloat16(x)[~finite_or_inf]).all()


def test_bfloat16_ties_go_to_even_for_every_midpoint():
    hi = np.arange(1 << 16, dtype=np.uint32)
    x_bits = (hi << np.uint32(16)) | np.uint32(0x8000)
    x = x_bits.view(np.float32)
    usable = np.isfinite(x)
    want = np.where(hi & 1, hi + 1, hi).astype(np.uint32) << np.uint32(16)
    got = round_to_bfloat16(x).view(np.uint32)
    np.testing.assert_array_equal(got[usable], want[usable])


def _bfloat16_nearest(x32):
    """Nearest bfloat16 by comparing the two candidates in exact float64 arithmetic."""
    bits = x32.view(np.uint32)
    lo_bits = bits & np.uint32(0xFFFF0000)
    lo = lo_bits.view(np.float32).astype(np.float64)
    exponent = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int64)
    ulp = np.ldexp(1.0, np.maximum(exponent, 1) - 127 - 7)
    sign = np.where(np.signbit(x32), -1.0, 1.0)
    hi = lo + sign * ulp  # exact in float64, even past the float32 range
    x = x32.astype(np.float64)
    d_lo, d_hi = np.abs(x - lo), np.abs(hi - x)
    lo_even = ((lo_bits >> np.uint32(16)) & np.uint32(1)) == 0
    pick_lo = (d_lo < d_hi) | ((d_lo == d_hi) & lo_even)
    with np.errstate(over="ignore"):
        return np.where(pick_lo, lo, hi).astype(np.float32)


def test_bfloat16_matches_nearest_on_random_bit_patterns():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x)]
    got = round_to_bfloat16(x)
    want = _bfloat16_nearest(x)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_bfloat16_is_monotone():
    rng = np.random.default_rng(12)
    x = np.concatenate([
        rng.standard_normal(50_000).astype(np.float32) * 10.0 ** rng.integers(-40, 39, 50_000),
        np.array([-np.inf, np.inf, 0.0, -0.0, 3.0e38, -3.0e38, 1e-45], dtype=np.float32),
    ]).astype(np.float32)
    x.sort()
    assert (np.diff(round_to_bfloat16(x).astype(np.float64)) >= 0).all()


def test_round_to_dtypes_and_inputs():
    x = np.array([[1.0 + 2.0**-9, -3.3], [np.inf, 65520.0]])
    before = x.copy()
    assert round_to(x, "float64").dtype == np.float64
    np.testing.assert_array_equal(round_to(x, "float32"), x.astype(np.float32))
    f16 = round_to(x, "float16")
    assert f16.dtype == np.float16
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(f16, x.astype(np.float32).astype(np.float16))
    assert np.isposinf(f16[1, 1])
    bf = round_to(x, "bfloat16")
    assert bf.dtype == np.float32 and bf.shape == x.shape
    np.testing.assert_array_equal(bf, round_to_bfloat16(x.astype(np.float32)))
    np.testing.assert_array_equal(x, before)
    assert round_to_bfloat16(1.0 + 2.0**-8).shape == ()
    assert float(round_to_bfloat16(1.0 + 2.0**-8)) == 1.0


@pytest.mark.parametrize("precision, lo, hi", [
    ("float32", 0.0, 1e-5),
    ("float16", 1e-5, 5e-3),
    ("bfloat16", 1e-4, 4e-2),
])
def test_low_precision_reference_really_rounds(precision, lo, hi):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 24, 4, 32))
    k = rng.standard_normal((2, 40, 2, 32))
    v = rng.standard_normal((2, 40, 2, 16))
    opts = dict(causal=True, softcap=5.0, alibi_slopes=rng.uniform(0, 0.3, 4), return_lse=True)
    out64, lse64 = attention_ref(q, k, v, **opts)
    out, lse = attention_ref(q, k, v, precision=precision, **opts)
    err = np.abs(out - out64).max()
    assert lo < err < hi if lo > 0 else err < hi
    assert np.abs(lse - lse64).max() < 50 * hi
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_array_equal(round_to(out, precision).astype(np.float64), out)
    np.testing.assert_array_equal(lse.astype(np.float32).astype(np.float64), lse)
    probs = attention_probs_ref(q, k, v, causal=True, precision=precision)
    np.testing.assert_array_equal(round_to(probs, precision).astype(np.float64), probs)


def test_low_precision_rounds_a_float_bias_but_not_a_bool_mask():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 3, 1, 4)) for _ in range(3))
    bias = rng.standard_normal((3, 3))
    np.testing.assert_array_equal(
        attention_ref(q, k, v, bias=bias, precision="bfloat16"),
        attention_ref(q, k, v, bias=round_to(bias, "bfloat16"), precision="bfloat16"),
    )
    mask = np.array([[True, False, True]] * 3)
    np.testing.assert_array_equal(
        attention_ref(q, k, v, bias=mask, precision="float16"),
        attention_ref(q, k, v, bias=np.where(mask, 0.0, -np.inf), precision="float16"),
    )


@st.composite
def varlen_cases(draw):
    batch = draw(st.integers(1, 4))
    return dict(
        seqlens_q=draw(st.lists(st.integers(0, 5), min_size=batch, max_size=batch)),
        seqlens_k=draw(st.lists(st.integers(0, 5), min_size=batch, max_size=batch)),
        hkv=draw(st.integers(1, 2)),
        group=draw(st.integers(1, 2)),
        d=draw(st.integers(1, 6)),
        dv=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 2**32 - 1)),
        causal=draw(st.booleans()),
        align=draw(st.sampled_from(["bottom_right", "top_left"])),
        window=(draw(st.integers(-1, 4)), draw(st.integers(-1, 4))),
        softcap=draw(st.sampled_from([0.0, 1.5])),
        alibi=draw(st.sampled_from([None, "h", "bh"])),
        dropout_p=draw(st.sampled_from([0.0, 0.3])),
    )


@given(case=varlen_cases())
@example(case=dict(seqlens_q=[0, 3, 2, 0], seqlens_k=[2, 0, 4, 0], hkv=2, group=2, d=3, dv=2,
                   seed=1, causal=True, align="bottom_right", window=(-1, -1), softcap=0.0,
                   alibi="bh", dropout_p=0.3))
def test_varlen_equals_per_sequence_attention(case):
    rng = np.random.default_rng(case["seed"])
    sq, sk = np.array(case["seqlens_q"]), np.array(case["seqlens_k"])
    cu_q = np.concatenate([[0], np.cumsum(sq)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(sk)]).astype(np.int32)
    batch, hkv = len(sq), case["hkv"]
    hq = hkv * case["group"]
    q = rng.standard_normal((cu_q[-1], hq, case["d"]))
    k = rng.standard_normal((cu_k[-1], hkv, case["d"]))
    v = rng.standard_normal((cu_k[-1], hkv, case["dv"]))
    opts = dict(causal=case["causal"], causal_align=case["align"], window_size=case["window"],
                softcap=case["softcap"])
    slopes = {None: None, "h": rng.uniform(0, 1, hq), "bh": rng.uniform(0, 1, (batch, hq))}
    opts["alibi_slopes"] = slopes[case["alibi"]]
    mask = None
    if case["dropout_p"] > 0:
        mask = rng.random((batch, hq, sq.max(), sk.max())) >= case["dropout_p"]
        opts.update(dropout_p=case["dropout_p"], dropout_mask=mask)

    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, return_lse=True, **opts)
    assert out.shape == (cu_q[-1], hq, case["dv"]) and lse.shape == (hq, cu_q[-1])
    for b in range(batch):
        if sq[b] == 0:
            continue
        one = dict(opts)
        if opts["alibi_slopes"] is not None and opts["alibi_slopes"].ndim == 2:
            one["alibi_slopes"] = opts["alibi_slopes"][b]
        if mask is not None:
            one["dropout_mask"] = mask[b:b + 1, :, :sq[b], :sk[b]]
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want, want_lse = attention_ref(q[None, qs], k[None, ks], v[None, ks], return_lse=True,
                                       **one)
        np.testing.assert_array_equal(out[qs], want[0])
        np.testing.assert_array_equal(lse[:, qs], want_lse[0])


def _kvcache_setup(seed=0):
    rng = np.random.default_rng(seed)
    b, sq, hkv, hq, d, dv, s_new, capacity = 3, 2, 2, 4, 5, 3, 3, 12
    return dict(
        rng=rng, b=b, sq=sq, hq=hq, hkv=hkv, s_new=s_new, capacity=capacity,
        q=rng.standard_normal((b, sq, hq, d)),
        k_logical=rng.standard_normal((b, capacity, hkv, d)),
        v_logical=rng.standard_normal((b, capacity, hkv, dv)),
        k_new=rng.standard_normal((b, s_new, hkv, d)),
        v_new=rng.standard_normal((b, s_new, hkv, dv)),
        seqlens=np.array([0, 5, 9], dtype=np.int32),
        slopes=rng.uniform(0, 1, (b, hq)),
        bias=rng.standard_normal((b, 1, sq, capacity)),
    )


KV_OPTIONS = [
    dict(),
    dict(causal=True, alibi_slopes="slopes"),
    dict(causal=True, causal_align="top_left", window_size=(3, -1), softcap=2.0),
    dict(window_size=(4, 1), bias="bias", return_lse=True),
]


def _resolve(opts, setup):
    return {key: setup[val] if isinstance(val, str) and val in setup else val
            for key, val in opts.items()}


@pytest.mark.parametrize("opts", KV_OPTIONS)
def test_kvcache_contiguous_matches_attention_over_gathered_keys(opts):
    s = _kvcache_setup(1)
    opts = _resolve(opts, s)
    # Cache rows are permuted and one extra row is never touched.
    row_of = np.array([2, 0, 3], dtype=np.int32)
    k_cache = s["rng"].standard_normal((4, s["capacity"]) + s["k_logical"].shape[2:])
    v_cache = s["rng"].standard_normal((4, s["capacity"]) + s["v_logical"].shape[2:])
    k_cache[row_of], v_cache[row_of] = s["k_logical"], s["v_logical"]
    k_before, v_before = k_cache.copy(), v_cache.copy()
    k_new_before = s["k_new"].copy()

    result = attention_kvcache_ref(
        s["q"], k_cache, v_cache, k=s["k_new"], v=s["v_new"], cache_seqlens=s["seqlens"],
        cache_batch_idx=row_of, **opts)
    out, k_after, v_after = result[:3]

    np.testing.assert_array_equal(k_cache, k_before)
    np.testing.assert_array_equal(v_cache, v_before)
    np.testing.assert_array_equal(s["k_new"], k_new_before)
    assert k_after.shape == k_cache.shape and k_after.dtype == k_cache.dtype

    touched = np.zeros(k_cache.shape[:2], dtype=bool)
    for b in range(s["b"]):
        r, n, new = row_of[b], s["seqlens"][b], s["s_new"]
        np.testing.assert_array_equal(k_after[r, n:n + new], s["k_new"][b])
        np.testing.assert_array_equal(v_after[r, n:n + new], s["v_new"][b])
        touched[r, n:n + new] = True

        keys = np.concatenate([s["k_logical"][b, :n], s["k_new"][b]])[None]
        values = np.concatenate([s["v_logical"][b, :n], s["v_new"][b]])[None]
        one = dict(opts)
        if "alibi_slopes" in one:
            one["alibi_slopes"] = one["alibi_slopes"][b]
        if "bias" in one:
            one["bias"] = one["bias"][b:b + 1, :, :, :n + new]
        want = attention_ref(s["q"][b:b + 1], keys, values, **one)
        if opts.get("return_lse"):
            np.testing.assert_allclose(out[b], want[0][0], **TIGHT)
            np.testing.assert_allclose(result[3][b], want[1][0], **TIGHT)
        else:
            np.testing.assert_allclose(out[b], want[0], **TIGHT)
    np.testing.assert_array_equal(k_after[~touched], k_before[~touched])
    np.testing.assert_array_equal(v_after[~touched], v_before[~touched])


@pytest.mark.parametrize("opts", KV_OPTIONS)
def test_kvcache_paged_matches_contiguous(opts):
    s = _kvcache_setup(2)
    opts = _resolve(opts, s)
    page, b, capacity = 3, s["b"], s["capacity"]
    blocks_per_seq = capacity // page
    num_blocks = b * blocks_per_seq + 2
    table = s["rng"].permutation(num_blocks)[: b * blocks_per_seq].reshape(b, blocks_per_seq)
    table = table.astype(np.int32)

    def to_pages(logical):
        pool = s["rng"].standard_normal((num_blocks, page) + logical.shape[2:])
        for bi in range(b):
            pool[table[bi]] = logical[bi].reshape((blocks_per_seq, page) + logical.shape[2:])
        return pool

    def from_pages(pool):
        return np.stack([pool[table[bi]].reshape((capacity,) + pool.shape[2:])
                         for bi in range(b)])

    k_pool, v_pool = to_pages(s["k_logical"]), to_pages(s["v_logical"])
    k_pool_before = k_pool.copy()
    used = np.zeros(num_blocks, dtype=bool)
    used[table.ravel()] = True

    paged = attention_kvcache_ref(s["q"], k_pool, v_pool, k=s["k_new"], v=s["v_new"],
                                  cache_seqlens=s["seqlens"], block_table=table, **opts)
    contiguous = attention_kvcache_ref(s["q"], s["k_logical"], s["v_logical"], k=s["k_new"],
                                       v=s["v_new"], cache_seqlens=s["seqlens"], **opts)
    np.testing.assert_array_equal(k_pool, k_pool_before)
    np.testing.assert_allclose(paged[0], contiguous[0], **TIGHT)
    if opts.get("return_lse"):
        np.testing.assert_allclose(paged[3], contiguous[3], **TIGHT)
    np.testing.assert_array_equal(from_pages(paged[1]), contiguous[1])
    np.testing.assert_array_equal(from_pages(paged[2]), contiguous[2])
    np.testing.assert_array_equal(paged[1][~used], k_pool_before[~used])


def test_kvcache_defaults_and_unused_block_table_entries():
    s = _kvcache_setup(3)
    q, kl, vl = s["q"], s["k_logical"], s["v_logical"]
    out, k_after, _ = attention_kvcache_ref(q, kl, vl, causal=True)
    np.testing.assert_array_equal(out, attention_ref(q, kl, vl, causal=True))
    np.testing.assert_array_equal(k_after, kl)

    out, _, _ = attention_kvcache_ref(q, kl, vl, cache_seqlens=4, causal=True)
    np.testing.assert_array_equal(out, attention_ref(q, kl[:, :4], vl[:, :4], causal=True))

    # One page of 4 slots per row covers cache_seqlens = 4; the -1 padding is never read.
    pool_k = kl[:, :4].copy()
    pool_v = vl[:, :4].copy()
    table = np.array([[0, -1, -1], [1, -1, -1], [2, -1, -1]], dtype=np.int32)
    out_paged, _, _ = attention_kvcache_ref(q, pool_k, pool_v, cache_seqlens=4,
                                            block_table=table, causal=True)
    np.testing.assert_array_equal(out_paged, out)


def test_kvcache_writes_cast_to_the_cache_dtype():
    s = _kvcache_setup(4)
    k_cache = s["k_logical"].astype(np.float16)
    v_cache = s["v_logical"].astype(np.float16)
    out, k_after, v_after = attention_kvcache_ref(
        s["q"], k_cache, v_cache, k=s["k_new"], v=s["v_new"], cache_seqlens=s["seqlens"])
    assert k_after.dtype == np.float16 and v_after.dtype == np.float16
    b, n, new = 1, s["seqlens"][1], s["s_new"]
    np.testing.assert_array_equal(k_after[b, n:n + new], s["k_new"][b].astype(np.float16))
    want = attention_ref(s["q"][b:b + 1], k_after[b:b + 1, :n + new],
                         v_after[b:b + 1, :n + new])
    np.testing.assert_array_equal(out[b:b + 1], want)


def _dense():
    return np.zeros((2, 3, 4, 8)), np.zeros((2, 5, 2, 8)), np.zeros((2, 5, 2, 6))


def _varlen():
    return (np.zeros((5, 4, 8)), np.zeros((6, 2, 8)), np.zeros((6, 2, 6)),
            np.array([0, 2, 5], dtype=np.int32), np.array([0, 6, 6], dtype=np.int32))


def _kv():
    return np.zeros((2, 1, 4, 8)), np.zeros((2, 6, 2, 8)), np.zeros((2, 6, 2, 6))


def _with(arrays, index, value):
    arrays = list(arrays)
    arrays[index] = value
    return arrays


DENSE_ERRORS = [
    ("k batch", lambda: _with(_dense(), 1, np.zeros((3, 5, 2, 8))), {},
     r"k\.shape\[0\] \(batch\) must equal q\.shape\[0\] = 2, got 3"),
    ("v batch", lambda: _with(_dense(), 2, np.zeros((1, 5, 2, 6))), {},
     r"v\.shape\[0\] \(batch\) must equal q\.shape\[0\] = 2, got 1"),
    ("q ndim", lambda: _with(_dense(), 0, np.zeros((2, 3, 8))), {}, r"q\.ndim must be 4"),
    ("v seqlen", lambda: _with(_dense(), 2, np.zeros((2, 4, 2, 6))), {},
     r"v\.shape\[1\] \(seqlen_k\) must equal k\.shape\[1\] = 5, got 4"),
    ("v heads", lambda: _with(_dense(), 2, np.zeros((2, 5, 1, 6))), {},
     r"v\.shape\[2\] \(nheads_kv\) must equal k\.shape\[2\] = 2, got 1"),
    ("k headdim", lambda: _with(_dense(), 1, np.zeros((2, 5, 2, 7))), {},
     r"k\.shape\[3\] \(headdim\) must equal q\.shape\[3\] = 8, got 7"),
    ("gqa", lambda: _with(_dense(), 0, np.zeros((2, 3, 3, 8))), {},
     r"q\.shape\[2\] \(nheads_q\) must be a multiple of k\.shape\[2\] \(nheads_kv\) = 2, got 3"),
    ("q dtype", lambda: _with(_dense(), 0, np.zeros((2, 3, 4, 8), dtype=complex)), {},
     r"q\.dtype"),
    ("align", _dense, dict(causal=True, causal_align="center"), r"causal_align"),
    ("window short", _dense, dict(window_size=(1,)), r"window_size"),
    ("window -2", _dense, dict(window_size=(-2, 0)), r"window_size left must be >= -1"),
    ("window float", _dense, dict(window_size=(1, 0.5)), r"window_size right"),
    ("softcap", _dense, dict(softcap=-1.0), r"softcap"),
    ("alibi", _dense, dict(alibi_slopes=np.ones(3)), r"alibi_slopes shape .*got \(3,\)"),
    ("bias", _dense, dict(bias=np.zeros((3, 7))),
     r"bias must be broadcastable to \(batch, nheads_q, seqlen_q, seqlen_k\) = "
     r"\(2, 4, 3, 5\), got shape \(3, 7\)"),
    ("bias rank", _dense, dict(bias=np.zeros((1, 2, 4, 3, 5))), r"bias must be broadcastable"),
    ("dropout no mask", _dense, dict(dropout_p=0.1), r"dropout_mask"),
    ("dropout p", _dense, dict(dropout_p=1.0, dropout_mask=np.ones((3, 5), bool)), r"dropout_p"),
    ("dropout mask dtype", _dense, dict(dropout_p=0.5, dropout_mask=np.ones((3, 5))),
     r"dropout_mask\.dtype must be bool"),
    ("dropout mask shape", _dense, dict(dropout_p=0.5, dropout_mask=np.ones((4, 5), bool)),
     r"dropout_mask must be broadcastable"),
    ("precision", _dense, dict(precision="float8"), r"precision"),
]


@pytest.mark.parametrize("name, arrays, kwargs, match", DENSE_ERRORS,
                         ids=[e[0] for e in DENSE_ERRORS])
def test_dense_validation_errors(name, arrays, kwargs, match):
    for fn in (attention_ref, attention_probs_ref):
        with pytest.raises(ValueError, match=match):
            fn(*arrays(), **kwargs)


VARLEN_ERRORS = [
    ("bias", _varlen, dict(bias=np.zeros(1)), r"bias is not supported"),
    ("cu start", lambda: _with(_varlen(), 3, np.array([1, 2, 5], np.int32)), {},
     r"cu_seqlens_q\[0\] must equal 0, got 1"),
    ("cu end", lambda: _with(_varlen(), 4, np.array([0, 2, 5], np.int32)), {},
     r"cu_seqlens_k\[-1\] must equal k\.shape\[0\] \(total_k\) = 6, got 5"),
    ("cu order", lambda: _with(_varlen(), 3, np.array([0, 4, 3, 5], np.int32)), {},
     r"cu_seqlens_q must be non-decreasing"),
    ("cu dtype", lambda: _with(_varlen(), 3, np.array([0.0, 2.0, 5.0])), {},
     r"cu_seqlens_q\.dtype"),
    ("cu lengths", lambda: _with(_varlen(), 4, np.array([0, 6], np.int32)), {},
     r"cu_seqlens_k\.shape\[0\] \(batch \+ 1\) must equal cu_seqlens_q\.shape\[0\] = 3, got 2"),
    ("q ndim", lambda: _with(_varlen(), 0, np.zeros((1, 5, 4, 8))), {}, r"q\.ndim must be 3"),
    ("alibi", _varlen, dict(alibi_slopes=np.ones((3, 4))), r"alibi_slopes"),
    ("dropout mask", _varlen, dict(dropout_p=0.2, dropout_mask=np.ones((2, 4, 3, 7), bool)),
     r"dropout_mask must be broadcastable .*max_seqlen_q, max_seqlen_k\) = \(2, 4, 3, 6\)"),
]


@pytest.mark.parametrize("name, arrays, kwargs, match", VARLEN_ERRORS,
                         ids=[e[0] for e in VARLEN_ERRORS])
def test_varlen_validation_errors(name, arrays, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_varlen_ref(*arrays(), **kwargs)


KV_ERRORS = [
    ("overflow", dict(k=np.zeros((2, 3, 2, 8)), v=np.zeros((2, 3, 2, 6)), cache_seqlens=4),
     r"cache_seqlens \+ seqlen_new must be <= cache capacity = 6"),
    ("default full cache overflows", dict(k=np.zeros((2, 1, 2, 8)), v=np.zeros((2, 1, 2, 6))),
     r"cache_seqlens \+ seqlen_new"),
    ("k only", dict(k=np.zeros((2, 1, 2, 8))), r"k and v must be given together"),
    ("negative seqlens", dict(cache_seqlens=np.array([-1, 2], np.int32)),
     r"cache_seqlens must be >= 0"),
    ("seqlens shape", dict(cache_seqlens=np.array([1, 2, 3], np.int32)),
     r"cache_seqlens shape must be \(batch,\) = \(2,\), got \(3,\)"),
    ("new k heads", dict(k=np.zeros((2, 1, 1, 8)), v=np.zeros((2, 1, 1, 6)), cache_seqlens=0),
     r"k\.shape\[2\] \(nheads_kv\) must equal k_cache\.shape\[2\] = 2, got 1"),
    ("batch idx range", dict(cache_batch_idx=np.array([0, 2], np.int32)),
     r"cache_batch_idx entries must be in \[0, k_cache\.shape\[0\] = 2\), got \[2\]"),
    ("batch idx with table", dict(cache_batch_idx=np.array([0, 1], np.int32),
                                  block_table=np.zeros((2, 1), np.int32)),
     r"cache_batch_idx cannot be combined with block_table"),
    ("table range", dict(block_table=np.array([[0], [2]], np.int32)),
     r"block_table\[1\] entries must be in \[0, num_blocks = 2\), got \[2\]"),
    ("table shape", dict(block_table=np.zeros((3, 1), np.int32)), r"block_table shape"),
    ("table dtype", dict(block_table=np.zeros((2, 1))), r"block_table\.dtype"),
]


@pytest.mark.parametrize("name, kwargs, match", KV_ERRORS, ids=[e[0] for e in KV_ERRORS])
def test_kvcache_validation_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_kvcache_ref(*_kv(), **kwargs)


def test_kvcache_batch_mismatch_without_index():
    q, kc, vc = _kv()
    with pytest.raises(ValueError, match=r"k_cache\.shape\[0\] \(batch_cache\) must equal "
                                         r"q\.shape\[0\] = 2 when cache_batch_idx is None"):
        attention_kvcache_ref(q, kc[:1], vc[:1])


def test_round_to_rejects_unknown_precision():
    with pytest.raises(ValueError, match=r"precision must be one of"):
        round_to(np.zeros(2), "half")


@settings(max_examples=20)
@given(dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_any_float_input_dtype_is_accepted(dtype):
    q, k, v, kwargs = build(make_params(b=1, sq=3, sk=4, hkv=1, group=2, seed=9))
    got = attention_ref(q.astype(dtype), k.astype(dtype), v.astype(dtype), **kwargs)
    want = attention_ref(*(x.astype(dtype).astype(np.float64) for x in (q, k, v)), **kwargs)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
