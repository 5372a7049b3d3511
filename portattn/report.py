"""`python -m portattn report`: the GPU, its limits and versions, and the plan for every
dtype x head-dim bucket x causal, each with its reason, plus the backward plan per dtype x
head-dim bucket. Works with no GPU (--arch)."""
from __future__ import annotations

import json

import numpy as np

from . import __version__
from .arch import (GATE_CCS, Problem, detect, device_from_arch, parse_arch, select_bwd_plan,
                   select_plan)
from .arch.detect import gpu_status
from .spec import DTYPES, HEAD_DIM_BUCKETS


def plan_rows(device):
    rows = []
    for dtype in DTYPES:
        for d in HEAD_DIM_BUCKETS:
            for causal in (False, True):
                plan = select_plan(device, Problem(dtype=dtype, head_dim=d, causal=causal))
                rows.append({"dtype": dtype, "head_dim": d, "causal": causal, "path": plan.path,
                             "block_m": plan.spec.block_m, "block_n": plan.spec.block_n,
                             "threads": plan.spec.threads, "smem_bytes": plan.smem_bytes,
                             "ctas_per_sm": plan.ctas_per_sm, "reason": plan.reason,
                             "rejected": dict(plan.rejected)})
    return rows


def bwd_plan_rows(device):
    rows = []
    for dtype in DTYPES:
        for d in HEAD_DIM_BUCKETS:
            plan = select_bwd_plan(device, Problem(dtype=dtype, head_dim=d))
            spec = plan.spec("dkdv")
            rows.append({"dtype": dtype, "head_dim": d, "path": plan.path,
                         "block_m": spec.block_m, "block_n": spec.block_n,
                         "threads": spec.threads, "smem_bytes": plan.smem_bytes,
                         "ctas_per_sm": plan.ctas_per_sm, "reason": plan.reason})
    return rows


def device_dict(dev) -> dict:
    f = dev.facts
    return {"name": dev.name or None, "has_gpu": dev.has_gpu, "real_cc": dev.real_cc,
            "plan_arch": dev.arch_name, "forced": dev.forced, "sm_count": dev.sm_count,
            "smem_per_block": dev.smem_per_block, "smem_per_sm": dev.smem_per_sm,
            "mma": f.mma_name, "ldmatrix": f.ldmatrix, "cp_async": f.cp_async,
            "bf16_mma": f.bf16_mma, "versions": dev.versions,
            "nvrtc_archs": list(dev.nvrtc_archs)}


def format_report(dev, rows, no_gpu_reason: str = "", bwd_rows=()) -> str:
    f = dev.facts
    out = [f"portattn {__version__} capability report"]
    if dev.has_gpu:
        out.append(f"GPU: {dev.name}, compute capability {dev.real_cc // 10}.{dev.real_cc % 10}, "
                   f"{dev.sm_count} SMs")
        v = dev.versions
        out.append(f"versions: driver {v.get('driver')}, runtime {v.get('runtime')}, "
                   f"NVRTC {v.get('nvrtc')} (targets sm_{min(dev.nvrtc_archs, default=0)}.."
                   f"sm_{max(dev.nvrtc_archs, default=0)}), CuPy {v.get('cupy')}")
        if dev.forced:
            out.append(f"planning as {dev.arch_name} (PORTATTN_ARCH); kernels compile for "
                       f"sm_{dev.real_cc}")
    else:
        out.append(f"no CUDA GPU: {no_gpu_reason}" if no_gpu_reason else
                   "GPU not queried (--arch)")
        out.append(f"plans below are for {dev.arch_name} from the arch table "
                   f"(e.g. {f.example})")
    out.append(f"{dev.arch_name}: shared memory {dev.smem_per_block // 1024} KB/block (opt-in), "
               f"{dev.smem_per_sm // 1024} KB/SM; {f.max_threads_per_sm} threads, "
               f"{f.max_ctas_per_sm} CTAs per SM; MMA {f.mma_name}, ldmatrix "
               f"{'yes' if f.ldmatrix else 'no'}, cp.async {'yes' if f.cp_async else 'no'}, "
               f"bf16 MMA {'yes' if f.bf16_mma else 'no'}")
    out.append("")
    out.append(f"{'dtype':9} {'hdim':>4} {'causal':6} {'path':5} {'tile':>7} {'thr':>4} "
               f"{'smem':>7} {'CTA/SM':>6}  reason")
    for r in rows:
        out.append(f"{r['dtype']:9} {r['head_dim']:>4} {str(r['causal']):6} {r['path']:5} "
                   f"{str(r['block_m']) + 'x' + str(r['block_n']):>7} {r['threads']:>4} "
                   f"{str(r['smem_bytes'] // 1024) + ' KB':>7} {r['ctas_per_sm']:>6}  "
                   f"{r['reason']}")
    if bwd_rows:
        out.append("")
        out.append("backward (the dK/dV stage's tile; deterministic mode computes dQ on SIMT):")
        for r in bwd_rows:
            out.append(f"{r['dtype']:9} {r['head_dim']:>4} {'':6} {r['path']:5} "
                       f"{str(r['block_m']) + 'x' + str(r['block_n']):>7} {r['threads']:>4} "
                       f"{str(r['smem_bytes'] // 1024) + ' KB':>7} {r['ctas_per_sm']:>6}  "
                       f"{r['reason']}")
    out.append("")
    out.append("paths not taken:")
    for dtype in DTYPES:
        seen = {}
        for r in rows:
            if r["dtype"] == dtype:
                seen.update(r["rejected"])
        for path, why in seen.items():
            out.append(f"  {dtype:9} {path:5} {why}")
    return "\n".join(out)


def selftest_cases():
    """(dtype, head_dim, options) that --selftest runs on each plannable arch: awkward
    sizes, every feature at least once."""
    return [
        ("float16", 64, dict(sq=97, sk=130, causal=True)),
        ("bfloat16", 72, dict(sq=17, sk=200, window=(33, 5), alibi=True)),
        ("float32", 40, dict(sq=129, sk=65, bias=True, softcap=20.0)),
        ("float16", 256, dict(sq=65, sk=1025, causal=True, align="top_left")),
    ]


def run_selftest(dev, print_fn=print) -> bool:
    from . import flash_attn_func
    from .testing import check_forward, forced_arch, random_inputs
    try:
        import torch  # noqa: F401
        kind = "torch"
    except ImportError:
        kind = "cupy"
    archs = [None] + [cc for cc in GATE_CCS if cc < dev.real_cc]
    rng = np.random.default_rng()
    all_ok = True
    for arch in archs:
        for dtype, d, o in selftest_cases():
            label = f"{'native' if arch is None else f'sm_{arch}':7} {dtype:9} d{d:<4}"
            if dtype == "bfloat16" and kind != "torch":
                print_fn(f"{label} skipped: bfloat16 needs torch (CuPy has no bfloat16)")
                continue
            b, hkv, group = 2, 2, 2
            arrays = {"q": random_inputs(rng, (b, o["sq"], hkv * group, d), dtype),
                      "k": random_inputs(rng, (b, o["sk"], hkv, d), dtype),
                      "v": random_inputs(rng, (b, o["sk"], hkv, d), dtype)}
            if o.get("alibi"):
                arrays["alibi_slopes"] = rng.uniform(0, 0.3, (hkv * group,)).astype(np.float32)
            if o.get("bias"):
                arrays["bias"] = rng.standard_normal((o["sq"], o["sk"])).astype(np.float32)
            kwargs = dict(causal=o.get("causal", False), window_size=o.get("window", (-1, -1)),
                          softcap=o.get("softcap", 0.0),
                          causal_align=o.get("align", "bottom_right"))
            try:
                with forced_arch(arch):
                    c_out, c_lse = check_forward(kwargs, arrays, dtype, kind, flash_attn_func)
                ok = c_out.ok and c_lse.ok
                print_fn(f"{label} {'PASS' if ok else 'FAIL'} {c_out}; {c_lse}")
            except Exception as e:
                ok = False
                print_fn(f"{label} FAIL {type(e).__name__}: {e}")
            all_ok &= ok
    return all_ok


def main(argv) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="portattn report")
    ap.add_argument("--arch", help="plan for this arch from the table (no GPU needed), e.g. sm_75")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--selftest", action="store_true",
                    help="compile and run every plannable path on this GPU against the reference")
    a = ap.parse_args(argv)
    ok, why = gpu_status()
    if a.arch:
        dev = device_from_arch(parse_arch(a.arch, source="--arch"))
    elif ok:
        dev = detect()
    else:
        print(f"no CUDA GPU: {why}\nUse --arch sm_XX to print the plans for an arch "
              f"from the table.")
        return 0 if not a.selftest else 1
    rows, bwd_rows = plan_rows(dev), bwd_plan_rows(dev)
    if a.json:
        print(json.dumps({"device": device_dict(dev), "plans": rows,
                          "backward_plans": bwd_rows}, indent=1))
    else:
        print(format_report(dev, rows, "" if ok else why, bwd_rows))
    if a.selftest:
        if not ok:
            print(f"selftest needs a GPU: {why}")
            return 1
        print("\nselftest (each arch forced through PORTATTN_ARCH, against reference.py):")
        return 0 if run_selftest(detect()) else 1
    return 0
