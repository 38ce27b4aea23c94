"""Host cost of the serving engine's steps: where a step's time goes besides the model's forward.

    python -m bench.serve_step                       # CPU: tiny model (torch backend, vocab 256, context 1024), B=64
    python -m bench.serve_step --batch 64 --steps 200 --profile
    python -m bench.serve_step --mixed               # requests keep arriving: prefill + decode steps
    python -m bench.serve_step --n-layers 1 --emb-dim 16   # a near-free model: the engine's own cost stands out
    python -m bench.serve_step --preset gpt2         # on CUDA: GPT-2 124M bf16

Two workloads:
  decode (default)  B requests decoding together, none finishing (steady-state decode);
  --mixed           B requests running, each of random prompt (8..--prompt-max) and output
                    (8..--steps/2) length; a finished one is replaced by a new one at once, so
                    steps mix chunked prefill with decode.
Reports, over --repeats runs of --steps steps (the median run): the mean step wall time, the
part spent inside the model (forward / hidden_states / lm_head, synchronised on CUDA; on CUDA
with graph replay the decode forward is not separable and counts as engine time), the rest
(the engine's own host path) per step and per generated token, and the engine's own phase
timers (Engine.timings: schedule, prefill, decode, sample, wait, accept) per step. With
--profile also prints the cProfile top functions of the last run by cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time

import torch

from gptcore import GPT, GPTConfig
from gptcore.serve import Engine, SamplingParams


class _ModelTimer:
    """Wraps the model's entry points; counts the outermost call's time only."""

    def __init__(self, model, cuda: bool):
        self.model, self.cuda, self.depth, self.total = model, cuda, 0, 0.0
        self.saved = [(model, "forward", model.forward), (model, "hidden_states", model.hidden_states),
                      (model.lm_head, "forward", model.lm_head.forward)]
        for obj, name, fn in self.saved:
            setattr(obj, name, self._wrap(fn))

    def _wrap(self, fn):
        def timed(*a, **k):
            self.depth += 1
            t = time.perf_counter()
            try:
                out = fn(*a, **k)
                if self.cuda and self.depth == 1 and not torch.cuda.is_current_stream_capturing():
                    torch.cuda.synchronize()
                return out
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.total += time.perf_counter() - t
        return timed

    def restore(self):
        for obj, name, _ in self.saved:
            try:
                delattr(obj, name)
            except AttributeError:
                pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="model preset (default: gpt2 on CUDA, tiny on CPU)")
    ap.add_argument("--batch", type=int, default=64, help="requests running together (default 64)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per request in the decode workload (default 16)")
    ap.add_argument("--mixed", action="store_true", help="requests keep arriving (prefill + decode), see above")
    ap.add_argument("--prompt-max", type=int, default=96, help="--mixed: longest prompt (default 96)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="engine prefill_chunk (default 512 for decode, 64 for --mixed)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="override the preset's vocabulary (default 256 on CPU, so the lm_head and argmax compute "
                         "do not hide the host path; the preset's own on CUDA)")
    ap.add_argument("--n-layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--emb-dim", type=int, default=None, help="override the preset's width (a multiple of its heads)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch intra-op threads (default 1: tiny ops on a shared machine only lose by "
                         "spreading; the timings then show the host path, not thread hand-offs)")
    ap.add_argument("--profile", action="store_true", help="also print the cProfile top 30 by cumulative time")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(a.threads)
    preset = a.preset or ("gpt2" if cuda else "tiny")
    torch.manual_seed(0)
    vocab = a.vocab or (None if cuda else 256)
    over = {"vocab_size": vocab} if vocab else {}
    if not cuda:
        over["context_length"] = 1024         # room for --steps decode steps
    if a.n_layers:
        over["n_layers"] = a.n_layers
    if a.emb_dim:
        over["emb_dim"] = a.emb_dim
    cfg = GPTConfig.from_preset(preset, **over)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = GPT(cfg, backend="triton" if cuda else "torch").to("cuda" if cuda else "cpu", dtype=dtype).eval()
    olen = a.steps * (a.repeats + 1) + 8
    if not a.mixed and a.prompt + olen > cfg.context_length:
        ap.error(f"--prompt + --steps * (--repeats + 1) + 8 = {a.prompt + olen} exceeds the context length "
                 f"{cfg.context_length}; use fewer steps or repeats")
    if a.mixed and a.prompt_max + a.steps // 2 > cfg.context_length:
        ap.error(f"--prompt-max + --steps / 2 exceeds the context length {cfg.context_length}")
    chunk = a.prefill_chunk or (64 if a.mixed else 512)
    eng = Engine(model, max_batch=a.batch, prefill_chunk=chunk, eos_token_id=None)
    eng.capture_graphs()                     # CUDA: every decode / prefill bucket before timing
    g = random.Random(0)
    finished = [0]

    def submit():
        if a.mixed:
            plen, n = g.randint(8, a.prompt_max), g.randint(8, max(8, a.steps // 2))
        else:
            plen, n = a.prompt, olen
        eng.submit([g.randrange(cfg.vocab_size) for _ in range(plen)],
                   SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), on_event)

    def on_event(ev):
        if ev.done:
            finished[0] += 1
            if a.mixed:
                submit()                       # a new request takes the finished one's place

    for _ in range(a.batch):
        submit()
    if a.mixed:
        for _ in range(2 * a.steps):         # reach a steady mix of prefill and decode
            eng.step()
    else:
        while eng.stats()["waiting"] or eng.stats()["prefilling"]:   # every request decoding
            eng.step()
        for _ in range(4):
            eng.step()
    runs = []
    prof = None
    for rep in range(a.repeats):
        timer = _ModelTimer(model, cuda)
        t_eng = dict(getattr(eng, "timings", {}))
        tok0 = eng.generated_tokens
        prof = cProfile.Profile() if a.profile and rep == a.repeats - 1 else None
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
        dt = time.perf_counter() - t0
        timer.restore()
        phases = {k: (v - t_eng.get(k, 0.0)) / a.steps for k, v in getattr(eng, "timings", {}).items()}
        runs.append((dt / a.steps, timer.total / a.steps, (eng.generated_tokens - tok0), phases))
    dt, f, toks, phases = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    host = dt - f
    per_tok = host * a.steps / toks if toks else float("nan")
    st = eng.stats()
    print(f"preset {preset} layers {cfg.n_layers} width {cfg.emb_dim} vocab {cfg.vocab_size} B={a.batch} "
          f"steps={a.steps} x{a.repeats} workload={'mixed' if a.mixed else 'decode'} "
          f"decode_mode={st['decode_mode']} prefill_mode={st['prefill_mode']}")
    print(f"step {dt * 1e6:.0f} us  model {f * 1e6:.0f} us  engine host path {host * 1e6:.0f} us "
          f"({per_tok * 1e6:.1f} us per generated token; {toks / a.steps:.1f} tokens per step)"
          + ("  [decode forward not separated: graph replay]" if eng.cuda_graphs else ""))
    if phases:
        print("engine phases per step (us, model time included where it runs): "
              + "  ".join(f"{k} {v * 1e6:.0f}" for k, v in phases.items()))
    print(f"step times of the {a.repeats} runs (us): " + ", ".join(f"{r[0] * 1e6:.0f}" for r in runs)
          + f"; spread {statistics.pstdev([r[0] for r in runs]) * 1e6:.0f}")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
