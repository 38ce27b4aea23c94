"""Where a step's GPU time goes: a kernel-by-kernel profile of one train step or one decode step.

    python -m bench.profile_step train --config triton     # GPT-2 124M, B=16, T=1024, bf16 autocast
    python -m bench.profile_step train --config torch+compile
    python -m bench.profile_step decode --batch 1           # one eager KV-cache decode step

torch.profiler records a few steps after a warm-up. Rows: every kernel name with its calls and
device time per step, its share of the step, and a category (matmul, attention, layernorm, gelu,
cross-entropy, optimizer, elementwise, ...); then a per-category summary and the step's wall time
beside the sum of its kernel times (wall >> kernels means the host, not the GPU, sets the pace),
and the host-side ops with the most self CPU time (where a host-bound step spends it).
JSON: bench/results/profile-<what>-<gpu>-<date>.json via bench.harness.write_json.
Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch

from bench import harness

CATEGORIES = [  # (category, regex on the kernel name), first match wins
    ("cross-entropy", r"_ce_rows|cross_entropy|nll_loss|log_softmax|softmax_warp"),
    ("attention", r"flash|fmha|_attn|attention|sdpa|cudnn|^_fwd_kernel|^_bwd_(dkdv|dq|delta)_kernel"
                  r"|^_split_kernel|^_combine_kernel"),  # gptcore's attention / decode-attention kernels
    ("layernorm", r"_ln_|layer_norm|LayerNorm|layernorm|sum_partials"),
    ("gelu", r"gelu|GeluCUDA"),
    ("matmul", r"gemm|gemv|sm90_xmma|nvjet|cutlass|cublas|splitK|Kernel2|ampere_|sm80_"),
    ("optimizer", r"multi_tensor|fused_adam|Adam|_foreach"),
    ("kv-cache", r"kv_append|paged|kv_"),
    ("reduce", r"reduce_kernel|Reduce|argmax|max_kernel|topk|sort"),
    ("copy/cast", r"copy|Copy|to_copy|cast|fill|Fill|memset|Memset|memcpy|Memcpy"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise"),
    ("triton (other)", r"^triton_|^_"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name):
            return cat
    return "other"


def _profile(step, steps: int) -> tuple[list[dict], float, float]:
    """Kernel rows per step, wall ms per step, summed kernel ms per step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    acc: dict[str, list] = defaultdict(lambda: [0, 0.0])
    host: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            host[e.name][0] += 1
            host[e.name][1] += e.self_cpu_time_total
            continue
        if e.name.startswith(("Optimizer.", "ProfilerStep")):  # GPU-side annotations, not kernels
            continue
        us = e.time_range.elapsed_us()
        acc[e.name][0] += 1
        acc[e.name][1] += us
    total_ms = sum(v[1] for v in acc.values()) / 1e3 / steps
    rows = []
    for name, (calls, us) in sorted(acc.items(), key=lambda kv: -kv[1][1]):
        ms = us / 1e3 / steps
        rows.append({"kernel": name[:160], "category": category(name), "calls_per_step": calls / steps,
                     "ms_per_step": ms, "pct": 100 * ms / total_ms if total_ms else None})
    host_rows = [{"host_op": name[:120], "calls_per_step": calls / steps, "self_cpu_ms_per_step": us / 1e3 / steps}
                 for name, (calls, us) in sorted(host.items(), key=lambda kv: -kv[1][1])]
    return rows, wall_ms, total_ms, host_rows


def _summary(rows: list[dict]) -> list[dict]:
    by: dict[str, list] = defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        by[r["category"]][0] += r["ms_per_step"]
        by[r["category"]][1] += r["calls_per_step"]
    total = sum(v[0] for v in by.values())
    return [{"category": c, "ms_per_step": ms, "kernels_per_step": n, "pct": 100 * ms / total}
            for c, (ms, n) in sorted(by.items(), key=lambda kv: -kv[1][0])]


def train_step(config: str, preset: str, B: int, T: int):
    from bench.train_step import CONFIGS, _build, make_step

    c = next((c for c in CONFIGS if c.label == config), None)
    if c is None:
        raise SystemExit(f"unknown --config {config!r}; choose from {[c.label for c in CONFIGS]}")
    model, opt = _build(preset, c.backend, T, "cuda", graph=c.graph)
    V = model.config.vocab_size
    x = torch.randint(0, V, (B, T), device="cuda")
    y = torch.randint(0, V, (B, T), device="cuda")
    loss_fn = torch.compile(model.loss) if c.compile else None
    step = make_step(c, model, opt, x, y, loss_fn)
    for _ in range(3):
        step()
    return step, {"what": f"train step {config}", "preset": preset, "B": B, "T": T, "tokens": B * T}


def decode_step(batch: int, length: int, backend: str):
    from gptcore import GPT, GPTConfig
    from gptcore.kv_cache import KVCache

    cfg = GPTConfig.from_preset("gpt2")
    model = GPT(cfg, backend=backend).to("cuda", torch.bfloat16).eval()
    cache = KVCache.for_model(model, batch, length + 64)
    prompt = torch.randint(0, cfg.vocab_size, (batch, length), device="cuda")
    tok = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")

    @torch.no_grad()
    def step():
        cache.set_lengths([length] * batch)
        logits = model(tok, kv_cache=cache)[:, -1]
        tok.copy_(logits.argmax(-1, keepdim=True))

    with torch.no_grad():
        model(prompt, kv_cache=cache)
    for _ in range(3):
        step()
    return step, {"what": f"decode step ({backend}, batch {batch}, cache length {length})", "B": batch,
                  "length": length}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="one full train step (forward, loss, backward, AdamW)")
    t.add_argument("--config", default="triton",
                   help="a bench.train_step configuration label (default triton: the graph-captured step; "
                        "triton-nograph: the same kernels stepped eagerly)")
    t.add_argument("--preset", default="gpt2")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=1024)
    d = sub.add_parser("decode", help="one eager decode step with the KV cache (greedy)")
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--length", type=int, default=128, help="tokens already in the cache")
    d.add_argument("--backend", default="triton")
    for q in (t, d):
        q.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
        q.add_argument("--top", type=int, default=25, help="kernels printed (default 25; the JSON has all)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile_step needs a CUDA GPU (it profiles device kernels)")
    if args.what == "train":
        step, meta = train_step(args.config, args.preset, args.batch_size, args.seq_len)
    else:
        step, meta = decode_step(args.batch, args.length, args.backend)
    rows, wall_ms, kern_ms, host_rows = _profile(step, args.steps)
    summary = _summary(rows)
    meta.update(wall_ms_per_step=wall_ms, kernel_ms_per_step=kern_ms,
                kernels_per_step=sum(r["calls_per_step"] for r in rows))
    print(f"{meta['what']}: wall {wall_ms:.3f} ms/step, kernels {kern_ms:.3f} ms/step, "
          f"{meta['kernels_per_step']:.0f} kernel launches/step")
    harness.print_table(summary, ["category", "ms_per_step", "kernels_per_step", "pct"], "by category")
    harness.print_table(rows[: args.top], ["kernel", "category", "calls_per_step", "ms_per_step", "pct"],
                        f"top {args.top} kernels")
    harness.print_table(host_rows[: args.top], ["host_op", "calls_per_step", "self_cpu_ms_per_step"],
                        f"top {args.top} host-side ops by self CPU time (profiler overhead included)")
    tag = re.sub(r"[^A-Za-z0-9]+", "_", args.config if args.what == "train" else f"decode_b{args.batch}")
    path = harness.write_json(f"profile-{args.what}-{tag}", rows, extra={"meta": meta, "summary": summary,
                                                                                   "host_ops": host_rows[:100]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
