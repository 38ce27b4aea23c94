"""The triton backend's kernels as opaque torch.library custom ops, for torch.compile.

    from gptcore import compiled_ops                        # same signatures as gptcore.kernels.*
    y = compiled_ops.layer_norm(x, weight, bias, eps, out_dtype=None)
    y, h = compiled_ops.layer_norm(x, weight, bias, eps, residual=r, out_dtype=None)
    y = compiled_ops.gelu(x, bias, out_dtype=None)
    o = compiled_ops.attention(q, k, v, causal=True, dropout_p=0.0, scale=None, seed=None)

Why: dynamo cannot trace a Triton launcher's host side (it stops at Triton's argument
specialisation), so torch.compile(model.loss) on the triton backend broke the graph at every
kernel call and ran no faster than eager. Registered as custom ops, each kernel call is one node
of the graph: the compiler sees its schema and a fake impl (output shapes and dtypes only),
autograd sees a registered backward that is itself a custom op, and Inductor fuses the torch
ops around the kernels. torch.compile(..., fullgraph=True) traces a whole training step.

Ops (namespace gptcore; the launchers run unchanged inside them):
  layer_norm(x, weight?, bias?, eps, out_dtype?)   -> y, mean, rstd       (gelu, layer_norm: via
  gelu(x, bias?)                                   -> y                    custom_ops.autograd_op)
  add_layer_norm(x, residual, weight?, bias?, eps, out_dtype?) -> y, h, mean, rstd
(the LN kernels store y in out_dtype; gelu's out_dtype is a cast after the op, and the model's
fc_gelu passes the bias in the Linear's dtype under compile, so the cast has nothing to do)
  attention(q, k, v, causal, dropout_p, scale, seed?) -> o, lse
add_layer_norm and attention register their autograd directly: their backward reads a result
(h, o), and add_layer_norm's backward must not keep x and residual alive (only h) and returns
one gradient tensor for both when they share a dtype. Outputs never alias inputs; a backward
output that has no meaning (d weight without a weight, a d residual equal to d x) is an empty
(0,) tensor the autograd glue drops.

Eager cost: a custom-op call costs tens of microseconds of host dispatch. gptcore.ops therefore
runs the kernels' autograd.Functions in eager and these ops only while dynamo traces.

Every gptcore op is registered as an explicit Inductor fallback before Inductor lowers it (see
_inductor_fallbacks: torch 2.11's implicit-fallback path made compile time exponential in depth).

Input checks run in the public functions in eager and in the fake impls while compiling (once,
at trace time, on the fake tensors' metadata), with the kernels' own error messages.

Dropout seed: a 1-element int64 CPU tensor (None when dropout_p == 0). attention(seed=None,
dropout_p > 0) draws it with torch.randint from torch's CPU generator, as the eager kernel does,
but as a graph op instead of a host .item() (which would break the graph): seeded runs repeat
(torch.manual_seed), and backward regenerates the forward's mask from the saved seed tensor. With
aot_eager the compiled and eager calls draw the same seeds; Inductor draws its own stream.

Tests: python -m pytest -q tests/test_compile_ops.py
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from gptcore.custom_ops import autograd_op
from gptcore.kernels import attention as _attn
from gptcore.kernels import gelu as _gelu
from gptcore.kernels import layer_norm as _ln
from gptcore.kernels._rows import as_rows


def _vec(p: Optional[Tensor]) -> Optional[Tensor]:
    """A weight/bias as the kernels index it: (N,) contiguous."""
    return None if p is None else p.contiguous()


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _empty_or_like(p: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if p is None else p.new_empty(p.shape)


# ---- Inductor: explicit fallbacks for these ops ---------------------------------------------------
_FALLBACKS_DONE = False


def _inductor_fallbacks() -> None:
    """Register every gptcore:: op as an Inductor fallback kernel before Inductor meets it.

    Inductor lowers an op it has no lowering for through an "implicit fallback", and torch 2.11
    first formats a log message that prints the op's arguments as IR. Those arguments print their
    producers, which print theirs: down a GPT's chain of opaque ops (LN -> matmul -> attention ->
    matmul -> LN ...) the string grows exponentially with depth, and compiling a 12-layer model
    never finished (the stack was in ir.__str__ after minutes). An explicit fallback, with the
    layout constraint the implicit path would choose, takes Inductor's other branch and prints
    nothing. Called from the ops' fake impls, which run while dynamo traces (before Inductor
    lowers anything); a private-API change in torch only brings the slow path back.
    """
    global _FALLBACKS_DONE
    if _FALLBACKS_DONE:
        return
    _FALLBACKS_DONE = True
    try:
        from torch._inductor import lowering
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:
        return
    for name in torch._C._dispatch_get_all_op_names():
        ns, _, op_name = name.partition("::")
        if ns != "gptcore":
            continue
        op_name, _, overload = op_name.partition(".")
        try:
            op = getattr(getattr(torch.ops.gptcore, op_name), overload or "default")
            if op in lowering.lowerings:
                continue
            constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            lowering.make_fallback(op, layout_constraint=constraint, warn=False)
        except (AttributeError, TypeError, AssertionError):
            continue


# ---- LayerNorm without residual ---------------------------------------------------------------
def _ln_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
            out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., N) -> y (x's shape; out_dtype, default x's), mean, rstd (M,) fp32."""
    y, _, mean, rstd = _ln._forward(as_rows(x), None, _vec(weight), _vec(bias), eps, x.shape, x.dtype, out_dtype)
    return y, mean, rstd


def _ln_fwd_fake(x, weight, bias, eps, out_dtype):
    _inductor_fallbacks()
    _ln._check(x, weight, bias, None, out_dtype)
    m = math.prod(x.shape[:-1])
    f32 = dict(dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), x.new_empty(m, **f32), x.new_empty(m, **f32)


def _ln_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
            out_dtype: Optional[torch.dtype], mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx (x's shape and dtype), d weight, d bias (their dtypes; (0,) when absent)."""
    bias_dtype = None if bias is None else bias.dtype
    dx, _, dw, db = _ln._backward(as_rows(dy), None, as_rows(x), _vec(weight), bias_dtype, mean, rstd, x.shape,
                                  x.dtype, None)
    return dx, _or_empty(dw, x), _or_empty(db, x)


def _ln_bwd_fake(dy, x, weight, bias, eps, out_dtype, mean, rstd):
    return x.new_empty(x.shape), _empty_or_like(weight, x), _empty_or_like(bias, x)


_layer_norm = autograd_op("gptcore::layer_norm", _ln_fwd, _ln_bwd, n_outputs=1, forward_fake=_ln_fwd_fake,
                          backward_fake=_ln_bwd_fake)


# ---- LayerNorm of x + residual: returns (y, h) ---------------------------------------------------
@torch.library.custom_op("gptcore::add_layer_norm", mutates_args=())
def _add_ln_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                eps: float, out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h = x + residual (promoted dtype), y = LN(h) (out_dtype, default h's): -> y, h (x's shape),
    mean, rstd (M,) fp32."""
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    return _ln._forward(as_rows(x), as_rows(residual), _vec(weight), _vec(bias), eps, x.shape, h_dtype, out_dtype)


@_add_ln_fwd.register_fake
def _(x, residual, weight, bias, eps, out_dtype=None):
    _inductor_fallbacks()
    _ln._check(x, weight, bias, residual, out_dtype)
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    m = math.prod(x.shape[:-1])
    return (x.new_empty(x.shape, dtype=out_dtype or h_dtype), x.new_empty(x.shape, dtype=h_dtype),
            x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("gptcore::add_layer_norm_backward", mutates_args=())
def _add_ln_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, rstd: Tensor, x_dtype: torch.dtype,
                res_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dx (x_dtype), d residual (res_dtype; (0,) when res_dtype == x_dtype: it equals dx),
    d weight, d bias ((0,) when absent). dh: the gradient flowing into the returned h."""
    bias_dtype = None if bias is None else bias.dtype
    dx, dres, dw, db = _ln._backward(as_rows(dy), None if dh is None else as_rows(dh), as_rows(h), _vec(weight),
                                     bias_dtype, mean, rstd, h.shape, x_dtype, res_dtype)
    return dx, _or_empty(dres, h), _or_empty(dw, h), _or_empty(db, h)


@_add_ln_bwd.register_fake
def _(dy, dh, h, weight, bias, mean, rstd, x_dtype, res_dtype):
    dres = h.new_empty(0) if res_dtype == x_dtype else h.new_empty(h.shape, dtype=res_dtype)
    return h.new_empty(h.shape, dtype=x_dtype), dres, _empty_or_like(weight, h), _empty_or_like(bias, h)


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, bias, _eps, _out_dtype = inputs
    _y, h, mean, rstd = output
    ctx.save_for_backward(h, weight, bias, mean, rstd)  # LN's input is h: x and residual are not kept
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _add_ln_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None and dh is None:
        return None, None, None, None, None, None
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dres, dw, db = _add_ln_bwd(dy, dh, h, weight, bias, mean, rstd, *ctx.dtypes)
    if ctx.dtypes[0] == ctx.dtypes[1]:
        dres = dx  # d x = d residual: one tensor serves both (as autograd does for x + r)
    need = ctx.needs_input_grad
    return (dx, dres, dw if weight is not None and need[2] else None, db if bias is not None and need[3] else None,
            None, None)


_add_ln_fwd.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


def layer_norm(x, weight, bias, eps: float = 1e-5, residual=None, out_dtype=None):
    """gptcore.kernels.layer_norm.layer_norm as custom ops: y, or (y, x + residual) with a residual.
    The kernel stores y in out_dtype itself (no fp32 y plus a cast, as under autocast)."""
    if not torch.compiler.is_compiling():
        _ln._check(x, weight, bias, residual, out_dtype)
    if residual is None:
        return _layer_norm(x, weight, bias, float(eps), out_dtype)
    y, h, _, _ = _add_ln_fwd(x, residual, weight, bias, float(eps), out_dtype)
    return y, h


# ---- GELU -------------------------------------------------------------------------------------
def _gelu_fwd(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """gelu_tanh(x + bias): x's shape, the dtype of x + bias."""
    return _gelu._forward(as_rows(x), _vec(bias), x.shape, _gelu.out_dtype_of(x, bias))


def _gelu_fwd_fake(x, bias):
    _inductor_fallbacks()
    _gelu._check(x, bias)
    return x.new_empty(x.shape, dtype=_gelu.out_dtype_of(x, bias))


def _gelu_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """-> dx (x's shape and dtype), d bias (bias's dtype; (0,) without a bias)."""
    dx, db = _gelu._backward(as_rows(dy), as_rows(x), _vec(bias), x.shape, x.dtype)
    return dx, _or_empty(db, x)


def _gelu_bwd_fake(dy, x, bias):
    return x.new_empty(x.shape), _empty_or_like(bias, x)


_gelu_op = autograd_op("gptcore::gelu", _gelu_fwd, _gelu_bwd, n_outputs=1, forward_fake=_gelu_fwd_fake,
                       backward_fake=_gelu_bwd_fake)


def gelu(x, bias=None, out_dtype=None):
    """gptcore.kernels.gelu.gelu as a custom op: gelu_tanh(x + bias)."""
    if not torch.compiler.is_compiling():
        _gelu._check(x, bias, out_dtype)
    y = _gelu_op(x, bias)  # out_dtype is a cast after the op: see layer_norm above
    return y if out_dtype is None else y.to(out_dtype)


# ---- attention ------------------------------------------------------------------------------------
@torch.library.custom_op("gptcore::attention", mutates_args=())
def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, scale: float,
              seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """q (B, H, Tq, D), k, v (B, H, Tk, D) -> o (B, H, Tq, D) q's dtype (contiguous), lse (B, H, Tq) fp32."""
    q, k, v = (_attn._last_dim_contiguous(t) for t in (q, k, v))
    # contiguous o here: Inductor plans the layout around the op itself (a transposed custom-op
    # output sent its GPU codegen into an exponential IR printing loop on a 12-layer model)
    return _attn._forward(q, k, v, causal, dropout_p, scale, 0 if seed is None else int(seed), bthd_out=False)


@_attn_fwd.register_fake
def _(q, k, v, causal, dropout_p, scale, seed):
    _inductor_fallbacks()
    _attn._check_inputs(q, k, v, causal, dropout_p, scale)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("gptcore::attention_backward", mutates_args=())
def _attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, dropout_p: float,
              scale: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (shapes and dtypes of q, k, v; contiguous)."""
    q, k, v = (_attn._last_dim_contiguous(t) for t in (q, k, v))
    return _attn._backward(do, q, k, v, o, lse, causal, dropout_p, scale, 0 if seed is None else int(seed))


@_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, causal, dropout_p, scale, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.args = (causal, dropout_p, scale)
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    causal, dropout_p, scale = ctx.args
    dq, dk, dv = _attn_bwd(do, q, k, v, o, lse, causal, dropout_p, scale, seed)
    return dq, dk, dv, None, None, None, None


_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


@torch.library.custom_op("gptcore::attention_qkv", mutates_args=())
def _attn_qkv_fwd(qkv: Tensor, n_heads: int, causal: bool, dropout_p: float, scale: float,
                  seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """qkv (B, T, 3 H D) packed -> o (B, H, T, D) contiguous, lse (B, H, T) fp32."""
    q, k, v = _attn.split_qkv(qkv.contiguous(), n_heads)
    return _attn._forward(q, k, v, causal, dropout_p, scale, 0 if seed is None else int(seed), bthd_out=False)


@_attn_qkv_fwd.register_fake
def _(qkv, n_heads, causal, dropout_p, scale, seed):
    _inductor_fallbacks()
    B, T, C3 = qkv.shape
    return qkv.new_empty((B, n_heads, T, C3 // (3 * n_heads))), qkv.new_empty((B, n_heads, T), dtype=torch.float32)


@torch.library.custom_op("gptcore::attention_qkv_backward", mutates_args=())
def _attn_qkv_bwd(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, n_heads: int, causal: bool, dropout_p: float,
                  scale: float, seed: Optional[Tensor]) -> Tensor:
    """-> dqkv (B, T, 3 H D) contiguous, written by the kernels in place of three separate grads."""
    qkv = qkv.contiguous()
    dqkv = torch.empty_like(qkv)
    _attn._backward(do, *_attn.split_qkv(qkv, n_heads), o, lse, causal, dropout_p, scale,
                    0 if seed is None else int(seed), out=_attn.split_qkv(dqkv, n_heads))
    return dqkv


@_attn_qkv_bwd.register_fake
def _(do, qkv, o, lse, n_heads, causal, dropout_p, scale, seed):
    return qkv.new_empty(qkv.shape)


def _attn_qkv_setup(ctx, inputs, output):
    qkv, n_heads, causal, dropout_p, scale, seed = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse, seed)
    ctx.args = (n_heads, causal, dropout_p, scale)
    ctx.mark_non_differentiable(lse)


def _attn_qkv_backward(ctx, do, _dlse):
    qkv, o, lse, seed = ctx.saved_tensors
    n_heads, causal, dropout_p, scale = ctx.args
    return _attn_qkv_bwd(do, qkv, o, lse, n_heads, causal, dropout_p, scale, seed), None, None, None, None, None


_attn_qkv_fwd.register_autograd(_attn_qkv_backward, setup_context=_attn_qkv_setup)


def _seed_tensor(dropout_p: float, seed: int | None) -> Optional[Tensor]:
    """The dropout seed as a (1,) int64 CPU tensor (drawn when None); None without dropout."""
    if seed is not None and not 0 <= int(seed) < 2**31:
        raise ValueError(f"attention: seed must be in [0, 2**31), got {seed}")
    if dropout_p > 0.0:
        return torch.randint(0, 2**31 - 1, (1,)) if seed is None else torch.tensor([int(seed)])
    return None


def attention_qkv(qkv, n_heads: int, causal: bool = True, dropout_p: float = 0.0, scale: float | None = None,
                  seed: int | None = None) -> Tensor:
    """gptcore.kernels.attention.attention_qkv as a custom op (packed qkv in, packed dqkv out)."""
    scale = None if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not torch.compiler.is_compiling():
        _attn._check_qkv(qkv, n_heads)
        _attn._check_inputs(*_attn.split_qkv(qkv, n_heads), causal, dropout_p, scale)
    scale = 1.0 / math.sqrt(qkv.shape[2] // (3 * n_heads)) if scale is None else scale
    o, _ = _attn_qkv_fwd(qkv, int(n_heads), bool(causal), dropout_p, scale, _seed_tensor(dropout_p, seed))
    return o


def attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale: float | None = None,
              seed: int | None = None) -> Tensor:
    """gptcore.kernels.attention.attention as a custom op; seed as there (see the header on
    how a missing seed is drawn)."""
    scale = None if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not torch.compiler.is_compiling():
        _attn._check_inputs(q, k, v, causal, dropout_p, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seed_t = _seed_tensor(dropout_p, seed)
    q, k, v = (_attn._last_dim_contiguous(t) for t in (q, k, v))
    o, _ = _attn_fwd(q, k, v, bool(causal), dropout_p, scale, seed_t)
    return o
