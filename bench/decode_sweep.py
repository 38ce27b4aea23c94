"""Tile sweep of the skinny decode GEMM (gptcore.kernels.decode_linear) on a GPU: the data behind
``decode_linear.plan``, and a per-kernel profile of one fused decode step.

    python bench/decode_sweep.py --out DIR [--budget 300] [--presets gpt2,gpt2-xl] [--rows 1,32]

For each preset and each per-layer Linear of the decode step (QKV with the LayerNorm prologue, the
out-projection with the residual epilogue, FC with LayerNorm + GELU, FC2 with the residual) at M rows,
every candidate tile (BLOCK_N x BLOCK_K, split-K sized for about 1x or 3x as many programs as SMs) is
timed as one launch inside a CUDA graph of back-to-back launches over enough distinct weight copies
to exceed L2 (so each launch reads its weight from HBM, as in a real step), beside F.linear (cuBLAS)
and today's ``plan``. Reports us per launch and weight GB/s. Then one fused decode step per preset
at batch 1 under torch.profiler: device time per kernel name.

Writes decode_sweep-<gpu>-<date>.json under --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from gptcore.config import PRESETS
from gptcore.kernels import decode_linear as dl

L2_BYTES = 60 * 2**20


def _graph_us(fn, calls: int, reps: int = 7) -> float:
    """Median us per fn() call, fn captured `calls` times back to back in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    times.sort()
    return times[len(times) // 2]


def _op(kind, M, C, ff, dt, dev):
    """(N, K, copies of (w, b), the call fn(i, ws))."""
    N, K = {"qkv": (3 * C, C), "proj": (C, C), "fc": (ff, C), "fc2": (C, ff)}[kind]
    copies = max(2, -(-2 * L2_BYTES // (N * K * 2)))
    ws_ = [(torch.randn(N, K, device=dev, dtype=dt) * 0.02, torch.randn(N, device=dev, dtype=dt) * 0.02)
           for _ in range(copies)]
    lnw, lnb = torch.ones(K, device=dev, dtype=dt), torch.zeros(K, device=dev, dtype=dt)
    xin = torch.randn(M, K, device=dev, dtype=torch.float32 if kind in ("qkv", "fc") else dt)
    res = torch.randn(M, N, device=dev, dtype=torch.float32)
    out = torch.empty(M, N, device=dev, dtype=dt)

    def call(i, ws):
        w, b = ws_[i % copies]
        if kind == "qkv":
            dl.ln_linear(xin, lnw, lnb, 1e-5, w, b, out=out, ws=ws)
        elif kind == "fc":
            dl.ln_linear_gelu(xin, lnw, lnb, 1e-5, w, b, out=out, ws=ws)
        else:
            dl.linear_residual(xin, w, b, res, ws=ws)

    xb = xin.to(dt)

    def cublas(i):
        w, b = ws_[i % copies]
        F.linear(xb, w, b)

    return N, K, copies, call, cublas


def _candidates(M, N, K, sms):
    bm = max(16, dl.next_pow2(M))
    seen = set()
    for bn, bk, mult in itertools.product((32, 64, 128), (64, 128, 256), (1, 3)):
        if bk > max(16, dl.next_pow2(K)):
            continue
        n_tiles = -(-N // bn)
        k_chunks = -(-K // bk)
        split = max(1, min(k_chunks, -(-mult * sms // n_tiles)))
        k_split = -(-k_chunks // split) * bk
        split = -(-K // k_split)
        tile_bytes = bk * bn * 2
        stages = 3 if tile_bytes <= 32768 else 2
        warps = 4 if bm * bn <= 2048 else 8
        key = (bn, bk, split, warps, stages)
        if key in seen:
            continue
        seen.add(key)
        yield dl.Plan(bm, bn, bk, split, k_split, n_tiles, warps, stages)


def sweep(presets, rows, budget, out_rows):
    dev = torch.device("cuda")
    dt = torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    t_end = time.time() + budget
    orig_plan = dl.plan
    for preset, M in itertools.product(presets, rows):
        cfg = PRESETS[preset]
        C = cfg.emb_dim
        for kind in ("qkv", "proj", "fc", "fc2"):
            if time.time() > t_end:
                print("sweep: time budget reached", flush=True)
                return
            N, K, copies, call, cublas = _op(kind, M, C, 4 * C, dt, dev)
            wbytes = N * K * 2
            base = {"preset": preset, "M": M, "op": kind, "N": N, "K": K, "weight_MB": wbytes / 1e6}
            us = _graph_us(cublas, 4 * copies)
            out_rows.append({**base, "impl": "cublas F.linear", "us": us, "GBps": wbytes / us / 1e3})
            default = orig_plan(M, N, K, dev)
            cands = [("plan()", default)] + [("sweep", p) for p in _candidates(M, N, K, sms)]
            best = None
            for label, p in cands:
                if time.time() > t_end:
                    break
                dl.plan = lambda *a, _p=p, **k: _p  # noqa: E731
                try:
                    ws = dl.Workspace(dev, max(p.split_k * M * N, 2 * M * p.n_tiles), p.n_tiles + 1)
                    us = _graph_us(lambda i: call(i, ws), 4 * copies)
                except Exception as e:  # noqa: BLE001 - out of shared memory etc.: skip the tile
                    out_rows.append({**base, "impl": label, "plan": p.__dict__, "error": f"{type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200] if str(e) else ''}"})
                    continue
                finally:
                    dl.plan = orig_plan
                row = {**base, "impl": label, "plan": p.__dict__, "us": us, "GBps": wbytes / us / 1e3}
                out_rows.append(row)
                if best is None or us < best["us"]:
                    best = row
            if best:
                print(f"{preset} M={M} {kind}: cublas {out_rows[-len(cands) - 1]['us']:.1f} us | plan() "
                      f"{next((r['us'] for r in out_rows if r.get('impl') == 'plan()' and r['op'] == kind and r['M'] == M and r['preset'] == preset), float('nan')):.1f} us"
                      f" | best {best['us']:.1f} us {best['GBps']:.0f} GB/s {best['plan']}", flush=True)


def profile_step(presets, out_rows):
    from torch.profiler import ProfilerActivity, profile

    from gptcore.generate import Generator
    from gptcore.model import GPT

    for preset in presets:
        torch.manual_seed(0)
        model = GPT(PRESETS[preset], backend="triton").cuda().to(torch.bfloat16).eval()
        gen = Generator(model)
        prompts = torch.randint(0, 50257, (1, 16), device="cuda")
        gen.generate(prompts, 32, temperature=0)
        graphs = [g for g in gen._graphs.values() if g.graph is not None]
        if not graphs:
            out_rows.append({"preset": preset, "profile": "no graph captured"})
            continue
        g = graphs[0]
        gen.cache.reserve(4)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                g.graph.replay()
            torch.cuda.synchronize()
        per = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                name = e.name[:60]
                n, t = per.get(name, (0, 0.0))
                per[name] = (n + 1, t + e.device_time_total)
        total = sum(t for _, t in per.values()) / 3
        top = sorted(per.items(), key=lambda kv: -kv[1][1])
        out_rows.append({"preset": preset, "profile": "fused decode step, batch 1", "kernel_us_per_step": total,
                         "kernels": [{"name": k, "per_step": n / 3, "us_per_step": t / 3} for k, (n, t) in top]})
        print(f"{preset}: kernels sum {total:.1f} us/step; " +
              "; ".join(f"{k[:40]} x{n / 3:.0f} {t / 3:.1f}us" for k, (n, t) in top[:6]), flush=True)
        del gen, model
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("GPTCORE_BENCH_OUT", "bench/results"), help="output folder")
    ap.add_argument("--budget", type=float, default=300, help="seconds for the tile sweep")
    ap.add_argument("--presets", default="gpt2-xl,gpt2", help="comma-separated presets")
    ap.add_argument("--rows", default="1,32", help="comma-separated row counts (batch)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel step profile")
    a = ap.parse_args(argv)
    presets = a.presets.split(",")
    rows: list = []
    if not a.no_profile:
        profile_step(presets, rows)
    sweep(presets, [int(r) for r in a.rows.split(",")], a.budget, rows)
    name = torch.cuda.get_device_name().replace(" ", "_")
    now = datetime.now(timezone.utc)
    path = os.path.join(a.out, f"decode_sweep-{name}-{now:%Y%m%d-%H%M%S}.json")
    os.makedirs(a.out, exist_ok=True)
    env = {"date": now.isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "git_commit": os.environ.get("GPTCORE_GIT_COMMIT"), "command": "python bench/decode_sweep.py " +
           " ".join(argv or __import__("sys").argv[1:])}
    with open(path, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
