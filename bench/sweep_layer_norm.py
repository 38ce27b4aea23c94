"""Launch-config sweep for the LayerNorm kernels (how kernels/layer_norm.py's fwd_config/bwd_config
were chosen). CUDA only; one JSON line per config: eager do_bench ms and CUDA-graph ms.

    python bench/sweep_layer_norm.py OUT.jsonl      # bf16, 16384 rows, widths 768/1024/1600/4096 (~4 min on an H100)
    python bench/sweep_layer_norm.py OUT.jsonl bwd  # backward only: tile, warps, grid size, and the
                                                    # partial-sum kernel's tile (timed alone and in the backward)
    python bench/sweep_layer_norm.py OUT.jsonl dh   # add+LN backward (reads dh too): row prefetch on/off
"""
import itertools, json, sys, time
import torch, triton
from triton.testing import do_bench, do_bench_cudagraph
import gptcore.kernels.layer_norm as L

M = 16384
dt = torch.bfloat16
out = open(sys.argv[1], "w") if len(sys.argv) > 1 else sys.stdout
def emit(**kw):
    print(json.dumps(kw), file=out, flush=True)

def bench(fn):
    a = do_bench(fn, warmup=10, rep=50, return_mode="median")
    try:
        g = do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception:
        g = None
    return a, g

orig_f, orig_b = L.fwd_config, L.bwd_config
t_start = time.time()
if len(sys.argv) > 2 and sys.argv[2] == "dh":
    import dataclasses
    for N in (768, 1024, 1600, 4096):
        x = torch.randn(M, N, device="cuda", dtype=dt); dy = torch.randn_like(x); dh = torch.randn_like(x)
        w = torch.randn(N, device="cuda", dtype=dt)
        y, h, mean, rstd = L._forward(x, None, w, w, 1e-5, (M, N), dt)
        for pf in (False, True):
            cfg = dataclasses.replace(orig_b(N), prefetch_with_dh=pf)
            L.bwd_config = lambda n, cfg=cfg: cfg
            ms = do_bench_cudagraph(lambda: L._backward(dy, dh, x, w, dt, mean, rstd, (M, N), dt, dt), rep=50)
            emit(N=N, kind="bwd_dh", prefetch_with_dh=pf, us=ms * 1e3, GBps=4 * M * N * 2 / ms / 1e6)
        L.bwd_config = orig_b
    sys.exit(0)
if len(sys.argv) > 2 and sys.argv[2] == "bwd":
    import gptcore.kernels._rows as R
    orig_sp = R.SUM_PARTIALS_CONFIG
    for N in (768, 1024, 1600, 4096):
        nset = 4
        xs = [torch.randn(M, N, device="cuda", dtype=dt) for _ in range(nset)]
        dys = [torch.randn(M, N, device="cuda", dtype=dt) for _ in range(nset)]
        w = torch.randn(N, device="cuda", dtype=dt)
        y, h, mean, rstd = L._forward(xs[0], None, w, w, 1e-5, (M, N), dt)
        it = itertools.count()
        base = orig_b(N)
        P = 4 * base.programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
        part = torch.randn(2, P, N, device="cuda")
        for sp in ((64, 32, 4), (128, 32, 4), (256, 16, 4), (128, 16, 4), (64, 16, 2), (256, 32, 8), (32, 64, 4)):
            R.SUM_PARTIALS_CONFIG = sp
            emit(N=N, kind="sum_partials", P=P, sp=sp, ms=bench(lambda: R.sum_partials(part, [dt, dt])))
        full = N == 768  # the width whose target was missed gets the whole grid
        for sp in ((64, 32, 4), (128, 16, 4), (256, 16, 4)):
            R.SUM_PARTIALS_CONFIG = sp
            for bm_mul in (1, 2) if full else (1,):
                for nw in sorted({base.num_warps, 2 * base.num_warps}) if full else (base.num_warps,):
                    for pps in (2, 3, 4, 6) if full else (base.programs_per_sm,):
                        cfg = L.LaunchConfig(base.block_m * bm_mul, base.block_n, nw, 1, pps)
                        L.bwd_config = lambda n, cfg=cfg: cfg
                        try:
                            f = lambda: L._backward(dys[next(it) % nset], None, xs[next(it) % nset], w, dt, mean, rstd, (M, N), dt, None)
                            emit(N=N, kind="bwd", sp=sp, cfg=str(cfg), ms=bench(f))
                        except Exception as e:
                            emit(N=N, kind="bwd", sp=sp, cfg=str(cfg), err=str(e)[:200])
        R.SUM_PARTIALS_CONFIG = orig_sp
        L.bwd_config = orig_b
        emit(N=N, kind="elapsed", s=time.time() - t_start)
    sys.exit(0)
for N in (768, 1024, 1600, 4096):
    nset = 4
    xs = [torch.randn(M, N, device="cuda", dtype=dt) for _ in range(nset)]
    rs = [torch.randn(M, N, device="cuda", dtype=dt) for _ in range(nset)]
    w = torch.randn(N, device="cuda", dtype=dt); b = torch.randn(N, device="cuda", dtype=dt)
    dys = [torch.randn(M, N, device="cuda", dtype=dt) for _ in range(nset)]
    it = itertools.count()
    # whole-wrapper vs raw launch with default config
    emit(N=N, kind="wrapper_fwd", ms=bench(lambda: L.layer_norm(xs[next(it) % nset], w, b, 1e-5)))
    bn = max(16, triton.next_power_of_2(N))
    for tile in (2048, 4096, 8192, 16384):
        bm = max(1, tile // bn)
        for nw in (2, 4, 8, 16):
            if bm * bn // (nw * 32) < 4 or bm * bn // (nw * 32) > 128:
                continue
            cfg = L.LaunchConfig(bm, bn, nw)
            L.fwd_config = lambda n, cfg=cfg: cfg
            try:
                f = lambda: L._forward(xs[next(it) % nset], None, w, b, 1e-5, (M, N), dt)
                fr = lambda: L._forward(xs[next(it) % nset], rs[next(it) % nset], w, b, 1e-5, (M, N), dt)
                emit(N=N, kind="fwd", cfg=str(cfg), ms=bench(f), ms_res=bench(fr))
            except Exception as e:
                emit(N=N, kind="fwd", cfg=str(cfg), err=str(e)[:200])
    L.fwd_config = orig_f
    y, h, mean, rstd = L._forward(xs[0], None, w, b, 1e-5, (M, N), dt)
    for tile in (2048, 4096, 8192):
        bm = max(1, tile // bn)
        for nw in (4, 8, 16):
            if bm * bn // (nw * 32) < 4 or bm * bn // (nw * 32) > 128:
                continue
            for st in (1, 3):
                for pps in (2, 4, 8, 16):
                    cfg = L.LaunchConfig(bm, bn, nw, st, pps)
                    L.bwd_config = lambda n, cfg=cfg: cfg
                    try:
                        f = lambda: L._backward(dys[next(it) % nset], None, xs[next(it) % nset], w, dt, mean, rstd, (M, N), dt, None)
                        emit(N=N, kind="bwd", cfg=str(cfg), ms=bench(f))
                    except Exception as e:
                        emit(N=N, kind="bwd", cfg=str(cfg), err=str(e)[:200])
    L.bwd_config = orig_b
    emit(N=N, kind="elapsed", s=time.time() - t_start)
