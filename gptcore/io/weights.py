"""Weights against a model: what to save, whether a state_dict fits a config, and a GPT built
from one. Every reader's output and every loader's input go through here."""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
import torch.nn as nn

from gptcore.config import GPTConfig
from gptcore.io.common import CheckpointError, FormatError, clip, natural, strip_prefixes
from gptcore.model import GPT
from gptcore.ops import default_backend


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save: no wrapper prefixes, a tied LM head once (as transformer.wte.weight)."""
    state = strip_prefixes(unwrap(model).state_dict())
    cfg = getattr(unwrap(model), "config", None)
    if cfg is not None and cfg.tie_weights:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def _drop_tied_head(weights: dict, cfg: Optional[GPTConfig]) -> dict:
    """Without lm_head.weight when ``cfg`` ties it and it is the token embedding (as readers return it)."""
    head, wte = weights.get("lm_head.weight"), weights.get("transformer.wte.weight")
    if cfg is not None and cfg.tie_weights and head is not None and wte is not None and \
            (head is wte or (head.shape == wte.shape and torch.equal(head, wte))):
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    return weights


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``weights`` into ``model`` (any module: LoRA-wrapped ones too); any missing, unexpected
    or mis-shaped tensor is a CheckpointError naming them."""
    weights = _drop_tied_head(strip_prefixes(weights), getattr(unwrap(model), "config", None))
    expected = model_state_dict(model)
    missing = sorted(set(expected) - set(weights), key=natural)
    unexpected = sorted(set(weights) - set(expected), key=natural)
    shapes = [f"{k}: {tuple(weights[k].shape)} in {source}, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing tensors {clip(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {clip(unexpected)}")
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes))
        raise CheckpointError(f"{source} does not fit the model config: " + "; ".join(parts))
    unwrap(model).load_state_dict(weights, strict=False)  # strict=False: the tied lm_head is not stored


def finish_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Point lm_head.weight at the token embedding when config ties them and the file omits it."""
    if config.tie_weights and "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def infer_config_fields(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config fields a gptcore-named state_dict's shapes determine (n_heads is not one)."""
    wte = sd.get("transformer.wte.weight")
    if wte is None or wte.dim() != 2:
        return {}
    out: dict[str, Any] = {"vocab_size": wte.shape[0], "emb_dim": wte.shape[1]}
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if layers:
        out["n_layers"] = max(layers) + 1
    wpe = sd.get("transformer.wpe.weight")
    out["pos_emb"] = "learned" if wpe is not None else "rope"
    if wpe is not None:
        out["context_length"] = wpe.shape[0]
    out["qkv_bias"] = "transformer.h.0.attn.c_attn.bias" in sd
    fc = sd.get("transformer.h.0.mlp.c_fc.weight")
    if fc is not None and fc.shape[0] % wte.shape[1] == 0:
        out["ff_mult"] = fc.shape[0] // wte.shape[1]
    head = sd.get("lm_head.weight")
    out["tie_weights"] = head is None or (head.shape == wte.shape and torch.equal(head, wte))
    return out


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of GPT(config), computed without allocating weights."""
    with torch.device("meta"):
        model = GPT(config, backend="reference")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def diff_state_dict(config: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, list]:
    """What keeps sd from loading into GPT(config): missing / unexpected keys, shape mismatches."""
    want = expected_shapes(config)
    return {
        "missing": sorted((k for k in want if k not in sd), key=natural),
        "unexpected": sorted((k for k in sd if k not in want), key=natural),
        "shape_mismatch": sorted(
            ((k, tuple(sd[k].shape), want[k]) for k in want if k in sd and tuple(sd[k].shape) != want[k]),
            key=lambda t: natural(t[0]),
        ),
    }


def check_state_dict(config: GPTConfig, sd: dict[str, torch.Tensor], source: str = "state_dict") -> None:
    """Raise FormatError naming every key and shape that does not fit GPT(config)."""
    d = diff_state_dict(config, sd)
    problems = []
    if d["missing"]:
        problems.append(f"missing tensors {clip(d['missing'])}")
    if d["unexpected"]:
        problems.append(f"unexpected tensors {clip(d['unexpected'])}")
    order = {k: i for i, k in enumerate(expected_shapes(config))}  # the model's order: embeddings first
    shapes = sorted((t for t in d["shape_mismatch"] if not (config.tie_weights and t[0] == "lm_head.weight")),
                    key=lambda t: order[t[0]])
    if shapes:
        problems.append("shape mismatches: " + clip([f"{k}: {a} in the file, {b} in the model" for k, a, b in shapes],
                                                    sep="; "))
    if problems:
        raise FormatError(f"{source} does not fit the model config ({config}): " + "; ".join(problems))
    head, wte = sd["lm_head.weight"], sd["transformer.wte.weight"]
    if config.tie_weights and head is not wte and not torch.equal(head, wte):
        raise FormatError(
            f"{source}: lm_head.weight differs from transformer.wte.weight but the config ties them; "
            f"use tie_weights=False"
        )


def state_dict_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The one floating dtype of sd's tensors, or float32 when they mix."""
    kinds = {v.dtype for v in sd.values() if v.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else torch.float32


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"dtype must be a torch floating dtype or its name (float32, bfloat16...), got {dtype!r}")
    return d


def count_params(config: Optional[GPTConfig], sd: dict[str, torch.Tensor]) -> int:
    """Parameter count with tied weights once."""
    tied = config.tie_weights if config is not None else infer_config_fields(sd).get("tie_weights", False)
    return sum(v.numel() for k, v in sd.items() if not (tied and k == "lm_head.weight"))


def build_model(config: GPTConfig, state_dict: dict[str, torch.Tensor], backend: Optional[str] = None,
                dtype=None, device="cpu", source: str = "state_dict") -> GPT:
    """GPT(config) holding state_dict's weights, in dtype (None: the state_dict's float dtype), on
    ``device`` (backend None: the fastest that runs there), in eval mode (call .train() to train)."""
    sd = finish_state_dict(dict(state_dict), config)
    check_state_dict(config, sd, source=source)
    dtype = as_dtype(dtype) if dtype is not None else state_dict_dtype(sd)
    model = GPT(config, backend=backend or default_backend(device)).to(dtype)
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()
