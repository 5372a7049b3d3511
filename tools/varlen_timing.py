"""Varlen vs dense forward (and forward+backward) time on the current GPU, same run.

    python tools/varlen_timing.py [--json PATH]

A packed batch of equal-length sequences does the same work as the dense call of that
shape, so their time ratio shows what the varlen indexing costs; a batch of mixed lengths
(same token count) is timed against its own FLOPs. torch SDPA flash on the dense shape is
the yardstick in the same run. fp16, head dim 64/128, 16 heads, 16k tokens per batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    import portattn
    from portattn.bench import time_ms as bench
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    h, tokens = 16, 16384
    for d in (64, 128):
        for causal in (False, True):
            for lens in ([2048] * 8, [4096, 512, 3000, 1024, 6976, 728, 48]):
                cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32,
                                  device="cuda")
                q, k, v = (torch.randn(tokens, h, d, device="cuda", dtype=torch.float16)
                           for _ in range(3))
                mx = max(lens)
                flops = sum(4 * h * n * n * d / (2 if causal else 1) for n in lens)
                t_var = bench(lambda: portattn.flash_attn_varlen_func(
                    q, k, v, cu, cu, mx, mx, causal=causal, check_indices=False))
                row = dict(d=d, causal=causal, lens=lens, varlen_ms=t_var,
                           varlen_tflops=flops / t_var / 1e9)
                if len(set(lens)) == 1:
                    b, n = len(lens), lens[0]
                    qd, kd, vd = (x.view(b, n, h, d) for x in (q, k, v))
                    row["dense_ms"] = bench(lambda: portattn.flash_attn_func(qd, kd, vd,
                                                                             causal=causal))
                    qt, kt, vt = (x.transpose(1, 2) for x in (qd, kd, vd))
                    flash = torch.nn.attention.SDPBackend.FLASH_ATTENTION
                    with torch.nn.attention.sdpa_kernel(flash):
                        row["sdpa_flash_ms"] = bench(lambda: F.scaled_dot_product_attention(
                            qt, kt, vt, is_causal=causal))
                    row["varlen_over_dense"] = t_var / row["dense_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"device: {torch.cuda.get_device_name()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
