"""CPU tests of the arch table, arch parsing, PORTATTN_ARCH and plan selection.

Plans are pure functions of table integers, so every decision the GPU would take can be
checked here: the chosen kernel must fit the shared memory and register budgets of the
arch it is planned for, and the reasons printed for rejected paths must say what is true.
Expected values are written from the CUDA Programming Guide or recomputed here, not read
back from the code under test.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portattn.arch import (
    ARCH_TABLE,
    GATE_CCS,
    KNOWN_CCS,
    PATH_NAMES,
    Problem,
    all_specs_for,
    device_from_arch,
    facts_for,
    forced_arch,
    parse_arch,
    select_plan,
)
from portattn.arch import plan as plan_mod
from portattn.arch.table import MMA_M8N8K4, MMA_M16N8K8, MMA_M16N8K16, MMA_NONE
from portattn.spec import DTYPES, FEAT_MODS, FEAT_PAIRS, HEAD_DIM_BUCKETS, KernelSpec

# portattn.arch re-exports the detect() function under the submodule's name.
detect_mod = importlib.import_module("portattn.arch.detect")
KB = 1024
TENSOR_CORE_PATHS = ("sm80", "sm75", "sm70")
# The MMA each tensor-core path is built on (PTX ISA target requirements).
PATH_MMA = {"sm80": MMA_M16N8K16, "sm75": MMA_M16N8K8, "sm70": MMA_M8N8K4}


# --------------------------------------------------------------------------- the table

@pytest.mark.parametrize("cc", KNOWN_CCS)
def test_facts_internally_consistent(cc):
    f = ARCH_TABLE[cc]
    assert f.cc == cc and f.name == f"sm_{cc}"
    assert f.max_threads_per_sm % 32 == 0
    assert f.max_warps_per_sm == f.max_threads_per_sm // 32
    assert f.max_threads_per_block <= f.max_threads_per_sm
    assert f.smem_per_block == 48 * KB <= f.smem_per_block_optin
    assert f.smem_per_block_optin <= f.smem_per_sm
    # The largest block a kernel may request must still be resident once the system's
    # per-block reservation is taken from the SM's pool, or the opt-in value is a lie.
    assert f.smem_per_block_optin + f.smem_reserved_per_block <= f.smem_per_sm
    assert f.smem_reserved_per_block == (KB if cc >= 80 else 0)
    assert f.max_ctas_per_sm >= 1 and f.regs_per_sm == 64 * KB


@pytest.mark.parametrize("cc", KNOWN_CCS)
def test_features_appear_at_the_documented_arch(cc):
    f = ARCH_TABLE[cc]
    assert (f.mma == MMA_NONE) == (cc < 70)
    expected_mma = (MMA_NONE if cc < 70 else MMA_M8N8K4 if cc < 75
                    else MMA_M16N8K8 if cc < 80 else MMA_M16N8K16)
    assert f.mma == expected_mma
    assert f.ldmatrix == (cc >= 75)
    assert f.cp_async == (cc >= 80)
    assert f.bf16_mma == (cc >= 80)


def test_features_monotone_in_cc():
    # A newer arch never loses an instruction an older one had: plans rely on this when
    # an unknown newer arch is planned as the newest known one.
    ordered = [ARCH_TABLE[c] for c in sorted(ARCH_TABLE)]
    for older, newer in zip(ordered, ordered[1:]):
        assert newer.mma >= older.mma
        for feat in ("ldmatrix", "cp_async", "bf16_mma"):
            assert getattr(newer, feat) >= getattr(older, feat), (older.name, newer.name, feat)


# (cc, KB smem/SM, KB opt-in per block, threads/SM, CTAs/SM): CUDA C++ Programming Guide,
# "Technical Specifications per Compute Capability".
DOCUMENTED = [
    (50, 64, 48, 2048, 32), (52, 96, 48, 2048, 32), (53, 64, 48, 2048, 32),
    (60, 64, 48, 2048, 32), (61, 96, 48, 2048, 32), (62, 64, 48, 2048, 32),
    (70, 96, 96, 2048, 32), (72, 96, 96, 2048, 32), (75, 64, 64, 1024, 16),
    (80, 164, 163, 2048, 32), (86, 100, 99, 1536, 16), (87, 164, 163, 1536, 16),
    (89, 100, 99, 1536, 24), (90, 228, 227, 2048, 32),
]


@pytest.mark.parametrize("cc, sm_kb, optin_kb, threads, ctas", DOCUMENTED)
def test_documented_limits(cc, sm_kb, optin_kb, threads, ctas):
    f = ARCH_TABLE[cc]
    assert (f.smem_per_sm, f.smem_per_block_optin) == (sm_kb * KB, optin_kb * KB)
    assert (f.max_threads_per_sm, f.max_ctas_per_sm) == (threads, ctas)


def test_table_covers_documented_archs_and_gate():
    assert set(KNOWN_CCS) == {row[0] for row in DOCUMENTED}
    assert set(GATE_CCS) <= set(KNOWN_CCS)


def test_pascal_block_limit_is_48kb_not_the_sm_pool():
    # A frequent error elsewhere: sm_61 has 96 KB per SM but one block may use only 48 KB.
    f = ARCH_TABLE[61]
    assert f.smem_per_block_optin == 48 * KB and f.smem_per_sm == 96 * KB


# --------------------------------------------------------------------- parse_arch

@pytest.mark.parametrize("text", ["sm_75", "sm75", "75", "7.5", " SM_90 ", "sm_50", "8.6"])
def test_parse_arch_accepts(text):
    expected = {"sm_75": 75, "sm75": 75, "75": 75, "7.5": 75, " SM_90 ": 90, "sm_50": 50,
                "8.6": 86}[text]
    assert parse_arch(text) == expected


@pytest.mark.parametrize("text", ["sm_7", "abc", "7.55", "sm_30", "", "7.", ".5", "sm_",
                                  "sm_-75", "7.5.1", "4.9"])
def test_parse_arch_rejects_naming_source(text):
    with pytest.raises(ValueError, match=r"^THE_SOURCE must .*got " + re.escape(repr(text))):
        parse_arch(text, source="THE_SOURCE")


def test_parse_arch_superscript_digits_name_source():
    with pytest.raises(ValueError, match="THE_SOURCE"):
        parse_arch("sm_\u00b2\u00b2", source="THE_SOURCE")


@given(st.text(max_size=8))
def test_parse_arch_any_text_gives_cc_or_named_error(text):
    # The property the CLI relies on to print a clean message: either a plannable cc, or
    # a ValueError that names where the bad value came from.
    try:
        cc = parse_arch(text, source="SRC")
    except ValueError as e:
        assert str(e).startswith("SRC ")
    else:
        assert cc >= 50
        facts_for(cc)


# ----------------------------------------------------------------------- facts_for

@pytest.mark.parametrize("cc", [91, 100, 120, 1000])
def test_facts_for_newer_maps_to_newest(cc):
    assert facts_for(cc) is ARCH_TABLE[90]


@pytest.mark.parametrize("cc, known", [(73, 72), (71, 70), (74, 72), (81, 80), (88, 87),
                                       (51, 50), (63, 62), (79, 75)])
def test_facts_for_unlisted_minor_maps_to_nearest_lower(cc, known):
    assert facts_for(cc) is ARCH_TABLE[known]


@pytest.mark.parametrize("cc", [49, 35, 0])
def test_facts_for_too_old(cc):
    with pytest.raises(ValueError, match="older than the oldest supported"):
        facts_for(cc)


# ------------------------------------------------------------------- PORTATTN_ARCH

def test_forced_arch_unset(monkeypatch):
    monkeypatch.delenv("PORTATTN_ARCH", raising=False)
    assert forced_arch() is None


def test_forced_arch_blank_is_unset(monkeypatch):
    monkeypatch.setenv("PORTATTN_ARCH", "  ")
    assert forced_arch() is None


@pytest.mark.parametrize("value, cc", [("sm_61", 61), ("7.0", 70), ("SM_90", 90)])
def test_forced_arch_reads_env(monkeypatch, value, cc):
    monkeypatch.setenv("PORTATTN_ARCH", value)
    assert forced_arch() == cc


@pytest.mark.parametrize("value", ["sm_7x", "volta", "sm_30"])
def test_forced_arch_bad_value_names_variable(monkeypatch, value):
    monkeypatch.setenv("PORTATTN_ARCH", value)
    with pytest.raises(ValueError, match=r"^PORTATTN_ARCH must .*got "):
        forced_arch()


# ------------------------------------------------------- detect() with a fake CuPy

def _fake_cupy(major, minor, optin, per_sm, sms=40, name=b"Fake GPU"):
    props = {"major": major, "minor": minor, "name": name, "sharedMemPerBlockOptin": optin,
             "sharedMemPerMultiprocessor": per_sm, "multiProcessorCount": sms}

    def fail():
        raise RuntimeError("no driver in this fake")

    runtime = types.SimpleNamespace(getDevice=lambda: 0,
                                    getDeviceProperties=lambda i: dict(props),
                                    driverGetVersion=fail, runtimeGetVersion=fail)
    return types.SimpleNamespace(__version__="0-fake",
                                 cuda=types.SimpleNamespace(runtime=runtime))


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a fake CuPy reporting the given device; detect()'s cache starts empty."""
    def install(*args, **kw):
        fake = _fake_cupy(*args, **kw)
        monkeypatch.setattr(detect_mod, "import_cupy", lambda: fake)
        monkeypatch.setattr(detect_mod, "_cache", {})
    monkeypatch.delenv("PORTATTN_ARCH", raising=False)
    return install


def test_detect_native_takes_smaller_of_table_and_device(fake_gpu):
    # A device reporting less than the table (e.g. a MIG slice or a driver carve-out)
    # must bound the plan, or a launch would ask for more shared memory than exists.
    fake_gpu(8, 0, optin=100 * KB, per_sm=120 * KB)
    dev = detect_mod.detect()
    assert (dev.plan_cc, dev.real_cc, dev.forced, dev.has_gpu) == (80, 80, False, True)
    assert dev.smem_per_block == 100 * KB and dev.smem_per_sm == 120 * KB
    assert dev.name == "Fake GPU" and dev.sm_count == 40
    assert select_plan(dev, Problem("float16", 256)).smem_bytes <= 100 * KB


def test_detect_forced_older_arch_uses_its_table(fake_gpu, monkeypatch):
    fake_gpu(8, 6, optin=99 * KB, per_sm=100 * KB)
    monkeypatch.setenv("PORTATTN_ARCH", "sm_61")
    dev = detect_mod.detect()
    assert (dev.plan_cc, dev.real_cc, dev.forced) == (61, 86, True)
    assert dev.smem_per_block == 48 * KB and dev.smem_per_sm == 96 * KB
    assert "PORTATTN_ARCH" in dev.describe()


def test_detect_refuses_forcing_a_newer_arch(fake_gpu, monkeypatch):
    fake_gpu(7, 5, optin=64 * KB, per_sm=64 * KB)
    monkeypatch.setenv("PORTATTN_ARCH", "sm_80")
    with pytest.raises(ValueError, match=r"PORTATTN_ARCH=sm_80 .*sm_75.*must be sm_75 or older"):
        detect_mod.detect()


# --------------------------------------------------------------------- select_plan

def _bucket(d):
    return ((d + 31) // 32) * 32


def _smem(d, bm, bn):
    # fp32 staging of Q^T (D x BM), K^T (D x BN) sharing with P^T (BN x BM), and V (BN x D).
    return 4 * (d * bm + max(d * bn, bn * bm) + bn * d)


def _ctas(facts, smem_per_sm, threads, smem):
    by_smem = smem_per_sm // (smem + facts.smem_reserved_per_block)
    return min(by_smem, facts.max_ctas_per_sm, facts.max_threads_per_sm // threads)


def _expected_path(facts, dtype):
    if facts.mma >= MMA_M16N8K16 and dtype in ("float16", "bfloat16"):
        return "sm80"
    if facts.mma >= MMA_M16N8K8 and dtype == "float16":
        return "sm75"
    if facts.mma == MMA_M8N8K4 and dtype == "float16":
        return "sm70"
    return "simt"


def _expected_rejection_words(facts, dtype, path, chosen):
    """The fact a rejection reason must state for ``path`` on this arch and dtype."""
    need = PATH_MMA.get(path, 0)
    if facts.mma < need:
        return "needs mma"
    if need and dtype == "float32":
        return "float32"
    if need and dtype == "bfloat16" and need < MMA_M16N8K16:
        return "bfloat16"
    if path == "sm70" and facts.mma > MMA_M8N8K4:
        return "emulated"
    return f"lower preference than {chosen}"


def check_plan(cc, dtype, head_dim):
    dev = device_from_arch(cc)
    f = dev.facts
    plan = select_plan(dev, Problem(dtype=dtype, head_dim=head_dim))
    s = plan.spec
    want = _expected_path(f, dtype)
    assert plan.path == want and s.dtype == dtype, (cc, dtype, plan.path)
    assert plan.plan_cc == cc
    assert s.head_dim == _bucket(head_dim) and s.head_dim % 32 == 0
    assert head_dim <= s.head_dim < head_dim + 32
    if want == "simt":
        assert s.family == "simt_fwd" and s.mma == 0
        assert plan.smem_bytes == _smem(s.head_dim, s.block_m, s.block_n)
        assert _fits_registers(s.head_dim, s.block_m, s.block_n, s.threads, s.tx)
    elif want == "sm70":
        assert s.family == "tc70_fwd" and s.mma == 70 and s.tx == 0
        # Q, K, V tiles in fp16, rows padded by 8; each warp owns 32 query rows, shared by
        # WD = 1 or 2 warps that split O's head dim into multiples of 16.
        wd = plan_mod.tc70_split(s.block_m, s.threads)
        assert wd in (1, 2) and (s.head_dim // wd) % 16 == 0
        assert plan.smem_bytes == 2 * (s.block_m + 2 * s.block_n) * (s.head_dim + 8)
        assert (plan_mod.tc70_est_regs(s.block_m, s.block_n, s.threads, s.head_dim)
                <= plan_mod.TC70_MAX_EST_REGS)
    else:
        assert s.family == "tc_fwd" and s.mma == int(want[2:]) and s.tx == 0
        # Q, K, V tiles in the 2-byte input type, rows padded by 8 elements; Turing keeps
        # Q in registers when its fragments take <= 32, and K/V reuse its rows.
        rows_per_warp = s.block_m // (16 * (s.threads // 32))
        q_regs = s.mma < 80 and rows_per_warp * s.head_dim // 4 <= 32
        rows = max(s.block_m, 2 * s.block_n) if q_regs else s.block_m + 2 * s.block_n
        assert plan.smem_bytes == 2 * rows * (s.head_dim + 8)
        assert s.block_m % (16 * (s.threads // 32)) == 0
        assert plan_mod.tc_est_regs(s.block_m, s.block_n, s.threads, s.head_dim,
                                    s.mma) <= plan_mod.TC_MAX_EST_REGS[s.mma]
    assert plan.smem_bytes <= dev.smem_per_block
    assert plan.ctas_per_sm >= 1
    assert plan.ctas_per_sm == _ctas(f, dev.smem_per_sm, s.threads, plan.smem_bytes)
    assert s.threads <= f.max_threads_per_block
    names = [p for p, _ in plan.rejected]
    assert sorted(names) == sorted(set(PATH_NAMES) - {want})
    for path, why in plan.rejected:
        assert isinstance(why, str) and why.strip()
        assert _expected_rejection_words(f, dtype, path, want) in why, (cc, dtype, path, why)
    return plan


def test_path_names_are_the_four_paths():
    # check_plan's rejection expectations are written for exactly these paths.
    assert sorted(PATH_NAMES) == sorted(TENSOR_CORE_PATHS + ("simt",))


@given(cc=st.sampled_from(KNOWN_CCS), dtype=st.sampled_from(DTYPES),
       head_dim=st.integers(1, 256))
def test_plan_fits_any_head_dim(cc, dtype, head_dim):
    check_plan(cc, dtype, head_dim)


def test_plan_fits_every_bucket_exhaustive():
    for cc in KNOWN_CCS:
        for dtype in DTYPES:
            for d in HEAD_DIM_BUCKETS:
                check_plan(cc, dtype, d)
                check_plan(cc, dtype, d - 31)   # the smallest head dim in the bucket


@pytest.mark.parametrize("cc", [73, 100, 120])
def test_plan_for_unlisted_arch_uses_mapped_facts(cc):
    dev = device_from_arch(cc)
    assert dev.plan_cc == cc
    for dtype in DTYPES:
        plan = select_plan(dev, Problem(dtype=dtype, head_dim=128))
        assert plan.smem_bytes <= dev.facts.smem_per_block_optin and plan.plan_cc == cc


def test_rejections_sm61_need_mma():
    for dtype in DTYPES:
        plan = select_plan(device_from_arch(61), Problem(dtype=dtype, head_dim=64))
        for path, why in plan.rejected:
            assert why.startswith("needs mma") and "sm_61" in why, (path, why)


def test_rejections_sm90_float16():
    plan = select_plan(device_from_arch(90), Problem("float16", 64))
    rej = dict(plan.rejected)
    # sm80 runs; Turing's path and SIMT could, but rank lower; sm70's m8n8k4 is emulated.
    assert plan.path == "sm80" and "sm80" not in rej
    assert rej["sm75"] == "lower preference than sm80"
    assert rej["simt"] == "lower preference than sm80"
    assert "emulated" in rej["sm70"] and "mma.m8n8k4" in rej["sm70"]


def test_rejections_sm75_bfloat16_names_dtype():
    rej = dict(select_plan(device_from_arch(75), Problem("bfloat16", 64)).rejected)
    assert "bfloat16" in rej["sm75"] and "mma.m16n8k8" in rej["sm75"]
    assert rej["sm80"].startswith("needs mma.m16n8k16")


@pytest.mark.parametrize("cc", [80, 86, 89, 90])
def test_rejections_float32_name_dtype_where_mma_exists(cc):
    rej = dict(select_plan(device_from_arch(cc), Problem("float32", 64)).rejected)
    assert all("float32" in rej[p] for p in TENSOR_CORE_PATHS), rej


def test_select_plan_is_pure():
    dev = device_from_arch(86)
    prob = Problem("bfloat16", 96, causal=True)
    assert select_plan(dev, prob) == select_plan(dev, prob)
    assert select_plan(dev, prob) == select_plan(device_from_arch(86), Problem("bfloat16", 96,
                                                                               causal=True))


@pytest.mark.parametrize("cc", [61, 70, 75, 90])
def test_features_change_only_the_mods_bit(cc):
    # Masks and shapes are kernel arguments. Score modifiers (ALiBi, softcap, bias, a
    # negative scale) change only tc_fwd's FEAT_MODS bit (and drop its register cap), and
    # that spec is in the compile gate's list too: any other difference would be a compile
    # the gate never covered.
    dev = device_from_arch(cc)
    gate = set(all_specs_for(dev))
    for dtype in DTYPES:
        for d in (40, 128, 256):
            base = select_plan(dev, Problem(dtype, d))
            assert base.spec.feat == 0
            for kw in (dict(causal=True), dict(window=(16, 0)),
                       dict(seqlen_q=7, seqlen_k=5000, batch=9, nheads_q=8, nheads_kv=2)):
                other = select_plan(dev, Problem(dtype, d, **kw))
                assert (other.spec, other.smem_bytes, other.ctas_per_sm) == \
                    (base.spec, base.smem_bytes, base.ctas_per_sm), kw
            for kw in (dict(alibi=True), dict(softcap=True), dict(bias=True),
                       dict(neg_scale=True), dict(causal=True, alibi=True)):
                other = select_plan(dev, Problem(dtype, d, **kw))
                want = FEAT_MODS if other.spec.family == "tc_fwd" else 0
                assert other.spec == dataclasses.replace(base.spec, feat=want, min_ctas=1), kw
                assert (other.smem_bytes, other.ctas_per_sm) == \
                    (base.smem_bytes, base.ctas_per_sm), kw
                assert other.spec in gate, kw


@pytest.mark.parametrize("dtype, d", [("float64", 64), ("float16", 0), ("float16", 257)])
def test_select_plan_rejects_invalid_problem(dtype, d):
    with pytest.raises(ValueError):
        select_plan(device_from_arch(80), Problem(dtype, d))


# ------------------------------------------------------------ tiles and the model

def _fits_registers(d, bm, bn, threads, tx):
    # Per-thread accumulators: O is RM rows x D/TX cols, S is RM x RN; the combined
    # budget (S counted twice, its operands stay live) where the module defines one.
    ty = threads // tx
    rm, rn = bm // ty, bn // tx
    o_regs, s_regs = rm * (d // tx), rm * rn
    acc = getattr(plan_mod, "SIMT_MAX_ACC_REGS", None)
    return (o_regs <= plan_mod.SIMT_MAX_O_REGS and s_regs <= plan_mod.SIMT_MAX_S_REGS
            and (acc is None or o_regs + 2 * s_regs <= acc))


def _fma_per_load(bm, bn, threads, tx):
    rm, rn = bm // (threads // tx), bn // tx
    return rm * rn / (-(-rm // 4) + rn // 4)


def test_simt_tiles_partition_exactly():
    # Each thread owns an integral micro-tile; a remainder would leave rows uncomputed.
    for bm, bn, threads, tx in plan_mod.SIMT_TILES:
        assert threads % 32 == 0 and threads % tx == 0
        assert bm % (threads // tx) == 0 and bn % tx == 0
        for d in HEAD_DIM_BUCKETS:
            assert d % tx == 0


def test_tile_candidates_follow_register_budget():
    for d in HEAD_DIM_BUCKETS:
        got = plan_mod.simt_tile_candidates(d)
        assert got == [t for t in plan_mod.SIMT_TILES if _fits_registers(d, *t)]
        assert got, d


def test_fma_per_load_formula():
    for t in plan_mod.SIMT_TILES:
        assert plan_mod.simt_fma_per_load(*t) == pytest.approx(_fma_per_load(*t))
    # 64x64 on 128 threads, tx 8: 4x8 micro-tile, 1 Q vector + 2 K vectors per step.
    assert plan_mod.simt_fma_per_load(64, 64, 128, 8) == pytest.approx(32 / 3)


@pytest.mark.parametrize("cc", KNOWN_CCS)
def test_chosen_tile_maximises_model(cc):
    dev = device_from_arch(cc)
    f = dev.facts
    for d in HEAD_DIM_BUCKETS:
        scored = []
        for tile in plan_mod.SIMT_TILES:
            bm, bn, threads, tx = tile
            smem = KernelSpec("simt_fwd", "float32", d, bm, bn, threads, tx).smem_bytes
            if not _fits_registers(d, *tile) or smem > dev.smem_per_block:
                continue
            warps = _ctas(f, dev.smem_per_sm, threads, smem) * threads // 32
            scored.append((_fma_per_load(*tile) * min(warps, 8), tile))
        best = max(score for score, _ in scored)
        # Ties go to the earliest (largest) tile in SIMT_TILES.
        want = next(tile for score, tile in scored if score == best)
        # float32 always runs SIMT, so it exercises the SIMT model on every arch.
        s = select_plan(dev, Problem("float32", d)).spec
        assert (s.block_m, s.block_n, s.threads, s.tx) == want, (cc, d)


@pytest.mark.parametrize("cc, mma", [(75, 75), (80, 80), (86, 80), (89, 80), (90, 80)])
def test_chosen_tensor_core_tile_maximises_model(cc, mma):
    dev = device_from_arch(cc)
    f = dev.facts
    for d in HEAD_DIM_BUCKETS:
        scored = []
        for bm, bn, threads in plan_mod.TC_TILES:
            mb = bm // (16 * (threads // 32))
            chunks = (bn * d // 8 + threads - 1) // threads
            q_regs = mma < 80 and mb * d // 4 <= 32
            staged = mma < 80 and chunks <= 4
            est = (mb * (d // 2 + 3 * bn // 4) + (4 * chunks if staged else 0)
                   + (mb * d // 4 if q_regs else 0))
            smem = 2 * (max(bm, 2 * bn) if q_regs else bm + 2 * bn) * (d + 8)
            if mb < 1 or est > plan_mod.TC_MAX_EST_REGS[mma] or smem > dev.smem_per_block:
                continue
            ctas = _ctas(f, dev.smem_per_sm, threads, smem)
            ldsm = (d // 16) * ((0 if q_regs else mb) + bn // 16) + (bn // 16) * (d // 16)
            warps = ctas * threads // 32
            scored.append(((mb * bn * d // 64) / ldsm * min(warps, 8), (bm, bn, threads)))
        best = max(score for score, _ in scored)
        want = next(tile for score, tile in scored if score == best)
        s = select_plan(dev, Problem("float16", d)).spec
        assert (s.block_m, s.block_n, s.threads) == want, (cc, d)


@pytest.mark.parametrize("d, bm, bn, expected", [
    (64, 64, 64, 49152),     # exactly 48 KB: why 48 KB archs can run the big tile at d64
    (32, 64, 64, 32768),     # P^T (BN x BM) is larger than K^T here
    (128, 64, 32, 65536),
    (96, 64, 32, 49152),
    (256, 16, 16, 49152),    # the one d256 tile that fits a 48 KB block
    (256, 32, 64, 163840),
])
def test_smem_formula(d, bm, bn, expected):
    assert KernelSpec("simt_fwd", "float32", d, bm, bn, 128, 8).smem_bytes == expected


def test_48kb_block_archs_run_big_tile_at_d64():
    # With 96 KB per SM two 48 KB CTAs (8 warps) are resident. (sm_50 has 64 KB per SM,
    # one such CTA only, and rightly prefers 64x32.)
    for cc in (52, 61):
        s = select_plan(device_from_arch(cc), Problem("float16", 64)).spec
        assert (s.block_m, s.block_n) == (64, 64)


# ----------------------------------------------------------- devices and spec sets

@pytest.mark.parametrize("cc", KNOWN_CCS)
def test_device_from_arch_has_no_gpu_fields(cc):
    dev = device_from_arch(cc)
    assert not dev.has_gpu
    assert dev.sm_count is None and dev.real_cc is None and dev.device_id is None
    assert not dev.forced and dev.name == ""
    assert dev.smem_per_block == ARCH_TABLE[cc].smem_per_block_optin
    assert dev.smem_per_sm == ARCH_TABLE[cc].smem_per_sm
    assert "no GPU" in dev.describe()


@pytest.mark.parametrize("cc", KNOWN_CCS)
def test_all_specs_for_covers_every_dtype_and_bucket(cc):
    dev = device_from_arch(cc)
    specs = all_specs_for(dev)
    keys = list(specs)
    # One spec per (dtype, bucket), two where tc_fwd runs it (with and without FEAT_MODS).
    n_tc = sum(s.family == "tc_fwd" for s in keys)
    assert len(keys) == len(set(keys)) == len(DTYPES) * len(HEAD_DIM_BUCKETS) + n_tc // 2
    assert {(s.dtype, s.head_dim, s.feat) for s in keys if s.family == "tc_fwd"} == \
        {(s.dtype, s.head_dim, f) for s in keys if s.family == "tc_fwd" for f in (0, FEAT_MODS)}
    assert {(s.dtype, s.head_dim) for s in keys} == \
        {(t, d) for t in DTYPES for d in HEAD_DIM_BUCKETS}
    for spec, plan in specs.items():
        assert plan.spec == spec and spec.smem_bytes <= dev.smem_per_block


@given(cc=st.sampled_from(KNOWN_CCS), dtype=st.sampled_from(DTYPES),
       head_dim=st.integers(1, 256), causal=st.booleans())
def test_runtime_spec_is_in_compile_gate_set(cc, dtype, head_dim, causal):
    # The compile gate builds all_specs_for; a run-time plan outside it would be a kernel
    # no one compiled before release.
    dev = device_from_arch(cc)
    spec = select_plan(dev, Problem(dtype, head_dim, causal=causal)).spec
    assert spec in all_specs_for(dev)


# ------------------------------------------------------------------- ctas_per_sm

def test_ctas_sm90_reservation_boundary():
    f = ARCH_TABLE[90]
    dev = device_from_arch(90)
    # Largest block for which two fit: 2 * (smem + reserved) <= smem_per_sm.
    boundary = f.smem_per_sm // 2 - f.smem_reserved_per_block
    assert boundary == 113 * KB
    assert plan_mod.ctas_per_sm(dev, 128, boundary) == 2
    assert plan_mod.ctas_per_sm(dev, 128, boundary + 1) == 1
    assert plan_mod.ctas_per_sm(dev, 128, 114 * KB) == 1


def test_ctas_sm80_counts_reservation():
    dev = device_from_arch(80)
    # 2 x 82 KB = 164 KB would fit the pool if the 1 KB per block were ignored.
    assert plan_mod.ctas_per_sm(dev, 128, 82 * KB) == 1
    assert plan_mod.ctas_per_sm(dev, 128, 81 * KB) == 2


def test_ctas_no_reservation_before_sm80():
    assert plan_mod.ctas_per_sm(device_from_arch(75), 128, 32 * KB) == 2
    assert plan_mod.ctas_per_sm(device_from_arch(61), 128, 48 * KB) == 2


@pytest.mark.parametrize("cc, threads, expected", [
    (75, 128, 8),     # 1024 threads/SM
    (75, 64, 16),     # 16 CTAs/SM
    (86, 64, 16),     # 1536 / 64 = 24, capped by 16 CTAs
    (89, 128, 12),    # 1536 / 128
    (89, 64, 24),     # 24 CTAs on Ada
    (90, 64, 32),
    (61, 128, 16),    # 2048 / 128
])
def test_ctas_thread_and_cta_caps(cc, threads, expected):
    dev = device_from_arch(cc)
    assert plan_mod.ctas_per_sm(dev, threads, KB) == expected
    assert plan_mod.ctas_per_sm(dev, threads, 0) == expected


@pytest.mark.parametrize("cc", KNOWN_CCS)
def test_ctas_largest_block_is_resident(cc):
    dev = device_from_arch(cc)
    assert plan_mod.ctas_per_sm(dev, 128, dev.smem_per_block) >= 1
    assert plan_mod.ctas_per_sm(dev, 128, dev.smem_per_sm + 1) == 0


def test_only_restricts_the_choice_and_says_why():
    dev = device_from_arch(90)
    plan = select_plan(dev, Problem("float16", 64), only="simt")
    assert plan.path == "simt" and plan.spec.family == "simt_fwd"
    rej = dict(plan.rejected)
    assert set(rej) == {"sm80", "sm75", "sm70"}
    assert all(why == "excluded: PORTATTN_PATH=simt" for why in rej.values())
    assert select_plan(dev, Problem("float16", 64), only="sm75").spec.mma == 75
    # A forced path that cannot run is an error naming why, never a silent fallback.
    with pytest.raises(ValueError, match="sm75: .*bfloat16"):
        select_plan(dev, Problem("bfloat16", 64), only="sm75")
    with pytest.raises(ValueError, match="sm70: mma.m8n8k4 is emulated"):
        select_plan(dev, Problem("float16", 64), only="sm70")
    assert select_plan(device_from_arch(70), Problem("float16", 64), only="sm70").path == "sm70"
    with pytest.raises(ValueError, match="sm70: .*bfloat16"):
        select_plan(device_from_arch(70), Problem("bfloat16", 64), only="sm70")
    with pytest.raises(ValueError, match="path must be one of"):
        select_plan(dev, Problem("float16", 64), only="tensorcores")


def test_forced_path_env(monkeypatch):
    from portattn.arch import forced_path
    monkeypatch.delenv("PORTATTN_PATH", raising=False)
    assert forced_path() is None
    monkeypatch.setenv("PORTATTN_PATH", " SIMT ")
    assert forced_path() == "simt"
    monkeypatch.setenv("PORTATTN_PATH", "fast")
    with pytest.raises(ValueError, match="PORTATTN_PATH must be one of"):
        forced_path()


@pytest.mark.parametrize("cc", [70, 72])
def test_volta_fp16_runs_m8n8k4_with_resident_warps(cc):
    dev = device_from_arch(cc)
    for d in range(32, 257, 32):
        plan = select_plan(dev, Problem("float16", d, causal=True))
        s = plan.spec
        assert plan.path == "sm70" and s.family == "tc70_fwd" and s.mma == 70
        assert s.name_expression.endswith(f"{s.threads}, 70>")
        assert "useful MMAs per shared load" in plan.reason
        assert f"{s.block_m}x{s.block_n} tile" in plan.reason
        # >= 2 CTAs or >= 8 warps per SM wherever a second CTA's tiles fit in 96 KB.
        if 2 * plan.smem_bytes <= dev.smem_per_sm:
            assert plan.ctas_per_sm >= 2 or plan.warps_per_sm >= 8, (d, plan.describe())
    for dtype in ("bfloat16", "float32"):
        plan = select_plan(dev, Problem(dtype, 64))
        assert plan.path == "simt"
        assert "mma.m8n8k4" in dict(plan.rejected)["sm70"] or dtype in dict(plan.rejected)["sm70"]


# ------------------------------------------------------ backward plan: tensor-core tiles

@pytest.mark.parametrize("cc", [75, 80, 86, 89, 90])
@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_tc_bwd_tile_fits_shape_rules_registers_and_smem(cc, d):
    from portattn.arch import select_bwd_plan
    from portattn.arch.plan_bwd import (TC_BWD_MAX_EST_REGS, TC_BWD_MAX_EST_REGS_PLAIN,
                                        TC_BWD_SPILLED, tc_bwd_est_regs, tc_bwd_pairs_ok,
                                        tc_bwd_tile_ok)
    dev = device_from_arch(cc)
    plan = select_bwd_plan(dev, Problem(dtype="float16", head_dim=d))
    s = plan.spec("dkdv")
    mma = 80 if cc >= 80 else 75
    assert (plan.path, s.family, s.mma) == (f"sm{mma}", "tc_bwd", mma)
    assert tc_bwd_tile_ok(s.block_m, s.block_n, s.threads, d)
    assert tc_bwd_est_regs(s.block_m, d) <= TC_BWD_MAX_EST_REGS_PLAIN[mma]
    # With score modifiers the tighter budget applies (their builds spill sooner on sm_75).
    mods = select_bwd_plan(dev, Problem(dtype="float16", head_dim=d, alibi=True)).spec("dkdv")
    assert mods.feat & FEAT_MODS and tc_bwd_est_regs(mods.block_m, d) <= TC_BWD_MAX_EST_REGS[mma]
    assert mods.block_m <= s.block_m and (mods.feat & FEAT_PAIRS or not mods.block_m >= 128)
    # Warp pairs on sm_80+ from d96 (64-query tiles) or on 128-query tiles, where their
    # P^T buffer fits.
    pairs = bool(s.feat & FEAT_PAIRS)
    paired = dataclasses.replace(s, feat=s.feat | FEAT_PAIRS)
    assert pairs == (tc_bwd_pairs_ok(mma, s.block_m, s.threads, d)
                     and paired.smem_bytes <= dev.smem_per_block)
    assert pairs or s.block_m < 128
    if mma >= 80 and d >= 96:
        assert pairs or "without warp pairs" in plan.reason, plan.describe()
    assert ("warp pairs share 32 keys" in plan.reason) == pairs
    assert (d, s.block_m, s.block_n, s.threads, pairs) not in TC_BWD_SPILLED
    assert s.smem_bytes <= dev.smem_per_block and "keys" in plan.reason
    rows = plan.spec("pre")
    assert rows == plan.spec("cvt") and (rows.family, rows.block_m, rows.mma) == ("tc_bwd", 0, mma)
    assert plan.spec("dq").family == "simt_bwd"


@pytest.mark.parametrize("cc", [70, 72])
@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_volta_bwd_runs_m8n8k4_tiles_within_rules(cc, d):
    from portattn.arch import select_bwd_plan
    from portattn.arch.plan_bwd import (TC70_BWD_MAX_EST_REGS, TC70_BWD_TILES, tc70_bwd_tile_ok,
                                        tc_bwd_est_regs)
    dev = device_from_arch(cc)
    for mods in (False, True):
        plan = select_bwd_plan(dev, Problem(dtype="float16", head_dim=d, alibi=mods))
        s = plan.spec("dkdv")
        assert (plan.path, s.family, s.mma, s.feat) == ("sm70", "tc70_bwd", 70, int(mods))
        assert (s.block_m, s.block_n, s.threads) in TC70_BWD_TILES
        assert tc70_bwd_tile_ok(s.block_m, s.block_n, s.threads, d)
        assert tc_bwd_est_regs(s.block_m, d) <= TC70_BWD_MAX_EST_REGS
        assert s.smem_bytes <= dev.smem_per_block and plan.ctas_per_sm >= 2, plan.describe()
        rows = plan.spec("pre")
        assert rows == plan.spec("cvt")
        assert (rows.family, rows.block_m, rows.mma) == ("tc_bwd", 0, 70)
        assert plan.spec("dq").family == "simt_bwd"
        rej = dict(plan.rejected)
        assert "needs mma.m16n8k8" in rej["sm75"] and "lower preference than sm70" in rej["simt"]
    # bf16 has no m8n8k4 form: the whole backward stays SIMT, and says why.
    bf = select_bwd_plan(dev, Problem(dtype="bfloat16", head_dim=d))
    assert bf.path == "simt" and "bfloat16" in dict(bf.rejected)["sm70"]


def test_volta_bwd_tile_rules_reject_what_the_kernel_cannot_split():
    from portattn.arch.plan_bwd import tc70_bwd_tile_ok
    assert tc70_bwd_tile_ok(64, 64, 128, 128) and tc70_bwd_tile_ok(32, 32, 64, 96)
    assert not tc70_bwd_tile_ok(32, 64, 128, 96)    # dQ: 96 / 4 warps = 24 columns
    assert not tc70_bwd_tile_ok(32, 64, 128, 32)    # 8 columns per warp
    assert not tc70_bwd_tile_ok(16, 32, 64, 64)     # dQ warp blocks are 32 queries
    assert not tc70_bwd_tile_ok(64, 32, 128, 64)    # 16 keys per warp


@pytest.mark.parametrize("cc, dtype, d, why", [
    (90, "float16", 160, "dK + dV of 16 keys x d per warp"),
    (90, "float32", 64, "float32 inputs have no tensor-core form"),
    (75, "bfloat16", 64, "m16n8k8 has no bfloat16 form"),
    (70, "float16", 160, "dK + dV of 16 keys x d per warp"),
    (70, "bfloat16", 64, "m8n8k4 has no bfloat16 form"),
    (61, "float16", 64, "needs mma.m16n8k16; sm_61 has no tensor-core MMA"),
])
def test_bwd_plan_says_why_it_stays_simt(cc, dtype, d, why):
    from portattn.arch import select_bwd_plan
    plan = select_bwd_plan(device_from_arch(cc), Problem(dtype=dtype, head_dim=d))
    assert plan.path == "simt" and all(s.family == "simt_bwd" for s in plan.specs.values())
    assert any(why in w for _, w in plan.rejected), plan.describe()
    assert "sm70" in dict(plan.rejected)


def test_bwd_plan_forced_paths():
    from portattn.arch import select_bwd_plan
    p = Problem(dtype="float16", head_dim=64)
    h100 = device_from_arch(90)
    assert select_bwd_plan(h100, p, only="simt").path == "simt"
    turing_on_h100 = select_bwd_plan(h100, p, only="sm75")
    assert turing_on_h100.path == "sm75" and turing_on_h100.spec("dkdv").mma == 75
    assert "excluded: PORTATTN_PATH=sm75" in dict(turing_on_h100.rejected)["sm80"]
    assert select_bwd_plan(device_from_arch(75), p, only="sm80").path == "simt"


@pytest.mark.parametrize("cc, d, mods, want", [
    (90, 64, False, 3), (80, 32, False, 3), (90, 64, True, 1), (90, 96, False, 1),
    (86, 64, False, 1), (89, 64, False, 1), (75, 64, False, 1)])
def test_tc_register_cap_only_where_three_ctas_fit(cc, d, mods, want):
    # The 168-register cap (3 CTAs/SM) is asked only on the Ampere+ policy at d <= 64 with no
    # score modifiers (with them the cap spilled) and where shared memory holds 3 CTAs
    # (sm_86/89: 100 KB per SM holds 2 of d64's 36 KB).
    plan = select_plan(device_from_arch(cc), Problem("float16", d, alibi=mods))
    assert plan.spec.family == "tc_fwd"
    assert plan.spec.min_ctas == want
    assert ("ptxas asked for 3 CTAs" in plan.reason) == (want == 3)
    if want == 3:
        assert plan.ctas_per_sm >= 3 and "/min3" in plan.spec.short()
        assert plan.spec.name_expression.endswith(", 80, 0, 3>")


def test_tc_bwd_pairs_cost_p_buffer_and_follow_the_shape_rules():
    from portattn.arch import select_bwd_plan
    from portattn.arch.plan_bwd import tc_bwd_pairs_ok
    one = KernelSpec("tc_bwd", "float16", 128, 64, 128, 256, mma=80)
    two = dataclasses.replace(one, feat=FEAT_PAIRS)
    assert two.smem_bytes - one.smem_bytes == 2 * 128 * (64 + 8)   # P^T, BN x (BM + 8)
    assert two.short().endswith("/pairs") and ", 2>" in two.name_expression
    assert tc_bwd_pairs_ok(80, 64, 256, 128) and tc_bwd_pairs_ok(80, 128, 256, 64)
    assert not tc_bwd_pairs_ok(75, 64, 256, 128)    # Turing keeps the 1-D split
    assert not tc_bwd_pairs_ok(80, 64, 256, 64)     # 64-query tiles: slower at d64
    assert tc_bwd_pairs_ok(80, 64, 128, 96)
    assert not tc_bwd_pairs_ok(80, 64, 32 * 3, 128)  # an odd warp count has no pairs
    # The H100 runs d64 on the 128-query pair tile without score modifiers (with them it
    # spilled) and d128 on 64x128 with pairs.
    d64 = select_bwd_plan(device_from_arch(90), Problem(dtype="float16", head_dim=64))
    assert (d64.spec("dkdv").block_m, d64.spec("dkdv").feat) == (128, FEAT_PAIRS)
    d64m = select_bwd_plan(device_from_arch(90), Problem(dtype="float16", head_dim=64,
                                                         alibi=True))
    assert (d64m.spec("dkdv").block_m, d64m.spec("dkdv").feat) == (64, FEAT_MODS)
    # S^T / dP^T split across the pair (kS2D): 128-query tiles, and plain builds from d96.
    from portattn.arch.plan_bwd import tc_bwd_splits_s
    for d, mods, split in ((64, False, True), (96, False, True), (96, True, False),
                           (128, False, True), (128, True, False)):
        plan = select_bwd_plan(device_from_arch(90), Problem(dtype="float16", head_dim=d,
                                                             alibi=mods))
        assert tc_bwd_splits_s(plan.spec("dkdv")) == split, (d, mods)
        assert ("S^T and dP^T split across the pair" in plan.reason) == split
    # A100's 163 KB/block cannot hold d128 64x128 with P^T: the same tile, unpaired.
    a100 = select_bwd_plan(device_from_arch(80), Problem(dtype="float16", head_dim=128))
    assert a100.spec("dkdv") == one and "without warp pairs" in a100.reason
    h100 = select_bwd_plan(device_from_arch(90), Problem(dtype="float16", head_dim=128))
    assert h100.spec("dkdv") == two


def test_cached_plans_are_the_pure_planners_answers():
    from portattn.arch import select_bwd_plan, select_decode_plan, select_plan
    from portattn.arch.cache import bwd_plan, decode_plan, fwd_plan
    from portattn.arch.plan_decode import DecodeProblem
    for cc in (61, 75, 90):
        dev = device_from_arch(cc)
        for only in (None, "simt"):
            p = Problem(dtype="float16", head_dim=72, seqlen_q=97, seqlen_k=1025, causal=True)
            got = fwd_plan(dev, p, only)
            assert got == select_plan(dev, p, only=only)
            assert fwd_plan(dev, p, only) is got
            assert bwd_plan(dev, p, only) == select_bwd_plan(dev, p, only=only)
            dp = DecodeProblem(dtype="float16", head_dim=128, seqlen_k=4096, nheads_q=32,
                               nheads_kv=8, batch=8)
            assert decode_plan(dev, dp, only) == select_decode_plan(dev, dp, only=only)
        # The path restriction is part of the key: a forced path is never served the other.
        assert fwd_plan(dev, p, "simt").path == "simt"
        assert fwd_plan(dev, p, None) == select_plan(dev, p)


def test_cached_plan_errors_are_not_kept():
    from portattn.arch.cache import fwd_plan
    dev = device_from_arch(61)
    p = Problem(dtype="float16", head_dim=64)
    for _ in range(2):
        with pytest.raises(ValueError, match="PORTATTN_PATH=sm80"):
            fwd_plan(dev, p, "sm80")
