"""The `portattn report` CLI with no GPU, and the CPU-testable part of portattn.testing.

The report is what a user pastes into an issue, so it must show the same plan the library
would run: rows are re-derived here with select_plan and compared. gpu_status is replaced
in-process so the output does not depend on whether this machine has a GPU; one
subprocess run proves `python -m portattn` itself works.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from portattn import report as report_mod
from portattn.__main__ import main
from portattn.arch import Problem, device_from_arch, select_bwd_plan, select_plan
from portattn.spec import DTYPES, HEAD_DIM_BUCKETS
from portattn.testing import EPS, compare

REPO = Path(__file__).resolve().parents[1]
NO_GPU_WHY = "test: pretend there is no driver"
ROW = re.compile(r"^(float16|bfloat16|float32)\s+(\d+)\s+(True|False)\s+(\S+)\s+(\d+)x(\d+)\s+"
                 r"(\d+)\s+(\d+) KB\s+(\d+)\s+(\S.*)$")


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(report_mod, "gpu_status", lambda: (False, NO_GPU_WHY))
    monkeypatch.delenv("PORTATTN_ARCH", raising=False)


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def rows_of(text):
    return [ROW.match(line).groups() for line in text.splitlines() if ROW.match(line)]


def not_taken(text):
    lines = text.splitlines()
    start = lines.index("paths not taken:")
    out = {}
    for line in lines[start + 1:]:
        dtype, path, why = line.split(None, 2)
        assert (dtype, path) not in out, line
        out[(dtype, path)] = why
    return out


# ------------------------------------------------------------------------ text report

@pytest.mark.parametrize("arch, facts_line", [
    ("sm_75", "sm_75: shared memory 64 KB/block (opt-in), 64 KB/SM; 1024 threads, "
              "16 CTAs per SM; MMA mma.m16n8k8, ldmatrix yes, cp.async no, bf16 MMA no"),
    ("sm_61", "sm_61: shared memory 48 KB/block (opt-in), 96 KB/SM; 2048 threads, "
              "32 CTAs per SM; MMA none, ldmatrix no, cp.async no, bf16 MMA no"),
])
def test_report_arch_text(capsys, arch, facts_line):
    rc, out, err = run(capsys, "report", "--arch", arch)
    assert rc == 0 and err == ""
    assert facts_line in out.splitlines()
    assert f"no CUDA GPU: {NO_GPU_WHY}" in out
    assert f"plans below are for {arch} from the arch table" in out
    lines = out.splitlines()
    bwd = lines.index("backward (the dK/dV stage's tile; deterministic mode computes dQ on SIMT):")
    # Backward: Turing's fp16 dK/dV up to d128 is tensor-core (tc_bwd), the rest SIMT.
    assert all(line.split()[2] == ("sm75" if arch == "sm_75" and line.split()[0] == "float16"
                                   and int(line.split()[1]) <= 128 else "simt")
               for line in lines[bwd + 1:bwd + 25])
    rows = rows_of(out)
    assert len(rows) == 48
    assert {(r[0], int(r[1]), r[2]) for r in rows} == \
        {(t, d, c) for t in DTYPES for d in HEAD_DIM_BUCKETS for c in ("False", "True")}
    # Turing runs fp16 on its tensor cores; everything else there, and all of sm_61, is SIMT.
    expected_path = {("sm_75", "float16"): "sm75"}
    for dtype, d, causal, path, bm, bn, thr, smem_kb, ctas, reason in rows:
        assert path == expected_path.get((arch, dtype), "simt"), (dtype, path)
        assert reason.startswith(f"fastest eligible path for {dtype} on {arch}")
        assert f"{bm}x{bn} tile" in reason
    taken = not_taken(out)
    ran = {(t, expected_path.get((arch, t), "simt")) for t in DTYPES}
    all_paths = {(t, p) for t in DTYPES for p in ("sm80", "sm75", "sm70", "simt")}
    assert set(taken) == all_paths - ran
    assert all(why.strip() for why in taken.values())
    if arch == "sm_61":
        assert all(why.startswith("needs mma") for why in taken.values())
    else:
        assert "bfloat16" in taken[("bfloat16", "sm75")]
        assert "float32" in taken[("float32", "sm75")]
        assert taken[("float16", "sm80")].startswith("needs mma.m16n8k16")
        assert taken[("float16", "simt")] == "lower preference than sm75"


@pytest.mark.parametrize("cc", [61, 75, 90])
def test_report_rows_equal_select_plan(capsys, cc):
    rc, out, _ = run(capsys, "report", "--arch", f"sm_{cc}")
    assert rc == 0
    dev = device_from_arch(cc)
    for dtype, d, causal, path, bm, bn, thr, smem_kb, ctas, reason in rows_of(out):
        plan = select_plan(dev, Problem(dtype, int(d), causal=causal == "True"))
        s = plan.spec
        assert (path, int(bm), int(bn), int(thr)) == (plan.path, s.block_m, s.block_n, s.threads)
        assert (int(smem_kb), int(ctas)) == (plan.smem_bytes // 1024, plan.ctas_per_sm)
        assert reason == plan.reason


def test_report_arch_spellings_agree(capsys):
    outs = {a: run(capsys, "report", "--arch", a)[1] for a in ("sm_75", "7.5", "75", "SM75")}
    assert len(set(outs.values())) == 1


def test_report_arch_text_differs_between_archs(capsys):
    # Guards the comparisons above against a report that ignores --arch.
    sm61, sm90 = (run(capsys, "report", "--arch", a)[1] for a in ("sm_61", "sm_90"))
    assert sm61 != sm90


# ------------------------------------------------------------------------ JSON report

def test_report_json_sm90(capsys):
    rc, out, err = run(capsys, "report", "--arch", "sm_90", "--json")
    assert rc == 0 and err == ""
    data = json.loads(out)
    assert set(data) == {"device", "plans", "backward_plans"}
    dev = data["device"]
    assert dev["plan_arch"] == "sm_90" and dev["has_gpu"] is False and dev["sm_count"] is None
    assert dev["smem_per_block"] == 227 * 1024 and dev["smem_per_sm"] == 228 * 1024
    assert (dev["mma"], dev["ldmatrix"], dev["cp_async"], dev["bf16_mma"]) == \
        ("mma.m16n8k16", True, True, True)
    plans = data["plans"]
    assert len(plans) == 48
    table_dev = device_from_arch(90)
    for p in plans:
        assert p["path"] == ("simt" if p["dtype"] == "float32" else "sm80")
        assert p["smem_bytes"] <= dev["smem_per_block"]
        assert isinstance(p["rejected"], dict)
        assert set(p["rejected"]) == {"sm80", "sm75", "sm70", "simt"} - {p["path"]}
        plan = select_plan(table_dev, Problem(p["dtype"], p["head_dim"], causal=p["causal"]))
        assert (p["block_m"], p["block_n"], p["threads"], p["smem_bytes"], p["ctas_per_sm"]) == \
            (plan.spec.block_m, plan.spec.block_n, plan.spec.threads, plan.smem_bytes,
             plan.ctas_per_sm)
    bwd = data["backward_plans"]
    assert len(bwd) == 24 and {(p["dtype"], p["head_dim"]) for p in bwd} == \
        {(dt, d) for dt in DTYPES for d in HEAD_DIM_BUCKETS}
    for p in bwd:
        plan = select_bwd_plan(table_dev, Problem(p["dtype"], p["head_dim"]))
        spec = plan.spec("dkdv")
        assert (p["path"], p["block_m"], p["block_n"], p["threads"], p["smem_bytes"]) == \
            (plan.path, spec.block_m, spec.block_n, spec.threads, plan.smem_bytes)
        assert p["smem_bytes"] <= dev["smem_per_block"] and p["reason"] == plan.reason


# ----------------------------------------------------------------- no GPU and errors

def test_report_without_gpu_points_to_arch(capsys):
    rc, out, _ = run(capsys, "report")
    assert rc == 0
    assert f"no CUDA GPU: {NO_GPU_WHY}" in out
    assert "Use --arch sm_XX" in out
    assert not rows_of(out)


def test_report_selftest_without_gpu_fails(capsys):
    rc, out, _ = run(capsys, "report", "--selftest")
    assert rc == 1
    assert f"no CUDA GPU: {NO_GPU_WHY}" in out


def test_report_arch_selftest_without_gpu_prints_plans_then_fails(capsys):
    rc, out, _ = run(capsys, "report", "--arch", "sm_61", "--selftest")
    assert rc == 1
    assert len(rows_of(out)) == 48
    assert f"selftest needs a GPU: {NO_GPU_WHY}" in out


@pytest.mark.parametrize("arch, msg", [
    ("sm_7x", "--arch must look like 'sm_75' or '7.5', got 'sm_7x'"),
    ("sm_30", "--arch must be sm_50 or newer, got 'sm_30'"),
])
def test_report_bad_arch(capsys, arch, msg):
    rc, out, err = run(capsys, "report", "--arch", arch)
    assert rc == 2 and out == ""
    assert err.strip() == f"portattn report: {msg}"


def test_unknown_command(capsys):
    rc, out, err = run(capsys, "frobnicate")
    assert rc == 2 and out == ""
    assert "unknown command 'frobnicate'" in err and "usage: portattn" in err


def test_no_args_prints_usage(capsys):
    rc, out, _ = run(capsys)
    assert rc == 2 and out.startswith("usage: portattn {report,bench}")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(capsys, flag):
    rc, out, _ = run(capsys, flag)
    assert rc == 0 and out.startswith("usage: portattn {report,bench}") and "--arch" in out


def test_report_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", "--help"])
    assert info.value.code == 0
    assert "--selftest" in capsys.readouterr().out


def test_module_entry_point_subprocess():
    proc = subprocess.run([sys.executable, "-m", "portattn", "report", "--arch", "sm_75"],
                          capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "sm_75: shared memory 64 KB/block (opt-in), 64 KB/SM; 1024 threads" in proc.stdout
    assert len(rows_of(proc.stdout)) == 48
    from portattn.arch.detect import gpu_status
    if not gpu_status()[0]:
        assert "no CUDA GPU: " in proc.stdout


def test_module_entry_point_without_gpu_subprocess():
    from portattn.arch.detect import gpu_status
    if gpu_status()[0]:
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "portattn", "report"], capture_output=True,
                          text=True, cwd=str(REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no CUDA GPU: ") and "Use --arch sm_XX" in proc.stdout


# ------------------------------------------------------------- testing.compare on CPU

def _ref(seed=0, n=64):
    rng = np.random.default_rng(seed)
    ref64 = rng.standard_normal(n) * 3
    ref_lowp = ref64.astype(np.float16).astype(np.float64)
    return ref64, ref_lowp


def _bound(ref64, ref_lowp, dtype):
    # flash_attn's rule, written out: 2 x the low-precision reference's own error + 1 ulp
    # of dtype at the output's magnitude (at least 1).
    return 2 * np.max(np.abs(ref_lowp - ref64)) + EPS[dtype] * max(1.0, np.max(np.abs(ref64)))


def test_compare_exact_output_ok():
    ref64, low = _ref()
    c = compare(ref64.copy(), ref64, low, "float16")
    assert c.ok and c.err == 0 and c.unwritten == 0
    assert c.bound == pytest.approx(_bound(ref64, low, "float16"))
    assert "ok" in str(c)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_compare_bound_is_tight(dtype):
    ref64, low = _ref(1)
    bound = _bound(ref64, low, dtype)
    inside, outside = ref64.copy(), ref64.copy()
    inside[5] += 0.99 * bound
    outside[5] -= 1.01 * bound
    assert compare(inside, ref64, low, dtype).ok
    c = compare(outside, ref64, low, dtype)
    assert not c.ok and c.err == pytest.approx(1.01 * bound) and "FAIL" in str(c)


def test_compare_atol_when_lowp_is_exact():
    # seqlen_k == 1: the low-precision reference is exact, only the ulp term is left.
    ref = np.array([0.25, -2.0, 4.0])
    out = ref.copy()
    out[2] += 0.9 * EPS["float16"] * 4.0
    assert compare(out, ref, ref, "float16").ok
    out[2] = ref[2] + 1.1 * EPS["float16"] * 4.0
    assert not compare(out, ref, ref, "float16").ok


def test_compare_flags_nan_as_unwritten():
    ref64, low = _ref(2)
    out = ref64.copy()
    out[7] = np.nan
    c = compare(out, ref64, low, "float16")
    assert not c.ok and c.unwritten >= 1 and "unwritten" in str(c)


def test_compare_flags_inf_in_output():
    ref64, low = _ref(3)
    out = ref64.copy()
    out[0] = np.inf
    assert not compare(out, ref64, low, "float32").ok


@pytest.mark.parametrize("case", ["nan_out", "finite_vs_minus_inf"])
def test_compare_counts_each_bad_element_once(case):
    ref = np.array([0.5, -np.inf, 1.0])
    out = ref.copy()
    if case == "nan_out":
        out[0] = np.nan
    else:
        out[1] = 0.0
    assert compare(out, ref, ref, "float32").unwritten == 1


def test_compare_lse_minus_inf_positions():
    ref = np.array([1.5, -np.inf, -np.inf, 0.0])
    assert compare(ref.copy(), ref, ref, "float32", "lse").ok
    for pos, value in ((1, 0.0), (1, -1e30), (2, np.inf), (2, np.nan), (0, -np.inf)):
        out = ref.copy()
        out[pos] = value
        c = compare(out, ref, ref, "float32", "lse")
        assert not c.ok, (pos, value)
        assert str(c).startswith("lse: FAIL")


def test_compare_all_minus_inf_rows():
    ref = np.full(4, -np.inf)
    assert compare(ref.copy(), ref, ref, "float32").ok


def test_compare_empty():
    e = np.zeros((0, 3))
    assert compare(e, e, e, "float16").ok
