"""Forward+backward TFLOP/s of portattn (SIMT backward) next to torch SDPA's efficient
kernel, same run, same inputs.

    python tools/bwd_timing.py [--seqlen 2048] [--batch 2] [--heads 16] [--dims 64,128]

FLOPs: forward 4*b*h*sq*sk*d, backward 2.5x that, both halved for causal.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _time(fn, iters: int = 10, warmup: int = 2) -> float:
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import portattn
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dims", default="64,128")
    a = ap.parse_args(argv)
    b, h, s = a.batch, a.heads, a.seqlen
    print(f"device: {torch.cuda.get_device_name()}, fp16, batch {b}, heads {h}, seqlen {s}")
    print(f"{'impl':26} {'d':>4} {'causal':>6} {'fwd ms':>8} {'fwd+bwd ms':>10} "
          f"{'bwd ms':>8} {'fwd+bwd TFLOP/s':>15} {'bwd TFLOP/s':>11}")
    for d in (int(x) for x in a.dims.split(",")):
        for causal in (False, True):
            fwd_flops = 4 * b * h * s * s * d / (2 if causal else 1)
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.float16,
                                   requires_grad=True) for _ in range(3))
            g = torch.randn(b, s, h, d, device="cuda", dtype=torch.float16)

            def pa_fwd():
                with torch.no_grad():
                    portattn.flash_attn_func(q, k, v, causal=causal)

            def pa_both(det):
                def run():
                    out = portattn.flash_attn_func(q, k, v, causal=causal, deterministic=det)
                    torch.autograd.grad(out, (q, k, v), g)
                return run

            qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_(True) for x in (q, k, v))
            gt = g.transpose(1, 2)

            def sd_fwd():
                with torch.no_grad(), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

            def sd_both():
                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                torch.autograd.grad(out, (qt, kt, vt), gt)

            rows = [("portattn (atomic dQ)", pa_fwd, pa_both(False)),
                    ("portattn (deterministic)", pa_fwd, pa_both(True)),
                    ("torch SDPA efficient", sd_fwd, sd_both)]
            for name, fwd, both in rows:
                tf, tb = _time(fwd), _time(both)
                print(f"{name:26} {d:>4} {str(causal):>6} {tf * 1e3:>8.2f} {tb * 1e3:>10.2f} "
                      f"{(tb - tf) * 1e3:>8.2f} {3.5 * fwd_flops / tb / 1e12:>15.2f} "
                      f"{2.5 * fwd_flops / max(tb - tf, 1e-9) / 1e12:>11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
