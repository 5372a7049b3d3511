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


def _options(*argv):
    return bench.options(bench.parser().parse_args(list(argv)))


def test_each_mode_fills_in_its_own_defaults():
    fwd = _options()
    assert fwd["mode"] == "fwd" and fwd["dtypes"] == ("float16", "float32")
    assert fwd["seqlens"][-1] == 16384 and fwd["baselines"] == bench.SDPA_BACKENDS
    both = _options("--mode", "fwd_bwd")
    assert both["dtypes"] == ("float16", "bfloat16") and both["head_dims"] == (64, 128)
    assert both["seqlens"] == (1024, 2048, 4096, 8192) and both["causals"] == (False, True)
    assert both["baselines"] == ("flash", "efficient") and both["deterministic"] is False
    mem = _options("--mode=bwd_memory")
    assert mem["seqlens"] == (32768, 65536) and mem["dtypes"] == ("float16",)
    assert mem["baselines"] == ("efficient",) and mem["heads"] == bench.MEMORY_HEADS
    assert mem["causals"] == (False,)
    det = _options("--mode", "fwd_bwd", "--deterministic", "--archs", "native,sm_70:simt",
                   "--baselines", "", "--seqlens", "97,1025", "--causal", "on")
    assert det["deterministic"] is True and det["archs"] == ((None, None), (70, "simt"))
    assert det["baselines"] == () and det["seqlens"] == (97, 1025) and det["causals"] == (True,)
    assert set(_options("--mode", "fwd_bwd")) <= set(bench.run_bench.__code__.co_varnames)


@pytest.mark.parametrize("argv, words", [
    (("--deterministic",), ("--deterministic", "fwd_bwd", "--mode fwd")),
    (("--mode", "fwd_bwd", "--baselines", "flash,xformers"), ("--baselines", "'xformers'")),
    (("--mode", "fwd_bwd", "--dtypes", "float16,fp8"), ("--dtypes", "'fp8'")),
    (("--mode", "fwd_bwd", "--seqlens", "1024,2k"), ("--seqlens", "'1024,2k'")),
    (("--mode", "fwd_bwd", "--seqlens", "0"), ("--seqlens", "got 0")),
    (("--mode", "bwd_memory", "--head-dims", "64,512"), ("--head-dims", "got 512")),
    (("--mode", "bwd_memory", "--heads", "0"), ("--heads", "got 0")),
    (("--mode", "fwd_bwd", "--archs", "native:tc"), ("--archs", "'tc'")),
])
def test_bad_flags_raise_value_errors_naming_the_flag(argv, words):
    with pytest.raises(ValueError) as e:
        _options(*argv)
    for w in words:
        assert w in str(e.value)


def test_bad_flags_exit_2_through_the_command_line(capsys):
    from portattn.__main__ import main
    assert main(["bench", "--mode", "fwd_bwd", "--baselines", "xformers"]) == 2
    assert "--baselines" in capsys.readouterr().err


def test_help_documents_the_backward_modes(capsys):
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for w in ("fwd_bwd", "bwd_memory", "3.5x", "--deterministic", "--heads", "decode"):
        assert w in text


def test_flops_add_two_and_a_half_forwards_for_the_backward():
    row = bench.Row("float16", 64, 1024, False, 2, 8)
    fwd = 4.0 * 2 * 8 * 1024 * 1024 * 64
    assert bench.flops(row) == fwd and bench.flops(row, "fwd") == fwd
    assert bench.flops(row, "fwd_bwd") == 3.5 * fwd
    causal = bench.Row("float16", 64, 1024, True, 2, 8)
    assert bench.flops(causal, "fwd_bwd") == 3.5 * fwd / 2
    mem = bench.MemRow("float16", 128, 32768, False, 1, 2)
    assert mem.grad_bytes == 3 * 32768 * 2 * 128 * 2
    assert bench.math_bytes(row, "fwd_bwd") > bench.math_bytes(row, "fwd")


def test_default_runs_are_estimated_within_budget():
    for mode, budget in (("fwd_bwd", 240), ("bwd_memory", 120)):
        o = _options("--mode", mode)
        rows = (bench.bench_rows(o["dtypes"], o["head_dims"], o["seqlens"], o["causals"])
                if mode == "fwd_bwd" else
                bench.memory_rows(o["dtypes"], o["head_dims"], o["seqlens"], o["causals"],
                                  o["heads"]))
        est = bench.estimate_seconds(rows, mode, o["archs"], o["baselines"])
        assert 10 < est < budget, (mode, est)
        assert est < bench.estimate_seconds(rows, mode, o["archs"], o["baselines"], True)
        # bwd_memory: each config well under 10 s of backward at the guessed rate
        if mode == "bwd_memory":
            assert all(bench.flops(r, mode) / bench.GUESS_TFLOPS["portattn"] / 1e12 < 5
                       for r in rows)
    rows = bench.bench_rows(("float16",), (64,), (4096,), (False,))
    assert (rows[0].batch, rows[0].nheads) == (4, 32)     # 16k tokens x 2048 hidden, as fwd
    assert bench._timed_seconds(1.0) == 7.0 and bench._timed_seconds(0.001) == 52 * 0.001


def fwd_bwd_result(deterministic=False):
    r = synthetic_result()
    r["mode"], r["deterministic"] = "fwd_bwd", deterministic
    name = "portattn+det" if deterministic else "portattn"
    for row in r["rows"]:
        row["tflops"] = {name: 20.0, "sdpa_flash": 100.0, "sdpa_efficient": 80.0,
                         "sdpa_cudnn": None}
        row["notes"] = {name: "simt:simt_bwd/float16/d64/64x64/t256; fwd sm80 tc_fwd/x",
                        "sdpa_cudnn": "RuntimeError: No available kernel"}
    return r


def test_fwd_bwd_table_judges_portattn_by_its_backward_path():
    text = bench.format_result(fwd_bwd_result())
    assert "mode fwd_bwd" in text and "FLOPs = 3.5x the forward's" in text
    assert "deterministic" not in text
    fp16 = next(line for line in text.splitlines() if line.startswith("float16"))
    assert "portattn [simt] 40% of fma_fp32" in fp16
    assert "0.25x sdpa_efficient" in fp16 and "0.20x sdpa_flash" in fp16 and "n/a" in fp16
    assert text.splitlines()[-1] == "n/a sdpa_cudnn (12 rows): RuntimeError: No available kernel"
    det = bench.format_result(fwd_bwd_result(True))
    assert "deterministic=True" in det and "portattn+det [simt] 40% of fma_fp32" in det


def test_fwd_bwd_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bwd.png"
    assert bench.write_plot(fwd_bwd_result(), str(out), err=sys.stdout)
    assert out.stat().st_size > 10_000


def memory_result():
    rows = []
    for d in (64, 128):
        for L in (32768, 65536):
            row = bench.MemRow("float16", d, L, False, 1, 2)
            elems = L * 2 * d
            row.extra_bytes = {"portattn": 10 * elems + 8 * 2 * L, "sdpa_efficient": 8 * elems,
                               "sdpa_flash": None}
            row.bwd_ms = {"portattn": 500.0, "sdpa_efficient": 50.0}
            row.notes = {"sdpa_flash": "RuntimeError: no flash kernel"}
            rows.append(dict(bench.asdict(row), grad_bytes=row.grad_bytes))
    return {"device": "Test GPU", "cc": 90, "sms": 132, "versions": {}, "torch": "x",
            "mode": "bwd_memory", "deterministic": False, "date": "2026-11-22 00:00 UTC",
            "peaks_tflops": {}, "rows": rows}


def test_memory_table_reports_bytes_per_element_flat_across_seqlen():
    text = bench.format_result(memory_result())
    lines = text.splitlines()
    assert "mode bwd_memory" in lines[0]
    body = [line for line in lines if line.startswith("float16")]
    assert len(body) == 4
    # d 128 at 32k: 10 B/elem + lse/delta's 16 B per row over 128 elements per row.
    row = next(line for line in body if line.split()[1:3] == ["128", "32768"])
    assert " 10.06 " in row and " 8.00 " in row and " 48.0 " in row   # grads 3x2x32k x 2 x 128
    assert "n/a sdpa_flash (4 rows): RuntimeError: no flash kernel" in lines[-1]
    # backward TFLOP/s from the measured time: 2.5 x 4 x 2 x 32k^2 x 128 / 0.5 s
    assert f"{2.5 * 4 * 2 * 32768 ** 2 * 128 / 0.5 / 1e12:.1f} TFLOP/s" in row
    per = [float(line.split()[7]) for line in body if line.split()[1] == "64"]
    assert per[0] == pytest.approx(per[1], abs=0.2)


def test_memory_mode_has_no_plot_and_says_so(tmp_path, capsys):
    assert bench.write_plot(memory_result(), str(tmp_path / "m.png"), err=sys.stdout) is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "bwd_memory" in out
    assert not (tmp_path / "m.png").exists()


class _FakeTensor:
    def __init__(self, shape):
        self.shape = tuple(shape)

    def transpose(self, a, b):
        s = list(self.shape)
        s[a], s[b] = s[b], s[a]
        return _FakeTensor(s)

    def contiguous(self):
        return self

    def detach(self):
        return _FakeTensor(self.shape)

    def requires_grad_(self, flag=True):
        return self


class _FakeCuda:
    def __init__(self):
        self.emptied = 0

    def empty_cache(self):
        self.emptied += 1

    def synchronize(self):
        pass

    def is_available(self):
        return True


def _fake_torch(monkeypatch):
    import contextlib
    import types
    torch = types.SimpleNamespace(
        __version__="fake", float16="f16", bfloat16="bf16", float32="f32", cuda=_FakeCuda(),
        randn=lambda *shape, **kw: _FakeTensor(shape),
        randn_like=lambda x: _FakeTensor(x.shape),
        enable_grad=contextlib.nullcontext)
    nn = types.ModuleType("torch.nn")
    attention = types.ModuleType("torch.nn.attention")
    attention.SDPBackend = types.SimpleNamespace(
        FLASH_ATTENTION="flash", EFFICIENT_ATTENTION="efficient", CUDNN_ATTENTION="cudnn",
        MATH="math")
    attention.sdpa_kernel = lambda which: contextlib.nullcontext()
    monkeypatch.setitem(sys.modules, "torch.nn", nn)
    monkeypatch.setitem(sys.modules, "torch.nn.attention", attention)
    monkeypatch.setattr(bench, "_torch", lambda: torch)
    import portattn.arch
    dev = types.SimpleNamespace(name="Fake GPU", real_cc=90, sm_count=132, versions={})
    monkeypatch.setattr(portattn.arch, "detect", lambda: dev)
    monkeypatch.setattr(bench, "measure_peaks", lambda: {"fma_fp32": 50.0})
    return torch


def test_fwd_bwd_run_times_every_impl_and_survives_missing_backends(monkeypatch, capsys):
    torch = _fake_torch(monkeypatch)
    seen = []

    def pa_runner(torch_, q, k, v, dout, causal, arch, path=None, deterministic=False):
        assert dout.shape == q.shape
        seen.append((q.shape, causal, arch, path, deterministic))
        if arch == 61:
            raise ValueError("no plan")
        return ("pa", 10.0), "simt:simt_bwd/x; fwd sm80 tc_fwd/y"

    def sdpa_runner(torch_, be, qt, kt, vt, dout_t, causal):
        assert qt.shape == dout_t.shape and qt.shape[2] in (1024, 65536)   # (b, h, s, d)
        if be == "cudnn":
            raise RuntimeError("No available kernel.\nmore")
        return ("sdpa", 2.0)

    monkeypatch.setattr(bench, "_portattn_fwd_bwd_runner", pa_runner)
    monkeypatch.setattr(bench, "_sdpa_fwd_bwd_runner", sdpa_runner)
    monkeypatch.setattr(bench, "time_ms", lambda fn: fn[1])
    res = bench.run_bench(("float16",), (64,), (1024, 65536), (False, True),
                          archs=(None, (61, None)), baselines=("flash", "cudnn", "math"),
                          progress=sys.stdout, mode="fwd_bwd", deterministic=True)
    out = capsys.readouterr().out
    assert "estimated" in out and "[4/4]" in out
    assert res["mode"] == "fwd_bwd" and res["deterministic"] is True
    assert res["estimate_s"] > 0 and res["peaks_tflops"] == {"fma_fp32": 50.0}
    assert len(seen) == 8 and all(s[4] for s in seen)
    r0 = res["rows"][0]
    row = bench.Row(**{k: r0[k] for k in ("dtype", "head_dim", "seqlen", "causal", "batch",
                                          "nheads")})
    assert r0["tflops"]["portattn+det"] == pytest.approx(bench.flops(row, "fwd_bwd") / 10e9)
    assert r0["tflops"]["sdpa_flash"] == pytest.approx(bench.flops(row, "fwd_bwd") / 2e9)
    assert r0["tflops"]["portattn@sm_61+det"] is None
    assert "no plan" in r0["notes"]["portattn@sm_61+det"]
    assert r0["tflops"]["sdpa_cudnn"] is None
    assert r0["notes"]["sdpa_cudnn"] == "RuntimeError: No available kernel."
    long = res["rows"][-1]
    assert long["seqlen"] == 65536 and long["tflops"]["sdpa_math"] is None
    assert long["notes"]["sdpa_math"].startswith("skipped: would materialise")
    assert torch.cuda.emptied == 4
    text = bench.format_result(res)
    assert "portattn+det [simt] " in text and "deterministic=True" in text
    assert "; ran 0 s (estimated " in text


def test_bwd_memory_run_records_extra_bytes_per_impl(monkeypatch, capsys):
    _fake_torch(monkeypatch)
    calls = []

    def extra(torch_, forward, inputs, dout):
        calls.append(len(inputs))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return 1000 * len(calls), 5.0

    monkeypatch.setattr(bench, "_bwd_extra_bytes", extra)
    res = bench.run_bench(("float16",), (64,), (32768,), (False,), baselines=("efficient",),
                          progress=sys.stdout, mode="bwd_memory", heads=3)
    assert "estimated" in capsys.readouterr().out
    (row,) = res["rows"]
    assert (row["batch"], row["nheads"], row["grad_bytes"]) == (1, 3, 3 * 32768 * 3 * 64 * 2)
    assert row["extra_bytes"] == {"portattn": 1000, "sdpa_efficient": None}
    assert row["notes"]["sdpa_efficient"] == "RuntimeError: out of memory"
    assert calls == [3, 3] and res["mode"] == "bwd_memory"
    assert "mode bwd_memory" in bench.format_result(res)


def test_main_prints_the_table_and_writes_json(monkeypatch, tmp_path, capsys):
    import json
    got = {}

    def fake_run(**kw):
        got.update(kw)
        return fwd_bwd_result()
    monkeypatch.setattr(bench, "run_bench", fake_run)
    path = tmp_path / "r.json"
    assert bench.main(["--mode", "fwd_bwd", "--json", str(path), "--label", "c0ffee"]) == 0
    assert got["mode"] == "fwd_bwd" and got["seqlens"] == (1024, 2048, 4096, 8192)
    assert "FLOPs = 3.5x" in capsys.readouterr().out
    assert json.loads(path.read_text())["label"] == "c0ffee"


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
