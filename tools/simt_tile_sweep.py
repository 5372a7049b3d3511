"""Time every SIMT tile candidate (and a few larger ones) on this GPU for a few shapes,
to check the plan's tile model against measurement. Needs torch and a GPU.

    PYTHONPATH=. python tools/simt_tile_sweep.py
"""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from portattn import api  # noqa: E402
from portattn.arch.plan import SIMT_TILES, simt_tile_candidates  # noqa: E402
from portattn.bench import measure_peaks, time_ms  # noqa: E402
from portattn.spec import KernelSpec, head_dim_bucket  # noqa: E402

EXTRA = ((128, 64, 256, 8), (128, 32, 256, 8), (64, 64, 256, 8))


def sweep(dtype, d, seqlen, causal, peak):
    tokens, hidden = 16384, 2048
    b, h = max(1, tokens // seqlen), hidden // d
    q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=getattr(torch, dtype))
               for _ in range(3))
    p = api._prepare(q, k, v, dropout_p=0.0, softmax_scale=None, causal=causal,
                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                     return_attn_probs=False, bias=None, causal_align="bottom_right")
    flops = 4.0 * b * h * seqlen * seqlen * d / (2 if causal else 1)
    dpad = head_dim_bucket(d)
    allowed = set(simt_tile_candidates(dpad))
    for tile in tuple(SIMT_TILES) + EXTRA:
        spec = KernelSpec("simt_fwd", dtype, dpad, *tile)
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
        mark = "*" if spec == p.plan.spec else (" " if tile in allowed else "x")
        print(f"{mark} {dtype:8} d{d:<4} L{seqlen:<6} causal={int(causal)} tile {tile}: "
              f"{ms:8.2f} ms {tf:6.2f} TFLOP/s {100 * tf / peak:5.1f}% of FMA peak", flush=True)


if __name__ == "__main__":
    peak = measure_peaks()["fma_fp32"]
    print(f"fp32 FMA peak {peak:.1f} TFLOP/s; * = the plan's tile, x = outside the register "
          f"budget (not selectable)")
    for dtype, d, seqlen, causal in (("float16", 64, 4096, False), ("float16", 128, 4096, False),
                                     ("float32", 128, 4096, True), ("float16", 256, 2048, False)):
        sweep(dtype, d, seqlen, causal, peak)
