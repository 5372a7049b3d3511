"""tools/sanitize.py's verdicts from a child's output; no GPU and no sanitizer needed."""

import pytest
from toolload import load_tool

@pytest.fixture(scope="module")
def tool():
    return load_tool("sanitize")


CLEAN = """========= COMPUTE-SANITIZER
CASE ok sm_75 float16 tiny [simt:simt_fwd/float16/d40/16x16/t64]: out: ok; lse: ok
CASE ok sm_75 float16 edge [simt:simt_fwd/float16/d64/64x64/t128]: out: ok; lse: ok
========= ERROR SUMMARY: 0 errors
"""

DIRTY = """========= COMPUTE-SANITIZER
CASE ok sm_75 float16 tiny [simt:x]: out: ok; lse: ok
========= Invalid __global__ read of size 2 bytes
=========     at simt_fwd_kernel+0x1a30
=========     by thread (5,0,0) in block (1,0,0)
=========
========= ERROR SUMMARY: 1 error
"""


def test_clean_child_passes(tool):
    o = tool.Outcome("memcheck", "sm_75", 0, 3.0, CLEAN)
    assert o.counts == (2, 0, 0)
    assert (o.verdict, o.passed, o.summary) == ("pass", True, "ERROR SUMMARY: 0 errors")


def test_sanitizer_errors_fail_and_show_the_access(tool):
    o = tool.Outcome("memcheck", "sm_75", tool.ERROR_EXIT, 3.0, DIRTY)
    assert (o.verdict, o.passed, o.summary) == ("SANITIZER ERRORS", False, "ERROR SUMMARY: 1 error")
    errs = o.first_errors()
    assert errs[0] == "========= Invalid __global__ read of size 2 bytes"
    assert any("simt_fwd_kernel" in e for e in errs)


def test_wrong_results_crashes_timeouts_and_skips(tool):
    wrong = CLEAN.replace("CASE ok sm_75 float16 edge", "CASE FAIL sm_75 float16 edge")
    assert tool.Outcome("racecheck", "sm_75", 1, 1.0, wrong).verdict == "FAIL (rc 1)"
    crash = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n"
    o = tool.Outcome("memcheck", "native", 1, 1.0, crash)
    assert not o.passed and o.first_errors()[-1] == "RuntimeError: boom"
    assert tool.Outcome("memcheck", "native", None, 300.0, "").verdict == "TIMEOUT"
    skip = "CASE SKIP sm_90: newer than this GPU (sm_80)\n========= ERROR SUMMARY: 0 errors\n"
    assert tool.Outcome("memcheck", "sm_90", 0, 1.0, skip).passed
    assert not tool.Outcome("memcheck", "sm_90", 0, 1.0, "").passed


def test_shapes_cover_the_tile_boundaries_the_brief_names(tool):
    shapes = {s.name: s for s in tool.SHAPES}
    assert (shapes["tiny"].sq, shapes["tiny"].sk) == (1, 1)
    assert (shapes["edge"].sq, shapes["edge"].sk, shapes["edge"].kwargs) == \
        (65, 129, {"causal": True})
    assert shapes["window"].kwargs["window_size"] != (-1, -1)
