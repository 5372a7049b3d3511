"""The compile gate in CI: every plannable kernel, every gate arch, real SASS, no GPU."""

import pickle

import pytest
from toolload import load_tool

from portattn.arch import GATE_CCS, all_specs_for, device_from_arch
from portattn.arch.plan_bwd import all_bwd_specs_for
from portattn.arch.plan_decode import all_decode_specs_for

def _gate():
    return load_tool("compile_gate")


def _nvrtc_archs():
    try:
        from cupy_backends.cuda.libs import nvrtc
        return set(int(a) for a in nvrtc.getSupportedArchs())
    except Exception as e:  # no CuPy / no NVRTC library
        pytest.skip(f"NVRTC unavailable: {type(e).__name__}: {e}")


def test_every_plannable_kernel_compiles_on_its_arch_without_spills(capsys):
    missing = set(GATE_CCS) - _nvrtc_archs()
    if missing:
        pytest.skip(f"this NVRTC cannot target {sorted(missing)}; install portattn[cuda12]")
    gate = _gate()
    rows = gate.run_gate(GATE_CCS)
    with capsys.disabled():
        print("\n" + gate.HEADER)
        for r in rows:
            print(r.line())
    expected = {(cc, s) for cc in GATE_CCS for s in all_specs_for(device_from_arch(cc))}
    expected |= {(cc, s) for cc in GATE_CCS for s in all_bwd_specs_for(device_from_arch(cc))}
    expected |= {(cc, s) for cc in GATE_CCS for s in all_decode_specs_for(device_from_arch(cc))}
    assert {(r.cc, r.spec) for r in rows} == expected
    bad = [r.line() for r in rows if r.problems]
    assert not bad, "\n".join(bad)
    assert all(r.regs <= 255 and r.ctas_per_sm >= 1 for r in rows)


def test_parse_ptxas_reads_the_named_entry_only():
    gate = _gate()
    log = """ptxas info    : Compiling entry function '_Z1ai' for 'sm_61'
ptxas info    : Function properties for _Z1ai
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, 16 bytes smem, 328 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1bi' for 'sm_61'
ptxas info    : Function properties for _Z1bi
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 200 registers, 328 bytes cmem[0]
"""
    assert gate.parse_ptxas(log, "_Z1ai") == (40, 16, 8, 4, 12)
    assert gate.parse_ptxas(log, "_Z1bi") == (200, 0, 0, 0, 0)
    with pytest.raises(RuntimeError):
        gate.parse_ptxas(log, "_Z1ci")


def test_compile_error_carries_nvrtc_log_and_spec(monkeypatch):
    _nvrtc_archs()
    from portattn import compile as comp
    from portattn.spec import KernelSpec
    spec = KernelSpec("simt_fwd", "float16", 64, 64, 64, 128, 8)
    monkeypatch.setattr(comp, "build_source", lambda family: "this is not CUDA;")
    with pytest.raises(comp.KernelCompileError) as info:
        comp.compile_cubin(spec, 61)
    assert info.value.spec == spec and info.value.log.strip()
    assert "simt_fwd" in str(info.value) and "sm_61" in str(info.value)
    # The gate's worker processes return it pickled; it must arrive whole.
    back = pickle.loads(pickle.dumps(info.value))
    assert (back.spec, back.log, back.arch, str(back)) == \
        (spec, info.value.log, "sm_61", str(info.value))


def test_cache_key_covers_every_kernel_file(monkeypatch):
    from portattn import compile as comp
    files = dict(comp.kernel_files())
    before = comp.build_source("simt_fwd")
    assert comp.sources_digest() in before.splitlines()[0]
    # Editing a header that simt_fwd.cu includes must change the text CuPy keys on.
    changed = dict(files, **{"common.cuh": files["common.cuh"] + "\n// edited\n"})
    for fn in (comp.kernel_files, comp.sources_digest, comp.build_source):
        fn.cache_clear()
    monkeypatch.setattr(comp, "kernel_files", lambda: changed)
    try:
        after = comp.build_source("simt_fwd")
        assert after != before and after.splitlines()[0] != before.splitlines()[0]
        assert "#include" not in after       # headers are inlined, not left for NVRTC to find
    finally:
        monkeypatch.undo()
        for fn in (comp.kernel_files, comp.sources_digest, comp.build_source):
            fn.cache_clear()
