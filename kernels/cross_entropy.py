"""Triton cross-entropy row step: loss per row and d loss / d logits, written over the logits.

This is the inner step of gptcore.loss.linear_cross_entropy (the chunked LM head + loss): for one
chunk of rows it turns logits (n, V) into p - onehot(target) in place, in the logits' own dtype,
and writes each row's loss -log softmax(x)[target] in fp32. All arithmetic is fp32. One program
per row, two passes over the row (an online max/sum-of-exp pass, then the gradient pass), so the
chunk costs two reads (the second mostly from L2) and one write of bf16 logits and no fp32 copy
of them.

    ce_rows_(logits, target, ignore_index, loss)     # launcher; the public entry point

Its plain PyTorch twin (same contract) is gptcore.loss.ce_rows_torch_, the torch backend's row step.

Rows whose target equals ignore_index get loss 0 and a zero gradient row. A target outside
[0, V) that is not ignore_index gives loss NaN (no host sync is spent on checking it).
Tests: python -m pytest -q tests/test_fused_ce.py   (TRITON_INTERPRET=1 on a CPU)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptcore.kernels._launch import next_pow2, planned

# Elements of a row per loop step, and 16 warps at that size: the best of blocks 1024..8192 x
# 4/8/16 warps for (4096, 50257) bf16 rows in bench/probe_lm_head.py (rerun it to retune).
_MAX_BLOCK = 2048


@planned
@triton.jit
def _ce_rows_kernel(
    LOGITS,  # (n, V) fp32/fp16/bf16, row stride stride_row; overwritten with p - onehot(target)
    TARGET,  # (n,) int64 class ids
    LOSS,    # (n,) fp32, written: lse - logit[target] (0 for ignored rows)
    stride_row, ignore_index,
    V: tl.constexpr,  # vocab size: fixed per model, and a constexpr keeps the loop bounds static
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    y = tl.load(TARGET + row)
    offs = tl.arange(0, BLOCK)

    # Pass 1: running max and sum of exp(x - max), kept per lane (BLOCK of each) so the loop has
    # no cross-warp reduction and its loads overlap; the lanes are merged once at the end.
    m_vec = tl.full((BLOCK,), float("-inf"), tl.float32)
    s_vec = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with nothing yet stays s = 0
        s_vec = s_vec * tl.exp(m_vec - m_ref) + tl.exp(x - m_ref)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    s = tl.sum(s_vec * tl.exp(m_vec - m), axis=0)
    lse = m + tl.log(s)

    _loss_and_grad(ptr, y, lse, LOSS + row, ignore_index, V, BLOCK)


@triton.jit
def _loss_and_grad(ptr, y, lse, loss_ptr, ignore_index, V: tl.constexpr, BLOCK: tl.constexpr):
    """Given a row's log-sum-exp: store its loss, then pass 2 over the row, writing
    d loss_row / d x = softmax(x) - onehot(y) over x (zero for an ignored row)."""
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < V)
    x_y = tl.load(ptr + y, mask=in_range & ~ignored, other=0.0).to(tl.float32)
    tl.store(loss_ptr, tl.where(ignored, 0.0, tl.where(in_range, lse - x_y, float("nan"))))
    keep = tl.where(ignored, 0.0, 1.0)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
        tl.store(ptr + cols, (g * keep).to(ptr.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"ce_rows_: logits must be (rows, vocab), got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"ce_rows_: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.stride(-1) != 1:
        raise ValueError("ce_rows_: logits rows must be contiguous (stride 1 along the vocab); pass .contiguous()")
    n = logits.shape[0]
    if target.shape != (n,) or target.dtype != torch.int64:
        raise ValueError(f"ce_rows_: target must be int64 of shape ({n},), got {target.dtype} {tuple(target.shape)}")
    if loss.shape != (n,) or loss.dtype != torch.float32 or not loss.is_contiguous():
        raise ValueError(f"ce_rows_: loss must be a contiguous float32 tensor of shape ({n},)")
    if not (logits.device == target.device == loss.device):
        raise ValueError(
            f"ce_rows_: logits ({logits.device}), target ({target.device}) and loss ({loss.device}) "
            f"must be on one device"
        )


def ce_rows_(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, loss: torch.Tensor) -> None:
    """logits (n, V) -> p - onehot(target), in place; loss (n,) fp32 <- per-row cross-entropy."""
    _check(logits, target, loss)
    n, V = logits.shape
    if n == 0:
        return
    block = min(_MAX_BLOCK, next_pow2(V))
    warps = 16 if block >= 2048 else 8 if block >= 1024 else 4
    _ce_rows_kernel[(n,)](logits, target.contiguous(), loss, logits.stride(0), ignore_index,
                          V=V, BLOCK=block, num_warps=warps)

