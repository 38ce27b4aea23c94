"""Host (CPU) cost per call of the kernels' Python paths beside torch's ops, then a cProfile of two
backward paths: tiny inputs, so the GPU time is negligible and the loop time is the launch path.

    python bench/probe_host_overhead.py        # CUDA GPU; H100 output in bench/results/host-overhead-probe-*.log
"""
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from gptcore.kernels.attention import attention
from gptcore.kernels.gelu import gelu
from gptcore.kernels.layer_norm import layer_norm


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


dev = "cuda"
x = torch.randn(64, 768, device=dev, dtype=torch.bfloat16, requires_grad=True)
r = torch.randn(64, 768, device=dev, dtype=torch.float32, requires_grad=True)
w = torch.randn(768, device=dev, requires_grad=True)
b = torch.randn(768, device=dev, requires_grad=True)
q, k, v = (torch.randn(1, 2, 64, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

cases = {}
y, h = layer_norm(x, w, b, residual=r)
gy, gh = torch.randn_like(y), torch.randn_like(h)
cases["triton add+LN fwd"] = lambda: layer_norm(x, w, b, residual=r)
cases["triton add+LN bwd"] = lambda: torch.autograd.grad((y, h), (x, w, b, r), (gy, gh), retain_graph=True)
yt = F.layer_norm(x.float() + r, (768,), w, b)
cases["torch LN fwd"] = lambda: F.layer_norm(x.float() + r, (768,), w, b)
cases["torch LN bwd"] = lambda: torch.autograd.grad(yt, (x, w, b, r), torch.randn_like(yt), retain_graph=True)
yg = gelu(x, b[:768].detach().requires_grad_())
cases["triton gelu fwd"] = lambda: gelu(x, b)
bb = b.detach().requires_grad_()
yg = gelu(x, bb)
cases["triton gelu bwd"] = lambda: torch.autograd.grad(yg, (x, bb), torch.randn_like(yg), retain_graph=True)
o = attention(q, k, v, causal=True)
cases["triton attn fwd"] = lambda: attention(q, k, v, causal=True)
cases["triton attn bwd"] = lambda: torch.autograd.grad(o, (q, k, v), torch.randn_like(o), retain_graph=True)
os_ = F.scaled_dot_product_attention(q, k, v, is_causal=True)
cases["sdpa fwd"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
cases["sdpa bwd"] = lambda: torch.autograd.grad(os_, (q, k, v), torch.randn_like(os_), retain_graph=True)
for name, fn in cases.items():
    print(f"{name:22s} {per_call_us(fn):8.1f} us/call (host)")

for name in ("triton add+LN bwd", "triton attn bwd"):
    pr = cProfile.Profile()
    fn = cases[name]
    pr.enable()
    for _ in range(200):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    print(f"\n==== cProfile {name} (200 calls)")
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)
