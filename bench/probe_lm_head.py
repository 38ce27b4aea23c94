"""The chunked LM head's pieces on the GPU, one 4096-row chunk of GPT-2's head (C 768, V 50257).

    python -m bench.probe_lm_head     # CUDA GPU; JSON via bench.harness.write_json

1. Every matmul layout the head could use: device time, TFLOP/s and the kernel cuBLAS picks.
2. The cross-entropy row step over the chunk's bf16 logits for blocks 1024..8192 x 4/8/16 warps, in
   two variants: a running max per lane (the shipped kernel) and one scalar running max per row;
   then the shipped launcher (kernels.cross_entropy.ce_rows_) as it runs in training.
Behind gptcore.loss's padded d-weight accumulation and kernels.cross_entropy's launch config.
"""
from __future__ import annotations

import json

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from bench import harness
from gptcore.kernels.cross_entropy import _ce_rows_kernel, _loss_and_grad, ce_rows_


@triton.jit
def _ce_scalar_kernel(LOGITS, TARGET, LOSS, stride_row, ignore_index, V: tl.constexpr, BLOCK: tl.constexpr):
    """The variant: one running max per row (a block max per step) instead of one per lane."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    y = tl.load(TARGET + row)
    offs = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    _loss_and_grad(ptr, y, lse, LOSS + row, ignore_index, V, BLOCK)


def _kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    return [e.name[:90] for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main() -> None:
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    n, C, V, Vp = 4096, 768, 50257, 50304
    dev, bf, f32 = "cuda", torch.bfloat16, torch.float32
    hc = torch.randn(n, C, device=dev, dtype=bf)
    w = torch.randn(Vp, C, device=dev, dtype=bf) * 0.02
    logits = hc @ w.t()
    flops = 2 * n * C * Vp
    gw, gwp, gwt = (torch.zeros(s, device=dev) for s in ((V, C), (Vp, C), (C, Vp)))
    mm_cases = {
        "logits = hc @ w.t() (bf16)": lambda: hc @ w.t(),
        "grad_h = mm(logits, w) fp32 out": lambda: torch.mm(logits, w, out_dtype=f32),
        "grad_h = logits @ w (bf16)": lambda: logits @ w,
        "grad_w (V, C) += logits[:, :V].t() @ hc, fp32 (before)": lambda: torch.addmm(
            gw, logits[:, :V].t(), hc, out_dtype=f32, out=gw),
        "grad_w (Vp, C) += logits.t() @ hc, fp32 (now, later chunks)": lambda: torch.addmm(
            gwp, logits.t(), hc, out_dtype=f32, out=gwp),
        "grad_w (Vp, C) = mm(logits.t(), hc) fp32 (now, first chunk)": lambda: torch.mm(logits.t(), hc, out_dtype=f32),
        "grad_w.T (C, Vp) += hc.t() @ logits, fp32": lambda: torch.addmm(gwt, hc.t(), logits, out_dtype=f32, out=gwt),
        "grad_w (Vp, C) = logits.t() @ hc (bf16)": lambda: logits.t() @ hc,
    }
    for name, fn in mm_cases.items():
        ms = do_bench(fn, warmup=50, rep=300)
        emit({"case": name, "ms": ms, "TFLOPs": flops / ms / 1e9, "kernels": _kernels(fn)})

    base = (hc @ w.t())[:, :V]  # the row step's input: (n, V) with row stride Vp, as in training
    lg = torch.empty_like(hc @ w.t())
    view = lg[:, :V]
    tgt = torch.randint(0, V, (n,), device=dev)
    loss = torch.empty(n, device=dev, dtype=f32)
    nbytes = n * V * 2 * 3  # two reads and one write of bf16
    copy_ms = do_bench(lambda: view.copy_(base), warmup=50, rep=300)
    emit({"case": "restore the logits (subtracted from the rows below)", "ms": copy_ms})
    view.copy_(base)
    ce_rows_(view, tgt, -100, loss)
    want_g, want_loss = view.clone(), loss.clone()

    def ce_row(label: str, launch) -> None:
        def f():
            view.copy_(base)  # fresh logits for every call: the step overwrites them
            launch()
        f()
        torch.cuda.synchronize()
        ok = bool(torch.allclose(view.float(), want_g.float(), atol=1e-2) and torch.allclose(loss, want_loss, atol=1e-3))
        ms = do_bench(f, warmup=30, rep=200) - copy_ms
        emit({"case": label, "ms": ms, "GBps": nbytes / ms / 1e6, "matches_shipped": ok})

    for variant, kern in (("per-lane max", _ce_rows_kernel), ("scalar max", _ce_scalar_kernel)):
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                ce_row(f"ce {variant} BLOCK {block} warps {warps}",
                       lambda k=kern, b=block, nw=warps: k[(n,)](view, tgt, loss, view.stride(0), -100, V=V, BLOCK=b,
                                                                 num_warps=nw))
    ce_row("ce shipped launcher ce_rows_", lambda: ce_rows_(view, tgt, -100, loss))
    print(harness.write_json("probe-lm-head", rows, extra={"command": "python -m bench.probe_lm_head"}))


if __name__ == "__main__":
    main()
