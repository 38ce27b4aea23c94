"""LayerNorm over the last dim, optionally fused with the residual add, as Triton kernels.

    y = layer_norm(x, weight, bias, eps)                  # y = LN(x)
    y, h = layer_norm(x, weight, bias, eps, residual=r)   # h = x + r, y = LN(h): one pass

Forward (``_ln_fwd_kernel``): each program normalises BLOCK_M whole rows held in registers
(BLOCK_M > 1 for narrow rows, so every program moves a few thousand elements). Statistics are
fp32 whatever the input dtype; per-row mean and rstd (M,) fp32 are kept for the backward.
Backward (``_ln_bwd_kernel``): a persistent grid of a few programs per SM; each walks its own
contiguous run of rows once, reading the saved input and dy, writing dx (and d residual) and
accumulating dweight/dbias in fp32 registers. Each program writes its partial sums to one row
of a (programs, N) fp32 buffer; one small kernel (_rows.sum_partials) sums those in a fixed
order and casts to the parameters' dtypes: no atomics, so dweight and dbias are bit-identical
from run to run.

Gradients with residual: h feeds y and is also returned, so dh_total = dh (flowing into the
returned h) + dLN/dh; d x = d residual = dh_total (one tensor when x and residual share a dtype).

Limits and layout:
- row width N from 1 to MAX_WIDTH = 16384 elements (a row must fit in one program's registers;
  wider rows raise an error naming the limit); any number of rows; leading dims flattened.
  Tuned for N <= 8192; above that the backward spills registers to local memory (correct, slower).
- float32, float16, bfloat16 inputs, any mix among x, residual, weight, bias. h and y have the
  dtype of x + residual (x's dtype without residual); ``out_dtype`` gives y another (the model
  asks for autocast's dtype: the next Linear then needs no cast, and dy arrives in it);
  dweight/dbias have the parameter's dtype.
- CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
- Inputs are read in place through a row stride; a tensor whose last dim is not unit-stride, or
  whose leading dims cannot be flattened to one row stride, is copied once (.contiguous()).

Tests: python -m pytest -q tests/test_layer_norm.py     Bench: python -m bench.kernels_norm
"""
from __future__ import annotations

import dataclasses
import functools

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gptcore.kernels._launch import cdiv, next_pow2, planned
from gptcore.kernels._oplib import launcher_op

from gptcore.kernels._rows import as_rows, check_out_dtype, check_tensor, persistent_programs, sum_partials

MAX_WIDTH = 16384  # widest row (elements) one program normalises in registers
# Elements per program tile: rows are stacked until a tile holds about this many. 2048 won a sweep of
# tile size, warps, stages and programs per SM on an H100 (bf16, 16384 rows, widths 768-4096).
_TILE = 2048


@triton.jit
def _row_mean(row_sums, N):
    """row_sums / N, correctly rounded. A plain fp32 `/` compiles to the GPU's approximate
    division (up to 2 ulp): at width 1 that leaves x - mean and dy - mean(dy) a few ulp off 0,
    which rstd = 1/sqrt(eps) then blows up. Per-row, so the exact division costs nothing."""
    return tl.math.div_rn(row_sums, tl.zeros_like(row_sums) + N)


@planned
@triton.jit(do_not_specialize=["M"])
def _ln_fwd_kernel(
    X,  # (M, N) rows at stride_x, unit column stride
    R,  # (M, N) residual rows at stride_r (unused unless HAS_RES)
    W,  # (N,) weight (unused unless HAS_W)
    B,  # (N,) bias (unused unless HAS_B)
    Y,  # (M, N) contiguous output
    H,  # (M, N) contiguous x + residual (unused unless HAS_RES)
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    M,
    N,
    stride_x,
    stride_r,
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_N)
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)  # round as stored, so y is exactly LN(returned h)
        tl.store(H + rows64[:, None] * N + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    mean = _row_mean(tl.sum(x, axis=1), N)  # (BLOCK_M,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = _row_mean(tl.sum(xc * xc, axis=1), N)
    rstd = tl.rsqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_load(X, DY, DH, MEAN, RSTD, rows, cols, col_ok, M, stride_x, stride_dy, stride_dh, HAS_DH: tl.constexpr):
    """One backward step's inputs for rows (BLOCK_M,) as fp32; rows >= M load nothing (zeros)."""
    row_ok = rows < M
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DH:
        dh = tl.load(DH + rows64[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        dh = x
    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    return x, dy, dh, mean, rstd


@planned
@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _ln_bwd_kernel(
    X,  # (M, N) saved LN input (x, or h = x + residual) at stride_x
    W,  # (N,) weight (unused unless HAS_W)
    DY,  # (M, N) grad of y at stride_dy
    DH,  # (M, N) grad flowing into the returned h at stride_dh (unused unless HAS_DH)
    DX,  # (M, N) contiguous out: grad of x
    DRES,  # (M, N) contiguous out: grad of residual in its own dtype (unused unless HAS_DRES)
    DW_PART,  # (programs, N) fp32 out: per-program sums of dy * xhat (unused unless HAS_W)
    DB_PART,  # (programs, N) fp32 out: per-program sums of dy (unused unless HAS_B)
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    M,
    N,
    stride_x,
    stride_dy,
    stride_dh,
    rows_per_prog,  # a multiple of BLOCK_M
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # PREFETCH: each step loads the next step's rows before its own math, so those loads are in
    # flight during the row reductions instead of the SM waiting on DRAM at the top of every step
    # (768-wide bf16 rows on an H100: 44 -> 36 us, bench/results/kernels_norm-sweep-bwd-*.jsonl).
    # With dh (the fused residual) the extra registers cost more than the overlap gains there.
    rows = row_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    x, dy, dh, mean, rstd = _ln_bwd_load(X, DY, DH, MEAN, RSTD, rows, cols, col_ok, M, stride_x, stride_dy,
                                         stride_dh, HAS_DH)
    for r0 in range(0, rows_per_prog, BLOCK_M):
        # the next step's rows (past this program's run: masked, no loads; the last step's is idle)
        nrows = tl.where(r0 + BLOCK_M < rows_per_prog, rows + BLOCK_M, M)
        if PREFETCH:
            nx, ndy, ndh, nmean, nrstd = _ln_bwd_load(X, DY, DH, MEAN, RSTD, nrows, cols, col_ok, M, stride_x,
                                                      stride_dy, stride_dh, HAS_DH)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            # The select keeps dy * w rounded once: fused into an FMA in `wdy - c2` below it would
            # be exact there but rounded inside c2, and at width 1 (xhat = 0, rstd = 1/sqrt(eps))
            # that half-ulp gap comes out ~300x larger instead of dx = 0.
            wdy = tl.where(mask, dy * w[None, :], 0.0)
            dw_acc += dy * xhat
        else:
            wdy = dy
        if HAS_B:
            db_acc += dy
        c1 = _row_mean(tl.sum(xhat * wdy, axis=1), N)  # (BLOCK_M,)
        c2 = _row_mean(tl.sum(wdy, axis=1), N)
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += dh
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DRES:
            tl.store(DRES + rows64[:, None] * N + cols[None, :], dx.to(DRES.dtype.element_ty), mask=mask)
        rows = nrows
        if PREFETCH:
            x, dy, dh, mean, rstd = nx, ndy, ndh, nmean, nrstd
        else:
            x, dy, dh, mean, rstd = _ln_bwd_load(X, DY, DH, MEAN, RSTD, rows, cols, col_ok, M, stride_x,
                                                 stride_dy, stride_dh, HAS_DH)
    if HAS_W:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one LayerNorm kernel is launched for a row width (the sweep in bench/ overrides these)."""

    block_m: int  # rows per program step
    block_n: int  # power of two >= N: a whole row per program
    num_warps: int
    num_stages: int = 1  # backward only: software pipelining of its row loop
    programs_per_sm: int = 0  # backward only: persistent grid size
    prefetch_with_dh: bool = False  # backward only: prefetch rows also when dh is read (plain LN always does)


@functools.lru_cache(maxsize=None)  # per call on the hot path; a pure function of n
def fwd_config(n: int) -> LaunchConfig:
    """Forward launch for rows of width n: whole rows, ~_TILE elements a program, 512 elements a
    warp. Depends on n only, so the row count never triggers a recompile."""
    block_n = max(16, next_pow2(n))
    block_m = max(1, _TILE // block_n)
    num_warps = min(max(block_m * block_n // 512, 1), 16)
    return LaunchConfig(block_m, block_n, num_warps)


@functools.lru_cache(maxsize=None)
def bwd_config(n: int) -> LaunchConfig:
    """Backward launch for rows of width n: the forward's tile on a persistent grid, at least 4
    warps; 4 programs per SM up to 2048-wide rows, 2 above (more per SM thrash L1/L2 there)."""
    c = fwd_config(n)
    if c.block_n >= 16384:
        # the widest rows: x, dy, w and two accumulators per thread; 32 warps halve the spills
        return dataclasses.replace(c, num_warps=32, programs_per_sm=2)
    return dataclasses.replace(c, num_warps=max(4, c.num_warps), programs_per_sm=4 if c.block_n <= 2048 else 2)


def _forward(x2, r2, weight, bias, eps: float, out_shape, h_dtype, y_dtype=None):
    """x2, r2: (M, N) row views -> y (out_shape, y_dtype or h_dtype), h (out_shape or None), mean,
    rstd (M,) fp32."""
    M, N = x2.shape
    dev = x2.device
    y = torch.empty(out_shape, dtype=y_dtype or h_dtype, device=dev)
    h = torch.empty(out_shape, dtype=h_dtype, device=dev) if r2 is not None else None
    mean = torch.empty(M, dtype=torch.float32, device=dev)
    rstd = torch.empty(M, dtype=torch.float32, device=dev)
    if M == 0:
        return y, h, mean, rstd
    cfg = fwd_config(N)
    _ln_fwd_kernel[(cdiv(M, cfg.block_m),)](
        x2, x2 if r2 is None else r2, x2 if weight is None else weight, x2 if bias is None else bias,
        y, y if h is None else h, mean, rstd,
        M, N, x2.stride(0), 0 if r2 is None else r2.stride(0), eps,
        HAS_RES=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
    )
    return y, h, mean, rstd


def _backward(dy2, dh2, x2, weight, bias_dtype, mean, rstd, out_shape, dx_dtype, dres_dtype):
    """Grads of LN(x2) (+ dh2 when the residual sum was returned). x2 is the saved LN input.

    Returns dx (out_shape, dx_dtype), dres (out_shape, dres_dtype; None when it would equal dx),
    dweight (weight's dtype) and dbias (bias_dtype), None when absent.
    """
    M, N = x2.shape
    dev = x2.device
    dx = torch.empty(out_shape, dtype=dx_dtype, device=dev)
    dres = None
    if dres_dtype is not None and dres_dtype != dx_dtype:
        dres = torch.empty(out_shape, dtype=dres_dtype, device=dev)
    has_w, has_b = weight is not None, bias_dtype is not None
    if M == 0:
        zeros = lambda dt: torch.zeros(N, dtype=dt, device=dev)
        return dx, dres, zeros(weight.dtype) if has_w else None, zeros(bias_dtype) if has_b else None
    cfg = bwd_config(N)
    blocks = cdiv(M, cfg.block_m)
    programs = min(blocks, persistent_programs(dev, cfg.programs_per_sm))
    rows_per_prog = cdiv(blocks, programs) * cfg.block_m
    programs = cdiv(M, rows_per_prog)  # every program gets at least one row
    # per-program partial sums: part[0] of dweight (or of dbias when there is no weight), part[-1] of dbias
    part = torch.empty((has_w + has_b, programs, N), dtype=torch.float32, device=dev) if has_w or has_b else None
    dw_part = part[0] if has_w else None
    db_part = part[-1] if has_b else None
    _ln_bwd_kernel[(programs,)](
        x2, x2 if weight is None else weight, dy2, dy2 if dh2 is None else dh2,
        dx, dx if dres is None else dres,
        dx if dw_part is None else dw_part, dx if db_part is None else db_part,
        mean, rstd,
        M, N, x2.stride(0), dy2.stride(0), 0 if dh2 is None else dh2.stride(0), rows_per_prog,
        HAS_W=has_w, HAS_B=has_b, HAS_DH=dh2 is not None, HAS_DRES=dres is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PREFETCH=dh2 is None or cfg.prefetch_with_dh,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if part is None:
        return dx, dres, None, None
    sums = sum_partials(part, ([weight.dtype] if has_w else []) + ([bias_dtype] if has_b else []))
    return dx, dres, sums[0] if has_w else None, sums[-1] if has_b else None


# ---- launcher ops (kernels/_oplib.py): the launchers above, callable eagerly or traced ---------------
def _fwd_launcher(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float, out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (..., N) [+ residual] -> y (x's shape; out_dtype, default that of x + residual), h = x +
    residual (None without one), mean, rstd (M,) fp32."""
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return _forward(as_rows(x), None if residual is None else as_rows(residual), _vec(weight), _vec(bias), eps,
                    x.shape, h_dtype, out_dtype)


def _fwd_fake(x, residual, weight, bias, eps, out_dtype):
    _check(x, weight, bias, residual, out_dtype)
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    m = math.prod(x.shape[:-1])
    f32 = dict(dtype=torch.float32)
    h = x.new_empty(0) if residual is None else x.new_empty(x.shape, dtype=h_dtype)
    return x.new_empty(x.shape, dtype=out_dtype or h_dtype), h, x.new_empty(m, **f32), x.new_empty(m, **f32)


def _bwd_launcher(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                  bias_dtype: Optional[torch.dtype], mean: Tensor, rstd: Tensor, x_dtype: torch.dtype,
                  res_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dx (x's shape, x_dtype), d residual (res_dtype; None when it equals dx), d weight, d bias
    (None when absent). x: the saved LN input (x itself, or h); dh: the gradient into returned h."""
    return _backward(as_rows(dy), None if dh is None else as_rows(dh), as_rows(x), _vec(weight), bias_dtype,
                     mean, rstd, x.shape, x_dtype, res_dtype)


def _bwd_fake(dy, dh, x, weight, bias_dtype, mean, rstd, x_dtype, res_dtype):
    dres = dy.new_empty(0) if res_dtype is None or res_dtype == x_dtype else x.new_empty(x.shape, dtype=res_dtype)
    dw = dy.new_empty(0) if weight is None else weight.new_empty(weight.shape)
    db = dy.new_empty(0) if bias_dtype is None else x.new_empty(x.shape[-1], dtype=bias_dtype)
    return x.new_empty(x.shape, dtype=x_dtype), dres, dw, db


_fwd_op = launcher_op("gptcore::layer_norm_fwd", _fwd_launcher, _fwd_fake)
_bwd_op = launcher_op("gptcore::layer_norm_bwd", _bwd_launcher, _bwd_fake)


def _vec(p: Optional[Tensor]) -> Optional[Tensor]:
    """A weight/bias as the kernels index it: (N,) contiguous."""
    return None if p is None else p.contiguous()


class _LayerNorm(torch.autograd.Function):
    """The one autograd path of the op, eager and compiled (kernels/_oplib.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, out_dtype):
        y, h, mean, rstd = _fwd_op(x, residual, weight, bias, eps, out_dtype)
        # The backward needs LN's input: x itself, or the h this kernel just wrote.
        ctx.save_for_backward(x if residual is None else h, weight, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.x_dtype = x.dtype
        ctx.res_dtype = None if residual is None else residual.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y if residual is None else (y, h)

    @staticmethod
    def backward(ctx, dy, dh=None):
        x, weight, mean, rstd = ctx.saved_tensors
        if dy is None and dh is None:
            return None, None, None, None, None, None
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dres, dw, db = _bwd_op(dy, dh, x, weight, ctx.bias_dtype, mean, rstd, ctx.x_dtype, ctx.res_dtype)
        need = ctx.needs_input_grad
        if ctx.res_dtype is None:
            dres = None
        elif ctx.res_dtype == ctx.x_dtype:
            dres = dx  # d x = d residual: one tensor serves both (as autograd does for x + r)
        return (dx, dw if weight is not None and need[1] else None,
                db if ctx.bias_dtype is not None and need[2] else None, dres, None, None)


def _check(x, weight, bias, residual, out_dtype=None) -> None:
    op = "gptcore layer_norm"
    check_tensor(x, "x", op)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dim (the normalised row), got a scalar")
    n = x.shape[-1]
    if not 1 <= n <= MAX_WIDTH:
        raise ValueError(
            f"{op}: row width {n} is outside the supported 1..{MAX_WIDTH} (MAX_WIDTH: a row must fit "
            f"in one program's registers); use backend='torch' (F.layer_norm) for wider rows"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(p, name, op, x.device)
            if p.shape != (n,):
                raise ValueError(f"{op}: {name} must have shape ({n},) to match x's last dim, got {tuple(p.shape)}")
    if residual is not None:
        check_tensor(residual, "residual", op, x.device)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual shape {tuple(residual.shape)} must equal x's {tuple(x.shape)}")
    check_out_dtype(out_dtype, op)


def layer_norm(x, weight, bias, eps: float = 1e-5, residual=None, out_dtype=None):
    """LayerNorm of x's last dim (weight, bias may be None); with ``residual`` returns
    (LN(x + residual), x + residual) from one kernel. out_dtype: y's dtype (default: that of x,
    or of x + residual; h keeps that one). Same signature as ``layer_norm_ref``."""
    if not torch.compiler.is_compiling():  # while tracing, the fake impl checks (on metadata)
        _check(x, weight, bias, residual, out_dtype)
    return _LayerNorm.apply(x, weight, bias, residual, float(eps), out_dtype)
