"""The ops layer: one small table that maps each op the model needs to an implementation.

Backends:
  reference  the textbook math in plain PyTorch (gptcore.kernels.reference): the oracle
  torch      PyTorch's own fused ops (scaled_dot_product_attention, F.layer_norm, F.gelu):
             what a nanoGPT user runs today, the baseline to beat
  triton     gptcore's kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Each op
             is one autograd.Function over launcher ops (gptcore.kernels._oplib): the same
             path eagerly and under torch.compile, where each launch is an opaque gptcore:: node

Every op has the same signature in every backend:
  layer_norm(x, weight, bias, eps, residual=None, out_dtype=None)
                                                 -> y  or (y, x + residual); y in out_dtype if given
  fc_gelu(x, weight, bias)                       -> gelu_tanh(x @ weight.T + bias)
  attention(q, k, v, causal, dropout_p, scale)   -> (B, H, Tq, D); causal aligns queries to the
                                                    end of the keys when Tq < Tk
  loss(h, weight, target, ignore_index)          -> mean CE of the LM head (None: full logits)
  token_pick(logits (B, V))                      -> (B,) greedy token ids
  linear(x, weight, bias=None)                   -> F.linear(x, weight, bias); the triton backend's
                                                    device-time backward (gptcore.kernels.linear)
                                                    inside ``device_time_first()`` (captured graphs)
  decode_attention                               the KV cache's attention read, by name
                                                    (cached_decode_attention runs it)
The model never imports a kernel directly; it asks ``get_ops(backend)``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gptcore.kernels import reference as ref
from gptcore.loss import linear_cross_entropy

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


# ---- loss and token pick, every backend ---------------------------------------------------------
def _loss_fn(impl: str) -> Callable:
    def loss(h, weight, target, ignore_index=-100):
        """Mean cross-entropy of softmax(h @ weight.T), chunked (the logits never exist in full)."""
        return linear_cross_entropy(h, weight, target, ignore_index=ignore_index, impl=impl)

    loss.__name__ = f"linear_cross_entropy[{impl}]"
    return loss


def _torch_token_pick(logits):
    """(B, V) -> (B,) int64: the greedy token, logits.argmax(-1)."""
    return logits.argmax(dim=-1)


def _triton_token_pick(logits):
    """gptcore's split argmax on CUDA (torch.argmax's tie and NaN rules); torch's elsewhere."""
    if logits.is_cuda and logits.dim() == 2:
        return argmax_rows(logits)
    return logits.argmax(dim=-1)


class _Mode:
    device_first = False


# process-wide, not thread-local: autograd runs CUDA backwards (and so grad checkpointing's
# recompute of the forward) on its own device thread, which must see the mode the forward saw
_MODE = _Mode()


@contextmanager
def device_time_first():
    """Inside: ops that trade host time for device time take the device-time variant. For code whose
    host work is not on the critical path: a step captured in a CUDA graph (gptcore.graph_step)
    replays kernels with no Python, so the host cost of the variant is paid once, at capture.
    The mode holds for every thread of the process while the block runs."""
    prev = _MODE.device_first
    _MODE.device_first = True
    try:
        yield
    finally:
        _MODE.device_first = prev


def device_time_first_on() -> bool:
    return _MODE.device_first


@dataclass(frozen=True)
class Ops:
    """The implementations one backend uses, and a human-readable line per op saying which.

    decode_attention is the name of the KV cache's attention read (triton / torch / reference),
    the one a cache is built with (``cache.attention``; run by cached_decode_attention); loss is
    (h, lm_head_weight, targets, ignore_index) -> mean loss, or None where the model computes full
    logits (reference)."""

    backend: str
    layer_norm: Callable
    fc_gelu: Callable
    gelu: Callable
    attention: Callable
    report: dict = field(default_factory=dict)
    # attention over the packed c_attn output (B, T, 3C) with a packed gradient, where the backend
    # has one (triton); the model falls back to attention(*split) otherwise
    attention_qkv: Optional[Callable] = None
    loss: Optional[Callable] = None
    decode_attention: str = "torch"
    token_pick: Callable = _torch_token_pick
    linear: Callable = F.linear


def triton_status() -> str | None:
    """None if Triton kernels can run here; otherwise the reason they cannot. The one answer to
    "can Triton run here?" in the package."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (it ships for Linux only); use backend='torch'"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set; use backend='torch', "
            "or set TRITON_INTERPRET=1 to run the kernels (slowly) on the CPU"
        )
    return None


def _triton_ops() -> Ops:
    from gptcore.kernels.attention import attention, attention_qkv
    from gptcore.kernels.gelu import gelu
    from gptcore.kernels.layer_norm import layer_norm
    from gptcore.kernels.linear import linear as device_linear

    def linear(x, weight, bias=None):
        """F.linear; inside device_time_first() on CUDA with grad, the fp32-gradient backward."""
        if (_MODE.device_first and x.is_cuda and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return device_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def fc_gelu(x, weight, bias):
        h = linear(x, weight)
        # the result in the Linear's dtype, as F.linear(x, weight, bias) would give: under autocast
        # bf16 (not bf16 + fp32 bias = fp32, which the next Linear casts back); the kernel stores it
        return gelu(h, bias, out_dtype=h.dtype)

    rep = {"layer_norm": "triton", "gelu": "triton", "fc_gelu": "torch F.linear + triton gelu(bias)",
           "attention": "triton", "loss": "chunked LM head + triton CE rows",
           "decode_attention": "triton split-KV decode", "token_pick": "triton split argmax",
           "linear": "torch F.linear (in captured graphs: fp32-gradient backward + triton bias colsum)"}
    return Ops("triton", layer_norm, fc_gelu, gelu, attention, rep, attention_qkv, _loss_fn("triton"),
               "triton", _triton_token_pick, linear)


def get_ops(backend: str) -> Ops:
    if backend == "reference":
        rep = {"layer_norm": "reference", "fc_gelu": "reference", "attention": "reference",
               "loss": "full logits + F.cross_entropy", "decode_attention": "reference masked softmax",
               "token_pick": "torch argmax"}
        return Ops("reference", ref.layer_norm_ref, _ref_fc_gelu, ref.gelu_ref, ref.attention_ref, rep,
                   None, None, "reference", _torch_token_pick)
    if backend == "torch":
        rep = {"layer_norm": "torch F.layer_norm", "fc_gelu": "torch F.linear+F.gelu",
               "attention": "torch scaled_dot_product_attention", "loss": "chunked LM head + torch CE rows",
               "decode_attention": "torch SDPA + length mask", "token_pick": "torch argmax"}
        return Ops("torch", _torch_layer_norm, _torch_fc_gelu, _torch_gelu, _torch_attention, rep, None,
                   _loss_fn("torch"), "torch", _torch_token_pick)
    if backend == "triton":
        why = triton_status()
        if why is not None:
            raise RuntimeError(f"backend 'triton' cannot run here: {why}")
        return _triton_ops()
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def default_backend(device=None) -> str:
    """The fastest backend that can run here (on ``device`` when given): triton on a CUDA GPU,
    else torch (a CPU model on a machine with a GPU also gets torch)."""
    if device is not None and torch.device(device).type != "cuda":
        return "torch"
    return "triton" if torch.cuda.is_available() and triton_status() is None else "torch"


# ---- decode attention over a KV cache ------------------------------------------------------------
def cached_decode_attention(cache, layer: int, q, k, v):
    """Store one decode step's k, v (B, H, 1, D) in ``cache`` and attend q (B, H, 1, D) over each
    sequence's keys; returns (B, H, 1, D). The cache only stores and hands out (its protocol:
    gptcore.kv_cache); the read is ``cache.attention``'s:
      triton     the split-KV decode kernel, which also stores k, v (one launch) when their dtype is
                 the cache's
      reference  masked softmax over the stored keys (gptcore.kernels.reference)
      torch      SDPA over the cache's whole capacity with a per-sequence length mask. Static
                 shapes: the eager step and its CUDA-graph replay run the very same kernels.
    """
    kc, vc = cache.layer_kv(layer)
    table, lengths = cache.block_rows(), cache.lengths
    if cache.attention == "triton":
        from gptcore.kernels.decode_attention import decode_attention

        if k.dtype == kc.dtype and v.dtype == vc.dtype:
            # one launch: the kernel stores k, v at each sequence's write position (lengths - 1,
            # bounds checked by the cache's reservation) and attends to them with the rest
            return decode_attention(q, kc, vc, lengths, block_table=table, k_new=k, v_new=v)
        cache.store(layer, k, v)
        return decode_attention(q, kc, vc, lengths, block_table=table)
    cache.store(layer, k, v)
    if cache.attention == "reference":
        return ref.decode_attention_ref(q, kc, vc, lengths, block_table=table)
    n = cache.capacity()
    k_all, v_all = cache.gather(layer, n)                                   # 2 x (B, H, n, D)
    mask = cache.positions(n)[None, :] < lengths[:, None]                   # (B, n)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None, None, :])


def argmax_rows(logits):
    from gptcore.kernels.argmax import argmax_rows as _argmax_rows

    return _argmax_rows(logits)
