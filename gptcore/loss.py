"""Fused LM head + cross-entropy that never holds the full (rows, vocab) logits.

    loss = linear_cross_entropy(h, weight, target)       # h (..., C), weight (V, C), target (...)
    loss = linear_cross_entropy_ref(h, weight, target)   # the plain twin: F.cross_entropy(F.linear(h, W).float(), y)

The plain path materialises B*T x V logits (GPT-2 at B*T = 16k: 1.6 GB in bf16, then 3.3 GB fp32
copies for the softmax and its gradient). Here the rows go through in chunks of ``chunk_rows``
(default 4096): for each chunk the logits are computed, turned in place into d loss / d logits by
a row step, and immediately multiplied back into the gradients of h and of the weight, all during
the forward pass. Backward only scales the two stored gradients by the incoming gradient. Peak
extra memory is one chunk of logits (plus its fp32 log-softmax for the torch row step) and fp32
gradient buffers of h and weight (Liger-Kernel's FusedLinearCrossEntropy follows the same idea).

Row steps (``impl``): "torch" (log_softmax in fp32, torch ops; any device) and "triton"
(gptcore.kernels.cross_entropy, two passes over bf16 logits, no fp32 copy; CUDA or the
interpreter). The 1/N of the mean is applied after the matmuls, in fp32, so fp16 gradients do
not underflow before a GradScaler's factor arrives through backward.

Under autocast the matmuls run in the autocast dtype (as F.linear would) and the gradients come
back in the dtypes of h and weight (fp32 master weights get fp32 gradients). The forward is a
launcher op (gptcore.kernels._oplib), so torch.compile treats it as one opaque node.

Tests: python -m pytest -q tests/test_fused_ce.py
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from gptcore.kernels._oplib import launcher_op

DEFAULT_CHUNK_ROWS = 4096
IMPLS = ("torch", "triton")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def linear_cross_entropy_ref(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                             reduction: str = "mean") -> Tensor:
    """The plain twin: full logits, then cross-entropy in fp32."""
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


def ce_rows_torch_(logits: Tensor, target: Tensor, ignore_index: int, loss: Tensor) -> None:
    """Row step in torch ops: logits (n, V) -> p - onehot(target) in place; loss (n,) fp32.

    Same contract as gptcore.kernels.cross_entropy.ce_rows_ (ignored rows: loss 0, zero grad;
    a target outside [0, V): loss NaN). Costs one fp32 (n, V) buffer for the log-softmax.
    """
    V = logits.shape[1]
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    safe = torch.where(valid & in_range, target, 0)[:, None]  # (n, 1)
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (n, V) fp32
    nll = -logp.gather(1, safe).squeeze(1)
    loss.copy_(torch.where(valid, torch.where(in_range, nll, float("nan")), 0.0))
    p = logp.exp_()  # softmax, in place of logp
    p.scatter_add_(1, safe, -valid.to(p.dtype)[:, None])
    torch.mul(p, valid[:, None], out=logits)


def _row_step(impl: str):
    if impl == "triton":
        from gptcore.kernels.cross_entropy import ce_rows_

        return ce_rows_
    return ce_rows_torch_


# ---- the op: forward computes loss and both gradients; backward scales them ----------------------
def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result straight from the fp32 accumulator: chunk products that are later
    summed in fp32 are not first rounded to fp16/bf16 (which made the summed gradient up to ~2.7x
    less accurate than one full-size matmul)."""
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # CPU: no low-precision mm with an fp32 result


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b for an fp32 acc, in place (no (V, C) temporary and extra pass per chunk)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


VOCAB_ALIGN = 64  # logits rows padded to a multiple of this many columns (see _padded_weight)


def _padded_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """weight (V, C) cast to dtype with zero rows appended up to a multiple of VOCAB_ALIGN.

    GPT-2's vocab (50257) makes every (rows, V) logits matrix's leading dimension odd, and cuBLAS
    then drops to its slow unaligned kernels for the LM head's three matmuls (nanoGPT pads its
    vocab to 50304 for the same reason). The zero rows give logits columns that are exactly 0;
    the row step never sees them (it gets the [:, :V] view) and they add exactly 0 to both
    gradients, so the result is unchanged.
    """
    V, C = weight.shape
    Vp = -(-V // VOCAB_ALIGN) * VOCAB_ALIGN
    if Vp == V:
        return weight.to(dtype)
    w = torch.empty((Vp, C), dtype=dtype, device=weight.device)
    w[:V].copy_(weight)
    w[V:].zero_()
    return w


def _fused_forward(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int, reduction: str,
                   chunk_rows: int, impl: str, compute_dtype: torch.dtype,
                   compute_grads: bool, grad_weight: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """h (N, C), weight (V, C), target (N,) -> (loss fp32 scalar, grad_h (N, C) fp32, grad_w (V, C) fp32).

    The gradients are d loss / d h and d loss / d weight for an incoming gradient of 1 (empty
    tensors when compute_grads is False; grad_w zeros (V, C) when grad_weight is False: a frozen
    LM head, as under LoRA, skips the weight-gradient matmul and its fp32 buffer).
    """
    N, C = h.shape
    V = weight.shape[0]
    step = _row_step(impl)
    target = target.contiguous()
    loss_rows = torch.empty(N, dtype=torch.float32, device=h.device)
    grad_h = torch.empty((N, C) if compute_grads else (0,), dtype=torch.float32, device=h.device)
    grad_w = None  # (Vp, C) fp32: the padded rows get exactly 0 and are dropped at the end
    with torch.autocast(h.device.type, enabled=False):
        w = _padded_weight(weight, compute_dtype)  # (Vp, C), rows V.. are zero
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            hc = h[s:e].to(compute_dtype)  # (n, C)
            logits = hc @ w.t()  # (n, Vp); [:, :V] becomes d loss_row / d logits below
            step(logits[:, :V], target[s:e], ignore_index, loss_rows[s:e])
            if compute_grads:
                grad_h[s:e] = _mm_f32(logits, w)  # (n, C); the zero columns meet zero rows
            if compute_grads and grad_weight:
                # d weight over all Vp rows, not the [:V] slice: with V = 50257 rows cuBLAS picks
                # a slower sm80 CUTLASS kernel for the slice on Hopper, a Hopper kernel for Vp
                if grad_w is None:
                    grad_w = _mm_f32(logits.t(), hc)
                else:
                    _addmm_f32_(grad_w, logits.t(), hc)
            del logits
        if not compute_grads:
            grad_w = h.new_empty((0,), dtype=torch.float32)
        elif not grad_weight:
            grad_w = h.new_empty((0,), dtype=torch.float32)
        elif grad_w is None:  # no rows
            grad_w = torch.zeros((V, C), dtype=torch.float32, device=h.device)
        else:
            grad_w = grad_w[:V]
        loss = loss_rows.sum()
        if reduction == "mean":
            n_valid = (target != ignore_index).sum()
            loss = loss / n_valid  # NaN when every row is ignored, as F.cross_entropy
            if compute_grads:
                # gradients are zero when every row is ignored, as F.cross_entropy
                scale = 1.0 / n_valid.clamp_min(1).to(torch.float32)
                grad_h *= scale
                if grad_weight:
                    grad_w *= scale
    return loss, grad_h, grad_w


def _fused_forward_fake(h, weight, target, ignore_index, reduction, chunk_rows, impl, compute_dtype,
                        compute_grads, grad_weight=True):
    f32 = dict(dtype=torch.float32, device=h.device)
    if not compute_grads:
        return h.new_empty((), **f32), h.new_empty((0,), **f32), h.new_empty((0,), **f32)
    gw = h.new_empty(weight.shape if grad_weight else (0,), **f32)
    return h.new_empty((), **f32), h.new_empty(h.shape, **f32), gw


_fused_forward_op = launcher_op("gptcore::linear_cross_entropy_fwd", _fused_forward, _fused_forward_fake)


class _LinearCrossEntropy(torch.autograd.Function):
    """The op's one autograd path: the forward (a launcher op, opaque under torch.compile) already
    made both gradients; backward scales them by the incoming scalar gradient (plain torch ops).
    grad_weight False (a frozen LM head, as under LoRA): no weight-gradient matmul at all."""

    @staticmethod
    def forward(ctx, h, weight, target, ignore_index, reduction, chunk_rows, impl, compute_dtype, compute_grads,
                grad_weight):
        loss, grad_h, grad_w = _fused_forward_op(h, weight, target, ignore_index, reduction, chunk_rows, impl,
                                                 compute_dtype, compute_grads, grad_weight)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes, ctx.compute_grads, ctx.grad_weight = (h.dtype, weight.dtype), compute_grads, grad_weight
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if not ctx.compute_grads:
            raise RuntimeError("linear_cross_entropy: backward through a call made without gradients "
                               "(inputs did not require grad, or grad mode was off)")
        grad_h, grad_w = ctx.saved_tensors
        need = ctx.needs_input_grad
        return ((grad_h * grad_loss).to(ctx.dtypes[0]) if need[0] else None,
                (grad_w * grad_loss).to(ctx.dtypes[1]) if need[1] and ctx.grad_weight else None,
                None, None, None, None, None, None, None, None)


# ---- public entry point ------------------------------------------------------------------------
def _check(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int, reduction: str, chunk_rows: int,
           impl: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: weight must be (vocab, C), got shape {tuple(weight.shape)}")
    if h.dim() < 1 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)} must end in C = {weight.shape[1]} "
                         f"(weight is {tuple(weight.shape)})")
    if target.shape != h.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: target {tuple(target.shape)} must have h's leading shape "
                         f"{tuple(h.shape[:-1])}")
    if h.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        raise TypeError(f"linear_cross_entropy: h and weight must be floating point, got {h.dtype}, {weight.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_cross_entropy: target must hold integer class ids, got {target.dtype}")
    if not (h.device == weight.device == target.device):
        raise ValueError(f"linear_cross_entropy: h ({h.device}), weight ({weight.device}) and target "
                         f"({target.device}) must be on one device")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r} "
                         f"(per-row losses would need the full logits' worth of bookkeeping; use the twin)")
    if not isinstance(chunk_rows, int) or chunk_rows <= 0:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be a positive int, got {chunk_rows!r}")
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and h.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"linear_cross_entropy: impl='triton' needs CUDA tensors (got {h.device}) or "
                           f"TRITON_INTERPRET=1; use impl='torch' here")


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk_rows: int | None = None, impl: str = "torch") -> Tensor:
    """Cross-entropy of softmax(h @ weight.T) against target, without materialising all the logits.

    h (..., C), weight (V, C), target (...) int -> fp32 scalar. Equals
    ``linear_cross_entropy_ref`` (up to rounding); reduction 'mean' (over non-ignored rows) or 'sum'.
    """
    chunk_rows = DEFAULT_CHUNK_ROWS if chunk_rows is None else chunk_rows
    _check(h, weight, target, ignore_index, reduction, chunk_rows, impl)
    C, V = weight.shape[1], weight.shape[0]
    h2 = h.reshape(-1, C)  # (N, C)
    y = target.reshape(-1).long()  # (N,)
    if not y.is_cuda and y.numel() and not torch.compiler.is_compiling():
        bad = (y != ignore_index) & ((y < 0) | (y >= V))
        if bool(bad.any()):
            raise ValueError(f"linear_cross_entropy: target ids must be in [0, {V}) or ignore_index "
                             f"({ignore_index}); got {int(y[bad][0])}")
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h2, weight, y, ignore_index, reduction, chunk_rows, impl, compute_dtype, need,
                                     need and weight.requires_grad)
