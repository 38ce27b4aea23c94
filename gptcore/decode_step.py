"""The fused decode step: one token per sequence through the whole model in 5 launches per layer.

    from gptcore.decode_step import fused_decode_step
    step, why = fused_decode_step(model, cache)   # step is None where it cannot run; why says so
    tok = step.greedy(tok)                        # (B, 1) or (B,) ids in -> (B,) next ids (in place ok)
    logits = step.logits(tok)                     # (B, V) for sampling

Launches per step (gptcore.kernels.decode_linear, gptcore.kernels.decode_attention):
    embed         x = wte[tok] + wpe[pos]; LN-1 of block 0; the cache's lengths += 1          1
    per layer     QKV + bias + KV-cache append (static or paged)                             5 x L
                  decode attention over the cache (split-KV, partials combined in the kernel)
                  out-projection + bias + residual add (in place into x) + LN-2
                  FC + bias + GELU
                  FC2 + bias + residual add + the next LayerNorm (LN-1 of the next block, or the final LN)
    head          LM head + greedy argmax (or + logits for sampling)                          1
Each LayerNorm runs in the kernel that completes the residual stream before it (the residual
epilogue's last program normalises the finished rows): the Linears after it read a plain input,
with no per-program LayerNorm prologue (which, recomputed in every program of the skinny GEMM,
cost the QKV and FC launches 2-3x their weight-streaming time on an H200).
The residual stream x is kept in fp32 (one (B, C) buffer); activations between kernels are in
the model's dtype. Every buffer is allocated once per (model, cache, batch), so the step can be
captured in a CUDA graph (gptcore.generate does).

Used automatically by gptcore.generate.Generator where ``fused_decode_step`` returns a step: the
triton backend, a CUDA device (or GPTCORE_FUSED_DECODE=1, which also allows the Triton
interpreter on the CPU), batch <= 64, learned positions (no RoPE), no LoRA adapter, the triton
decode attention of the cache. GPTCORE_FUSED_DECODE=0 turns it off. Everything else runs today's
model forward. Reference: the model's own cached forward (tests/test_decode_step.py compares them).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

MAX_BATCH = 64


def why_not(model, cache) -> Optional[str]:
    """None if the fused step can run this model with this cache, else the reason it cannot."""
    flag = os.environ.get("GPTCORE_FUSED_DECODE", "auto")
    if flag == "0":
        return "GPTCORE_FUSED_DECODE=0"
    if getattr(model, "backend", None) != "triton":
        return f"backend {getattr(model, 'backend', None)!r} (the fused step is triton's)"
    dev = next(model.parameters()).device
    if dev.type != "cuda" and not (flag == "1" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"model on {dev} (the fused step runs on CUDA)"
    cfg = model.config
    if cfg.pos_emb != "learned":
        return f"pos_emb={cfg.pos_emb!r} (RoPE is not fused)"
    if cache.batch_size > MAX_BATCH:
        return f"batch {cache.batch_size} > {MAX_BATCH}"
    if getattr(cache, "attention", None) != "triton":
        return f"cache attention {getattr(cache, 'attention', None)!r}"
    if model.training:
        return "model in training mode (dropout)"
    for m in model.modules():
        if hasattr(m, "add_lora"):
            return "a LoRA adapter is attached"
    w = model.lm_head.weight
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or cache.dtype != w.dtype:
        return f"weights {w.dtype} / cache {cache.dtype}"
    if any(p.dtype != w.dtype for p in model.parameters()):
        return "mixed parameter dtypes"
    return None


class FusedDecodeStep:
    """The step's buffers and per-layer weights for one (model, cache, batch); see the module doc."""

    def __init__(self, model, cache):
        from gptcore.kernels import decode_linear as dl
        from gptcore.kernels.decode_attention import decode_attention

        self.dl, self.attention = dl, decode_attention
        self.model, self.cache = model, cache
        cfg = model.config
        B, C, H = cache.batch_size, cfg.emb_dim, cfg.n_heads
        self.B, self.C, self.H, self.D = B, C, H, C // H
        p = model.lm_head.weight
        dev, dt = p.device, p.dtype
        t = model.transformer
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        self.layers = [(b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj) for b in t.h]
        self.ln_f = t.ln_f
        ff = self.layers[0][4].weight.shape[0]
        V = p.shape[0]
        self.x = torch.empty((B, C), device=dev, dtype=torch.float32)       # residual stream
        self.xn = torch.empty((B, C), device=dev, dtype=dt)                 # its LayerNorm (next Linear's input)
        self.q = torch.empty((B, C), device=dev, dtype=dt)
        self.y = torch.empty((B, H, self.D), device=dev, dtype=dt)          # attention output
        self.f = torch.empty((B, ff), device=dev, dtype=dt)                 # GELU(FC) output
        self.tok = torch.empty(B, device=dev, dtype=torch.int64)
        self.ws = dl.workspace_for(dev, B, [(3 * C, C, True), (C, C, True), (ff, C, True), (C, ff, True),
                                            (V, C, False)])
        self.att_counters = torch.zeros(B * H, device=dev, dtype=torch.int32)
        self.launches_per_step = 2 + 5 * len(self.layers)

    def _body(self, tok) -> torch.Tensor:
        """Embedding and every block; returns xn (B, C): the final LayerNorm of the residual stream."""
        dl, cache, B = self.dl, self.cache, self.B
        if cache.batch_size != B:
            raise ValueError(f"fused decode step built for {B} sequences, the cache has {cache.batch_size}")
        lengths, write = cache._lengths[:B], cache._write[:B]
        xn = self.xn
        # each LayerNorm is applied by the kernel that finishes the residual stream before it (embed, and
        # the residual epilogues' last program), so every Linear streams its weight with a plain input
        lns = [b[0] for b in self.layers[1:]] + [self.ln_f]
        ln1 = self.layers[0][0]
        x = dl.embed(tok.reshape(B, -1)[:, -1], self.wte, self.wpe, lengths, write, out=self.x,
                     post_ln=(ln1.weight, ln1.bias, ln1.eps, xn))
        table = cache._block_table()
        for i, ((_, qkv, proj, ln2, fc, fc2), nxt) in enumerate(zip(self.layers, lns)):
            kc, vc = cache._layer(i)
            dl.ln_qkv_append(xn, None, None, 0.0, qkv.weight, qkv.bias, kc, vc, lengths, self.H,
                             block_table=table, q_out=self.q, ws=self.ws)
            self.attention(self.q.view(B, self.H, self.D), kc, vc, lengths, block_table=table,
                             counters=self.att_counters, out=self.y)
            dl.linear_residual(self.y.view(B, self.C), proj.weight, proj.bias, x, ws=self.ws,
                               post_ln=(ln2.weight, ln2.bias, ln2.eps, xn))
            dl.ln_linear_gelu(xn, None, None, 0.0, fc.weight, fc.bias, out=self.f, ws=self.ws)
            dl.linear_residual(self.f, fc2.weight, fc2.bias, x, ws=self.ws,
                               post_ln=(nxt.weight, nxt.bias, nxt.eps, xn))
        return xn

    def greedy(self, tok: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Next greedy token (B,) int64 for input tokens tok (B, 1) or (B,); out may be tok's storage."""
        xn = self._body(tok)
        out = self.tok if out is None else out
        return self.dl.ln_lm_head_argmax(xn, None, None, 0.0, self.model.lm_head.weight, tok_out=out, ws=self.ws)

    def logits(self, tok: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) in the model's dtype (for sampling)."""
        xn = self._body(tok)
        return self.dl.ln_linear(xn, None, None, 0.0, self.model.lm_head.weight, ws=self.ws)

    def __call__(self, tok, sample=None, noise=None):
        """Greedy when sample is None, else sample(logits, noise) (a (logits, noise) -> (B,) callable)."""
        if sample is None:
            return self.greedy(tok)
        return sample(self.logits(tok), noise)


def fused_decode_step(model, cache):
    """(FusedDecodeStep, "") where the fused step can run, else (None, the reason)."""
    why = why_not(model, cache)
    if why is not None:
        return None, why
    return FusedDecodeStep(model, cache), ""
