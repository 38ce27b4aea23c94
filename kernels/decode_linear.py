"""Skinny linear layers for the decode step (M <= 64 rows), with fused prologues and epilogues.

    from gptcore.kernels import decode_linear as dl
    q = dl.ln_qkv_append(x, ln_w, ln_b, eps, w, b, k_cache, v_cache, lengths, block_table=None)
    h = dl.linear_residual(y, w, b, resid)              # resid + y @ w.T + b  (in place into resid)
    f = dl.ln_linear_gelu(h, ln_w, ln_b, eps, w, b)     # gelu_tanh(LN(h) @ w.T + b)
    tok = dl.ln_lm_head_argmax(h, ln_w, ln_b, eps, w)   # argmax(LN(h) @ w.T), ties -> lowest index
    x = dl.embed(tok, wte, wpe, lengths)                # wte[tok] + wpe[lengths]; lengths += 1

    x       (M, K) rows (unit column stride), any float dtype: the activations
    w       (N, K) an nn.Linear weight (unit column stride); bias (N,) or None
    returns (M, N) fp32 unless an `out` is given (the decode step keeps its residual stream in fp32)

At decode time a Linear multiplies a handful of rows by a big weight: the work is reading the weight
once, so the kernel is a weight-streaming GEMM. One kernel, ``_skinny_kernel``, grid (N tiles,
SPLIT_K): program (n, s) multiplies all M rows (padded to BLOCK_M >= 16 for tl.dot) by columns
[n*BLOCK_N, (n+1)*BLOCK_N) of the weight over its K range [s*K_SPLIT, (s+1)*K_SPLIT), reading each
weight element exactly once in the whole grid. Tile sizes and SPLIT_K are chosen so that a few
hundred programs stream the weight (``plan``): a narrow N (768) with a long K (3072) is split
along K, a wide N (50257) is not.

Split-K reduction, deterministic: each program writes its fp32 partial tile to a workspace
(SPLIT_K, M, N), then bumps a per-N-tile counter (an acq_rel atomic, after a CTA barrier). The
program that sees the count reach SPLIT_K - 1 -- whichever one that is -- resets the counter and
sums the SPLIT_K partials in the fixed order s = 0, 1, ... before running the epilogue: the result
is bit-identical from run to run, whatever order the programs finished in. Counters are left at
zero, so one counter buffer serves every launch of a step (launches on one stream never overlap).

Prologue (PRO_LN): LayerNorm of the input rows. Every program recomputes the row statistics
(mean, then the centred variance, fp32) from the (M, K) input, which is tiny next to the weight,
and normalises each K chunk on the fly; the normalised value is rounded to the weight's dtype
before the product, as the model's LayerNorm output is.

Epilogues (EPI): 0 store y = acc + bias; 1 GELU (tanh approximation, fp32); 2 residual add
(out = res + acc + bias; res may be out itself); 3 QKV split: columns [0, C) go to q (M, C),
columns [C, 2C) and [2C, 3C) are the new key and value, stored into the static cache at position
lengths[m] - 1 of row m, or into the paged cache through the block table; 4 greedy pick: per
(row, N tile) the largest logit (rounded to the weight's dtype first, as F.linear's output is) and
its lowest column go to a partial buffer, and the last program of the grid (a second counter)
picks each row's token: the largest value, ties to the lowest column (torch.argmax's rule; NaN is
not treated specially here).

Reference twins: the ``*_ref`` functions at the end (today's torch ops composed). Tests:
python -m pytest -q tests/test_decode_linear.py (CPU: TRITON_INTERPRET=1, fp32/fp16; bf16 and
full sizes are marked gpu). Used by gptcore/decode_step.py.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gptcore.kernels._launch import cdiv, next_pow2, planned
from gptcore.kernels.gelu import _sigmoid_2u

MAX_ROWS = 64          # rows (batch) one launch handles; BLOCK_M = next_pow2(M) >= 16
_GELU_C = math.sqrt(2.0 / math.pi)
EPI_STORE, EPI_GELU, EPI_RESIDUAL, EPI_QKV, EPI_ARGMAX = 0, 1, 2, 3, 4
_BIG = 2147483647


# ---- kernels -----------------------------------------------------------------------------------
@triton.jit
def _ln_stats(X, rows, row_ok, sxm, K, eps, BLOCK_M: tl.constexpr, BLOCK_KS: tl.constexpr):
    """(mean, rstd) (BLOCK_M,) fp32 of rows of X (M, K), in one pass over K: each chunk's own mean
    and centred sum of squares, merged into the running ones by Chan's pairwise rule (as exact as
    mean-then-centred-variance, without a second pass). Chunks are wide (BLOCK_KS): at decode time
    the passes are latency, not bytes."""
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_KS):
        ks = k0 + tl.arange(0, BLOCK_KS)
        m = row_ok[:, None] & (ks < K)[None, :]
        x = tl.load(X + rows[:, None] * sxm + ks[None, :], mask=m, other=0.0).to(tl.float32)
        n_old = k0 * 1.0
        n_c = tl.minimum(K - k0, BLOCK_KS) * 1.0
        mean_c = tl.sum(x, axis=1) / n_c
        xc = tl.where(m, x - mean_c[:, None], 0.0)
        delta = mean_c - mean
        n_new = n_old + n_c
        m2 += tl.sum(xc * xc, axis=1) + delta * delta * (n_old * n_c / n_new)
        mean += delta * (n_c / n_new)
    return mean, tl.rsqrt(m2 / K + eps)


@triton.jit
def _epilogue(acc, rows, cols, row_ok, col_ok, pid_n,
              Bias, Res, Out, Q, KC, VC, Lens, Table, PVal, PIdx,
              N, sres, sout, skb, skh, skt, skd, sbt, C, HD, capacity, num_blocks, n_tiles,
              HAS_BIAS: tl.constexpr, EPI: tl.constexpr, STORE_OUT: tl.constexpr,
              PAGE: tl.constexpr, PAGED: tl.constexpr):
    """Bias, then the EPI variant on one (BLOCK_M, BLOCK_N) fp32 tile (module doc)."""
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if EPI == 1:
        s, _e, _zc = _sigmoid_2u(acc, 0.7978845608028654)
        acc = acc * s
    if EPI == 2:
        acc += tl.load(Res + rows[:, None] * sres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if EPI == 3:
        which = cols // C                       # 0 q, 1 k, 2 v
        c = cols % C
        head = c // HD
        d = c % HD
        tl.store(Q + rows[:, None] * C + c[None, :], acc.to(Q.dtype.element_ty), mask=mask & (which == 0)[None, :])
        pos = tl.load(Lens + rows, mask=row_ok, other=1).to(tl.int64) - 1          # (BLOCK_M,)
        ok = row_ok & (pos >= 0) & (pos < capacity)
        if PAGED:
            blk = tl.load(Table + rows * sbt + pos // PAGE, mask=ok, other=-1).to(tl.int64)
            ok = ok & (blk >= 0) & (blk < num_blocks)
            base = blk * skb + (pos % PAGE) * skt
        else:
            base = rows.to(tl.int64) * skb + pos * skt
        off = base[:, None] + (head * skh + d * skd)[None, :]
        kv_ok = mask & ok[:, None]
        kv = acc.to(KC.dtype.element_ty)
        tl.store(KC + off, kv, mask=kv_ok & (which == 1)[None, :])
        tl.store(VC + off, kv, mask=kv_ok & (which == 2)[None, :])
    elif EPI == 4:
        val = acc.to(Out.dtype.element_ty)
        if STORE_OUT:
            tl.store(Out + rows[:, None] * sout + cols[None, :], val, mask=mask)
        val = tl.where(mask, val.to(tl.float32), float("-inf"))
        best = tl.max(val, axis=1)                                               # (BLOCK_M,)
        idx = tl.min(tl.where(val == best[:, None], cols[None, :], 2147483647), axis=1)
        tl.store(PVal + rows * n_tiles + pid_n, best, mask=row_ok)
        tl.store(PIdx + rows * n_tiles + pid_n, idx, mask=row_ok)
    else:
        tl.store(Out + rows[:, None] * sout + cols[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _arrive(Cnt, expected):
    """True in the program that arrives last at counter Cnt (of `expected` programs); it resets it.
    The barrier orders every thread's stores before the acq_rel atomic of the one thread doing it."""
    tl.debug_barrier()
    old = tl.atomic_add(Cnt, 1, sem="acq_rel", scope="gpu")
    last = old == expected - 1
    if last:
        tl.store(Cnt, 0)
    return last


@planned
@triton.jit(do_not_specialize=["M"])  # batch 1 and 8 share one binary (BLOCK_M decides the code)
def _skinny_kernel(X, LnW, LnB, W, Bias, Res, Out, Ws, Cnt, Q, KC, VC, Lens, Table, PVal, PIdx, Tok,
                   M, N, K, sxm, swn, sres, sout, eps,
                   skb, skh, skt, skd, sbt, C, HD, capacity, num_blocks, n_tiles,
                   K_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRO_LN: tl.constexpr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr,
                   STORE_OUT: tl.constexpr, IEEE: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_KS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if PRO_LN:
        mean, rstd = _ln_stats(X, rows, row_ok, sxm, K, eps, BLOCK_M, BLOCK_KS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    for kk in range(0, K_SPLIT, BLOCK_K):
        ks = k_lo + kk + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xm = row_ok[:, None] & k_ok[None, :]
        x = tl.load(X + rows[:, None] * sxm + ks[None, :], mask=xm, other=0.0)
        if PRO_LN:
            g = tl.load(LnW + ks, mask=k_ok, other=0.0).to(tl.float32)
            bb = tl.load(LnB + ks, mask=k_ok, other=0.0).to(tl.float32)
            xn = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + bb[None, :]
            x = tl.where(xm, xn, 0.0)
        a = x.to(W.dtype.element_ty)
        w = tl.load(W + cols[None, :].to(tl.int64) * swn + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)                                                    # (BLOCK_K, BLOCK_N)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    go = True
    if SPLIT_K > 1:
        mask = row_ok[:, None] & col_ok[None, :]
        part = rows[:, None] * N + cols[None, :]
        tl.store(Ws + pid_k * M * N + part, acc, mask=mask)
        go = _arrive(Cnt + pid_n, SPLIT_K)
        if go:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):  # fixed order: deterministic
                acc += tl.load(Ws + s * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
    if go:
        _epilogue(acc, rows, cols, row_ok, col_ok, pid_n, Bias, Res, Out, Q, KC, VC, Lens, Table, PVal, PIdx,
                  N, sres, sout, skb, skh, skt, skd, sbt, C, HD, capacity, num_blocks, n_tiles,
                  HAS_BIAS, EPI, STORE_OUT, PAGE, PAGED)
        if EPI == 4:
            # the grid's last program picks each row's token from the per-tile maxima
            if _arrive(Cnt + n_tiles, n_tiles):
                best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                pick = tl.full((BLOCK_M,), 2147483647, tl.int32)
                for t0 in range(0, n_tiles, BLOCK_T):
                    ts = t0 + tl.arange(0, BLOCK_T)
                    ok = row_ok[:, None] & (ts < n_tiles)[None, :]
                    offs = rows[:, None] * n_tiles + ts[None, :]
                    v = tl.load(PVal + offs, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    i = tl.load(PIdx + offs, mask=ok, other=2147483647, cache_modifier=".cg")
                    vb = tl.max(v, axis=1)
                    ib = tl.min(tl.where(v == vb[:, None], i, 2147483647), axis=1)
                    # chunks come in column order: a later chunk wins only with a strictly larger value
                    take = vb > best
                    pick = tl.where(take, ib, pick)
                    best = tl.where(take, vb, best)
                tl.store(Tok + rows, tl.where(pick == 2147483647, 0, pick).to(tl.int64), mask=row_ok)


@planned
@triton.jit
def _embed_kernel(Tok, Wte, Wpe, Lens, Write, Out, stok, C, sout,
                  HAS_WPE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row m: out = wte[tok[m]] + wpe[lengths[m]] (rounded to wte's dtype, as the model adds them);
    then lengths[m] += 1 and write[m] = the old length (the cache's advance(1), device part)."""
    m = tl.program_id(0)
    cs = tl.arange(0, BLOCK_C)
    ok = cs < C
    t = tl.load(Tok + m * stok).to(tl.int64)
    x = tl.load(Wte + t * C + cs, mask=ok, other=0.0)
    pos = tl.load(Lens + m)
    if HAS_WPE:
        x = (x + tl.load(Wpe + pos.to(tl.int64) * C + cs, mask=ok, other=0.0)).to(Wte.dtype.element_ty)
    tl.store(Out + m * sout + cs, x.to(Out.dtype.element_ty), mask=ok)
    tl.store(Lens + m, pos + 1)
    tl.store(Write + m, pos)


# ---- launch plans ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class Plan:
    """Tiles of one skinny GEMM: grid (n_tiles, split_k)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_split: int
    n_tiles: int
    num_warps: int
    num_stages: int


def plan(M: int, N: int, K: int, device: torch.device, block_n: int | None = None, split_k: int | None = None,
         allow_split: bool = True) -> Plan:
    """Tile sizes for (M, N, K): enough programs (about 2 per SM) to stream the weight at full
    bandwidth, split along K only when N alone gives too few. block_n / split_k override (tests).
    The rule follows a tile sweep on an H200 (bench/decode_sweep.py; bench/results/decode_sweep-*):
    64-column tiles for wide weights, 32 for narrow ones; 256-deep K steps for long K."""
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"decode_linear: {M} rows; the skinny kernels take 1..{MAX_ROWS} (use F.linear above that)")
    block_m = max(16, next_pow2(M))
    cuda = device.type == "cuda"
    block_k = min(256 if K >= 2048 and cuda else 128, max(16, next_pow2(K)))
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if cuda else 4
    if block_n is None and not cuda:
        block_n = 64  # the interpreter: fewest programs
    if block_n is None:
        block_n = 64 if N >= (1536 if M <= 16 else 3072) else 32
    n_tiles = cdiv(N, block_n)
    k_chunks = cdiv(K, block_k)
    if split_k is None:
        split_k = min(k_chunks, max(1, cdiv(target, n_tiles))) if allow_split else 1
    split_k = max(1, min(int(split_k), k_chunks))
    k_split = cdiv(k_chunks, split_k) * block_k
    split_k = cdiv(K, k_split)
    return Plan(block_m, block_n, block_k, split_k, k_split, n_tiles, 8 if block_m * block_n >= 4096 else 4, 3)


def _stats_chunk(K: int, p: Plan) -> int:
    """Columns per chunk of the LayerNorm statistics pass: as wide as 8192 fp32 values of BLOCK_M
    rows allow (few round trips to L2), never narrower than the main loop's BLOCK_K."""
    return max(p.block_k, min(next_pow2(K), 8192 // p.block_m))


class Workspace:
    """The split-K partials (fp32) and the arrival counters (int32, kept at zero between launches),
    shared by every launch of a decode step: allocate once, before a CUDA-graph capture."""

    def __init__(self, device, floats: int, counters: int):
        self.part = torch.empty(max(1, floats), dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(1, counters), dtype=torch.int32, device=device)

    def fits(self, floats: int, counters: int) -> bool:
        return floats <= self.part.numel() and counters <= self.counters.numel()


def workspace_for(device, M: int, shapes, block_n=None, split_k=None) -> Workspace:
    """A Workspace big enough for every (N, K, allow_split) in shapes at M rows."""
    floats = counters = 0
    for N, K, allow in shapes:
        p = plan(M, N, K, torch.device(device), block_n, split_k, allow)
        floats = max(floats, p.split_k * M * N, 2 * M * p.n_tiles)
        counters = max(counters, p.n_tiles + 1)
    return Workspace(device, floats, counters)


def _check(x, w, name):
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name}: x must be (M, K) and w (N, K) with the same K, got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"{name}: x and w need a unit column stride (call .contiguous())")
    if x.device != w.device:
        raise ValueError(f"{name}: x is on {x.device} but w is on {w.device}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: weight dtype {w.dtype}; float32, float16 or bfloat16 only")


def _launch(x, w, bias, out, *, epi, ws: Workspace | None, ln=None, res=None, qkv=None, pick=None,
            block_n=None, split_k=None, store_out=True):
    M, K = x.shape
    N = w.shape[0]
    p = plan(M, N, K, x.device, block_n, split_k, allow_split=epi != EPI_ARGMAX)
    if ws is None:
        ws = workspace_for(x.device, M, [(N, K, epi != EPI_ARGMAX)], block_n, split_k)
    need = max(p.split_k * M * N if p.split_k > 1 else 0, 2 * M * p.n_tiles if epi == EPI_ARGMAX else 0)
    if not ws.fits(need, p.n_tiles + 1):
        raise ValueError(f"decode_linear: workspace too small for ({M}, {N}, {K}); build it with workspace_for")
    ln_w, ln_b, eps = ln if ln is not None else (x, x, 0.0)
    dummy = ws.counters
    q = kc = vc = lens = table = dummy
    skb = skh = skt = skd = sbt = C = HD = capacity = num_blocks = 0
    page, paged = 1, False
    if qkv is not None:
        q, kc, vc, lens, table, C, HD = qkv
        skb, skh, skt, skd = kc.stride()
        paged = table is not None
        page = kc.shape[2] if paged else 1
        capacity = table.shape[1] * page if paged else kc.shape[2]
        num_blocks = kc.shape[0]
        sbt = table.stride(0) if paged else 0
        table = table if paged else lens
    pval = pidx = tok = dummy
    if pick is not None:
        tok = pick
        pval = ws.part[: M * p.n_tiles]
        pidx = ws.part[M * p.n_tiles: 2 * M * p.n_tiles].view(torch.int32)
    res_t = res if res is not None else dummy
    out_t = out if out is not None else dummy
    _skinny_kernel[(p.n_tiles, p.split_k)](
        x, ln_w, ln_b, w, bias if bias is not None else dummy, res_t, out_t, ws.part, ws.counters,
        q, kc, vc, lens, table, pval, pidx, tok,
        M, N, K, x.stride(0), w.stride(0), res.stride(0) if res is not None else 0,
        out.stride(0) if out is not None else 0, float(eps),
        skb, skh, skt, skd, sbt, C, HD, capacity, num_blocks, p.n_tiles,
        K_SPLIT=p.k_split, SPLIT_K=p.split_k, BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=p.block_k,
        PRO_LN=ln is not None, HAS_BIAS=bias is not None, EPI=epi, STORE_OUT=store_out,
        IEEE=w.dtype == torch.float32, PAGE=page, PAGED=paged, BLOCK_T=max(16, 4096 // p.block_m),
        BLOCK_KS=_stats_chunk(K, p),
        num_warps=p.num_warps, num_stages=p.num_stages,
    )


# ---- public functions --------------------------------------------------------------------------
def linear(x, w, bias=None, out=None, ws=None, **kw):
    """x @ w.T + bias -> out (M, N) (fp32 by default)."""
    _check(x, w, "linear")
    out = torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=torch.float32) if out is None else out
    _launch(x, w, bias, out, epi=EPI_STORE, ws=ws, **kw)
    return out


def linear_residual(x, w, bias, resid, out=None, ws=None, **kw):
    """resid + x @ w.T + bias -> out (default: resid itself, updated in place)."""
    _check(x, w, "linear_residual")
    out = resid if out is None else out
    _launch(x, w, bias, out, epi=EPI_RESIDUAL, ws=ws, res=resid, **kw)
    return out


def ln_linear_gelu(x, ln_w, ln_b, eps, w, bias, out=None, ws=None, **kw):
    """gelu_tanh(LN(x) @ w.T + bias) -> out (M, N), by default in w's dtype (the next Linear's input)."""
    _check(x, w, "ln_linear_gelu")
    out = torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=w.dtype) if out is None else out
    _launch(x, w, bias, out, epi=EPI_GELU, ws=ws, ln=(ln_w, ln_b, eps), **kw)
    return out


def ln_linear(x, ln_w, ln_b, eps, w, bias=None, out=None, ws=None, **kw):
    """LN(x) @ w.T + bias -> out (M, N), by default in w's dtype (F.linear's: e.g. the LM head's logits)."""
    _check(x, w, "ln_linear")
    out = torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=w.dtype) if out is None else out
    _launch(x, w, bias, out, epi=EPI_STORE, ws=ws, ln=(ln_w, ln_b, eps), **kw)
    return out


def ln_qkv_append(x, ln_w, ln_b, eps, w, bias, k_cache, v_cache, lengths, n_heads: int, block_table=None,
                  q_out=None, ws=None, **kw):
    """q = (LN(x) @ w.T + bias)[:, :C] -> (M, C) in w's dtype; the key and value parts are stored into
    the cache at position lengths[m] - 1 of row m (lengths already counts the new token).

    static: k_cache, v_cache (B >= M, H, T_max, D); paged: (num_blocks, H, block_size, D) with
    block_table (M, max_blocks)."""
    _check(x, w, "ln_qkv_append")
    M, C = x.shape[0], x.shape[1]
    if w.shape[0] != 3 * C or C % n_heads:
        raise ValueError(f"ln_qkv_append: w must be (3C, C) = ({3 * C}, {C}) with C divisible by n_heads "
                         f"{n_heads}, got {tuple(w.shape)}")
    hd = C // n_heads
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.shape[1] != n_heads \
            or k_cache.shape[3] != hd:
        raise ValueError(f"ln_qkv_append: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} must be alike "
                         f"(same strides) with {n_heads} heads of {hd}")
    if lengths.shape[0] < M or (block_table is None and k_cache.shape[0] < M):
        raise ValueError(f"ln_qkv_append: lengths and a static cache need >= {M} rows")
    if block_table is not None and (block_table.shape[0] < M or block_table.stride(1) != 1):
        raise ValueError("ln_qkv_append: block_table must be (>= M, max_blocks) with a unit column stride")
    if block_table is not None and k_cache.shape[2] & (k_cache.shape[2] - 1):
        raise ValueError(f"ln_qkv_append: block_size must be a power of two, got {k_cache.shape[2]}")
    q = torch.empty((M, C), device=x.device, dtype=w.dtype) if q_out is None else q_out
    _launch(x, w, bias, None, epi=EPI_QKV, ws=ws, ln=(ln_w, ln_b, eps),
            qkv=(q, k_cache, v_cache, lengths, block_table, C, hd), **kw)
    return q


def ln_lm_head_argmax(x, ln_w, ln_b, eps, w, tok_out=None, logits_out=None, ws=None, **kw):
    """argmax over columns of LN(x) @ w.T (ties: lowest column) -> (M,) int64; with logits_out the
    logits (M, N) are stored too (in its dtype)."""
    _check(x, w, "ln_lm_head_argmax")
    tok = torch.empty(x.shape[0], device=x.device, dtype=torch.int64) if tok_out is None else tok_out
    if tok.dtype != torch.int64 or tok.numel() < x.shape[0]:
        raise ValueError("ln_lm_head_argmax: tok_out must be int64 with a slot per row")
    if logits_out is None:
        logits_out, store = torch.empty(1, device=x.device, dtype=w.dtype), False
    else:
        store = True
    _launch(x, w, None, logits_out, epi=EPI_ARGMAX, ws=ws, ln=(ln_w, ln_b, eps), pick=tok, store_out=store, **kw)
    return tok


def embed(tok, wte, wpe, lengths, write=None, out=None):
    """wte[tok[m]] + wpe[lengths[m]] -> out (M, C) (fp32 by default), then lengths += 1 (write, if
    given, gets the old lengths). tok (M,) or (M, 1) int; wpe None for models without learned
    positions."""
    M, C = tok.shape[0], wte.shape[1]
    out = torch.empty((M, C), device=wte.device, dtype=torch.float32) if out is None else out
    write = lengths if write is None else write
    if write is lengths:
        write = torch.empty_like(lengths)
    _embed_kernel[(M,)](tok, wte, wpe if wpe is not None else wte, lengths, write, out, tok.stride(0), C,
                        out.stride(0), HAS_WPE=wpe is not None, BLOCK_C=next_pow2(C), num_warps=4)
    return out


# ---- reference twins (today's ops composed) ----------------------------------------------------
def _ln(x, ln_w, ln_b, eps, dtype):
    return F.layer_norm(x.to(dtype), (x.shape[-1],), ln_w, ln_b, eps)


def linear_ref(x, w, bias=None):
    return F.linear(x.to(w.dtype), w, bias)


def linear_residual_ref(x, w, bias, resid):
    return resid + F.linear(x.to(w.dtype), w, bias).to(resid.dtype)


def ln_linear_gelu_ref(x, ln_w, ln_b, eps, w, bias):
    return F.gelu(F.linear(_ln(x, ln_w, ln_b, eps, w.dtype), w, bias), approximate="tanh")


def ln_linear_ref(x, ln_w, ln_b, eps, w, bias=None):
    return F.linear(_ln(x, ln_w, ln_b, eps, w.dtype), w, bias)


def ln_qkv_append_ref(x, ln_w, ln_b, eps, w, bias, k_cache, v_cache, lengths, n_heads, block_table=None):
    """The same: q (M, C), and k, v stored into the cache in place (Python indexing)."""
    M, C = x.shape
    hd = C // n_heads
    qkv = F.linear(_ln(x, ln_w, ln_b, eps, w.dtype), w, bias)
    q, k, v = qkv.view(M, 3, n_heads, hd).unbind(1)
    for m in range(M):
        pos = int(lengths[m]) - 1
        if block_table is None:
            k_cache[m, :, pos] = k[m].to(k_cache.dtype)
            v_cache[m, :, pos] = v[m].to(v_cache.dtype)
        else:
            page = k_cache.shape[2]
            blk = int(block_table[m, pos // page])
            k_cache[blk, :, pos % page] = k[m].to(k_cache.dtype)
            v_cache[blk, :, pos % page] = v[m].to(v_cache.dtype)
    return q.reshape(M, C)


def ln_lm_head_argmax_ref(x, ln_w, ln_b, eps, w):
    return F.linear(_ln(x, ln_w, ln_b, eps, w.dtype), w).argmax(dim=-1)


def embed_ref(tok, wte, wpe, lengths):
    x = wte[tok.reshape(-1)]
    if wpe is not None:
        x = x + wpe[lengths]
    return x
