"""Forward+backward TFLOP/s of portattn next to torch SDPA's flash and efficient kernels,
same run, same inputs.

    python tools/bwd_timing.py [--seqlen 2048] [--batch 2] [--heads 16] [--dims 64,128]
                               [--dtypes float16,bfloat16] [--no-deterministic]

PORTATTN_ARCH=sm_75 (etc.) times the path that arch would run, on this GPU. Each row says
which backward path ran. FLOPs: forward 4*b*h*sq*sk*d, backward 2.5x that, both halved
for causal.
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
    ap.add_argument("--dtypes", default="float16")
    ap.add_argument("--no-deterministic", action="store_true")
    a = ap.parse_args(argv)
    b, h, s = a.batch, a.heads, a.seqlen
    print(f"device: {torch.cuda.get_device_name()}, batch {b}, heads {h}, seqlen {s}, "
          f"PORTATTN_ARCH={os.environ.get('PORTATTN_ARCH', '')}")
    print(f"{'impl':26} {'dtype':9} {'d':>4} {'causal':>6} {'fwd ms':>8} {'fwd+bwd ms':>10} "
          f"{'bwd ms':>8} {'fwd+bwd TFLOP/s':>15} {'bwd TFLOP/s':>11} {'vs flash':>8} "
          f"{'vs eff':>7}")
    for dtype, d, causal in ((t, int(x), c) for t in a.dtypes.split(",")
                             for x in a.dims.split(",") for c in (False, True)):
        tdt = getattr(torch, dtype)
        fwd_flops = 4 * b * h * s * s * d / (2 if causal else 1)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=tdt,
                               requires_grad=True) for _ in range(3))
        g = torch.randn(b, s, h, d, device="cuda", dtype=tdt)
        path = portattn.explain(q, k, v, causal=causal).backward.path

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

        def sdpa(backend):
            def fwd():
                with torch.no_grad(), sdpa_kernel(backend):
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

            def both():
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                torch.autograd.grad(out, (qt, kt, vt), gt)
            return fwd, both

        rows = [("torch SDPA flash", *sdpa(SDPBackend.FLASH_ATTENTION)),
                ("torch SDPA efficient", *sdpa(SDPBackend.EFFICIENT_ATTENTION)),
                (f"portattn {path} (atomic dQ)", pa_fwd, pa_both(False))]
        if not a.no_deterministic:
            rows.append((f"portattn {path} (determ.)", pa_fwd, pa_both(True)))
        ref = {}
        for name, fwd, both in rows:
            try:
                tf, tb = _time(fwd), _time(both)
            except RuntimeError as e:   # e.g. no flash kernel for this dtype / GPU
                print(f"{name:26} {dtype:9} {d:>4} {str(causal):>6}  n/a: {e}"[:160])
                continue
            ref.setdefault(name.split()[-1], tb)
            rel = [f"{ref[x] / tb:>{w}.2f}x" if x in ref else f"{'n/a':>{w + 1}}"
                   for x, w in (("flash", 7), ("efficient", 6))]
            print(f"{name:26} {dtype:9} {d:>4} {str(causal):>6} {tf * 1e3:>8.2f} "
                  f"{tb * 1e3:>10.2f} {(tb - tf) * 1e3:>8.2f} "
                  f"{3.5 * fwd_flops / tb / 1e12:>15.2f} "
                  f"{2.5 * fwd_flops / max(tb - tf, 1e-9) / 1e12:>11.2f} {rel[0]} {rel[1]}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
