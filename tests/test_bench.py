"""The bench's table, plot and peak lookup on a synthetic result, and the peak probes
compiled to SASS by NVRTC for each tensor-core arch; no GPU."""
import sys

import pytest
from toolload import load_tool

from portattn import bench


PEAKS = {"fma_fp32": 50.0, "mma_m8n8k4": 100.0, "mma_m16n8k8": 300.0,
         "mma_m16n8k16": 400.0, "mma_m16n8k16_bf16": 200.0}


def _row(dtype, d, L, causal, tflops, notes):
    return {"dtype": dtype, "head_dim": d, "seqlen": L, "causal": causal, "batch": 1,
            "nheads": 1, "tflops": tflops, "notes": notes}


def synthetic_result():
    rows = []
    for dtype in ("float16", "bfloat16"):
        for causal in (False, True):
            for L in (512, 1024, 2048):
                rows.append(_row(
                    dtype, 64, L, causal,
                    {"portattn": 100.0, "portattn@sm_75": 30.0 if dtype == "float16" else 20.0,
                     "portattn@sm_61": None, "sdpa_flash": 200.0, "sdpa_math": None},
                    {"portattn": "sm80:tc_fwd/x", "portattn@sm_75":
                     "sm75:tc_fwd/y" if dtype == "float16" else "simt:simt_fwd/z",
                     "portattn@sm_61": "RuntimeError: boom",
                     "sdpa_math": "skipped: would materialise 30 GB"}))
    return {"device": "Test GPU", "cc": 90, "sms": 132, "versions": {}, "torch": "x",
            "mode": "fwd", "date": "2026-11-22 00:00 UTC", "label": "abc",
            "peaks_tflops": dict(PEAKS), "rows": rows}


def test_peak_key_picks_the_bf16_peak_for_bf16_rows_of_the_sm80_path():
    assert bench.peak_key("sm80", "bfloat16") == "mma_m16n8k16_bf16"
    assert bench.peak_key("sm80", "float16") == "mma_m16n8k16"
    assert bench.peak_key("sm75", "float16") == "mma_m16n8k8"
    assert bench.peak_key("sm70", "float16") == "mma_m8n8k4"
    assert bench.peak_key("simt", "bfloat16") == "fma_fp32"
    assert bench.peak_key("simt", "float32") == "fma_fp32"
    assert bench.peak_key("unknown", "float16") is None
    assert set(bench.PATH_PEAK.values()) | set(bench.BF16_PEAK.values()) == \
        {"fma_fp32"} | {key for key, _, _ in bench.MMA_PROBES}


def test_format_table_judges_each_run_by_the_path_it_actually_ran():
    text = bench.format_table(synthetic_result())
    lines = text.splitlines()
    assert "mode fwd" in lines[0] and "mma_m16n8k16_bf16 200.0 TFLOP/s" in lines[0]
    fp16 = next(line for line in lines if line.startswith("float16"))
    bf16 = next(line for line in lines if line.startswith("bfloat16"))
    assert "portattn [sm80] 25% of mma_m16n8k16;" in fp16
    assert "portattn [sm80] 50% of mma_m16n8k16_bf16;" in bf16
    assert "portattn@sm_75 [sm75] 10% of mma_m16n8k8" in fp16
    # Forced sm_75 has no bf16 tensor-core path: it ran SIMT and is judged by the FMA peak.
    assert "portattn@sm_75 [simt] 40% of fma_fp32" in bf16
    assert "0.50x sdpa_flash" in fp16 and "n/a" in fp16
    assert "portattn@sm_61 [" not in text


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    assert bench.plot(synthetic_result(), str(out)) == str(out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_write_plot_says_so_in_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert bench.write_plot(synthetic_result(), str(tmp_path / "x.png"), err=sys.stdout) is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "matplotlib is not installed" in out
    assert not (tmp_path / "x.png").exists()


def test_bench_options():
    a = bench.parser().parse_args(["--plot", "p.png"])
    assert (a.mode, a.plot, a.archs) == ("fwd", "p.png", "native")
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--mode", "bwd"])


def _gate():
    return load_tool("peaks_gate")


@pytest.fixture(scope="module")
def cuobjdump():
    tool = bench.find_cuobjdump()
    if tool is None:
        return None
    try:
        bench.sass_opcodes(bench.compile_peaks(75)[0], tool)
    except RuntimeError:      # e.g. a CUDA 13 cuobjdump, which cannot read NVRTC 12's cubins
        return None
    return tool


@pytest.fixture(scope="module")
def nvrtc_archs():
    try:
        from cupy_backends.cuda.libs import nvrtc
        version = nvrtc.getVersion()
        archs = set(int(a) for a in nvrtc.getSupportedArchs())
    except Exception as e:  # no CuPy / no NVRTC library
        pytest.skip(f"NVRTC unavailable: {type(e).__name__}: {e}")
    # The gates read NVRTC 12's ptxas report (the NVRTC that targets every arch, which CI
    # installs); NVRTC 13 words it differently.
    if version[0] != 12:
        pytest.skip(f"the compile gates are defined for NVRTC 12, this is {version}")
    return archs


@pytest.mark.parametrize("cc", (70, 75, 80, 90))
def test_peak_probes_compile_to_sass(cc, nvrtc_archs, cuobjdump):
    if cc not in nvrtc_archs:
        pytest.skip(f"this NVRTC cannot target sm_{cc}; install portattn[cuda12]")
    gate = _gate()
    rows = gate.gate_arch(cc, cuobjdump)
    assert [r[0] for r in rows] == ["fma_peak"] + [f"{k}_peak" for k, _, _ in bench.MMA_PROBES]
    bad = [(r[0], r[4]) for r in rows if r[4]]
    assert not bad, bad
    regs = {r[0]: r[1] for r in rows}
    for key, min_cc, _ in bench.MMA_PROBES:
        # An MMA probe below its arch is an empty kernel; at or above it holds the loop.
        assert (regs[f"{key}_peak"] > 32) == (cc >= min_cc), (key, regs)
    if cuobjdump:
        hmma = {r[0]: r[3] for r in rows}
        assert hmma["mma_m16n8k8_peak"] > 0 if cc >= 75 else hmma["mma_m16n8k8_peak"] == 0
