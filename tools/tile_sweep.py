"""Time every tile candidate of a kernel family on this GPU for a few shapes, to check
the plan's tile model against measurement. Needs torch and a GPU.

    PYTHONPATH=. python tools/tile_sweep.py [simt|tc|tc75]

tc75 plans as sm_75 (PORTATTN_ARCH) and times the Turing policy's tiles.
"""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from portattn import api  # noqa: E402
from portattn.arch.plan import (SIMT_TILES, TC_MAX_EST_REGS, TC_TILES,  # noqa: E402
                                simt_tile_candidates, tc_est_regs)
from portattn.bench import measure_peaks, time_ms  # noqa: E402
from portattn.testing import forced_arch  # noqa: E402
from portattn.spec import KernelSpec, head_dim_bucket  # noqa: E402

SIMT_EXTRA = ((64, 64, 256, 8),)
TC_EXTRA = ((128, 128, 256), (64, 128, 128))


def tiles_for(family, dtype, dpad, mma):
    """(tile, KernelSpec, selectable) for every candidate and a few outside the model."""
    if family == "simt":
        allowed = set(simt_tile_candidates(dpad))
        for t in SIMT_TILES + SIMT_EXTRA:
            yield t, KernelSpec("simt_fwd", dtype, dpad, *t), t in allowed
    else:
        for t in TC_TILES + (TC_EXTRA if mma >= 80 else ()):
            ok = t in TC_TILES and tc_est_regs(*t, dpad, mma) <= TC_MAX_EST_REGS[mma]
            yield t, KernelSpec("tc_fwd", dtype, dpad, *t, mma=mma), ok


def sweep(family, dtype, d, seqlen, causal, peak, mma=80):
    tokens, hidden = 16384, 2048
    b, h = max(1, tokens // seqlen), hidden // d
    q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=getattr(torch, dtype))
               for _ in range(3))
    p = api._prepare(q, k, v, dropout_p=0.0, softmax_scale=None, causal=causal,
                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                     return_attn_probs=False, bias=None, causal_align="bottom_right")
    flops = 4.0 * b * h * seqlen * seqlen * d / (2 if causal else 1)
    dpad = head_dim_bucket(d)
    for tile, spec, allowed in tiles_for(family, dtype, dpad, mma):
        if spec.smem_bytes > p.device.smem_per_block:
            continue
        pp = dataclasses.replace(p, plan=dataclasses.replace(p.plan, spec=spec,
                                                             smem_bytes=spec.smem_bytes))
        try:
            ms = time_ms(lambda pp=pp: api._launch(pp, False))
        except Exception as e:
            print(f"{dtype} d{d} L{seqlen} c{int(causal)} {tile}: {type(e).__name__} {e}")
            continue
        tf = flops / ms / 1e9
        mark = "*" if spec == p.plan.spec else (" " if allowed else "x")
        print(f"{mark} {dtype:8} d{d:<4} L{seqlen:<6} causal={int(causal)} tile {tile}: "
              f"{ms:8.2f} ms {tf:7.2f} TFLOP/s {100 * tf / peak:5.1f}% of peak", flush=True)


if __name__ == "__main__":
    family = sys.argv[1] if len(sys.argv) > 1 else "simt"
    peaks = measure_peaks()
    if family == "simt":
        peak = peaks["fma_fp32"]
        shapes = (("float16", 64, 4096, False), ("float16", 128, 4096, False),
                  ("float32", 128, 4096, True), ("float16", 256, 2048, False))
    elif family == "tc75":
        peak = peaks.get("mma_m16n8k8", peaks["fma_fp32"])
        shapes = (("float16", 64, 4096, False), ("float16", 128, 4096, False),
                  ("float16", 160, 4096, False), ("float16", 256, 2048, False))
    else:
        peak = peaks.get("mma_m16n8k16", peaks["fma_fp32"])
        shapes = (("float16", 64, 4096, False), ("float16", 96, 4096, False),
                  ("float16", 128, 4096, False), ("bfloat16", 128, 4096, True),
                  ("float16", 160, 4096, False), ("float16", 256, 2048, False))
    print(f"{family}: peak used {peak:.1f} TFLOP/s; * = the plan's tile, x = outside the "
          f"register budget (not selectable)")
    mma = 75 if family == "tc75" else 80
    with forced_arch(75 if family == "tc75" else None):
        for dtype, d, seqlen, causal in shapes:
            sweep(family, dtype, d, seqlen, causal, peak, mma)
