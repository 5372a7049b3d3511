"""The compile gate in CI: every plannable kernel, every gate arch, real SASS, no GPU."""
import importlib.util
import os
import sys

import pytest

from portattn.arch import GATE_CCS, all_specs_for, device_from_arch

_TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "compile_gate.py")


def _gate():
    spec = importlib.util.spec_from_file_location("compile_gate", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod      # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


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
