"""A Linear whose backward is written for device time: fp32 weight and bias gradients straight from
the accumulators, and the bias gradient as one deterministic column reduction.

    y = linear(x, weight, bias)            # x (..., K), weight (N, K), bias (N,) or None

Forward is F.linear (under autocast: x, weight and bias in the autocast dtype, as autocast's own
F.linear). What differs is backward, where autocast's path spends device time the math does not need:

- d weight: autocast's cast node turns the (N, K) bf16 weight gradient into fp32 in a second pass
  (one copy kernel per Linear per step). Here ``torch.mm(dy^T, x, out_dtype=float32)`` writes the
  fp32 gradient from the matmul's fp32 accumulator: one pass, and no bf16 rounding of the sum.
- d bias: ``dy.sum(0)`` on a bf16 (M, N) gradient ran at ~1.2 TB/s on an H200 (torch's column
  reduction); here ``colsum`` (below) reads dy once at close to copy bandwidth into (P, N) fp32
  partials and ``sum_partials`` adds them in a fixed order.

The Python autograd.Function costs more host time per call than autocast's C++ path, so the model
uses it only where host time is free: inside a captured CUDA graph (gptcore.ops.device_time_first,
which gptcore.graph_step.GraphedStep turns on). Elsewhere the Linear is plain F.linear.

Reference twin: F.linear (tests/test_linear.py checks y, dx, dweight, dbias by DESIGN.md's rule).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gptcore.kernels._launch import cdiv, planned
from gptcore.kernels._rows import as_rows, check_tensor, persistent_programs, sum_partials


@planned
@triton.jit(do_not_specialize=["M", "ROWS_PER"])
def _colsum_kernel(
    Y,  # (M, N) rows, unit column stride
    PART,  # (P, N) fp32 out: PART[p] = sum of Y's rows [p * ROWS_PER, (p + 1) * ROWS_PER)
    M,
    N,
    stride_m,
    ROWS_PER,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    p = tl.program_id(1)
    col_ok = cols < N
    start = p * ROWS_PER
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, ROWS_PER, BLOCK_M):
        rows = start + m0 + tl.arange(0, BLOCK_M)
        mask = ((rows < M) & (m0 + tl.arange(0, BLOCK_M) < ROWS_PER))[:, None] & col_ok[None, :]
        acc += tl.load(Y + rows[:, None].to(tl.int64) * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(PART + p * N + cols, tl.sum(acc, axis=0), mask=col_ok)


# (BLOCK_M, BLOCK_N, num_warps, programs per SM)
COLSUM_CONFIG = (32, 128, 4, 4)


def colsum(y: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y (..., N) -> (N,) in out_dtype: the sum over every leading index, accumulated in fp32 in a
    fixed order (bit-identical from run to run)."""
    check_tensor(y, "y", "colsum")
    rows = as_rows(y)
    M, N = rows.shape
    block_m, block_n, warps, per_sm = COLSUM_CONFIG
    col_blocks = cdiv(N, block_n)
    # enough programs to fill the GPU, each over a whole number of BLOCK_M row tiles
    want = max(1, persistent_programs(y.device, per_sm) // col_blocks)
    rows_per = max(block_m, cdiv(cdiv(M, want), block_m) * block_m)
    P = max(1, cdiv(M, rows_per))
    part = torch.empty((1, P, N), dtype=torch.float32, device=y.device)
    if M == 0:
        part.zero_()
    else:
        _colsum_kernel[(col_blocks, P)](rows, part, M, N, rows.stride(0), rows_per,
                                        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return sum_partials(part, [out_dtype])[0]


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result taken from the fp32 accumulator (CUDA); CPU: in fp32."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        xc, wc = x.to(dtype), weight.to(dtype)
        bc = None if bias is None else bias.to(dtype)
        y = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.meta = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.meta
        need = ctx.needs_input_grad
        dy = dy.to(wc.dtype)
        dy2 = as_rows(dy)
        dx = dw = db = None
        if need[0]:
            dx = (dy @ wc).to(x_dtype)
        if need[1]:
            dw = _mm_f32(dy2.t(), as_rows(xc)).to(w_dtype)
        if b_dtype is not None and need[2]:
            db = colsum(dy2, b_dtype)
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the device-time backward above; the autocast dtype where
    autocast is on (as autocast's F.linear), else x's dtype (weight and bias cast to it)."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        return _Linear.apply(x, weight, bias, dtype)


__all__ = ["colsum", "linear"]
