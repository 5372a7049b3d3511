"""`python -m portattn bench --mode decode`: KV-cache decoding, judged by memory bandwidth.

All in one process on one GPU: this GPU's device-to-device copy bandwidth (read + write
bytes of a large buffer, CUDA events, median), portattn's decode latency and the KV bytes
it reads per second as a fraction of that bandwidth, torch SDPA's flash and cuDNN backends
on the same contiguous cache (GQA through ``enable_gqa``), paged caches against contiguous,
and split-KV against one split on a long single-sequence cache.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics

from .bench import _torch, time_ms

SDPA_DECODE_BACKENDS = ("flash", "cudnn")


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    torch = _torch()
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-3)


def _sdpa_ms(backend: str, q, k_cache, v_cache):
    """SDPA on the contiguous cache viewed as (batch, heads, seqlen, d); (ms, note)."""
    torch = _torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    gqa = qt.shape[1] != kt.shape[1]

    def run():
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa)
    try:
        with torch.no_grad():
            run()
            return time_ms(run), ""
    except Exception as e:  # backend refuses this shape/dtype/GPU
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _problem(batch, hq, hkv, d, seqlen, dtype, page=0, seed=0):
    torch = _torch()
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, dtype)
    q = torch.randn(batch, 1, hq, d, device="cuda", dtype=dt, generator=g)
    if page:
        per_row = -(-seqlen // page)
        nblocks = batch * per_row
        kc = torch.randn(nblocks, page, hkv, d, device="cuda", dtype=dt, generator=g)
        vc = torch.randn(nblocks, page, hkv, d, device="cuda", dtype=dt, generator=g)
        table = torch.randperm(nblocks, device="cuda", generator=g).to(torch.int32)
        table = table.reshape(batch, per_row)
    else:
        kc = torch.randn(batch, seqlen, hkv, d, device="cuda", dtype=dt, generator=g)
        vc = torch.randn(batch, seqlen, hkv, d, device="cuda", dtype=dt, generator=g)
        table = None
    seqlens = torch.full((batch,), seqlen, device="cuda", dtype=torch.int32)
    return q, kc, vc, table, seqlens


def _portattn_ms(q, kc, vc, table, seqlens, num_splits=0, check_indices=None):
    torch = _torch()
    from .kvcache import explain_kvcache, flash_attn_with_kvcache

    def run():
        return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table,
                                       num_splits=num_splits, check_indices=check_indices)
    with torch.no_grad():
        plan = explain_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table,
                               num_splits=num_splits, check_indices=check_indices).plan
        return time_ms(run), plan


def run_decode_bench(batch=8, hq=32, hkv=8, d=128, seqlen=32768, dtype="float16",
                     pages=(16, 64, 256), long_seqlen=131072, baselines=SDPA_DECODE_BACKENDS):
    torch = _torch()
    bw = copy_bandwidth()
    elt = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    rows = []

    def kv_bytes(b, s):
        return 2 * b * s * hkv * d * elt

    def record(name, ms, nbytes, plan=None, note=""):
        row = {"case": name, "ms": ms, "kv_GBps": None, "pct_copy_bw": None, "note": note}
        if ms:
            row["kv_GBps"] = nbytes / (ms * 1e-3) / 1e9
            row["pct_copy_bw"] = 100.0 * nbytes / (ms * 1e-3) / bw
        if plan is not None:
            row["plan"] = (f"{plan.path}: {plan.spec.short()}, {plan.num_splits} split(s), "
                           f"{plan.ctas_per_sm} CTA/SM{', L2 hint' if plan.l2_hint else ''}")
        rows.append(row)
        return row

    # The headline attends to the whole cache with no index arrays, exactly what the SDPA
    # baselines compute, so there is nothing to check before launch. With a cache_seqlens
    # tensor the default check copies it to the host first (one sync per call); the rows
    # below time that and the unchecked call (check_indices=False, as flash_attn runs).
    q, kc, vc, _, seqlens = _problem(batch, hq, hkv, d, seqlen, dtype)
    nbytes = kv_bytes(batch, seqlen)
    ms, plan = _portattn_ms(q, kc, vc, None, None)
    head = record("portattn contiguous", ms, nbytes, plan)
    from .testing import forced_path
    with forced_path("simt"):
        ms_simt, plan_simt = _portattn_ms(q, kc, vc, None, None)
    record("portattn contiguous, SIMT kernel (PORTATTN_PATH=simt)", ms_simt, nbytes, plan_simt)
    if dtype == "float16":
        with forced_path("sm75"):
            ms_75, plan_75 = _portattn_ms(q, kc, vc, None, None)
        record("portattn contiguous, Turing m16n8k8 kernel (PORTATTN_PATH=sm75)", ms_75, nbytes,
               plan_75)
    ms_unchk, plan_unchk = _portattn_ms(q, kc, vc, None, seqlens, check_indices=False)
    record("portattn contiguous, cache_seqlens tensor, check_indices=False", ms_unchk, nbytes,
           plan_unchk)
    ms_chk, _ = _portattn_ms(q, kc, vc, None, seqlens)
    record("portattn contiguous, cache_seqlens tensor, checked (default: host copy)", ms_chk,
           nbytes)
    sdpa = {}
    for backend in baselines:
        ms_b, note = _sdpa_ms(backend, q, kc, vc)
        sdpa[backend] = ms_b
        record(f"torch SDPA {backend} (contiguous, enable_gqa)", ms_b, nbytes, note=note)
    del q, kc, vc
    torch.cuda.empty_cache()

    paged = {}
    for page in pages:
        q, kc, vc, table, seqlens = _problem(batch, hq, hkv, d, seqlen, dtype, page=page)
        ms, plan = _portattn_ms(q, kc, vc, table, seqlens, check_indices=False)
        paged[page] = record(f"portattn paged, page {page}, check_indices=False", ms, nbytes,
                             plan)
        del q, kc, vc, table
        torch.cuda.empty_cache()

    q, kc, vc, _, seqlens = _problem(1, hq, hkv, d, long_seqlen, dtype)
    nb_long = kv_bytes(1, long_seqlen)
    ms_auto, plan_auto = _portattn_ms(q, kc, vc, None, None)
    long_auto = record(f"portattn batch 1, {long_seqlen} keys, num_splits=0 (plan)", ms_auto,
                       nb_long, plan_auto)
    ms_one, plan_one = _portattn_ms(q, kc, vc, None, None, num_splits=1)
    long_one = record(f"portattn batch 1, {long_seqlen} keys, num_splits=1", ms_one, nb_long,
                      plan_one)
    del q, kc, vc
    torch.cuda.empty_cache()

    summary = {
        "copy_bandwidth_GBps": bw / 1e9,
        "headline_pct_copy_bw": head["pct_copy_bw"],
        "headline_vs_sdpa": {b: (sdpa[b] / head["ms"] if sdpa[b] else None) for b in sdpa},
        "paged_vs_contiguous": {p: paged[p]["ms"] / head["ms"] for p in paged},
        "split_speedup_long": long_one["ms"] / long_auto["ms"],
    }
    config = dict(batch=batch, nheads_q=hq, nheads_kv=hkv, head_dim=d, seqlen=seqlen,
                  dtype=dtype, long_seqlen=long_seqlen)
    return {"config": config, "rows": rows, "summary": summary,
            "device": torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_split_sweep(batch=8, hq=32, hkv=8, d=128, seqlen=32768, dtype="float16",
                    long_seqlen=131072, threads=(64, 128), rounds=3):
    """Tensor-core decode time by CTA size, split count and L2 load hint (on or off),
    next to SDPA flash in every round; rounds interleave all configurations so clock drift
    hits them alike."""
    torch = _torch()
    from .arch import plan_decode
    from .arch.cache import decode_plan
    saved = (plan_decode.TC_THREADS, plan_decode.TC_L2_HINT)
    results = {}
    try:
        for b, s in ((batch, seqlen), (1, long_seqlen)):
            q, kc, vc, _, _ = _problem(b, hq, hkv, d, s, dtype)
            configs = []
            for nt in threads:
                plan_decode.TC_THREADS = nt
                decode_plan.cache_clear()
                auto = _portattn_ms(q, kc, vc, None, None)[1].num_splits
                splits = sorted({auto, 2 * auto} if nt == 128 else {auto})
                configs += [(nt, hint, min(sp, plan_decode.MAX_SPLITS), sp == auto)
                            for hint in (True, False) for sp in splits]
            for _ in range(rounds):
                if b == batch:
                    results.setdefault((b, s, "sdpa"), []).append(_sdpa_ms("flash", q, kc, vc)[0])
                for cfg in configs:
                    nt, hint, sp, _ = cfg
                    plan_decode.TC_THREADS = nt
                    plan_decode.TC_L2_HINT = hint
                    decode_plan.cache_clear()
                    ms, _ = _portattn_ms(q, kc, vc, None, None, num_splits=sp)
                    results.setdefault((b, s, cfg), []).append(ms)
            del q, kc, vc
            torch.cuda.empty_cache()
    finally:
        plan_decode.TC_THREADS, plan_decode.TC_L2_HINT = saved
        decode_plan.cache_clear()
    rows = []
    elt = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    for (b, s, cfg), times in results.items():
        med = statistics.median(times)
        row = {"batch": b, "seqlen": s, "ms": med, "ms_rounds": times,
               "kv_GBps": 2 * b * s * hkv * d * elt / (med * 1e-3) / 1e9}
        if cfg == "sdpa":
            row["config"] = "sdpa flash"
        else:
            nt, hint, sp, auto = cfg
            row.update(config=f"t{nt} {'L2 hint' if hint else 'no hint'} splits {sp}"
                       f"{' (plan)' if auto else ''}", threads=nt, l2_hint=hint, splits=sp,
                       auto=auto)
            sdpa = results.get((b, s, "sdpa"))
            if sdpa:
                row["sdpa_over_portattn"] = statistics.median(x / y for x, y in zip(sdpa, times))
        rows.append(row)
    return rows


def format_table(res: dict) -> str:
    c, s = res["config"], res["summary"]
    lines = [f"decode on {res['device']}: batch {c['batch']}, heads {c['nheads_q']}/"
             f"{c['nheads_kv']}, head dim {c['head_dim']}, {c['dtype']}, cache {c['seqlen']}; "
             f"copy bandwidth {s['copy_bandwidth_GBps']:.0f} GB/s (read + write)",
             f"{'case':72} {'ms':>8} {'KV GB/s':>8} {'% copy':>7}  plan / note"]
    for r in res["rows"]:
        ms = f"{r['ms']:.4f}" if r["ms"] else "n/a"
        gb = f"{r['kv_GBps']:.0f}" if r["kv_GBps"] else ""
        pct = f"{r['pct_copy_bw']:.1f}" if r["pct_copy_bw"] else ""
        lines.append(f"{r['case']:72} {ms:>8} {gb:>8} {pct:>7}  {r.get('plan', '')}{r['note']}")
    vs = ", ".join(f"{b} {x:.2f}x" if x else f"{b} n/a" for b, x in s["headline_vs_sdpa"].items())
    pv = ", ".join(f"page {p}: {x:.3f}" for p, x in s["paged_vs_contiguous"].items())
    lines += [f"headline: {s['headline_pct_copy_bw']:.1f}% of copy bandwidth; SDPA time / "
              f"portattn time: {vs}",
              f"paged / contiguous time: {pv}",
              f"batch 1 long cache: split-KV {s['split_speedup_long']:.2f}x faster than "
              f"num_splits=1"]
    return "\n".join(lines)


def parser():
    ap = argparse.ArgumentParser(prog="portattn bench --mode decode")
    ap.add_argument("--mode", default="decode", choices=("decode",))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", default="32/8", help="query heads / KV heads")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--pages", default="16,64,256")
    ap.add_argument("--long-seqlen", type=int, default=131072)
    ap.add_argument("--baselines", default=",".join(SDPA_DECODE_BACKENDS))
    ap.add_argument("--json", default=None, help="write the full results here")
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. the commit)")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the tensor-core kernel by CTA size and split count")
    return ap


def main(argv) -> int:
    a = parser().parse_args(argv)
    hq, _, hkv = a.heads.partition("/")
    baselines = tuple(b for b in a.baselines.split(",") if b)
    for b in baselines:
        if b not in SDPA_DECODE_BACKENDS:
            raise ValueError(f"--baselines must be among {SDPA_DECODE_BACKENDS}, got {b!r}")
    res = run_decode_bench(a.batch, int(hq), int(hkv or hq), a.head_dim, a.seqlen, a.dtype,
                           tuple(int(p) for p in a.pages.split(",") if p), a.long_seqlen,
                           baselines)
    res["label"] = a.label
    print(format_table(res))
    if a.sweep:
        res["sweep"] = run_split_sweep(a.batch, int(hq), int(hkv or hq), a.head_dim, a.seqlen,
                                       a.dtype, a.long_seqlen)
        print("sweep (tensor-core decode, median of rounds): batch, keys, config -> ms, "
              "KV GB/s, SDPA flash time / portattn time (same round)")
        for r in res["sweep"]:
            ratio = f"{r['sdpa_over_portattn']:.3f}x" if "sdpa_over_portattn" in r else ""
            each = " ".join(f"{x:.4f}" for x in r["ms_rounds"])
            print(f"  {r['batch']:3} {r['seqlen']:7} {r['config']:36} {r['ms']:.4f} "
                  f"{r['kv_GBps']:6.0f} {ratio}  rounds {each}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
