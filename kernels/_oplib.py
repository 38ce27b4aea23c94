"""One definition per op, for eager and torch.compile alike.

Each differentiable kernel op is one ``torch.autograd.Function`` (in its kernel file) whose forward
and backward call *launcher ops* made here:

    _fwd = launcher_op("gptcore::layer_norm_fwd", _forward_launcher, _forward_fake)
    class _LayerNorm(torch.autograd.Function):
        def forward(ctx, ...):  y, mean, rstd = _fwd(x, weight, bias, eps, out_dtype)
        def backward(ctx, dy):  return _bwd(dy, ...)

A launcher op is the launcher registered as a schema-only ``torch.library`` custom op (a fake impl
for shapes, no autograd of its own). Called eagerly it runs the launcher function itself (no
dispatcher: a custom-op call costs tens of microseconds of host time); while dynamo traces it is
the opaque custom op, so the compiled graph holds one ``gptcore::`` node per launch and the
Function's backward -- the only one there is -- is traced into the backward graph.

Contract for a launcher: tensors and scalars in (schema from its annotations), a tensor or a tuple
of NEW tensors out (never a view of an input). A result that does not exist may be None: eager
callers get None, the custom op returns an empty (0,) tensor like its first tensor argument (the
fake impl must do the same), so the Function decides presence from its inputs, not the result.

Inductor: every ``gptcore::`` op is registered as an explicit fallback before Inductor lowers it
(``_inductor_fallbacks``; run from the fake impls, i.e. while dynamo traces). torch 2.11's implicit
fallback formats a log line that prints the op's arguments as IR, each printing its producers: down
a GPT's chain of opaque ops that string grows exponentially and a 12-layer compile never finished.
The explicit fallback (with the layout constraint the implicit path would pick) prints nothing.
This uses private torch APIs; if they move, it does nothing and only compile time suffers.

Tests: python -m pytest -q tests/test_compile_ops.py
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

_FALLBACKS_DONE = False


def _inductor_fallbacks() -> None:
    """Register every gptcore:: op as an explicit Inductor fallback (module header)."""
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


def launcher_op(qualname: str, launcher: Callable, fake: Callable) -> Callable:
    """``launcher`` as a schema-only custom op; returns a caller that runs the launcher directly
    in eager and the custom op while dynamo traces (module header)."""
    @functools.wraps(launcher)  # the schema comes from the launcher's annotations
    def body(*args):
        out = launcher(*args)
        if isinstance(out, torch.Tensor):
            return out
        like = next(a for a in args if isinstance(a, torch.Tensor))
        return tuple(like.new_empty(0) if t is None else t for t in out)

    schema = torch.library.infer_schema(launcher, mutates_args=())
    op = torch.library.custom_op(qualname, body, mutates_args=(), schema=schema)

    def traced_fake(*args):
        global _FALLBACKS_DONE
        _FALLBACKS_DONE = False  # ops registered since the last trace get their fallback too
        _inductor_fallbacks()
        return fake(*args)

    op.register_fake(traced_fake)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return launcher(*args)

    call.op = op
    call.__name__ = qualname.split("::")[-1]
    call.__doc__ = launcher.__doc__
    return call
