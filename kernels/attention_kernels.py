"""The Triton kernels of gptcore.kernels.attention (flash attention, forward and backward).

What each kernel does, and the conventions they share (causal alignment, strides, Philox dropout,
TMA descriptors), are in gptcore.kernels.attention's header; its launchers (_forward, _backward,
dropout_mask) are the only callers. Kept apart so the jit code reads as one piece.

Tests: tests/test_attention.py (CPU: TRITON_INTERPRET=1, small shapes).
"""
import triton
import triton.language as tl

from gptcore.kernels._launch import planned


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
