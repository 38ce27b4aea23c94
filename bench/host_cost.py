"""Host cost per op call: each gptcore op beside its torch twin, forward and backward.

    python -m bench host            # CUDA GPU; rows: area "host", op, impl, host_us, ratio_vs_torch

Tiny inputs, so the GPU finishes each kernel long before the host issues the next call: the time
per call of a loop of calls (no synchronisation inside) is the host's cost of one call -- Python,
autograd, allocation, validation and the launch. Backward rows time ``torch.autograd.grad`` over a
graph built once (retain_graph), the same call on both sides. The median of several loops is kept.
``ratio_vs_torch`` = gptcore's host_us / the twin's (<= 1.0: gptcore costs the host no more).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

REPS = 200
ROUNDS = 7


def _per_call_us(fn, n: int = REPS, rounds: int = ROUNDS) -> float:
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    got = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        got.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(got)[rounds // 2]


def _grad(out, wrt):
    g = torch.randn_like(out) if isinstance(out, torch.Tensor) else [torch.randn_like(o) for o in out]
    return lambda: torch.autograd.grad(out, wrt, g, retain_graph=True)


def _cases(dev="cuda"):
    """(op, gptcore fn, torch twin fn) triples; both sides do the same math on the same inputs."""
    from gptcore.kernels.attention import attention, attention_qkv, split_qkv
    from gptcore.kernels.argmax import argmax_rows
    from gptcore.kernels.gelu import gelu
    from gptcore.kernels.layer_norm import layer_norm
    from gptcore.kernels.linear import linear
    from gptcore.loss import linear_cross_entropy

    bf, f32 = torch.bfloat16, torch.float32
    leaf = lambda *s, dt=bf: torch.randn(*s, device=dev, dtype=dt, requires_grad=True)
    x, r = leaf(64, 768), leaf(64, 768, dt=f32)
    w, b = leaf(768, dt=f32), leaf(768, dt=f32)
    xh, bh = leaf(64, 3072), leaf(3072, dt=f32)
    q, k, v = (leaf(1, 2, 64, 64) for _ in range(3))
    qkv = leaf(1, 64, 3 * 128)
    h, wte = leaf(64, 128), leaf(512, 128)
    tgt = torch.randint(0, 512, (64,), device=dev)
    logits = torch.randn(1, 50257, device=dev, dtype=bf)

    def sdpa_qkv(t):
        return F.scaled_dot_product_attention(*split_qkv(t, 2), is_causal=True)

    cases = []

    def pair(op, ours, twin, wrt_ours=None, wrt_twin=None):
        cases.append((op + " fwd", ours, twin))
        if wrt_ours is not None:
            cases.append((op + " bwd", _grad(ours(), wrt_ours), _grad(twin(), wrt_twin)))

    pair("layer_norm", lambda: layer_norm(x, w, b), lambda: F.layer_norm(x, (768,), w.to(bf), b.to(bf)),
         (x, w, b), (x, w, b))
    pair("add+layer_norm", lambda: layer_norm(x, w, b, residual=r, out_dtype=bf),
         lambda: (lambda hh: (F.layer_norm(hh, (768,), w, b).to(bf), hh))(x + r), (x, w, b, r), (x, w, b, r))
    pair("bias+gelu", lambda: gelu(xh, bh, out_dtype=bf), lambda: F.gelu(xh + bh, approximate="tanh").to(bf),
         (xh, bh), (xh, bh))
    pair("attention", lambda: attention(q, k, v, causal=True),
         lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), (q, k, v))
    pair("attention_qkv", lambda: attention_qkv(qkv, 2, causal=True), lambda: sdpa_qkv(qkv), (qkv,), (qkv,))
    pair("linear_cross_entropy", lambda: linear_cross_entropy(h, wte, tgt, impl="triton"),
         lambda: F.cross_entropy(F.linear(h, wte).float(), tgt), (h, wte), (h, wte))
    wl, bl = leaf(768, 768, dt=f32), leaf(768, dt=f32)

    def autocast(fn):
        def run():
            with torch.autocast("cuda", dtype=bf):
                return fn(x, wl, bl)
        return run

    # the device-time Linear (used inside captured graphs only) beside autocast's F.linear
    pair("linear (graph-only variant)", autocast(linear), autocast(F.linear), (x, wl, bl), (x, wl, bl))
    cases.append(("argmax", lambda: argmax_rows(logits), lambda: logits.argmax(-1)))
    return cases


def run(quick: bool = False, **_) -> list[dict]:
    if not torch.cuda.is_available():
        return [{"area": "host", "op": "host_cost", "skipped": "needs a CUDA GPU"}]
    from gptcore.kernels import _launch

    rows = []
    n = 50 if quick else REPS
    for op, ours, twin in _cases():
        t_ours, t_twin = _per_call_us(ours, n), _per_call_us(twin, n)
        rows.append({"area": "host", "op": op, "impl": "triton", "host_us": round(t_ours, 2),
                     "ratio_vs_torch": round(t_ours / t_twin, 3)})
        rows.append({"area": "host", "op": op, "impl": "torch", "host_us": round(t_twin, 2)})
    rows.append({"area": "host", "op": "launch_plans", "impl": "triton", **_launch.stats()})
    return rows


def profile(ops=("add+layer_norm bwd", "attention_qkv bwd", "attention_qkv fwd"), calls: int = 200) -> None:
    """cProfile of the gptcore side of a few cases: where the host time of one call goes."""
    import cProfile
    import pstats

    for op, ours, _ in _cases():
        if op not in ops:
            continue
        _per_call_us(ours, 20, 1)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(calls):
            ours()
        pr.disable()
        torch.cuda.synchronize()
        print(f"\n==== cProfile {op} ({calls} calls)")
        pstats.Stats(pr).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    import sys

    from bench import harness

    rows = run()
    for r in rows:
        print(r)
    print(harness.write_json("host_cost", rows, out_dir=None if len(sys.argv) < 2 else __import__("pathlib").Path(sys.argv[1])))
    profile()
