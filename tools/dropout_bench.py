"""What dropout's run-time branch costs the forward that does not use it: times the planned
forward (fp16, head dim 64 and 128, seqlen 4096, causal off and on) with this tree's kernels
and with a copy whose forward kernels have the dropout blocks removed, alternating the two
twice in one run, and also with dropout_p=0.1. Needs torch and a GPU.

    PYTHONPATH=. python tools/dropout_bench.py [--path sm80]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FILES = ("tc_fwd.cu", "tc70_fwd.cu", "simt_fwd.cu")
SHAPES = ((64, False), (64, True), (128, False), (128, True))


def strip_dropout(text: str) -> str:
    """``text`` without its ``if (drop_threshold != 0u) { ... }`` blocks."""
    key = "if (drop_threshold != 0u) {"
    while key in text:
        start = text.index(key)
        depth, i = 0, start + len(key) - 1
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        text = text[:start] + text[i:]
    return text


def child(path: str, with_dropout: bool) -> None:
    import torch
    from portattn import api
    from portattn.bench import time_ms
    os.environ["PORTATTN_PATH"] = path
    for d, causal in SHAPES:
        seqlen, b, h = 4096, 4, 2048 // d
        q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.float16)
                   for _ in range(3))
        flops = 4.0 * b * h * seqlen * seqlen * d / (2 if causal else 1)
        for p in ((0.0, 0.1) if with_dropout else (0.0,)):
            prep = api._prepare(q, k, v, dropout_p=p, softmax_scale=None, causal=causal,
                                window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                deterministic=False, return_attn_probs=False, bias=None,
                                causal_align="bottom_right", dropout_seed=1)
            ms = time_ms(lambda: api._launch(prep, False))
            print(f"  d{d} causal={int(causal)} dropout_p={p}: {ms:7.3f} ms "
                  f"{flops / ms / 1e9:6.1f} TFLOP/s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default="sm80")
    ap.add_argument("--child", choices=("before", "after"))
    a = ap.parse_args()
    if a.child:
        child(a.path, a.child == "after")
        return 0
    tmp = tempfile.mkdtemp(prefix="portattn_nodrop_")
    shutil.copytree(os.path.join(ROOT, "portattn"), os.path.join(tmp, "portattn"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    kdir = os.path.join(tmp, "portattn", "kernels_cuda")
    for name in FILES:
        with open(os.path.join(kdir, name)) as f:
            text = f.read()
        with open(os.path.join(kdir, name), "w") as f:
            f.write(strip_dropout(text))
    trees = {"before": tmp, "after": os.path.abspath(ROOT)}
    for rnd in range(2):
        for which in ("before", "after"):
            print(f"{which} (round {rnd + 1}): forward kernels "
                  f"{'without' if which == 'before' else 'with'} the dropout code", flush=True)
            env = dict(os.environ, PYTHONPATH=trees[which])
            subprocess.run([sys.executable, os.path.abspath(__file__), "--path", a.path,
                            "--child", which], env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
