"""Fused causal attention in Triton (the flash-attention algorithm), forward and backward.

    from gptcore.kernels.attention import attention
    y = attention(q, k, v, causal=True, dropout_p=0.0, scale=None)   # q (B,H,Tq,D), k/v (B,H,Tk,D)

What is here, bottom up:
  _fwd_kernel        one program per (query block, head, batch): streams key/value blocks through
                     an online softmax; writes O and the row log-sum-exp (fp32, base 2). Never
                     materialises the (Tq, Tk) score matrix.
  _bwd_delta_kernel  delta = rowsum(dO * O) in fp32 (the softmax-Jacobian correction term).
  _bwd_dkdv_kernel   one program per key block: holds K, V, loops over query blocks, recomputes
                     P from Q, K and the saved log-sum-exp, accumulates dK and dV.
  _bwd_dq_kernel     one program per query block: holds Q, dO, loops over key blocks, accumulates dQ.
                     Each gradient is written by exactly one program: no atomics, so the backward
                     pass is deterministic (the price is recomputing QK^T and dO V^T twice).
  dropout_mask()     the exact keep-mask the kernels use for a seed (for tests and debugging).
  _Attention         the torch.autograd.Function; attention() is the public entry point.

Conventions:
  * Causal with Tq < Tk aligns the queries to the END of the keys (prefill over a KV cache):
    query i sits at position P + i, P = Tk - Tq, and sees keys 0..P+i (kernels/reference.py).
  * Causal key blocks entirely above the diagonal are never visited (loop bounds); blocks entirely
    below it run an unmasked loop; only the diagonal blocks and the ragged last block get masks.
  * Inputs may be non-contiguous (the model passes permuted views of its qkv projection): every
    kernel takes (batch, head, row) strides; only a last dim with stride != 1 is copied once.
  * Dropout uses Philox (tl.philox, counter (j, i, b*H + h)): the forward and backward kernels
    regenerate the same mask, independent of block sizes, and a fixed seed reproduces it.
  * dtypes: fp16 and bf16 run tensor-core dots with fp32 accumulation and an fp32 softmax; fp32
    inputs run tl.dot with input_precision="ieee" (true fp32, not TF32) on smaller blocks.
  * Block sizes, warps, stages and pointer-vs-TMA loads come from a table per head_dim and GPU
    generation; on CUDA the first large call (>= 2^24 scores) for each (kernel, head_dim, dtype,
    causal, dropout, power-of-two length bucket) times the candidate configs and keeps the
    fastest (GPTCORE_ATTN_AUTOTUNE=0: table only). chosen_config() says what was used.

Tests: tests/test_attention.py (CPU: TRITON_INTERPRET=1, small shapes). Benchmark:
python -m bench.kernels_attention.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gptcore.kernels._launch import cdiv, planned, tma_descriptor
from gptcore.kernels._oplib import launcher_op

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # 1 / ln(2): softmax runs in base 2 (exp2 is one instruction)


# ============================================================================================
# Triton kernels
# ============================================================================================
# Tensor arguments Q, K, V, DO and the outputs are either pointers (with (batch, head, row)
# strides) or, with TMA=True (Hopper), rank-4 tensor descriptors over (B, H, T, D) whose
# hardware bounds checks replace the row masks. _load_rows/_store_rows hide the difference.
@triton.jit
def _load_rows(src, b, h, row0, n_rows, stride_t,
               BLOCK: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):
    """Rows [row0, row0 + BLOCK) of head (b, h) as a (BLOCK, D) tile; rows >= n_rows read 0.

    Pointer mode: src points at the head's row 0; MASKED says whether rows can pass n_rows.
    """
    if TMA:
        return src.load([b, h, row0, 0]).reshape(BLOCK, D)
    else:
        rows = row0 + tl.arange(0, BLOCK)
        ptrs = src + rows[:, None] * stride_t + tl.arange(0, D)[None, :]
        if MASKED:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _store_rows(dst, b, h, row0, n_rows, stride_t, tile,
                BLOCK: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Write a (BLOCK, D) tile to rows [row0, row0 + BLOCK) of head (b, h), rows < n_rows only."""
    if TMA:
        dst.store([b, h, row0, 0], tile.reshape(1, 1, BLOCK, D))
    else:
        rows = row0 + tl.arange(0, BLOCK)
        tl.store(dst + rows[:, None] * stride_t + tl.arange(0, D)[None, :], tile, mask=rows[:, None] < n_rows)


@triton.jit
def _dropout_keep(seed, p_drop, bh, rows, cols):
    """Keep-mask (True = keep) of the dropout at query rows x key cols of head bh = b*H + h.

    rows / cols broadcast against each other ((R, 1) and (1, C), or transposed). One Philox draw
    per element with the 32-bit counter (j, i, b*H + h, 0), so the mask depends only on
    (seed, b, h, i, j), never on how a kernel tiles the matrix.
    """
    i, j = tl.broadcast(rows, cols)
    c0 = j.to(tl.uint32)
    zero = c0 * 0
    r, _, _, _ = tl.philox(seed, c0, i.to(tl.uint32), zero + bh.to(tl.uint32), zero)
    return tl.uint_to_uniform_float(r) >= p_drop


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, b, h, skt, svt, offs_m, lo, hi, P, Tk, qk_scale,
               seed, p_drop, bh,
               D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """Online softmax over key blocks [lo, hi) for one query block.

    acc (BM, D) fp32 running sum of p @ v; l_i (BM,) running sum of p; m_i (BM,) running max of
    the base-2 scores. MASKED: bounds (j < Tk) and, if CAUSAL, the diagonal (j <= P + i).
    """
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + offs_n  # (BN,) key indices
        k = _load_rows(K, b, h, n0, Tk, skt, BLOCK_N, D, MASKED, TMA)  # (BN, D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BM, BN) raw scores, fp32
        if MASKED:
            ok = cols[None, :] < Tk
            if CAUSAL:
                ok = ok & (cols[None, :] <= P + offs_m[:, None])
            s = tl.where(ok, s, float("-inf"))
        # qk_scale = scale * log2(e) > 0, so the max of the scaled scores is the scaled max.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # (BM, BN)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped entries too
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, p_drop, bh, offs_m[:, None], cols[None, :])
            p = tl.where(keep, p, 0.0)
        v = _load_rows(V, b, h, n0, Tk, svt, BLOCK_N, D, MASKED, TMA)  # (BN, D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@planned
@triton.jit(do_not_specialize=["H", "Tq", "Tk", "seed"])
def _fwd_kernel(Q, K, V, O, LSE,  # Q, O: (B, H, Tq, D); K, V: (B, H, Tk, D); LSE: (B, H, Tq) fp32
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                H, Tq, Tk, qk_scale, seed, p_drop, drop_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    # Causal query blocks near the end do the most work: launch them first (program 0 = last block).
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    if not TMA:
        Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        K += b.to(tl.int64) * skb + h.to(tl.int64) * skh
        V += b.to(tl.int64) * svb + h.to(tl.int64) * svh
        O += b.to(tl.int64) * sob + h.to(tl.int64) * soh
    LSE += bh.to(tl.int64) * Tq

    offs_m = m0 + tl.arange(0, BLOCK_M)  # (BM,) query indices
    q = _load_rows(Q, b, h, m0, Tq, sqt, BLOCK_M, D, True, TMA)  # (BM, D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    P = Tk - Tq  # position of query 0 in the key sequence
    if CAUSAL:
        n_full = ((P + m0 + 1) // BLOCK_N) * BLOCK_N  # every row of the block sees keys [0, n_full)
        n_hi = tl.minimum(Tk, P + m0 + BLOCK_M)  # no row sees a key at or beyond n_hi
    else:
        n_full = (Tk // BLOCK_N) * BLOCK_N
        n_hi = Tk
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, b, h, skt, svt, offs_m, 0, n_full, P, Tk,
                               qk_scale, seed, p_drop, bh,
                               D, BLOCK_N, False, CAUSAL, DROPOUT, DOT_PREC, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, b, h, skt, svt, offs_m, n_full, n_hi, P, Tk,
                               qk_scale, seed, p_drop, bh,
                               D, BLOCK_N, True, CAUSAL, DROPOUT, DOT_PREC, TMA)
    # Every row (padding rows included) saw key 0, so l_i > 0 and m_i is finite.
    inv_l = 1.0 / l_i
    if DROPOUT:
        inv_l = inv_l * drop_scale
    out = acc * inv_l[:, None]
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Tq)
    _store_rows(O, b, h, m0, Tq, sot, out.to(q.dtype), BLOCK_M, D, TMA)


@planned
@triton.jit(do_not_specialize=["H", "Tq"])
def _bwd_delta_kernel(O, DO, DELTA,  # O, DO: (B, H, Tq, D); DELTA: (B, H, Tq) fp32
                      sob, soh, sot, sdob, sdoh, sdot, H, Tq,
                      D: tl.constexpr, BLOCK_M: tl.constexpr):
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Tq
    O += b.to(tl.int64) * sob + h.to(tl.int64) * soh
    DO += b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
    o = tl.load(O + offs_m[:, None] * sot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h).to(tl.int64) * Tq + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, sqt, sdot, offs_n, lo, hi, P, Tq,
                    qk_scale, seed, p_drop, drop_scale, bh,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dK, dV (BN, D) of one key block over query blocks [lo, hi), transposed layout.

    MASKED: query bounds (i < Tq) and, if CAUSAL, the diagonal (j <= P + i).
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    for m0 in range(lo, hi, BLOCK_M):
        m0 = tl.multiple_of(m0, BLOCK_M)
        rows = m0 + offs_m0  # (BM,) query indices
        q = _load_rows(Q, b, h, m0, Tq, sqt, BLOCK_M, D, MASKED, TMA)  # (BM, D)
        if MASKED:
            # +inf log-sum-exp makes p = 0 on padding rows.
            lse = tl.load(LSE + rows, mask=rows < Tq, other=float("inf"))
        else:
            lse = tl.load(LSE + rows)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BN, BM)
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])  # softmax probabilities, transposed
        if MASKED:
            if CAUSAL:
                pT = tl.where(offs_n[:, None] <= P + rows[None, :], pT, 0.0)
            delta = tl.load(DELTA + rows, mask=rows < Tq, other=0.0)
        else:
            delta = tl.load(DELTA + rows)
        do = _load_rows(DO, b, h, m0, Tq, sdot, BLOCK_M, D, MASKED, TMA)  # (BM, D)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BN, BM) = (dO V^T)^T
        if DROPOUT:
            keep = _dropout_keep(seed, p_drop, bh, rows[None, :], offs_n[:, None])
            # dV uses the dropped probabilities; drop_scale is applied once at the end.
            dv = tl.dot(tl.where(keep, pT, 0.0).to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])  # (BN, BM) dS^T, scale applied at the end
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@planned
@triton.jit(do_not_specialize=["H", "Tq", "Tk", "seed"])
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,  # DK, DV: (B, H, Tk, D) contiguous
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sgb, sgh, sgt,
                     H, Tq, Tk, qk_scale, scale, seed, p_drop, drop_scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                     TMA: tl.constexpr):
    # Causal key blocks near the start are seen by the most queries: program 0 = block 0 runs first.
    n0 = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    if not TMA:
        Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        K += b.to(tl.int64) * skb + h.to(tl.int64) * skh
        V += b.to(tl.int64) * svb + h.to(tl.int64) * svh
        DO += b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
        DK += b.to(tl.int64) * sgb + h.to(tl.int64) * sgh
        DV += b.to(tl.int64) * sgb + h.to(tl.int64) * sgh
    LSE += bh.to(tl.int64) * Tq
    DELTA += bh.to(tl.int64) * Tq

    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,) key indices
    # Key rows past Tk load as zeros; their dK/dV rows are garbage and never stored.
    k = _load_rows(K, b, h, n0, Tk, skt, BLOCK_N, D, True, TMA)  # (BN, D)
    v = _load_rows(V, b, h, n0, Tk, svt, BLOCK_N, D, True, TMA)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)

    P = Tk - Tq
    m_end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    m_even = (Tq // BLOCK_M) * BLOCK_M  # query blocks below m_even have no padding rows
    if CAUSAL:
        # Query i sees key j iff j <= P + i: the first block with a row seeing key n0, and the
        # first block whose every row sees all keys of this block.
        m_lo = (tl.maximum(n0 - P, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - P, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    # Diagonal blocks, then full blocks, then the ragged last block (each range may be empty).
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, sqt, sdot, offs_n,
                             m_lo, tl.minimum(m_full, m_end), P, Tq, qk_scale, seed, p_drop,
                             drop_scale, bh, D, BLOCK_M, True, CAUSAL, DROPOUT, DOT_PREC, TMA)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, sqt, sdot, offs_n,
                             m_full, m_even, P, Tq, qk_scale, seed, p_drop,
                             drop_scale, bh, D, BLOCK_M, False, CAUSAL, DROPOUT, DOT_PREC, TMA)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, b, h, sqt, sdot, offs_n,
                             tl.maximum(m_full, m_even), m_end, P, Tq, qk_scale, seed, p_drop,
                             drop_scale, bh, D, BLOCK_M, True, CAUSAL, DROPOUT, DOT_PREC, TMA)
    if DROPOUT:
        dv = dv * drop_scale
    dk = dk * scale
    _store_rows(DK, b, h, n0, Tk, sgt, dk.to(k.dtype), BLOCK_N, D, TMA)
    _store_rows(DV, b, h, n0, Tk, sgt, dv.to(v.dtype), BLOCK_N, D, TMA)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, b, h, skt, svt, offs_m, lo, hi, P, Tk,
                  qk_scale, seed, p_drop, drop_scale, bh,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ (BM, D) of one query block over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + offs_n
        k = _load_rows(K, b, h, n0, Tk, skt, BLOCK_N, D, MASKED, TMA)  # (BN, D)
        v = _load_rows(V, b, h, n0, Tk, svt, BLOCK_N, D, MASKED, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BM, BN)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            ok = cols[None, :] < Tk
            if CAUSAL:
                ok = ok & (cols[None, :] <= P + offs_m[:, None])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BM, BN) = dO V^T
        if DROPOUT:
            keep = _dropout_keep(seed, p_drop, bh, offs_m[:, None], cols[None, :])
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@planned
@triton.jit(do_not_specialize=["H", "Tq", "Tk", "seed"])
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,  # DQ: (B, H, Tq, D) contiguous
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sgb, sgh, sgt,
                   H, Tq, Tk, qk_scale, scale, seed, p_drop, drop_scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
                   TMA: tl.constexpr):
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # heaviest causal blocks first
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    if not TMA:
        Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        K += b.to(tl.int64) * skb + h.to(tl.int64) * skh
        V += b.to(tl.int64) * svb + h.to(tl.int64) * svh
        DO += b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
        DQ += b.to(tl.int64) * sgb + h.to(tl.int64) * sgh
    LSE += bh.to(tl.int64) * Tq
    DELTA += bh.to(tl.int64) * Tq

    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Tq
    q = _load_rows(Q, b, h, m0, Tq, sqt, BLOCK_M, D, True, TMA)  # (BM, D)
    do = _load_rows(DO, b, h, m0, Tq, sdot, BLOCK_M, D, True, TMA)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    P = Tk - Tq
    if CAUSAL:
        n_full = ((P + m0 + 1) // BLOCK_N) * BLOCK_N
        n_hi = tl.minimum(Tk, P + m0 + BLOCK_M)
    else:
        n_full = (Tk // BLOCK_N) * BLOCK_N
        n_hi = Tk
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, b, h, skt, svt, offs_m, 0, n_full, P, Tk,
                       qk_scale, seed, p_drop, drop_scale, bh,
                       D, BLOCK_N, False, CAUSAL, DROPOUT, DOT_PREC, TMA)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, b, h, skt, svt, offs_m, n_full, n_hi, P, Tk,
                       qk_scale, seed, p_drop, drop_scale, bh,
                       D, BLOCK_N, True, CAUSAL, DROPOUT, DOT_PREC, TMA)
    dq = dq * scale
    _store_rows(DQ, b, h, m0, Tq, sgt, dq.to(q.dtype), BLOCK_M, D, TMA)


@planned
@triton.jit(do_not_specialize=["Tq", "Tk", "seed"])
def _dropout_mask_kernel(MASK, Tq, Tk, seed, p_drop,  # MASK: (B, H, Tq, Tk) uint8
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = _dropout_keep(seed, p_drop, bh, rows[:, None], cols[None, :])
    ok = (rows[:, None] < Tq) & (cols[None, :] < Tk)
    ptrs = MASK + (bh.to(tl.int64) * Tq + rows[:, None]) * Tk + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=ok)


# ============================================================================================
# Configs: a table per GPU generation, optionally refined by timing candidates on first use
# ============================================================================================
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query rows per block
    block_n: int  # key rows per block
    num_warps: int
    num_stages: int
    tma: bool = False  # Hopper tensor-memory-accelerator loads/stores through tensor descriptors

    def __str__(self) -> str:
        return f"M{self.block_m}/N{self.block_n}/w{self.num_warps}/s{self.num_stages}" + ("/tma" if self.tma else "")


KERNELS = ("fwd", "dkdv", "dq")

# Candidates, best guess first (the first one is the table entry used without autotuning).
# fwd and dq hold a query block (BLOCK_M) and stream key blocks; dkdv holds a key block
# (BLOCK_N) and streams query blocks. BLOCK_M = 128 with 4 or 8 warps lets Triton emit Hopper
# wgmma; shared memory per stage is (BLOCK_N or BLOCK_M) x D x 2 tensors x 2 bytes. Without
# dropout none of these spills registers on sm_90 in bf16 (checked with ptxas). On Hopper every
# config is also tried with TMA loads (tma=True) when the tensors allow it.
_C = KernelConfig
_SM90 = {
    ("fwd", "small"): [_C(128, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 128, 8, 3), _C(64, 64, 4, 4),
                       _C(128, 32, 4, 4), _C(64, 128, 4, 3)],
    ("fwd", "large"): [_C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(128, 64, 8, 4), _C(128, 32, 8, 4),
                       _C(64, 64, 4, 3)],
    ("dkdv", "small"): [_C(64, 128, 8, 3), _C(32, 128, 8, 3), _C(64, 128, 8, 2), _C(64, 64, 4, 3),
                        _C(32, 64, 4, 4), _C(64, 64, 8, 3)],
    ("dkdv", "large"): [_C(32, 128, 8, 3), _C(32, 128, 8, 2), _C(16, 128, 8, 4), _C(64, 64, 8, 3),
                        _C(32, 64, 8, 3)],
    ("dq", "small"): [_C(128, 64, 8, 3), _C(128, 32, 4, 4), _C(64, 64, 4, 3), _C(64, 32, 4, 4)],
    ("dq", "large"): [_C(128, 64, 8, 2), _C(128, 32, 8, 3), _C(64, 64, 4, 3), _C(64, 32, 4, 3)],
}
# Larger tiles that only fit in registers without per-element pointers (TMA variants only).
_SM90_TMA_ONLY = {
    ("fwd", "small"): [_C(128, 128, 8, 4, True)],
    ("fwd", "large"): [],
    ("dkdv", "small"): [_C(64, 128, 8, 4, True)],
    ("dkdv", "large"): [],
    ("dq", "small"): [_C(128, 128, 8, 2, True)],
    ("dq", "large"): [_C(128, 128, 8, 2, True)],
}
# Ampere / Ada and anything else with bf16: less shared memory (100-164 KB), no wgmma.
_SM80 = {
    ("fwd", "small"): [_C(64, 64, 4, 3), _C(128, 64, 4, 2), _C(128, 32, 4, 3)],
    ("fwd", "large"): [_C(128, 64, 8, 2), _C(64, 64, 4, 2)],
    ("dkdv", "small"): [_C(32, 64, 4, 2), _C(32, 128, 4, 2), _C(64, 128, 8, 2)],
    ("dkdv", "large"): [_C(64, 64, 4, 2), _C(32, 64, 4, 2)],
    ("dq", "small"): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(128, 32, 4, 2)],
    ("dq", "large"): [_C(64, 64, 4, 2), _C(128, 32, 8, 1), _C(64, 32, 4, 2)],
}
# fp32 on any GPU: ieee dots run on FMA units (no tensor cores) from 4-byte tiles, so small
# blocks and 8 warps keep registers in check. A correctness path, not a fast one.
_FP32 = {("fwd", "small"): _C(32, 32, 8, 2), ("fwd", "large"): _C(32, 16, 8, 2),
         ("dkdv", "small"): _C(16, 32, 8, 2), ("dkdv", "large"): _C(16, 32, 8, 2),
         ("dq", "small"): _C(32, 32, 8, 2), ("dq", "large"): _C(32, 32, 8, 2)}
# Triton interpreter (CPU): small blocks so the tests' short sequences still span several
# blocks, with block_m != block_n so ragged diagonals are exercised.
_INTERPRETER = {"fwd": _C(32, 16, 1, 1), "dkdv": _C(16, 32, 1, 1), "dq": _C(32, 16, 1, 1)}

_AUTOTUNE = os.environ.get("GPTCORE_ATTN_AUTOTUNE", "1") != "0"
# Smaller problems (B*H*Tq*Tk scores; decode steps, short prompts) take the table entry: tuning
# them would cost more compile time than it could save.
_TUNE_MIN_SCORES = 1 << 24
_TUNED: dict[tuple, KernelConfig] = {}  # autotune results, keyed by _tune_key()
_TUNING_LOG: list[dict] = []  # every tuning run's candidate timings (see tuning_log())
_FORCED: dict[str, KernelConfig] | None = None  # set by use_config()


def _arch(device: torch.device) -> int | None:
    """Compute capability as 90, 80, ... or None for the interpreter (CPU tensors)."""
    if device.type != "cuda":
        return None
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    # cached: torch.cuda.get_device_capability costs ~10 us a call, and every launch asks
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def candidates(kernel: str, D: int, dtype: torch.dtype, arch: int | None, tma_ok: bool = True) -> list[KernelConfig]:
    """The configs autotuning tries for one kernel, table default first.

    tma_ok: the tensors meet TMA's alignment rules (see _tma_ok); TMA variants exist on sm_90+.
    """
    return list(_candidates(kernel, D, dtype, arch, tma_ok))


@functools.lru_cache(maxsize=None)
def _candidates(kernel: str, D: int, dtype: torch.dtype, arch: int | None, tma_ok: bool) -> tuple[KernelConfig, ...]:
    if arch is None:
        return (_INTERPRETER[kernel],)
    size = "large" if D > 64 else "small"
    if dtype == torch.float32:
        return (_FP32[(kernel, size)],)
    if arch >= 90:
        base = _SM90[(kernel, size)]
        with_tma = [dataclasses.replace(c, tma=True) for c in base] + _SM90_TMA_ONLY[(kernel, size)]
        return tuple(base + (with_tma if tma_ok else []))
    return tuple(_SM80[(kernel, size)])


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Rank-4 TMA descriptors need 16-byte aligned base addresses and strides, last dim contiguous.

    The interpreter (CPU) emulates descriptors; on CUDA they need sm_90+.
    """
    for t in tensors:
        if t.data_ptr() & 15 or not _tma_layout_ok(t.stride(), t.element_size(), _arch(t.device)):
            return False
    return True


@functools.lru_cache(maxsize=4096)
def _tma_layout_ok(strides: tuple, elem_size: int, arch: int | None) -> bool:
    if arch is not None and arch < 90:
        return False
    return strides[-1] == 1 and not any(s * elem_size % 16 for s in strides[:-1])


def _bucket(t: int) -> int:
    """Sequence lengths share a tuning result within a power-of-two bucket."""
    return 1 << max(0, (t - 1).bit_length())


def _tune_key(kernel, D, dtype, causal, dropout, Tq, Tk, arch, tma_ok):
    return (kernel, D, dtype, causal, dropout, _bucket(Tq), _bucket(Tk), arch, tma_ok)


def _pick(kernel: str, key: tuple, launch, n_scores: int) -> KernelConfig:
    """The config for one launch: forced > tuned > (tune now, if big enough) > table default."""
    if _FORCED is not None:
        return _FORCED[kernel]
    if key in _TUNED:
        return _TUNED[key]
    _, D, dtype, *_rest, arch, tma_ok = key
    cands = _candidates(kernel, D, dtype, arch, tma_ok)
    if not (_AUTOTUNE and arch is not None and len(cands) > 1 and n_scores >= _TUNE_MIN_SCORES):
        return cands[0]
    from triton.testing import do_bench

    timings, errors = {}, []
    for cfg in cands:
        try:
            timings[cfg] = do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # a candidate that does not fit this GPU (shared memory, registers)
            errors.append(f"{cfg}: {type(e).__name__}: {e}")
    # Nothing ran (e.g. no memory left for timing): the table entry, whose launch raises if it is broken.
    best = min(timings, key=timings.get) if timings else cands[0]
    _TUNED[key] = best
    _TUNING_LOG.append({
        "kernel": kernel, "head_dim": D, "dtype": str(dtype), "causal": key[3], "dropout": key[4],
        "Tq_bucket": key[5], "Tk_bucket": key[6], "arch": arch, "best": str(best),
        "ms": {str(c): round(t, 5) for c, t in sorted(timings.items(), key=lambda ct: ct[1])}, "errors": errors})
    return best


def tuning_log() -> list[dict]:
    """One entry per autotuning run so far: every candidate's median ms, failures and the pick."""
    return list(_TUNING_LOG)


@contextlib.contextmanager
def use_config(fwd: KernelConfig, dkdv: KernelConfig, dq: KernelConfig):
    """Run every attention call inside the block with these configs (no table, no autotuning)."""
    global _FORCED
    prev, _FORCED = _FORCED, {"fwd": fwd, "dkdv": dkdv, "dq": dq}
    try:
        yield
    finally:
        _FORCED = prev


def chosen_config(D: int, dtype: torch.dtype, causal: bool = True, Tq: int = 1024, Tk: int | None = None,
                  dropout: bool = False, device=None) -> dict:
    """What attention() uses for these shapes: {'fwd': 'M128/N64/w4/s3/tma', 'dkdv': ..., 'dq': ...,
    'source': 'autotuned' | 'table' | 'forced'} ('table' also means: not tuned yet)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = _arch(device)
    Tk = Tq if Tk is None else Tk
    out, sources = {}, set()
    for kernel in KERNELS:
        tuned = [_TUNED.get(_tune_key(kernel, D, dtype, causal, dropout, Tq, Tk, arch, ok)) for ok in (True, False)]
        tuned = [c for c in tuned if c is not None]
        if _FORCED is not None:
            cfg, src = _FORCED[kernel], "forced"
        elif tuned:
            cfg, src = tuned[0], "autotuned"
        else:
            cfg, src = candidates(kernel, D, dtype, arch)[0], "table"
        out[kernel] = str(cfg)
        sources.add(src)
    out["source"] = "+".join(sorted(sources))
    return out


# ============================================================================================
# Launchers
# ============================================================================================
def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output and workspace comes from here (tests swap in a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def out_layout(B: int, H: int, T: int, D: int, dtype, device) -> torch.Tensor:
    """An empty (B, H, T, D) output laid out as (B, T, H, D) in memory: the model's
    o.transpose(1, 2).reshape(B, T, H * D) is then a view, not a copy of the whole output."""
    return _alloc((B, T, H, D), dtype, device).transpose(1, 2)


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is Triton's default; 16-bit dots ignore it


def _operands(tma: bool, tensors_and_rows):
    """The kernel's tensor arguments: the tensors themselves, or with tma one (B, H, T, D)
    descriptor each whose block is (1, 1, rows, D)."""
    if not tma:
        return [t for t, _ in tensors_and_rows]
    return [tma_descriptor(t, [1, 1, rows, t.shape[3]]) for t, rows in tensors_and_rows]


def _forward(q, k, v, causal: bool, p_drop: float, scale: float, seed: int, bthd_out: bool = True):
    """bthd_out: o in (B, T, H, D) memory (out_layout); False gives a contiguous (B, H, T, D) o."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = out_layout(B, H, Tq, D, q.dtype, q.device) if bthd_out else _alloc((B, H, Tq, D), q.dtype, q.device)
    lse = _alloc((B, H, Tq), torch.float32, q.device)
    drop_scale = 1.0 / (1.0 - p_drop)
    tma_ok = _tma_ok(q, k, v, o)

    def launch(cfg: KernelConfig):
        bm, bn, tma = cfg.block_m, cfg.block_n, cfg.tma and tma_ok
        args = _operands(tma, [(q, bm), (k, bn), (v, bn), (o, bm)])
        _fwd_kernel[(cdiv(Tq, bm), H, B)](
            *args, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, Tq, Tk, scale * LOG2E, seed, p_drop, drop_scale,
            D=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, DROPOUT=p_drop > 0.0,
            DOT_PREC=_dot_prec(q.dtype), TMA=tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    key = _tune_key("fwd", D, q.dtype, causal, p_drop > 0, Tq, Tk, _arch(q.device), tma_ok)
    launch(_pick("fwd", key, launch, B * H * Tq * Tk))
    return o, lse


def _backward(do, q, k, v, o, lse, causal: bool, p_drop: float, scale: float, seed: int, out=None):
    """-> dq, dk, dv. out: optional (dq, dk, dv) views to write instead (dk and dv with equal
    strides, last dim unit-stride), e.g. the three parts of one packed dqkv buffer."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = _alloc((B, H, Tq), torch.float32, q.device)
    if out is None:
        dq = _alloc((B, H, Tq, D), q.dtype, q.device)
        dk = _alloc((B, H, Tk, D), k.dtype, k.device)
        dv = _alloc((B, H, Tk, D), v.dtype, v.device)
    else:
        dq, dk, dv = out
        assert dk.stride() == dv.stride() and dq.stride(-1) == dk.stride(-1) == 1, "dk, dv must share strides"
    drop_scale = 1.0 / (1.0 - p_drop)
    dropout = p_drop > 0.0
    prec = _dot_prec(q.dtype)
    arch = _arch(q.device)
    tma_ok = _tma_ok(q, k, v, do, dq, dk, dv)

    block = 64 if q.is_cuda else 32
    _bwd_delta_kernel[(cdiv(Tq, block), H, B)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Tq, D=D, BLOCK_M=block)

    common = (H, Tq, Tk, scale * LOG2E, scale, seed, p_drop, drop_scale)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])

    def launch_dkdv(cfg: KernelConfig):
        bm, bn, tma = cfg.block_m, cfg.block_n, cfg.tma and tma_ok
        args = _operands(tma, [(q, bm), (k, bn), (v, bn), (do, bm), (dk, bn), (dv, bn)])
        _bwd_dkdv_kernel[(cdiv(Tk, bn), H, B)](
            *args, lse, delta, *strides, *dk.stride()[:3], *common,
            D=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, DROPOUT=dropout, DOT_PREC=prec,
            TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def launch_dq(cfg: KernelConfig):
        bm, bn, tma = cfg.block_m, cfg.block_n, cfg.tma and tma_ok
        args = _operands(tma, [(q, bm), (k, bn), (v, bn), (do, bm), (dq, bm)])
        _bwd_dq_kernel[(cdiv(Tq, bm), H, B)](
            *args, lse, delta, *strides, *dq.stride()[:3], *common,
            D=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, DROPOUT=dropout, DOT_PREC=prec,
            TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    n_scores = B * H * Tq * Tk
    launch_dkdv(_pick("dkdv", _tune_key("dkdv", D, q.dtype, causal, dropout, Tq, Tk, arch, tma_ok), launch_dkdv,
                      n_scores))
    launch_dq(_pick("dq", _tune_key("dq", D, q.dtype, causal, dropout, Tq, Tk, arch, tma_ok), launch_dq, n_scores))
    return dq, dk, dv


@functools.lru_cache(maxsize=None)
def _bf16_ok(index) -> bool:
    return torch.cuda.is_bf16_supported()  # ~10 us a call uncached; fixed per device


def _check_device(t: torch.Tensor) -> None:
    if t.is_cuda:
        if t.dtype == torch.bfloat16 and not _bf16_ok(t.device.index):
            raise ValueError("attention: this GPU has no bfloat16 support; use float16 inputs")
        return
    if t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "attention: CPU tensors need the Triton interpreter; move q, k, v to a CUDA device, "
                "set TRITON_INTERPRET=1 before importing gptcore (slow, for tests), or use the "
                "'torch' backend")
        return
    raise ValueError(f"attention: unsupported device {t.device}; use CUDA tensors")


def _check_inputs(q, k, v, causal: bool, dropout_p: float, scale: float | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: dtype {q.dtype} is not supported; use one of "
                         f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on "
                         "batch, heads and head_dim (B, H, *, D)")
    D = q.shape[3]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head_dim {D} is not supported; the Triton kernel handles head_dim "
                         f"in {SUPPORTED_HEAD_DIMS} (use the 'torch' backend for others)")
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq < 1 or Tk < 1 or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"attention: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    if causal and Tq > Tk:
        raise ValueError(f"attention: causal attention needs Tq <= Tk (queries are the last Tq of the "
                         f"keys), got Tq={Tq}, Tk={Tk}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not (scale > 0.0 and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a positive finite number, got {scale}")
    _check_device(q)


# ============================================================================================
# Autograd and public API
# ============================================================================================
# ---- launcher ops (kernels/_oplib.py): the launchers above, eager or traced --------------------------
# The dropout seed travels as a (1,) int64 CPU tensor (None without dropout): under torch.compile it
# is drawn by a graph op (torch.randint), not a host .item(), and the backward regenerates the mask
# from the saved seed tensor.
def _seed_int(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed)


def _fwd_launcher(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, scale: float,
                  seed: Optional[Tensor], bthd_out: bool) -> tuple[Tensor, Tensor]:
    """q (B, H, Tq, D), k, v (B, H, Tk, D) -> o (B, H, Tq, D) in q's dtype (laid out (B, T, H, D) in
    memory when bthd_out, else contiguous), lse (B, H, Tq) fp32."""
    return _forward(q, k, v, causal, dropout_p, scale, _seed_int(seed), bthd_out)


def _fwd_fake(q, k, v, causal, dropout_p, scale, seed, bthd_out):
    _check_inputs(q, k, v, causal, dropout_p, scale)
    B, H, T, D = q.shape
    o = q.new_empty((B, T, H, D)).transpose(1, 2) if bthd_out else q.new_empty(q.shape)
    return o, q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_launcher(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                  dropout_p: float, scale: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (shapes and dtypes of q, k, v; contiguous)."""
    return _backward(do, q, k, v, o, lse, causal, dropout_p, scale, _seed_int(seed))


def _bwd_fake(do, q, k, v, o, lse, causal, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _qkv_fwd_launcher(qkv: Tensor, n_heads: int, causal: bool, dropout_p: float, scale: float,
                      seed: Optional[Tensor], bthd_out: bool) -> tuple[Tensor, Tensor]:
    """qkv (B, T, 3 H D) packed -> o (B, H, T, D) (layout as in _fwd_launcher), lse (B, H, T) fp32."""
    return _forward(*split_qkv(qkv, n_heads), causal, dropout_p, scale, _seed_int(seed), bthd_out)


def _qkv_fwd_fake(qkv, n_heads, causal, dropout_p, scale, seed, bthd_out):
    _check_qkv(qkv, n_heads)
    _check_inputs(*split_qkv(qkv, n_heads), causal, dropout_p, scale)
    B, T, C3 = qkv.shape
    D = C3 // (3 * n_heads)
    o = qkv.new_empty((B, T, n_heads, D)).transpose(1, 2) if bthd_out else qkv.new_empty((B, n_heads, T, D))
    return o, qkv.new_empty((B, n_heads, T), dtype=torch.float32)


def _qkv_bwd_launcher(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, n_heads: int, causal: bool,
                      dropout_p: float, scale: float, seed: Optional[Tensor]) -> Tensor:
    """-> dqkv (B, T, 3 H D) contiguous: the kernels write dq, dk, dv straight into its three parts."""
    dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    _backward(do, *split_qkv(qkv, n_heads), o, lse, causal, dropout_p, scale, _seed_int(seed),
              out=split_qkv(dqkv, n_heads))
    return dqkv


def _qkv_bwd_fake(do, qkv, o, lse, n_heads, causal, dropout_p, scale, seed):
    return qkv.new_empty(qkv.shape)


_fwd_op = launcher_op("gptcore::attention_fwd", _fwd_launcher, _fwd_fake)
_bwd_op = launcher_op("gptcore::attention_bwd", _bwd_launcher, _bwd_fake)
_qkv_fwd_op = launcher_op("gptcore::attention_qkv_fwd", _qkv_fwd_launcher, _qkv_fwd_fake)
_qkv_bwd_op = launcher_op("gptcore::attention_qkv_bwd", _qkv_bwd_launcher, _qkv_bwd_fake)


def _bthd_out() -> bool:
    # eager: o in (B, T, H, D) memory, so the model's transpose-reshape is a view. Compiled: a
    # contiguous o (a transposed custom-op output sent Inductor's GPU codegen into an exponential
    # IR-printing loop on a 12-layer model).
    return not torch.compiler.is_compiling()


class _Attention(torch.autograd.Function):
    """The one autograd path of attention, eager and compiled (kernels/_oplib.py)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, scale, seed):
        o, lse = _fwd_op(q, k, v, causal, dropout_p, scale, seed, _bthd_out())
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.args = (causal, dropout_p, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = _bwd_op(do, q, k, v, o, lse, *ctx.args, seed)
        return dq, dk, dv, None, None, None, None


def split_qkv(qkv: torch.Tensor, n_heads: int):
    """(B, T, 3 * H * D) -> q, k, v (B, H, T, D) views, the model's layout of one c_attn output."""
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, n_heads, C3 // (3 * n_heads)).permute(2, 0, 3, 1, 4).unbind(0)


class _AttentionQKV(torch.autograd.Function):
    """Attention over q, k, v read in place from one packed (B, T, 3C) tensor; the backward writes
    dq, dk, dv straight into one packed dqkv (no stack/permute copy of three separate grads)."""

    @staticmethod
    def forward(ctx, qkv, n_heads, causal, dropout_p, scale, seed):
        o, lse = _qkv_fwd_op(qkv, n_heads, causal, dropout_p, scale, seed, _bthd_out())
        ctx.save_for_backward(qkv, o, lse, seed)
        ctx.args = (n_heads, causal, dropout_p, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse, seed = ctx.saved_tensors
        return _qkv_bwd_op(do, qkv, o, lse, *ctx.args, seed), None, None, None, None, None


def _check_qkv(qkv, n_heads: int) -> None:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"attention_qkv: qkv must be a (B, T, 3 * n_heads * head_dim) tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    if n_heads < 1 or qkv.shape[2] % (3 * n_heads):
        raise ValueError(f"attention_qkv: last dim {qkv.shape[2]} is not 3 * n_heads * head_dim for "
                         f"n_heads={n_heads}")


def _seed_for(dropout_p: float, seed: int | None) -> Optional[Tensor]:
    """The dropout seed as a (1,) int64 CPU tensor (drawn from torch's CPU generator when None, so
    torch.manual_seed makes runs repeat); None without dropout."""
    if seed is not None and not 0 <= int(seed) < 2**31:
        raise ValueError(f"attention: seed must be in [0, 2**31), got {seed}")
    if dropout_p > 0.0:
        return torch.randint(0, 2**31 - 1, (1,)) if seed is None else torch.tensor([int(seed)])
    return None


def attention_qkv(qkv, n_heads: int, causal: bool = True, dropout_p: float = 0.0, scale: float | None = None,
                  seed: int | None = None) -> torch.Tensor:
    """attention(*split_qkv(qkv, n_heads), ...) for the model's packed c_attn output (B, T, 3C);
    same result, and its gradient arrives as one packed (B, T, 3C) tensor. Returns (B, H, T, D)."""
    scale = None if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not torch.compiler.is_compiling():  # while tracing, the fake impl checks (on metadata)
        _check_qkv(qkv, n_heads)
        _check_inputs(*split_qkv(qkv, n_heads), causal, dropout_p, scale)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    scale = 1.0 / math.sqrt(qkv.shape[2] // (3 * n_heads)) if scale is None else scale
    return _AttentionQKV.apply(qkv, int(n_heads), bool(causal), dropout_p, scale, _seed_for(dropout_p, seed))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale: float | None = None,
              seed: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v with optional attention dropout; (B, H, Tq, D).

    q: (B, H, Tq, D); k, v: (B, H, Tk, D); fp16, bf16 or fp32; D in SUPPORTED_HEAD_DIMS; any
    strides (a last dim with stride != 1 is copied). causal needs Tq <= Tk and aligns the queries
    to the end of the keys. scale defaults to 1/sqrt(D). dropout_p > 0 drops attention
    probabilities with a Philox mask from ``seed`` (default: drawn from torch's CPU generator, so
    torch.manual_seed makes runs repeatable); dropout_mask(seed, ...) returns that mask.
    """
    scale = None if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not torch.compiler.is_compiling():  # while tracing, the fake impl checks (on metadata)
        _check_inputs(q, k, v, causal, dropout_p, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seed = _seed_for(dropout_p, seed)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _Attention.apply(q, k, v, bool(causal), dropout_p, scale, seed)


def dropout_mask(seed: int, B: int, H: int, Tq: int, Tk: int, p: float, device=None) -> torch.Tensor:
    """The bool keep-mask (B, H, Tq, Tk) that attention(..., dropout_p=p, seed=seed) applies.

    Pass it as attention_ref(..., dropout_p=p, dropout_mask=mask) to reproduce the kernel exactly.
    device defaults to CUDA when available, else the CPU (interpreter).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    mask = _alloc((B, H, Tq, Tk), torch.uint8, device)
    _check_device(mask)
    bm, bn = (32, 128) if device.type == "cuda" else (16, 32)
    _dropout_mask_kernel[(cdiv(Tq, bm), cdiv(Tk, bn), B * H)](
        mask, Tq, Tk, int(seed), float(p), BLOCK_M=bm, BLOCK_N=bn)
    return mask.view(torch.bool)
