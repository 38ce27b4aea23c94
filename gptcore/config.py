"""Model configuration: one dataclass, named presets, and the key spellings of the seed projects.

    GPTConfig.from_preset("gpt2")                       # OpenAI GPT-2 124M
    GPTConfig.from_preset("tiny", context_length=32)    # preset plus overrides
    GPTConfig.from_dict({"emb_dim": 768, "n_heads": 12, "n_layers": 12, ...})  # LLMs-from-scratch keys
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

GPT2_VOCAB = 50257


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = GPT2_VOCAB
    context_length: int = 1024   # longest sequence the model accepts (positions)
    emb_dim: int = 768           # residual width C
    n_heads: int = 12            # attention heads; head_dim = emb_dim // n_heads
    n_layers: int = 12
    drop_rate: float = 0.0       # dropout on embeddings, attention probabilities and residual branches
    qkv_bias: bool = True        # bias on the fused query/key/value projection (GPT-2 has one)
    pos_emb: str = "learned"     # "learned" (GPT-2 position table) or "rope" (rotary, no table)
    rope_theta: float = 10000.0
    ff_mult: int = 4             # MLP hidden width = ff_mult * emb_dim
    ln_eps: float = 1e-5
    tie_weights: bool = True     # LM head shares the token-embedding matrix

    def __post_init__(self) -> None:
        for f in fields(self):  # types first: a string "true" is not a bool, "1e-3" not a number
            v, want = getattr(self, f.name), _TYPES[f.name]
            if want is int:
                continue  # the sizes: checked below, with their range
            if want is bool:
                ok = isinstance(v, bool)
            elif want is float:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                if ok and not math.isfinite(v):
                    raise ValueError(f"GPTConfig.{f.name} must be a finite number, got {v!r}")
            else:
                ok = isinstance(v, want)
            if not ok:
                raise ValueError(f"GPTConfig.{f.name} must be {want.__name__}, got {type(v).__name__} {v!r}")
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "ff_mult"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig: emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}); "
                f"head_dim would be {self.emb_dim / self.n_heads:g}"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if self.pos_emb not in ("learned", "rope"):
            raise ValueError(f"GPTConfig.pos_emb must be 'learned' or 'rope', got {self.pos_emb!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rope needs an even head_dim, got {self.head_dim}")
        if not 0 < self.ln_eps < 1:
            raise ValueError(f"GPTConfig.ln_eps must be in (0, 1), got {self.ln_eps!r}")
        if self.rope_theta <= 1:
            raise ValueError(f"GPTConfig.rope_theta must be > 1, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.ff_mult * self.emb_dim

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Build from gptcore's own keys, LLMs-from-scratch's (same names) or nanoGPT's
        (n_embd, n_head, n_layer, block_size, dropout, bias). Unknown keys are an error."""
        valid = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {}
        unknown = []
        for k, v in d.items():
            key = _ALIASES.get(k, k)
            if key in _IGNORED:
                continue
            if key not in valid:
                unknown.append(k)
                continue
            kw[key] = v
        if unknown:
            raise ValueError(
                f"GPTConfig: unknown key(s) {sorted(unknown)}; valid keys: {sorted(valid | set(_ALIASES))}"
            )
        if not isinstance(d, dict):
            raise ValueError(f"GPTConfig.from_dict needs a dict, got {type(d).__name__}")
        if d.get("bias") is False:
            raise ValueError("GPTConfig: nanoGPT's bias=False (no biases anywhere) is not supported")
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "GPTConfig":
        return dataclasses.replace(self, **changes)


_TYPES = {"vocab_size": int, "context_length": int, "emb_dim": int, "n_heads": int, "n_layers": int,
          "drop_rate": float, "qkv_bias": bool, "pos_emb": str, "rope_theta": float, "ff_mult": int,
          "ln_eps": float, "tie_weights": bool}

# nanoGPT and other spellings of the same fields.
_ALIASES = {
    "n_embd": "emb_dim", "n_head": "n_heads", "n_layer": "n_layers",
    "block_size": "context_length", "dropout": "drop_rate", "n_ctx": "context_length",
    "n_positions": "context_length",
}
# Keys seen in foreign configs that carry no information for the architecture.
_IGNORED = {"bias"}

PRESETS: dict[str, GPTConfig] = {
    # OpenAI GPT-2 family (Radford et al. 2019).
    "gpt2": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),
    # Small configurations from the seed projects (TinyStories-scale models).
    "small-384": GPTConfig(emb_dim=384, n_heads=6, n_layers=8, context_length=512, qkv_bias=False),
    "small-480": GPTConfig(emb_dim=480, n_heads=12, n_layers=12, context_length=256, qkv_bias=False),
    # Minimal model for tests and the CPU quickstart.
    "tiny": GPTConfig(emb_dim=64, n_heads=4, n_layers=2, context_length=64),
    # A little more than tiny, for CPU demos that must learn something (gptcore.finetune's offline default).
    "mini": GPTConfig(emb_dim=128, n_heads=4, n_layers=4, context_length=64),
}
