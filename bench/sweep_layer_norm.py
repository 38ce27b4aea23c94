"""Launch-config sweep for the LayerNorm kernels (how kernels/layer_norm.py's fwd_config/bwd_config
were chosen). CUDA only; one JSON line per config: eager do_bench ms and CUDA-graph ms.

    python bench/sweep_layer_norm.py OUT.jsonl      # bf16, 16384 rows, widths 768/1024/1600/4096 (~4 min on an H100)
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
