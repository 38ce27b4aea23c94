"""Opaque, differentiable custom ops built from a forward/backward pair of launchers.

torch.compile traces Python. A Triton launcher with host-side logic (shape checks, tuning caches,
grid arithmetic) can break or bloat that trace; registered with ``torch.library`` it becomes one
opaque node instead: the compiler sees its schema and a fake (shape-only) implementation, autograd
sees a registered backward, and eager calls run the launchers unchanged. ``autograd_op`` does the
registration for a pair of launchers:

    def _fwd(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:        # (y, rstd)
        ...                                                                      # result, residual
    def _bwd(dy: Tensor, x: Tensor, w: Tensor, eps: float, rstd: Tensor) -> tuple[Tensor, Tensor]:
        ...                                                                      # (dx, dw)
    rms_norm = autograd_op("gptcore::rms_norm", _fwd, _bwd, n_outputs=1,
                           forward_fake=lambda x, w, eps: (torch.empty_like(x),
                                                           x.new_empty(x.shape[:-1], dtype=torch.float32)))
    y = rms_norm(x, w, 1e-5)          # eager, under autograd, and inside torch.compile(fullgraph=True)

Contract:
- ``forward(*inputs)`` returns a tuple of new tensors (no views of inputs): the first ``n_outputs``
  are the op's results, the rest are residuals kept for backward. Its type annotations are the
  schema (Tensor, Optional[Tensor], int, float, bool, str, ...).
- ``backward(*result_grads, *inputs, *residuals)`` returns one gradient per Tensor-typed input, in
  order (a single Tensor if there is one): a tensor even where the input is None or needs no grad
  (it is dropped). Result gradients autograd did not produce arrive as zeros.
- ``forward_fake(*inputs)`` returns empty tensors shaped like forward's outputs; ``backward_fake``
  defaults to ``empty_like`` of each tensor input (an empty tensor for a None input).

Tests: python -m pytest -q tests/test_fused_ce.py -k custom_op
"""
from __future__ import annotations

from typing import Callable

import torch


def _schema_args(forward: Callable):
    """forward's parameters as torch.library infers them from its annotations."""
    return torch._C.parse_schema("op" + torch.library.infer_schema(forward, mutates_args=())).arguments


def autograd_op(qualname: str, forward: Callable, backward: Callable, *, n_outputs: int,
                forward_fake: Callable, backward_fake: Callable | None = None) -> Callable:
    """Register ``qualname`` (forward) and ``qualname_backward`` as custom ops; return the op's caller."""
    args = _schema_args(forward)
    n_inputs = len(args)
    tensor_pos = [i for i, a in enumerate(args) if str(a.type) in ("Tensor", "Optional[Tensor]")]

    fwd_op = torch.library.custom_op(qualname, forward, mutates_args=())
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op(qualname + "_backward", backward, mutates_args=())

    def default_backward_fake(*args):
        inputs = args[n_outputs:n_outputs + n_inputs]
        like = next(a for a in inputs if isinstance(a, torch.Tensor))
        grads = tuple(torch.empty_like(inputs[i]) if inputs[i] is not None else like.new_empty(0)
                      for i in tensor_pos)
        return grads[0] if len(grads) == 1 else grads

    bwd_op.register_fake(backward_fake or default_backward_fake)

    def setup_context(ctx, inputs, output):
        output = (output,) if isinstance(output, torch.Tensor) else tuple(output)
        ctx.save_for_backward(*(inputs[i] for i in tensor_pos), *output[n_outputs:])
        ctx.non_tensor = {i: a for i, a in enumerate(inputs) if i not in tensor_pos}
        ctx.result_meta = [(o.shape, o.dtype, o.device) for o in output[:n_outputs]]
        ctx.mark_non_differentiable(*output[n_outputs:])

    def backward_glue(ctx, *grads):
        saved = ctx.saved_tensors
        it = iter(saved[:len(tensor_pos)])
        inputs = [next(it) if i in tensor_pos else ctx.non_tensor[i] for i in range(n_inputs)]
        residuals = saved[len(tensor_pos):]
        result_grads = [g if g is not None else torch.zeros(s, dtype=d, device=dev)
                        for g, (s, d, dev) in zip(grads[:n_outputs], ctx.result_meta)]
        got = bwd_op(*result_grads, *inputs, *residuals)
        got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
        if len(got) != len(tensor_pos):
            raise RuntimeError(f"{qualname}: backward returned {len(got)} gradients for {len(tensor_pos)} tensor inputs")
        by_pos = dict(zip(tensor_pos, got))
        return tuple(
            by_pos[i] if i in by_pos and inputs[i] is not None and ctx.needs_input_grad[i] else None
            for i in range(n_inputs)
        )

    fwd_op.register_autograd(backward_glue, setup_context=setup_context)

    def call(*args):
        out = fwd_op(*args)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return out[0] if n_outputs == 1 else out[:n_outputs]

    call.forward_op, call.backward_op = fwd_op, bwd_op
    call.__name__ = qualname.split("::")[-1]
    call.__doc__ = forward.__doc__
    return call
