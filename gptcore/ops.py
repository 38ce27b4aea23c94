"""The ops layer: one small table that maps each op the model needs to an implementation.

Backends (DESIGN.md):
  reference  the textbook math in plain PyTorch (gptcore.kernels.reference): the oracle
  torch      PyTorch's own fused ops (scaled_dot_product_attention, F.layer_norm, F.gelu):
             what a nanoGPT user runs today, the baseline to beat
  triton     gptcore's kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
             (under torch.compile as opaque custom ops: gptcore.compiled_ops)

Every op has the same signature in every backend:
  layer_norm(x, weight, bias, eps, residual=None, out_dtype=None)
                                                 -> y  or (y, x + residual); y in out_dtype if given
  fc_gelu(x, weight, bias)                       -> gelu_tanh(x @ weight.T + bias)
  attention(q, k, v, causal, dropout_p, scale)   -> (B, H, Tq, D); causal aligns queries to the
                                                    end of the keys when Tq < Tk
The model never imports a kernel directly; it asks ``get_ops(backend)``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gptcore.kernels import reference as ref

BACKENDS = ("reference", "torch", "triton")


# ---- torch backend: PyTorch's fused ops -----------------------------------------------------
def _cast(y, dtype):
    return y if dtype is None else y.to(dtype)


def _torch_layer_norm(x, weight, bias, eps=1e-5, residual=None, out_dtype=None):
    if residual is None:
        return _cast(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), out_dtype)
    h = x + residual
    return _cast(F.layer_norm(h, (h.shape[-1],), weight, bias, eps), out_dtype), h


def _torch_fc_gelu(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def _torch_attention(q, k, v, causal=True, dropout_p=0.0, scale=None):
    tq, tk = q.shape[-2], k.shape[-2]
    if causal and tq != tk:
        # SDPA's is_causal aligns top-left; queries at the end of the keys need an explicit mask.
        mask = ref.causal_mask(tq, tk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale)


def _torch_gelu(x, bias=None, out_dtype=None):
    return _cast(F.gelu(x if bias is None else x + bias, approximate="tanh"), out_dtype)


# ---- reference backend ------------------------------------------------------------------------
def _ref_fc_gelu(x, weight, bias):
    return ref.gelu_ref(F.linear(x, weight), bias)


@dataclass(frozen=True)
class Ops:
    """The implementations one backend uses, and a human-readable line per op saying which."""

    backend: str
    layer_norm: Callable
    fc_gelu: Callable
    gelu: Callable
    attention: Callable
    report: dict = field(default_factory=dict)
    # attention over the packed c_attn output (B, T, 3C) with a packed gradient, where the backend
    # has one (triton); the model falls back to attention(*split) otherwise
    attention_qkv: Optional[Callable] = None


def triton_status() -> str | None:
    """None if Triton kernels can run here; otherwise the reason they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (it ships for Linux only); use backend='torch'"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set; use backend='torch', "
            "or set TRITON_INTERPRET=1 to run the kernels (slowly) on the CPU"
        )
    return None


# Kernel modules of the triton backend: op name -> (module, function).
_TRITON_KERNELS = {
    "layer_norm": ("gptcore.kernels.layer_norm", "layer_norm"),
    "gelu": ("gptcore.kernels.gelu", "gelu"),
    "attention": ("gptcore.kernels.attention", "attention"),
}


def _load_triton_kernel(op: str) -> Callable | None:
    mod_name, fn_name = _TRITON_KERNELS[op]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            return None  # this kernel does not exist yet: the caller falls back and says so
        raise
    return getattr(mod, fn_name)


def _compile_aware(eager: Callable, compiled: Callable) -> Callable:
    """eager (the kernel's autograd.Function: no dispatcher cost) outside torch.compile, compiled
    (the same kernel as an opaque custom op, gptcore.compiled_ops) while dynamo traces."""

    @functools.wraps(eager)
    def op(*args, **kwargs):
        if torch.compiler.is_compiling():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    return op


def get_ops(backend: str) -> Ops:
    if backend == "reference":
        rep = {"layer_norm": "reference", "fc_gelu": "reference", "attention": "reference"}
        return Ops("reference", ref.layer_norm_ref, _ref_fc_gelu, ref.gelu_ref, ref.attention_ref, rep)
    if backend == "torch":
        rep = {"layer_norm": "torch F.layer_norm", "fc_gelu": "torch F.linear+F.gelu",
               "attention": "torch scaled_dot_product_attention"}
        return Ops("torch", _torch_layer_norm, _torch_fc_gelu, _torch_gelu, _torch_attention, rep)
    if backend == "triton":
        why = triton_status()
        if why is not None:
            raise RuntimeError(f"backend 'triton' cannot run here: {why}")
        impl = {}
        rep = {}
        fallbacks = {"layer_norm": _torch_layer_norm, "gelu": _torch_gelu, "attention": _torch_attention}
        for op, fb in fallbacks.items():
            fn = _load_triton_kernel(op)
            if fn is not None:
                from gptcore import compiled_ops

                fn = _compile_aware(fn, getattr(compiled_ops, op))
            impl[op] = fn if fn is not None else fb
            rep[op] = "triton" if fn is not None else f"torch (fallback: {_TRITON_KERNELS[op][0]} not available)"
        gelu = impl["gelu"]

        def fc_gelu(x, weight, bias):
            h = F.linear(x, weight)
            if bias is not None and bias.dtype != h.dtype and torch.compiler.is_compiling():
                # Under torch.compile the op's out_dtype is a cast after it (see compiled_ops), so
                # an fp32 bias would make a (B, T, 4C) fp32 GELU output plus a cast, both ways.
                # The bias in the Linear's dtype, as autocast's F.linear(x, weight, bias) uses it,
                # gives that dtype directly.
                return gelu(h, bias.to(h.dtype))
            # the result in the Linear's dtype, as F.linear(x, weight, bias) would give: under
            # autocast bf16 (not bf16 + fp32 bias = fp32, which the next Linear casts back)
            return gelu(h, bias, out_dtype=h.dtype)

        rep["fc_gelu"] = "torch F.linear + " + ("triton gelu(bias)" if rep["gelu"] == "triton" else rep["gelu"])
        attention_qkv = None
        if rep["attention"] == "triton":
            from gptcore import compiled_ops
            from gptcore.kernels.attention import attention_qkv as _attention_qkv

            attention_qkv = _compile_aware(_attention_qkv, compiled_ops.attention_qkv)
        return Ops("triton", impl["layer_norm"], fc_gelu, gelu, impl["attention"], rep, attention_qkv)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def default_backend(device=None) -> str:
    """The fastest backend that can run here (on ``device`` when given): triton on a CUDA GPU,
    else torch (a CPU model on a machine with a GPU also gets torch)."""
    if device is not None and torch.device(device).type != "cuda":
        return "torch"
    return "triton" if torch.cuda.is_available() and triton_status() is None else "torch"
