"""Decode attention in Triton: one new query per sequence over a long KV cache (flash-decoding).

    from gptcore.kernels.decode_attention import decode_attention
    y = decode_attention(q, k_cache, v_cache, lengths)                       # static cache
    y = decode_attention(q, k_cache, v_cache, lengths, block_table=table)    # paged cache

    q        (B, H, 1, D) or (B, H, D)
    static   k_cache, v_cache (B, H, T_max, D), any strides (e.g. views of a bigger buffer)
    paged    k_cache, v_cache (num_blocks, H, block_size, D); block_table (B, max_blocks) int32/int64:
             key t of sequence b sits in block block_table[b, t // block_size], slot t % block_size
    lengths  (B,) int32/int64: sequence b attends to its keys 0 .. lengths[b]-1 (clamped to the
             cache's capacity; a sequence of length 0 gets a zero output)
    returns  q's shape and dtype

With one query row there is no matrix product worth a tensor core, and one program per
(sequence, head) would leave most of the GPU idle at small batch. So the keys are split:
  _split_kernel    grid (B*H, S): program (bh, s) streams keys [s*L, (s+1)*L) of its sequence in
                   tiles of BLOCK_N rows with an online softmax (fp32, base 2) and writes its
                   partial result: unnormalised output acc, running max m and sum l.
  _combine_kernel  grid (B*H,): rescales the S partials to the largest m and normalises:
                   out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
With ``counters`` (the fused decode step passes them) there is no combine launch: the split of each
(sequence, head) that finishes last, told by an arrival counter, combines the partials in the fixed
split order (deterministic). With S == 1 the split kernel normalises and writes the output itself. S depends only on shapes
(batch, heads, capacity, GPU size), never on lengths, so one launch configuration serves every
decode step and the kernels can be captured in a CUDA graph. Tiles past a sequence's length load
nothing (fully masked). Reads are bounds-safe: keys past lengths[b] and keys in a block id outside
[0, num_blocks) are masked, never loaded.

Reference twin: gptcore.kernels.reference.decode_attention_ref. Tests: tests/test_generate.py
(CPU: TRITON_INTERPRET=1). Benchmark: python -m bench.generate (decode-attention GB/s).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gptcore.kernels._launch import cdiv, next_pow2, planned
from gptcore.kernels._rows import persistent_programs
from gptcore.kernels.decode_linear import _arrive

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@planned
@triton.jit
def _split_kernel(Q, K, V, Lens, BlockTable, Out, PartAcc, PartMax, PartSum, KNew, VNew, Cnt,
                  sqb, sqh, sqd,            # Q: (B, H, D) strides
                  snb, snh, snd,            # KNew, VNew: (B, H, D) strides (unused unless APPEND)
                  skb, skh, skt, skd,       # K: static (B, H, T, D) / paged (NB, H, PAGE, D) strides
                  svb, svh, svt, svd,       # V: like K
                  sbt,                      # BlockTable: (B, max_blocks) row stride
                  sob, soh, sod,            # Out: (B, H, D) strides
                  H, D, capacity, num_blocks, qk_scale,
                  SPLIT_LEN: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, APPEND: tl.constexpr,
                  FUSED_COMBINE: tl.constexpr = False, BLOCK_S: tl.constexpr = 1):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    length = tl.minimum(tl.load(Lens + b).to(tl.int32), capacity)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    # Scores in base 2: (q . k) * scale * log2(e), so exp2 below is the softmax's exp.
    q = tl.load(Q + b * sqb + h * sqh + offs_d * sqd, mask=mask_d, other=0.0).to(tl.float32) * qk_scale
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    k_head = K + h * skh
    v_head = V + h * svh
    if APPEND:
        # The new key/value is key length-1. The program whose split holds that position stores
        # it into the cache and uses it from registers in place of the (stale) cached row.
        pos = length - 1
        k_new = tl.load(KNew + b * snb + h * snh + offs_d * snd, mask=mask_d, other=0.0)
        v_new = tl.load(VNew + b * snb + h * snh + offs_d * snd, mask=mask_d, other=0.0)
        if (pos >= start) & (pos < start + SPLIT_LEN):
            if PAGED:
                # the block id as a vector, so the bounds test is an elementwise mask like mask_d
                pblk = tl.load(BlockTable + b * sbt + pos // PAGE + offs_d * 0).to(tl.int64)
                ok = mask_d & (pblk >= 0) & (pblk < num_blocks)
                pk = pblk * skb + (pos % PAGE) * skt
                pv = pblk * svb + (pos % PAGE) * svt
            else:  # 0 <= start <= pos < capacity here
                ok = mask_d
                pk = b.to(tl.int64) * skb + pos * skt
                pv = b.to(tl.int64) * svb + pos * svt
            tl.store(k_head + pk + offs_d * skd, k_new.to(K.dtype.element_ty), mask=ok)
            tl.store(v_head + pv + offs_d * svd, v_new.to(V.dtype.element_ty), mask=ok)
    # A fixed trip count (tiles past `end` are fully masked: no loads) keeps the loop static.
    for tile in range(SPLIT_LEN // BLOCK_N):
        offs_n = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        if PAGED:
            blk = tl.load(BlockTable + b * sbt + offs_n // PAGE, mask=valid, other=0).to(tl.int64)
            valid = valid & (blk >= 0) & (blk < num_blocks)
            slot = offs_n % PAGE
            k_rows = blk * skb + slot * skt
            v_rows = blk * svb + slot * svt
        else:
            k_rows = b.to(tl.int64) * skb + offs_n * skt
            v_rows = b.to(tl.int64) * svb + offs_n * svt
        tile_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :] * skd, mask=tile_mask, other=0.0)
        if APPEND:
            k = tl.where((offs_n == pos)[:, None], k_new.to(k.dtype)[None, :], k)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)            # (BLOCK_N,)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)         # a tile with no valid key
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :] * svd, mask=tile_mask, other=0.0)
        if APPEND:
            v = tl.where((offs_n == pos)[:, None], v_new.to(v.dtype)[None, :], v)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)
        tl.store(Out + b * sob + h * soh + offs_d * sod, out.to(Out.dtype.element_ty), mask=mask_d)
    else:
        part = pid_bh * NUM_SPLITS + split
        tl.store(PartAcc + part * BLOCK_D + offs_d, acc)
        tl.store(PartMax + part, m_i)
        tl.store(PartSum + part, l_i)
        if FUSED_COMBINE:
            # the split that finishes last for this (sequence, head) combines them all (decode_linear's
            # arrival counter: a fixed combine order, so the result does not depend on who is last)
            if _arrive(Cnt + pid_bh, NUM_SPLITS):
                _combine(PartAcc, PartMax, PartSum, Out, pid_bh, sob, soh, sod, H, D, NUM_SPLITS, BLOCK_S, BLOCK_D)


@triton.jit
def _combine(PartAcc, PartMax, PartSum, Out, pid_bh, sob, soh, sod, H, D,
             NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program pid_bh's output from its NUM_SPLITS partials (loads bypass L1: other programs wrote them)."""
    b = pid_bh // H
    h = pid_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    base = pid_bh * NUM_SPLITS + offs_s
    m = tl.load(PartMax + base, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(PartSum + base, mask=mask_s, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))     # (BLOCK_S,), 0 for empty splits
    acc = tl.load(PartAcc + base[:, None] * BLOCK_D + offs_d[None, :], mask=mask_s[:, None], other=0.0,
                  cache_modifier=".cg")
    num = tl.sum(w[:, None] * acc, axis=0)
    den = tl.sum(w * l, axis=0)
    out = num / tl.where(den > 0.0, den, 1.0)
    tl.store(Out + b * sob + h * soh + offs_d * sod, out.to(Out.dtype.element_ty), mask=offs_d < D)


@planned
@triton.jit
def _combine_kernel(PartAcc, PartMax, PartSum, Out,  # partials: (B*H, S, BLOCK_D), (B*H, S), (B*H, S)
                    sob, soh, sod, H, D,
                    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    _combine(PartAcc, PartMax, PartSum, Out, tl.program_id(0), sob, soh, sod, H, D, NUM_SPLITS, BLOCK_S, BLOCK_D)


def plan_splits(batch_heads: int, capacity: int, device: torch.device, block_n: int,
                num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, split_len): about twelve programs per SM (a memory-bound kernel wants many warps
    in flight), each a whole number of BLOCK_N tiles; one split on the CPU unless asked.

    Twelve, not four: in bench/sweep_decode.py (GPT-2 heads, bf16, CUDA graph) the splits twelve
    programs per SM give beat the fewer, longer ones four give at batch 8 and 32; at batch 1 both
    give every tile its own program. Rerun the sweep to retune on another GPU."""
    tiles = max(1, cdiv(capacity, block_n))
    if num_splits is None:
        if device.type == "cuda":
            want = persistent_programs(device, 12)
            num_splits = cdiv(want, max(1, batch_heads))
        else:
            num_splits = 1
    num_splits = max(1, min(int(num_splits), tiles))
    split_len = cdiv(tiles, num_splits) * block_n
    return cdiv(capacity, split_len), split_len


def _check(q, k_cache, v_cache, lengths, block_table):
    if q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"decode_attention: q must hold one query per sequence, (B, H, 1, D); got "
                             f"{tuple(q.shape)} (use the attention kernel for several queries)")
    elif q.dim() != 3:
        raise ValueError(f"decode_attention: q must be (B, H, 1, D) or (B, H, D), got {tuple(q.shape)}")
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("lengths", lengths)):
        if t.device != q.device:
            raise ValueError(f"decode_attention: {name} is on {t.device} but q is on {q.device}; "
                             f"move it with .to(q.device)")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"decode_attention: q, k_cache, v_cache must share a dtype; got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: k_cache and v_cache must be 4-D and alike, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[1] != H or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: cache {tuple(k_cache.shape)} does not match q's heads {H} "
                         f"and head_dim {D}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head_dim {D} > {MAX_HEAD_DIM} is not supported")
    if lengths.shape != (B,) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: lengths must be (B,) = ({B},) int32/int64, got "
                         f"{tuple(lengths.shape)} {lengths.dtype}")
    if block_table is None:
        if k_cache.shape[0] != B:
            raise ValueError(f"decode_attention: static cache batch {k_cache.shape[0]} != q's batch {B}")
    else:
        if block_table.device != q.device:
            raise ValueError(f"decode_attention: block_table is on {block_table.device} but q is on {q.device}")
        if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"decode_attention: block_table must be (B, max_blocks) int32/int64 with B = {B}, "
                             f"got {tuple(block_table.shape)} {block_table.dtype}")
        if block_table.stride(1) != 1:
            raise ValueError("decode_attention: block_table must have a contiguous last dim")
        page = k_cache.shape[2]
        if page & (page - 1):
            raise ValueError(f"decode_attention: block_size must be a power of two, got {page}")


def decode_attention(q, k_cache, v_cache, lengths, block_table=None, scale=None, num_splits=None,
                     k_new=None, v_new=None, counters=None, out=None):
    """softmax(q K^T * scale) V over keys 0..lengths[b]-1 of each sequence; see the module doc.

    With k_new and v_new (q's shape and dtype) the kernel first makes them key/value lengths[b]-1
    of each sequence: stored into the cache there (the caller has already counted them in
    lengths) and attended to, in the same launch, instead of a separate append kernel.
    counters: an int32 tensor of >= B*H zeros (left at zero); with it the split kernel combines its
    own partials (the last split of each head to finish does it) and no combine kernel runs.
    out: a (B, H, D) tensor of q's dtype to write into (default: a new one).
    """
    _check(q, k_cache, v_cache, lengths, block_table)
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    append = k_new is not None or v_new is not None
    if append:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t is None or t.shape != q.shape or t.dtype != k_cache.dtype or t.device != q.device:
                raise ValueError(f"decode_attention: {name} must be given with the other and match q's shape "
                                 f"{tuple(q.shape)}, device and the cache's dtype {k_cache.dtype}; got "
                                 f"{None if t is None else (tuple(t.shape), t.dtype, str(t.device))}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q3 = q.reshape(B, H, D) if q.dim() == 4 else q  # a view for (B, H, 1, D)
    kn = k_new.reshape(B, H, D) if append else q3
    vn = v_new.reshape(B, H, D) if append else q3
    if append and kn.stride() != vn.stride():
        vn = vn.contiguous()
        kn = kn.contiguous()
    lengths = lengths.contiguous()
    if out is None:
        out = torch.empty((B, H, D), device=q.device, dtype=q.dtype)
    elif out.shape != (B, H, D) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"decode_attention: out must be ({B}, {H}, {D}) {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if counters is not None and (counters.dtype != torch.int32 or counters.numel() < B * H):
        raise ValueError(f"decode_attention: counters must be >= {B * H} int32 zeros")
    paged = block_table is not None
    page = k_cache.shape[2] if paged else 1
    capacity = block_table.shape[1] * page if paged else k_cache.shape[2]
    BLOCK_N = 64 if D <= 64 else 32
    BLOCK_D = next_pow2(D)
    splits, split_len = plan_splits(B * H, capacity, q.device, BLOCK_N, num_splits)
    if splits > 1:
        part_acc = torch.empty((B * H, splits, BLOCK_D), device=q.device, dtype=torch.float32)
        part_max = torch.empty((B * H, splits), device=q.device, dtype=torch.float32)
        part_sum = torch.empty((B * H, splits), device=q.device, dtype=torch.float32)
    else:
        part_acc = part_max = part_sum = out  # unused when there is one split
    bt = block_table if paged else lengths  # a placeholder pointer when static
    fused = counters is not None and splits > 1
    _split_kernel[(B * H, splits)](
        q3, k_cache, v_cache, lengths, bt, out, part_acc, part_max, part_sum, kn, vn,
        counters if fused else lengths,
        *q3.stride(), *kn.stride(), *k_cache.stride(), *v_cache.stride(), bt.stride(0) if paged else 0, *out.stride(),
        H, D, capacity, k_cache.shape[0], scale * LOG2E,
        SPLIT_LEN=split_len, NUM_SPLITS=splits, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PAGE=page, PAGED=paged,
        APPEND=append, FUSED_COMBINE=fused, BLOCK_S=next_pow2(splits), num_warps=4,
    )
    if splits > 1 and not fused:
        _combine_kernel[(B * H,)](
            part_acc, part_max, part_sum, out, *out.stride(), H, D,
            NUM_SPLITS=splits, BLOCK_S=next_pow2(splits), BLOCK_D=BLOCK_D, num_warps=4,
        )
    return out.view(q.shape)
