"""GPT-2's tanh-approximation GELU with an optional fused bias add, as Triton kernels.

    y = gelu(x, bias)     # z = x + bias (bias (N,) broadcast over rows); y = gelu_tanh(z)

gelu_tanh(z) = 0.5 z (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3), computed in fp32 as
z * sigmoid(2u) (the same function: 0.5 (1 + tanh(u)) = sigmoid(2u)), which needs one exp and
no tanh. The sigmoid is evaluated at z clamped to [-10, 10] and set to 0 below -10: beyond that
range it is 0 or 1 to fp32 precision, and the clamp keeps z^3 and exp() finite for any input
(no inf * 0 = NaN in the backward, no tiny-but-nonzero sigmoid scaling a huge negative z).

Forward (``_gelu_fwd_kernel``): 2-D tiles of (BLOCK_M rows, BLOCK_N cols); the bias slice is
loaded once per tile. z = x + bias is formed in fp32 and not rounded; the forward saves x (not
y) and the backward recomputes z.
Backward (``_gelu_bwd_kernel``): dz = dy * gelu'(z) = d x; with a bias, a persistent grid over
row runs accumulates d bias in fp32 registers and writes one (N,) partial per row-run to a
(programs, N) buffer that one small kernel (_rows.sum_partials) sums in a fixed order: no
atomics, bit-identical from run to run.

Limits: float32/float16/bfloat16 (any mix of x and bias; y has the dtype of x + bias, or the
out_dtype asked for: the MLP under autocast asks for its Linear's bf16, so no cast follows); any
shape, leading dims flattened; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. A tensor
whose last dim is not unit-stride (or cannot be flattened to one row stride) is copied once.

Tests: python -m pytest -q tests/test_gelu.py     Bench: python -m bench.kernels_norm
"""
from __future__ import annotations

import math

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from gptcore.kernels._launch import cdiv, next_pow2, planned
from gptcore.kernels._oplib import launcher_op

from gptcore.kernels._rows import as_rows, check_out_dtype, check_tensor, persistent_programs, sum_partials

_TILE = 4096  # elements per program tile
_MAX_BLOCK_N = 1024  # widest column block; wider rows span several programs
_BWD_PROGRAMS_PER_SM = 4  # persistent bias-grad grid: programs per SM
_GELU_C = math.sqrt(2.0 / math.pi)


@triton.jit
def _sigmoid_2u(z, C: tl.constexpr):
    """(s, e, zc): s = sigmoid(2 u(zc)) = 0.5 (1 + tanh(u(zc))) (0 where z < -10), e = exp(-2 u(zc)),
    zc = z clamped to [-10, 10] (fp32). 1 - s = e s without cancellation; e < 1e38 by the clamp."""
    zc = tl.minimum(tl.maximum(z, -10.0), 10.0)
    e = tl.exp(-2.0 * C * (zc + 0.044715 * zc * zc * zc))
    return tl.where(z < -10.0, 0.0, 1.0 / (1.0 + e)), e, zc


@planned
@triton.jit(do_not_specialize=["M"])
def _gelu_fwd_kernel(
    X,  # (M, N) rows at stride_x, unit column stride
    BIAS,  # (N,) (unused unless HAS_BIAS)
    Y,  # (M, N) contiguous output
    M,
    N,
    stride_x,
    C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    s, _, _ = _sigmoid_2u(z, C)
    tl.store(Y + rows64[:, None] * N + cols[None, :], (z * s).to(Y.dtype.element_ty), mask=mask)


@planned
@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _gelu_bwd_kernel(
    X,  # (M, N) saved input at stride_x
    BIAS,  # (N,) (unused unless HAS_BIAS)
    DY,  # (M, N) grad of y at stride_dy
    DX,  # (M, N) contiguous out: grad of x (= grad of z)
    DB_PART,  # (row programs, N) fp32 out: per-program column sums of dz (unused unless HAS_BIAS)
    M,
    N,
    stride_x,
    stride_dy,
    rows_per_prog,  # a multiple of BLOCK_M
    C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    row_start = pid_m * rows_per_prog
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_M):
        rows = row_start + r0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        mask = (rows < M)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        z = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += b[None, :]
        s, e, zc = _sigmoid_2u(z, C)
        # d/dz [z s(2u)] = s + z s (1 - s) 2 u'(z), u'(z) = C (1 + 3 * 0.044715 z^2); past the
        # clamp the second term is below fp32 resolution, so zc stands in for z there.
        dz = dy * (s + 2.0 * C * zc * (s * s * e) * (1.0 + 0.134145 * zc * zc))
        tl.store(DX + rows64[:, None] * N + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db_acc += dz  # masked lanes have dy = 0, so dz = 0
    if HAS_BIAS:
        tl.store(DB_PART + pid_m * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _tile(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): up to _MAX_BLOCK_N columns, rows stacked to ~_TILE elements.
    Depends on n only, so the row count never triggers a recompile."""
    block_n = min(max(16, next_pow2(n)), _MAX_BLOCK_N)
    block_m = max(1, _TILE // block_n)
    num_warps = min(max(block_m * block_n // 512, 1), 8)
    return block_m, block_n, num_warps


def _forward(x2, bias, out_shape, out_dtype):
    M, N = x2.shape
    y = torch.empty(out_shape, dtype=out_dtype, device=x2.device)
    if M == 0 or N == 0:
        return y
    block_m, block_n, num_warps = _tile(N)
    grid = (cdiv(M, block_m), cdiv(N, block_n))
    _gelu_fwd_kernel[grid](
        x2, x2 if bias is None else bias, y, M, N, x2.stride(0),
        C=_GELU_C, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y


def _backward(dy2, x2, bias, out_shape, dx_dtype):
    """-> dx (out_shape, dx_dtype), d bias (N,) in bias's dtype (None without bias)."""
    M, N = x2.shape
    dev = x2.device
    dx = torch.empty(out_shape, dtype=dx_dtype, device=dev)
    if M == 0 or N == 0:
        return dx, None if bias is None else torch.zeros(N, dtype=bias.dtype, device=dev)
    block_m, block_n, num_warps = _tile(N)
    row_blocks = cdiv(M, block_m)
    col_blocks = cdiv(N, block_n)
    if bias is None:
        row_programs = row_blocks  # no reduction: one tile per program
    else:
        row_programs = min(row_blocks, max(1, persistent_programs(dev, _BWD_PROGRAMS_PER_SM) // col_blocks))
    rows_per_prog = cdiv(row_blocks, row_programs) * block_m
    row_programs = cdiv(M, rows_per_prog)
    db_part = torch.empty((1, row_programs, N), dtype=torch.float32, device=dev) if bias is not None else None
    _gelu_bwd_kernel[(row_programs, col_blocks)](
        x2, x2 if bias is None else bias, dy2, dx, dx if db_part is None else db_part,
        M, N, x2.stride(0), dy2.stride(0), rows_per_prog,
        C=_GELU_C, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx, None if db_part is None else sum_partials(db_part, [bias.dtype])[0]


# ---- launcher ops (kernels/_oplib.py) and the op's one autograd path ----------------------------------
def _fwd_launcher(x: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """gelu_tanh(x + bias): x's shape, stored in out_dtype."""
    return _forward(as_rows(x), None if bias is None else bias.contiguous(), x.shape, out_dtype)


def _fwd_fake(x, bias, out_dtype):
    _check(x, bias, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype)


def _bwd_launcher(dy: Tensor, x: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """-> dx (x's shape and dtype), d bias (bias's dtype; None without a bias)."""
    return _backward(as_rows(dy), as_rows(x), None if bias is None else bias.contiguous(), x.shape, x.dtype)


def _bwd_fake(dy, x, bias):
    return x.new_empty(x.shape), dy.new_empty(0) if bias is None else bias.new_empty(bias.shape)


_fwd_op = launcher_op("gptcore::gelu_fwd", _fwd_launcher, _fwd_fake)
_bwd_op = launcher_op("gptcore::gelu_bwd", _bwd_launcher, _bwd_fake)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, out_dtype):
        ctx.save_for_backward(x, bias)  # the backward recomputes z = x + bias
        return _fwd_op(x, bias, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db = _bwd_op(dy, x, bias)
        return dx, db if bias is not None and ctx.needs_input_grad[1] else None, None


def out_dtype_of(x, bias, out_dtype=None) -> torch.dtype:
    """The result's dtype: out_dtype if given, else that of x + bias."""
    if out_dtype is not None:
        return out_dtype
    return x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)


def _check(x, bias, out_dtype=None) -> None:
    op = "gptcore gelu"
    check_tensor(x, "x", op)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dim, got a scalar (use x.reshape(1))")
    if bias is not None:
        check_tensor(bias, "bias", op, x.device)
        if bias.shape != (x.shape[-1],):
            raise ValueError(
                f"{op}: bias must have shape ({x.shape[-1]},) to broadcast over x's rows, got {tuple(bias.shape)}"
            )
    check_out_dtype(out_dtype, op)


def gelu(x, bias=None, out_dtype=None):
    """gelu_tanh(x + bias) in one pass (bias (N,) optional), stored in out_dtype (default: the dtype
    of x + bias; under autocast the MLP asks for its Linear's output dtype, so no cast follows).
    Same signature as ``gelu_ref``."""
    if not torch.compiler.is_compiling():  # while tracing, the fake impl checks (on metadata)
        _check(x, bias, out_dtype)
    return _Gelu.apply(x, bias, out_dtype_of(x, bias, out_dtype))
