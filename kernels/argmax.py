"""Row-wise argmax over the last dim for the decode step's token pick, as two small Triton kernels.

    from gptcore.kernels.argmax import argmax_rows
    tok = argmax_rows(logits)        # (B, V) -> (B,) int64, like logits.argmax(-1)

torch's argmax reduces a (1, 50257) row in one thread block (12 us on an H100, the slowest
kernel of a batch-1 decode step after the LM head). Here the row is split:
  _argmax_block_kernel  grid (B, S): program (b, s) finds the largest value of columns
                        [s*BLOCK, (s+1)*BLOCK) and its first column, fp32.
  _argmax_final_kernel  grid (B,): the first block holding the row's largest value wins.
Ties go to the smallest column and NaN counts as larger than every number (torch.argmax's
rules); among several NaNs (or NaN and +inf) the first NaN's column is returned.

Reference twin: torch.argmax. Tests: tests/test_generate.py (CPU: TRITON_INTERPRET=1).
Benchmark: bench/sweep_decode.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptcore.kernels._launch import cdiv, next_pow2, planned

_BLOCK = 2048  # columns per program in the first step


@planned
@triton.jit
def _argmax_block_kernel(X, PartVal, PartIdx, V, stride_x, S, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    cols = s * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + b.to(tl.int64) * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    # NaN first: any NaN becomes +inf and a NaN flag decides between it and a real +inf
    nan = x != x
    has_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    x = tl.where(nan, float("inf"), x)
    best = tl.max(x, axis=0)
    hit = tl.where(has_nan, nan, x == best)
    idx = tl.min(tl.where(hit, cols, 2147483647), axis=0)  # first column holding the best value
    best = tl.where(has_nan, float("nan"), best)
    tl.store(PartVal + b * S + s, best)
    tl.store(PartIdx + b * S + s, idx)


@planned
@triton.jit
def _argmax_final_kernel(PartVal, PartIdx, Out, S, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_S)
    ok = offs < S
    v = tl.load(PartVal + b * S + offs, mask=ok, other=float("-inf"))
    i = tl.load(PartIdx + b * S + offs, mask=ok, other=2147483647)
    nan = (v != v) & ok
    has_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    v = tl.where(nan, float("inf"), v)
    best = tl.max(v, axis=0)
    hit = tl.where(has_nan, nan, (v == best) & ok)
    tl.store(Out + b, tl.min(tl.where(hit, i, 2147483647), axis=0).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, V) float -> (B,) int64: the first column of each row's largest value (see module doc)."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"argmax_rows: x must be (B, V) with V >= 1, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"argmax_rows: x must be float32/float16/bfloat16, got {x.dtype}")
    if x.shape[1] >= 2**31:
        raise ValueError(f"argmax_rows: rows of {x.shape[1]} columns exceed the kernel's int32 column index")
    if x.stride(1) != 1:
        x = x.contiguous()
    B, V = x.shape
    out = torch.empty(B, dtype=torch.int64, device=x.device)
    if B == 0:
        return out
    S = cdiv(V, _BLOCK)
    part_val = torch.empty((B, S), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((B, S), dtype=torch.int32, device=x.device)
    _argmax_block_kernel[(B, S)](x, part_val, part_idx, V, x.stride(0), S, BLOCK=_BLOCK, num_warps=4)
    _argmax_final_kernel[(B,)](part_val, part_idx, out, S, BLOCK_S=max(16, next_pow2(S)), num_warps=1)
    return out
