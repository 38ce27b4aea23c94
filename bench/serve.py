"""Serving benchmark: the continuous-batching engine against static batching with the Generator,
on one request set, in one run.

    python -m bench serve                      # CUDA: GPT-2 124M (random init), bf16, 16 and 64 clients
    python -m bench.serve --clients 64 --requests 1024 --rate 1000
    python -m bench.serve --quick              # a smoke run (CPU: the tiny preset, short lengths)

Workload: ``requests`` requests with prompt lengths uniform in [16, 512] and output lengths uniform
in [16, 256] (both scaled down to fit a smaller context), random token ids, greedy, eos ignored
(so every request produces exactly its output length). Arrivals are a Poisson process at ``rate``
requests/s; at most ``clients`` requests are outstanding (a request waits for a free client). The
default rate (1000/s on CUDA) offers far more tokens than either system can serve, so the run
measures capacity at ``clients`` concurrent requests with new requests arriving whenever one ends;
at a lower rate both systems are bounded by the arrivals (rate x mean output tokens/s) and the
ratio says little. The engine runs in-process (no HTTP): TTFT is submit -> first token event, ITL
the gaps between a request's token events, both p50/p99 over all requests. Before the timed runs
each system serves a warm-up set of the same distribution (another seed), so kernel compilation
and tuning for the prefill shapes happens there.

Rows (area "serve"):
  continuous   the engine: output tokens/s over the whole run, TTFT/ITL p50/p99, TTFT p50 of the
               requests whose prompt has 112-144 tokens (ttft_128_p50_ms), KV utilisation (live
               tokens / slots of the blocks in use, mean over the samples taken while the batch is
               at least 90% full) and KV occupancy (blocks in use / all blocks), leaked blocks at
               the end (must be 0), mean running batch, and the engine's host time per step by
               phase (host_us_per_step: schedule, prefill, decode, sample, wait, accept; "wait"
               is the host blocked on the device, the rest is host work the device may overlap)
  static       the same requests in arrival order, batches of 32 through gptcore.generate's
               Generator (static cache, CUDA-graph decode), each batch run to its longest output;
               a batch starts when its last request has arrived and the previous batch is done;
               tokens/s counts each request's own output only; vs_static = continuous / static
  fixed-batch  the engine decoding ``clients`` sequences of a 16-token prompt together: its own
               decode rate at that batch size (the 60% target's denominator); frac_of_fixed
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import threading
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gptcore import GPT, GPTConfig  # noqa: E402
from gptcore.generate import Generator  # noqa: E402
from gptcore.ops import default_backend  # noqa: E402
from gptcore.serve import Engine, SamplingParams  # noqa: E402

STATIC_BATCH = 32


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def workload(n: int, ctx: int, vocab: int, rate: float, seed: int = 0):
    """[(arrival_s, prompt ids, output length)], arrival order."""
    g = random.Random(seed)
    p_lo, p_hi = min(16, ctx // 8), min(512, ctx // 2)
    o_lo, o_hi = min(16, ctx // 8), min(256, ctx // 4)
    t, reqs = 0.0, []
    for _ in range(n):
        t += g.expovariate(rate)
        plen, olen = g.randint(p_lo, p_hi), g.randint(o_lo, o_hi)
        reqs.append((t, [g.randrange(vocab) for _ in range(plen)], min(olen, ctx - plen)))
    return reqs


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def run_continuous(engine: Engine, reqs, clients: int) -> dict:
    n = len(reqs)
    sent, first, last, gaps = [0.0] * n, [None] * n, [None] * n, []
    finished = threading.Semaphore(0)
    slots = threading.Semaphore(clients)
    util, occ = [], []
    lock = threading.Lock()

    def on_event(i):
        def f(ev):
            now = time.perf_counter()
            if ev.tokens:
                with lock:
                    if first[i] is None:
                        first[i] = now
                    else:
                        gaps.append(now - last[i])
                    last[i] = now
            if ev.done:
                slots.release()
                finished.release()
        return f

    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            s = engine.stats()
            if s["running"] >= 0.9 * clients and s["blocks_used"]:
                util.append(s["kv_utilization"])
                occ.append(s["blocks_used"] / s["blocks_total"])
            time.sleep(0.005)

    mon = threading.Thread(target=monitor, daemon=True)
    mon.start()
    t_eng, steps0, tok0 = dict(engine.timings), engine.steps, engine.generated_tokens
    t0 = time.perf_counter()
    for i, (arr, prompt, olen) in enumerate(reqs):
        delay = t0 + arr - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        slots.acquire()
        sent[i] = time.perf_counter()
        engine.submit(prompt, SamplingParams(max_tokens=olen, temperature=0, ignore_eos=True), on_event(i))
    for _ in range(n):
        finished.acquire()
    _sync()
    t1 = time.perf_counter()
    stop.set()
    mon.join()
    steps = max(1, engine.steps - steps0)
    out_tokens = sum(o for _, _, o in reqs)
    ttft = [(f - s) * 1e3 for f, s in zip(first, sent) if f is not None]
    ttft_128 = [(f - s) * 1e3 for f, s, (_, p, _) in zip(first, sent, reqs) if f is not None and 112 <= len(p) <= 144]
    itl = [g * 1e3 for g in gaps]
    return {"tokens_per_s": out_tokens / (t1 - t0), "seconds": t1 - t0,
            "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p99_ms": _pct(ttft, 0.99),
            "ttft_128_p50_ms": _pct(ttft_128, 0.5), "ttft_128_n": len(ttft_128),
            "itl_p50_ms": _pct(itl, 0.5), "itl_p99_ms": _pct(itl, 0.99),
            "itl_p99_over_p50": _pct(itl, 0.99) / _pct(itl, 0.5) if itl and _pct(itl, 0.5) else None,
            "kv_util": sum(util) / len(util) if util else None, "kv_occupancy": sum(occ) / len(occ) if occ else None,
            "leaked_blocks": engine.num_blocks - engine.free_blocks(), "decode_mode": engine.stats()["decode_mode"],
            "prefill_mode": engine.stats()["prefill_mode"], "steps": steps, "mean_batch": (engine.generated_tokens - tok0) / steps,
            "step_ms": (t1 - t0) * 1e3 / steps,
            "host_us_per_step": {k: round((v - t_eng.get(k, 0.0)) * 1e6 / steps, 1) for k, v in engine.timings.items()}}


def run_static(model, reqs, ctx: int, warm=None) -> dict:
    gen = Generator(model, paged=False, cuda_graph=True, max_seq_len=ctx)
    for k in range(0, len(warm or reqs[:1]), STATIC_BATCH):      # warm-up: the prefill shapes compile here
        batch = (warm or reqs[:1])[k:k + STATIC_BATCH]
        gen.generate([p for _, p, _ in batch], 4, temperature=0)
    end, ttft, itl_ms = 0.0, [], []
    for k in range(0, len(reqs), STATIC_BATCH):
        batch = reqs[k:k + STATIC_BATCH]
        start = max(end, batch[-1][0])
        _sync()
        t = time.perf_counter()
        gen.generate([p for _, p, _ in batch], max(o for _, _, o in batch), temperature=0)
        _sync()
        dur = time.perf_counter() - t
        s = gen.stats
        ttft += [(start - a) * 1e3 + s["prefill_ms"] for a, _, _ in batch]
        itl_ms.append(s["decode_ms_per_step"])
        end = start + dur
    out_tokens = sum(o for _, _, o in reqs)
    span = end - 0.0
    return {"tokens_per_s": out_tokens / span, "seconds": span, "ttft_p50_ms": _pct(ttft, 0.5),
            "ttft_p99_ms": _pct(ttft, 0.99), "itl_p50_ms": _pct(itl_ms, 0.5), "itl_p99_ms": _pct(itl_ms, 0.99),
            "decode_mode": gen.stats["decode_mode"]}


def run_fixed(engine: Engine, clients: int, ctx: int, vocab: int) -> dict:
    """The engine's decode rate with ``clients`` sequences decoding together (steady state)."""
    g = random.Random(1)
    olen = min(256, ctx - 16)
    stamps: list[list[float]] = [[] for _ in range(clients)]
    done = threading.Semaphore(0)
    for i in range(clients):
        def f(ev, i=i):
            if ev.tokens:
                stamps[i].append(time.perf_counter())
            if ev.done:
                done.release()
        engine.submit([g.randrange(vocab) for _ in range(16)],
                      SamplingParams(max_tokens=olen, temperature=0, ignore_eos=True), f)
    for _ in range(clients):
        done.acquire()
    lo = max(s[0] for s in stamps)   # every sequence decoding
    hi = min(s[-1] for s in stamps)
    toks = sum(sum(1 for t in s if lo < t <= hi) for s in stamps)
    return {"tokens_per_s": toks / (hi - lo) if hi > lo else None}


def run(quick: bool = False, preset: str | None = None, clients=None, requests: int | None = None,
        rate: float | None = None) -> list[dict]:
    device = "cuda" if ON_GPU else "cpu"
    preset = preset or ("gpt2" if ON_GPU else "tiny")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if ON_GPU and torch.cuda.is_bf16_supported() else torch.float32
    model = GPT(GPTConfig.from_preset(preset), backend=default_backend(device)).to(device=device, dtype=dtype).eval()
    cfg = model.config
    ctx = cfg.context_length
    clients = clients or ([4] if quick and not ON_GPU else ([16] if quick else [16, 64]))
    n = requests or (24 if quick and not ON_GPU else (128 if quick else 1024))
    rate = rate or (1000.0 if ON_GPU else 20.0)
    reqs = workload(n, ctx, cfg.vocab_size, rate)
    warm = workload(min(n, 128) if ON_GPU else 8, ctx, cfg.vocab_size, 1000.0, seed=99)
    rows = []
    for C in clients:
        engine = Engine(model, max_batch=C, prefill_chunk=512 if ON_GPU else 64, max_queue=max(256, n),
                        cuda_graphs=True, eos_token_id=None).start()
        engine.capture_graphs()           # every decode and prefill bucket, before the timed run
        gc.collect()
        gc.freeze()                       # the model, graphs and cache out of the collector's scans (as the CLI)
        run_continuous(engine, warm, C)   # warm-up: kernels compiled and tuned for these shapes
        cont = run_continuous(engine, reqs, C)
        fixed = run_fixed(engine, C, ctx, cfg.vocab_size)
        engine.stop()
        static = run_static(model, reqs, ctx, warm=warm)
        shape = {"clients": C, "requests": n, "rate": rate}
        common = {"area": "serve", "op": "serve", "shape": shape, "preset": preset, "dtype": str(dtype)}
        rows.append({**common, "impl": "continuous", **cont,
                     "vs_static": cont["tokens_per_s"] / static["tokens_per_s"],
                     "frac_of_fixed": cont["tokens_per_s"] / fixed["tokens_per_s"] if fixed["tokens_per_s"] else None})
        rows.append({**common, "impl": "static", **static})
        rows.append({**common, "impl": "fixed-batch", **fixed})
    return rows


def main(argv=None) -> int:
    from bench.harness import print_table, write_json

    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (fewer requests and clients)")
    ap.add_argument("--preset", default=None, help="model preset (default: gpt2 on CUDA, tiny on CPU)")
    ap.add_argument("--clients", default=None, help="comma-separated concurrent-client counts (default 16,64)")
    ap.add_argument("--requests", type=int, default=None, help="requests in the set (default 1024; quick 128)")
    ap.add_argument("--rate", type=float, default=None,
                    help="Poisson arrival rate, requests/s (default 1000 on CUDA: enough to keep every client busy)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results/)")
    a = ap.parse_args(argv)
    clients = [int(x) for x in a.clients.split(",")] if a.clients else None
    rows = run(quick=a.quick, preset=a.preset, clients=clients, requests=a.requests, rate=a.rate)
    cols = ["impl", "shape", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "ttft_128_p50_ms", "itl_p50_ms",
            "itl_p99_ms", "kv_util", "kv_occupancy", "leaked_blocks", "mean_batch", "step_ms", "vs_static",
            "frac_of_fixed"]
    print_table([{**r, "shape": f"C{r['shape']['clients']}"} for r in rows], cols, "serve")
    print(f"results: {write_json('serve', rows, out_dir=a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
