"""Decode-step micro sweep: decode attention per split count, and greedy-pick variants (CUDA only).

How kernels/decode_attention.py's plan_splits target was chosen. Every time is one CUDA-graph
replay (triton.testing.do_bench_cudagraph), so launch gaps are counted as in the decode graph.
Then torch's argmax variants beside gptcore's argmax_rows on (B, 50257) bf16 logits.
One JSON line per row: batch B, cache capacity, length L, splits asked (None = plan_splits),
the plan (splits, keys per split), microseconds.

    python bench/sweep_decode.py OUT.jsonl      # GPT-2 heads (12 x 64), bf16; ~20 s on an H100
"""
import json, sys, torch
from triton.testing import do_bench_cudagraph
from gptcore.kernels.argmax import argmax_rows
from gptcore.kernels.decode_attention import decode_attention, plan_splits
out = open(sys.argv[1], "w")
def emit(**kw):
    print(json.dumps(kw), file=out, flush=True); print(kw, flush=True)
dt = torch.bfloat16
for B in (1, 8, 32):
    for cap in (272, 1024):
        H, D = 12, 64
        k = torch.randn(B, H, cap, D, device="cuda", dtype=dt); v = torch.randn_like(k)
        q = torch.randn(B, H, 1, D, device="cuda", dtype=dt)
        for L in (cap // 2, cap - 1):
            lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
            for ns in (None, 1, 2, 3, 4, 8, 16):
                try:
                    ms = do_bench_cudagraph(lambda: decode_attention(q, k, v, lens, num_splits=ns), rep=30)
                    emit(B=B, cap=cap, L=L, splits=ns, plan=plan_splits(B * H, cap, q.device, 64, ns), us=ms * 1e3)
                except Exception as e:
                    emit(B=B, cap=cap, L=L, splits=ns, err=str(e)[:200])
for B in (1, 32):
    x = torch.randn(B, 50257, device="cuda", dtype=dt)
    for name, fn in [("argmax bf16", lambda: x.argmax(-1)), ("argmax f32", lambda: x.float().argmax(-1)),
                     ("max dim", lambda: x.max(-1).indices), ("topk1", lambda: x.topk(1, -1).indices),
                     ("gptcore argmax_rows", lambda: argmax_rows(x))]:
        emit(B=B, what=name, us=do_bench_cudagraph(fn, rep=30) * 1e3)
