"""The GPT-2 model: one module for every backend, with nanoGPT / Hugging Face parameter names.

    model = GPT(GPTConfig.from_preset("gpt2"), backend="torch")
    logits = model(idx)                  # idx (B, T) int64 -> (B, T, vocab)
    loss = model.loss(idx, targets)      # mean cross-entropy

The backend (see gptcore.ops) decides how LayerNorm, the MLP's bias+GELU and attention run;
parameters and state_dict are identical across backends, so a checkpoint trained on one runs
on another. ``model.backend_report()`` says which implementation each op uses.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptcore.config import GPTConfig
from gptcore.ops import BACKENDS, Ops, cached_decode_attention, default_backend, get_ops


def rope_tables(head_dim: int, length: int, theta: float, device=None):
    """cos, sin of shape (length, head_dim) for rotate-half rotary embeddings."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv)  # (T, D/2)
    ang = torch.cat([ang, ang], dim=-1)  # (T, D)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin: (T, D) for the positions of x."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rot * sin).to(x.dtype)


def _linear(mod: nn.Linear, x, ops: Ops, remake=None):
    """mod(x) through the backend's linear; a LoRA-wrapped module (gptcore.lora) runs its own forward,
    told how x can be recomputed (remake = (fn, *src) with x == fn(*src)) so it need not store x."""
    if type(mod) is nn.Linear:
        return ops.linear(x, mod.weight, mod.bias)
    return mod(x, remake)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ops: Ops, rope=None, kv_cache=None, layer: int = 0, remake=None):
        B, T, C = x.shape
        qkv = _linear(self.c_attn, x, ops, remake)  # (B, T, 3C)
        if kv_cache is None and rope is None and ops.attention_qkv is not None:
            # q, k, v read in place from qkv, and the gradient written as one packed dqkv
            p = self.drop_rate if self.training else 0.0
            y = ops.attention_qkv(qkv, self.n_heads, causal=True, dropout_p=p, scale=None)  # (B, H, T, D)
            return self.resid_drop(_linear(self.c_proj, y.transpose(1, 2).reshape(B, T, C), ops))
        q, k, v = qkv.view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None and T == 1:
            # Decode: the cache stores k, v; q attends over each sequence's own length
            # (sequences of a batch may sit at different positions; see gptcore.kv_cache).
            y = cached_decode_attention(kv_cache, layer, q, k, v)  # (B, H, 1, D)
        else:
            if kv_cache is not None:
                # The cache stores k, v at this call's positions and returns everything seen so far.
                k, v = kv_cache.update(layer, k, v)
            p = self.drop_rate if self.training else 0.0
            y = ops.attention(q, k, v, causal=True, dropout_p=p, scale=None)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(_linear(self.c_proj, y, ops))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, cfg.ff_dim)
        self.c_proj = nn.Linear(cfg.ff_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ops: Ops, remake=None):
        # bias+GELU is one op so the triton backend can fuse it into one pass.
        if hasattr(self.c_fc, "add_lora"):
            # a LoRA adapter (gptcore.lora): the low-rank term joins x W^T before the fused bias+GELU
            pre = self.c_fc(x, remake, bias=False)
            bias = self.c_fc.bias.to(pre.dtype)
            h = ops.gelu(pre, bias, out_dtype=pre.dtype)
            return self.drop(_linear(self.c_proj, h, ops, (ops.gelu, pre, bias, pre.dtype)))
        h = ops.fc_gelu(x, self.c_fc.weight, self.c_fc.bias)
        return self.drop(_linear(self.c_proj, h, ops))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, branch, resid, ops: Ops, rope=None, kv_cache=None, layer: int = 0):
        """Pre-LN block on a residual stream carried as (pending branch output, stream).

        resid = resid + branch is fused into each LayerNorm (ops.layer_norm with residual=...),
        so the residual adds cost no extra pass. Returns the new (branch, resid).
        """
        y, resid = _add_ln(branch, resid, self.ln_1, ops)
        branch = self.attn(y, ops, rope, kv_cache, layer, (_ln_of, resid, self.ln_1, ops.layer_norm, y.dtype))
        y, resid = _add_ln(branch, resid, self.ln_2, ops)
        return self.mlp(y, ops, (_ln_of, resid, self.ln_2, ops.layer_norm, y.dtype)), resid


def _add_ln(branch, resid, ln: nn.LayerNorm, ops: Ops):
    # Under autocast the LN output feeds a Linear that would cast it to the autocast dtype first:
    # asking for that dtype here saves the cast (and its backward), the residual stream stays fp32.
    dev = resid.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    if branch is None:
        return ops.layer_norm(resid, ln.weight, ln.bias, ln.eps, out_dtype=out_dtype), resid
    return ops.layer_norm(branch, ln.weight, ln.bias, ln.eps, residual=resid, out_dtype=out_dtype)


def _ln_of(h, ln: nn.LayerNorm, layer_norm, out_dtype):
    """ln's output for its input h, as _add_ln gave it: how a LoRA layer (gptcore.lora) behind the LN
    recomputes its input from the h the LN saves, instead of storing it too."""
    return layer_norm(h, ln.weight, ln.bias, ln.eps, out_dtype=out_dtype)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, backend: Optional[str] = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.emb_dim),
            drop=nn.Dropout(config.drop_rate),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
            ln_f=nn.LayerNorm(config.emb_dim, eps=config.ln_eps),
        ))
        if config.pos_emb == "learned":
            self.transformer["wpe"] = nn.Embedding(config.context_length, config.emb_dim)
        else:
            cos, sin = rope_tables(config.head_dim, config.context_length, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.reset_parameters()
        self.set_backend(backend or default_backend())
        # Activation checkpointing: in training, recompute each block in backward instead of
        # keeping its activations (less memory, ~1/3 more compute). Set by the trainer.
        self.grad_checkpointing = False
        # Which rows model.loss runs the LM head on: "all", or "targets" (only rows whose target
        # is not ignore_index: in SFT the response tokens). Set by gptcore.finetune.
        self.loss_rows = "all"

    # ---- setup -----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L)."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = resid_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_backend(self, backend: str) -> "GPT":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.ops = get_ops(backend)
        self.backend = backend
        return self

    # ---- surgery (on a loaded model, before training it) --------------------------------------
    def crop_context(self, T: int) -> "GPT":
        """Keep the first T positions (nanoGPT's crop_block_size): the learned position table is cut,
        RoPE tables are shortened. A longer T than the model's is a ValueError."""
        cfg = self.config
        if T == cfg.context_length:
            return self
        if T > cfg.context_length:
            raise ValueError(f"context_length {T} exceeds the loaded model's {cfg.context_length}")
        if "wpe" in self.transformer:
            old = self.transformer.wpe
            self.transformer["wpe"] = nn.Embedding(T, cfg.emb_dim).to(old.weight.device)
            self.transformer.wpe.weight.data.copy_(old.weight.data[:T])
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:T], self.rope_sin[:T]
        self.config = cfg.replace(context_length=T)
        return self

    def set_dropout(self, p: float) -> "GPT":
        """Dropout probability p everywhere (config.drop_rate included)."""
        self.config = self.config.replace(drop_rate=p)
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            if hasattr(m, "drop_rate"):
                m.drop_rate = p
        return self

    def backend_report(self) -> dict[str, str]:
        """Which implementation each op runs on this backend (fallbacks are named as such)."""
        return dict(self.ops.report)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, kv_cache=None, start_pos: int = 0) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab).

        Without a cache, idx holds the tokens at positions [start_pos, start_pos + T). With a
        kv_cache (gptcore.kv_cache), each sequence continues where it left off in the cache
        (sequences may be at different positions) and the cache supplies the earlier keys/values.
        """
        hidden = self.hidden_states(idx, kv_cache, start_pos)
        return self.lm_head(hidden)

    def hidden_states(self, idx: torch.Tensor, kv_cache=None, start_pos: int = 0) -> torch.Tensor:
        """Final-LayerNorm output (B, T, C), before the LM head."""
        if idx.dim() != 2:
            raise ValueError(f"GPT expects token ids of shape (B, T), got {tuple(idx.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"GPT expects integer token ids, got {idx.dtype}")
        B, T = idx.shape
        cfg = self.config
        if kv_cache is not None:
            if start_pos:
                raise ValueError("with a kv_cache, positions come from the cache (its lengths); pass start_pos=0")
            if kv_cache.max_seq_len > cfg.context_length:
                raise ValueError(f"kv_cache holds {kv_cache.max_seq_len} positions but the model's context_length "
                                 f"is {cfg.context_length}; build the cache with max_seq_len <= {cfg.context_length}")
        elif start_pos + T > cfg.context_length:
            raise ValueError(
                f"sequence of {start_pos + T} positions exceeds the model's context_length "
                f"{cfg.context_length}; crop the input (e.g. idx[:, -{cfg.context_length}:])"
            )
        if not idx.is_cuda and idx.numel() and not torch.compiler.is_compiling():
            # Cheap on the CPU; on a GPU this check would cost a host sync per step (and under
            # torch.compile a graph break).
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got min {lo}, max {hi}")
        x = self.transformer.wte(idx)
        rope = None
        if kv_cache is not None:
            pos = kv_cache.advance(T)  # (B, T) per-sequence positions; raises if the cache is full
        else:
            pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        if cfg.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        elif kv_cache is not None:
            rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])  # (B, 1, T, D)
        else:
            rope = (self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T])
        resid = self.transformer.drop(x)
        branch = None
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute:
                # without dropout the recompute draws no random numbers: saving the RNG state (host
                # calls that a CUDA-graph capture refuses) is only needed with dropout
                branch, resid = checkpoint(block, branch, resid, self.ops, rope, kv_cache, i, use_reentrant=False,
                                           preserve_rng_state=cfg.drop_rate > 0)
            else:
                branch, resid = block(branch, resid, self.ops, rope, kv_cache, i)
        ln = self.transformer.ln_f
        y, _ = _add_ln(branch, resid, ln, self.ops)
        return y

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             fused: Optional[bool] = None, rows: Optional[str] = None) -> torch.Tensor:
        """Mean next-token cross-entropy of targets (B, T) given idx (B, T).

        fused (default: every backend but reference) runs the LM head and the loss in row chunks
        (gptcore.loss.linear_cross_entropy), so the (B*T, vocab) logits never exist in full;
        fused=False is the plain twin: full logits, then F.cross_entropy in fp32.
        rows (default: self.loss_rows): "all", or "targets": the LM head runs only on the rows
        whose target is not ignore_index (the same loss; for masked SFT batches far less work, at
        the price of one host read of the row count per call, which torch.compile cannot trace).
        """
        if targets.shape != idx.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match idx {tuple(idx.shape)}")
        if fused is None:
            fused = self.backend != "reference"
        rows = self.loss_rows if rows is None else rows
        if rows == "targets":
            keep = (targets.flatten() != ignore_index).nonzero().squeeze(1)  # (n,) host sync
            h = self.hidden_states(idx).flatten(0, 1).index_select(0, keep)  # (n, C)
            y = targets.flatten().index_select(0, keep)  # (n,)
            if fused:
                loss_fn = self.ops.loss or get_ops("torch").loss
                return loss_fn(h, self.lm_head.weight, y, ignore_index=ignore_index)
            return F.cross_entropy(self.lm_head(h).float(), y, ignore_index=ignore_index)
        if rows != "all":
            raise ValueError(f"rows must be 'all' or 'targets', got {rows!r}")
        if fused:
            loss_fn = self.ops.loss or get_ops("torch").loss  # reference: the chunked torch twin
            return loss_fn(self.hidden_states(idx), self.lm_head.weight, targets, ignore_index=ignore_index)
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)

    # ---- accounting ------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). non_embedding drops token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight multiply-add (6 with backward) plus attention.

        Counts every matrix product, the LM head included (PaLM appendix B / nanoGPT's
        estimate_mfu use 6N + 12 L H D T for training).
        """
        cfg = self.config
        T = cfg.context_length if seq_len is None else seq_len
        n = self.num_params(non_embedding=True)
        if cfg.tie_weights:  # the tied LM head's matmul is not among the non-embedding parameters
            n += cfg.vocab_size * cfg.emb_dim
        attn = 4 * cfg.n_layers * cfg.emb_dim * T  # QK^T and PV over T keys, no causal discount (as nanoGPT)
        fwd = 2 * n + attn
        return 3 * fwd if training else fwd

    def estimate_memory(self, batch_size: int, seq_len: int, dtype=torch.bfloat16, training: bool = True) -> dict:
        """Rough bytes for weights, grads, AdamW state and activations (a planning aid, not a promise)."""
        cfg = self.config
        p = self.num_params()
        el = torch.finfo(dtype).bits // 8
        params = p * 4  # fp32 master weights
        grads = p * 4 if training else 0
        adam = p * 8 if training else 0
        # per layer, per token: ~ 34 C bytes of bf16 activations (Korthikanti et al.), no T x T with flash
        act = cfg.n_layers * batch_size * seq_len * cfg.emb_dim * 17 * el if training else 0
        logits = batch_size * seq_len * cfg.vocab_size * (el + 4)
        return {"params": params, "grads": grads, "optimizer": adam, "activations": act, "logits": logits,
                "total": params + grads + adam + act + logits}
