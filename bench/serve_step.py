"""Host cost of one serving-engine step: B requests decoding together, timed and profiled.

    python -m bench.serve_step                       # CPU: tiny model (torch backend, vocab 256, context 256), B=64
    python -m bench.serve_step --batch 64 --steps 200 --profile
    python -m bench.serve_step --preset gpt2         # on CUDA: GPT-2 124M bf16

Reports the mean wall time of an engine step in steady-state decode (every request decoding,
none finishing), the part of it spent inside the model's forward (or the graph replay) and the
rest, the engine's own host path (tables, sampling, events). With --profile also prints the
cProfile top functions of those steps by cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch

from gptcore import GPT, GPTConfig
from gptcore.serve import Engine, SamplingParams


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="model preset (default: gpt2 on CUDA, tiny on CPU)")
    ap.add_argument("--batch", type=int, default=64, help="requests decoding together (default 64)")
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps (default 100)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per request (default 16)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="override the preset's vocabulary (default 256 on CPU, so the lm_head and argmax compute "
                         "do not hide the host path; the preset's own on CUDA)")
    ap.add_argument("--profile", action="store_true", help="also print the cProfile top 25 by cumulative time")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    preset = a.preset or ("gpt2" if cuda else "tiny")
    torch.manual_seed(0)
    vocab = a.vocab or (None if cuda else 256)
    over = {"vocab_size": vocab} if vocab else {}
    if not cuda:
        over["context_length"] = 256          # room for --steps decode steps
    cfg = GPTConfig.from_preset(preset, **over)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = GPT(cfg, backend="triton" if cuda else "torch").to("cuda" if cuda else "cpu", dtype=dtype).eval()
    need = a.prompt + a.steps + 8
    if need > cfg.context_length:
        ap.error(f"--prompt + --steps + 8 = {need} exceeds the context length {cfg.context_length}")
    eng = Engine(model, max_batch=a.batch, prefill_chunk=4096, eos_token_id=None)
    g = torch.Generator().manual_seed(0)
    for _ in range(a.batch):
        ids = torch.randint(0, cfg.vocab_size, (a.prompt,), generator=g).tolist()
        eng.submit(ids, SamplingParams(max_tokens=a.steps + 8, temperature=0, ignore_eos=True), lambda ev: None)
    for _ in range(4):                       # admit, prefill, first decode steps (graph capture)
        eng.step()
    fwd = [0.0]
    inner = model.forward

    def timed(*args, **kw):
        t = time.perf_counter()
        out = inner(*args, **kw)
        if cuda:
            torch.cuda.synchronize()
        fwd[0] += time.perf_counter() - t
        return out

    if not eng.cuda_graphs:
        model.forward = timed
    prof = cProfile.Profile() if a.profile else None
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(a.steps):
        eng.step()
    if prof:
        prof.disable()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    model.forward = inner
    f = fwd[0] / a.steps
    print(f"preset {preset} B={a.batch} steps={a.steps} decode_mode={eng.stats()['decode_mode']}")
    print(f"step {dt * 1e6:.0f} us  model forward {f * 1e6:.0f} us  engine host path {(dt - f) * 1e6:.0f} us "
          f"({(dt - f) * 1e6 / a.batch:.1f} us per request)" + ("  [forward not separated: graph replay]" if eng.cuda_graphs else ""))
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
