"""Reference twins of gptcore's kernels: the textbook math in plain PyTorch.

Each function has the signature of the fast kernel it checks and computes in the dtype of its
inputs (call it on float64 copies for an oracle). These are the `reference` backend of the model
and the ground truth of every kernel test; they are written to be obviously right, not fast.
"""
from __future__ import annotations

import math

import torch

GELU_C = math.sqrt(2.0 / math.pi)


def layer_norm_ref(x, weight, bias, eps: float = 1e-5, residual=None, out_dtype=None):
    """LayerNorm over the last dim from the mean and (biased) variance.

    With ``residual``: h = x + residual; returns (layer_norm(h), h). out_dtype: the normalised
    output's dtype (default: h's); h keeps its own.
    """
    h = x if residual is None else x + residual
    mean = h.mean(dim=-1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    if out_dtype is not None:
        y = y.to(out_dtype)
    return y if residual is None else (y, h)


def gelu_ref(x, bias=None, out_dtype=None):
    """GPT-2's tanh-approximation GELU of (x + bias): 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))).

    out_dtype: the result's dtype (default: that of x + bias)."""
    z = x if bias is None else x + bias
    y = 0.5 * z * (1.0 + torch.tanh(GELU_C * (z + 0.044715 * z**3)))
    return y if out_dtype is None else y.to(out_dtype)


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """(t_q, t_k) bool mask, True where query i may see key j.

    Queries are the *last* t_q positions of the key sequence (bottom-right alignment): query i
    sits at position P + i with P = t_k - t_q and sees keys 0..P+i. This is what prefill over a
    KV cache needs; for t_q == t_k it is the usual lower triangle.
    """
    if t_q > t_k:
        raise ValueError(f"causal attention needs t_q <= t_k, got t_q={t_q}, t_k={t_k}")
    i = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    j = torch.arange(t_k, device=device)[None, :]
    return j <= i


def attention_ref(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale=None, dropout_mask=None):
    """Explicit masked-softmax attention.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tq <= Tk for causal (queries at the end).
    dropout_mask: optional bool (B, H, Tq, Tk), True = keep; kept probabilities are scaled by
    1/(1-dropout_p). Without a mask and with dropout_p > 0 one is drawn from torch's RNG.
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    low = s.dtype in (torch.float16, torch.bfloat16)
    p = torch.softmax(s.float() if low else s, dim=-1).to(q.dtype)
    if dropout_p > 0.0 or dropout_mask is not None:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(p, dtype=torch.float32) >= dropout_p
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    return p @ v


def decode_attention_ref(q, k_cache, v_cache, lengths, block_table=None, scale=None):
    """One query per sequence over a KV cache, by explicit masked softmax (twin of decode_attention).

    q: (B, H, 1, D). Static cache: k_cache, v_cache (B, H, T, D). Paged cache: (num_blocks, H,
    block_size, D) with block_table (B, max_blocks), key t of sequence b in block
    block_table[b, t // block_size] at slot t % block_size. Sequence b attends to keys
    0..lengths[b]-1. Shapes never depend on lengths' values (no host sync).
    """
    if block_table is not None:
        blocks = block_table.long().clamp(min=0)  # ids past a sequence's length are masked below
        nb, H, bs, D = k_cache.shape
        B, mb = blocks.shape
        k_cache = k_cache[blocks].permute(0, 2, 1, 3, 4).reshape(B, H, mb * bs, D)
        v_cache = v_cache[blocks].permute(0, 2, 1, 3, 4).reshape(B, H, mb * bs, D)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q @ k_cache.transpose(-2, -1)) * scale  # (B, H, 1, T)
    keep = torch.arange(k_cache.shape[-2], device=q.device)[None, :] < lengths[:, None]  # (B, T)
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    low = s.dtype in (torch.float16, torch.bfloat16)
    p = torch.softmax(s.float() if low else s, dim=-1).to(q.dtype)
    return p @ v_cache
