"""LoRA adapters for the GPT model, merged or not, saved in Hugging Face PEFT's layout.

    from gptcore.lora import apply_lora, save_adapter, load_adapter, merge_lora
    names = apply_lora(model, rank=16, alpha=32, dropout=0.05, targets=("c_attn", "c_proj", "c_fc"))
    ...train: only the lora_A / lora_B parameters require grad...
    save_adapter(model, "out/adapter")          # adapter_config.json + adapter_model.safetensors
    load_adapter(base_model, "out/adapter")     # the same adapter onto a fresh copy of the base
    merge_lora(model)                           # W += (alpha / r) B A; plain nn.Linear again

A LoRA layer computes  y = x W^T + b + (alpha / r) * (dropout(x) A^T) B^T  with the base W, b
frozen, A (r, in) random (Kaiming-uniform, as PEFT) and B (out, r) zero, so an untrained adapter
changes nothing. The low-rank term is added by one addmm onto the base output (no separate add
pass); ``scale * dropout(x) A^T`` is the (rows, r) product, so the scale costs r columns, not out.
On every backend the base keeps its fast path: c_attn's output still feeds the triton attention in
place and c_fc's still goes through the backend's fused bias+GELU (model.MLP adds the term before
the bias; see ``LoRALinear.add_lora``).

Memory. A frozen base Linear needs no saved input (there is no weight gradient), but lora_A's
gradient does: s (g B)^T x. Behind a LayerNorm (c_attn, c_fc) or the GELU (the MLP's c_proj) x is
a cheap elementwise function of a tensor that op saves for its own backward anyway (the LN input
h; the GELU input), so, training, ``_LoRAFn`` stores that recipe (gptcore.model passes it as
``remake``) and recomputes x in backward: the same gradients, bit for bit on the CPU, without the
two LN outputs and the 4C-wide GELU output per block (on the triton backend, whose GELU saves its
input; torch's F.gelu saves x + b instead, so there the GELU's case only trades one tensor for another).

Targets: ``c_attn``, ``c_proj`` (both the attention's and the MLP's, as PEFT matches suffixes),
``attn.c_proj``, ``mlp.c_proj``, ``c_fc``. The LM head (tied to the token embedding) is not a target.

PEFT layout. HF GPT-2 stores these layers as Conv1D with weight (in, out); PEFT's LoRA on Conv1D
(``fan_in_fan_out=True``) keeps lora_A.weight (r, in) and lora_B.weight (out, r), the same as
here, so the tensors are written as they are under PEFT's names
``base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight``; ``PeftModel.from_pretrained``
loads them onto the ``GPT2LMHeadModel`` that ``gptcore.io.save_hf`` writes. The safetensors metadata
also carries ``gptcore_adapter``: the base's model config and a fingerprint of its weights, which
``load_adapter`` checks (an adapter for another base is an error naming what differs).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
VALID_TARGETS = ("c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj", "attn.c_attn", "mlp.c_fc")
ADAPTER_FORMAT = 1


class LoRAError(ValueError):
    """A bad LoRA setting or an adapter that does not fit the model; the message says which and why."""


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias parameters, same state_dict names) plus a LoRA term."""

    # training a frozen base, recompute the input in backward where the model says how (forward's
    # remake) rather than store it; False: autograd over add_lora, which stores it (the reference)
    remake_inputs = True

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def add_lora(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out (..., out_features) + scaling * (dropout(x) A^T) B^T, as one addmm."""
        u = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)) * self.scaling  # (..., r)
        shape = out.shape
        return torch.addmm(out.reshape(-1, shape[-1]), u.reshape(-1, self.rank).to(out.dtype),
                           self.lora_B.to(out.dtype).t()).view(shape)

    def forward(self, x: torch.Tensor, remake: Optional[tuple] = None, bias: bool = True) -> torch.Tensor:
        """x W^T (+ b) + the LoRA term. ``remake`` = (fn, *src): x == fn(*src), recomputable from
        tensors the op in front of this layer saves anyway (gptcore.model passes its LayerNorm and
        GELU); while training a frozen base, x is then recomputed in backward instead of stored."""
        b = self.bias if bias else None
        if self.lean(remake):
            return _LoRAFn.apply(x, self.weight, b, self.lora_A, self.lora_B, self.scaling, remake)
        return self.add_lora(F.linear(x, self.weight, b), x)

    def lean(self, remake: Optional[tuple]) -> bool:
        """Whether forward takes _LoRAFn: training a frozen base (no dropout on the branch, not traced
        by torch.compile) with x recomputable from tensors that need a gradient (so the op that made
        x from them saved them)."""
        return (self.remake_inputs and remake is not None and torch.is_grad_enabled()
                and isinstance(remake[1], torch.Tensor) and remake[1].requires_grad and not self.weight.requires_grad
                and (self.bias is None or not self.bias.requires_grad)
                and not isinstance(self.lora_dropout, nn.Dropout) and not torch.compiler.is_compiling())

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, (out, in) fp32: what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora rank={self.rank}, alpha={self.alpha}"


class _LoRAFn(torch.autograd.Function):
    """out = x W^T + b + s (x A^T) B^T over a frozen W, b, as LoRALinear.add_lora computes it, with
    what the backward needs and no more: u = s x A^T (rows, r) and the tensors x is remade from
    (``remake`` = (fn, *src), which the op in front of the layer saves for its own backward), not x.

    The gradients are autograd's of the unfused ops (dx = g W + s (g B) A, dA = s (g B)^T x,
    dB = g^T u), in the same dtypes; x is recomputed under the forward's autocast state.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, remake):
        out = F.linear(x, weight, bias)  # the caller's autocast applies, as in add_lora
        u = F.linear(x, A.to(x.dtype)) * scaling  # (..., r)
        shape = out.shape
        u2 = u.reshape(-1, A.shape[0]).to(out.dtype)
        out = torch.addmm(out.reshape(-1, shape[-1]), u2, B.to(out.dtype).t()).view(shape)
        fn, *src = remake
        ctx.remake, ctx.scaling, ctx.dtypes = fn, scaling, (u.dtype, out.dtype, x.dtype)
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        tensors = [t if isinstance(t, torch.Tensor) else None for t in src]
        ctx.consts = [None if isinstance(t, torch.Tensor) else t for t in src]
        ctx.save_for_backward(weight, A, B, u2, *tensors)
        return out

    @staticmethod
    def backward(ctx, g):
        weight, A, B, u2, *tensors = ctx.saved_tensors
        u_dt, out_dt, x_dt = ctx.dtypes
        src = [t if t is not None else c for t, c in zip(tensors, ctx.consts)]
        dev, ac, ac_dt = ctx.autocast
        with torch.no_grad(), torch.autocast(dev, dtype=ac_dt, enabled=ac):
            x = ctx.remake(*src)
        g2 = g.reshape(-1, g.shape[-1])
        gu = (g2 @ B.to(out_dt)).to(u_dt) * ctx.scaling  # d(x A^T): (rows, r)
        x2 = x.reshape(-1, x.shape[-1])
        dA = (gu.t() @ x2.to(u_dt)).to(A.dtype)
        dB = (g2.t() @ u2).to(B.dtype)
        dx = g2 @ weight.to(out_dt) + gu @ A.to(u_dt)
        return dx.view(*g.shape[:-1], -1).to(x_dt), None, None, dA, dB, None, None


# ---- applying, freezing, merging --------------------------------------------------------------------
_MODULE_NAME = re.compile(r"^transformer\.h\.\d+\.(?:attn\.(?:c_attn|c_proj)|mlp\.(?:c_fc|c_proj))$")


def parse_targets(targets: str | Sequence[str]) -> list[str]:
    """Target names: those of VALID_TARGETS, or full module names (transformer.h.3.attn.c_attn)."""
    items = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not items:
        raise LoRAError(f"lora targets are empty; choose from {', '.join(VALID_TARGETS)}")
    bad = [t for t in items if t not in VALID_TARGETS and not _MODULE_NAME.match(t)]
    if bad:
        raise LoRAError(f"unknown lora target(s) {bad}; choose from {', '.join(VALID_TARGETS)} (the LM head is tied to "
                        f"the token embedding and is not a target)")
    return items


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def check_rank(rank: int, emb_dim: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise LoRAError(f"lora rank must be a positive integer (1..emb_dim={emb_dim}), got {rank!r}; "
                        f"use --lora-rank 0 for full fine-tuning instead of LoRA")
    if rank > emb_dim:
        raise LoRAError(f"lora rank {rank} exceeds the model's emb_dim {emb_dim}: a rank above the width adds "
                        f"parameters without adding capacity; use a rank in 1..{emb_dim}")


def apply_lora(model: nn.Module, rank: int, alpha: Optional[float] = None, dropout: float = 0.0,
               targets: str | Sequence[str] = ("c_attn", "c_proj", "c_fc"), freeze: bool = True) -> list[str]:
    """Put a LoRA term on every targeted Linear of ``model`` (in place); freeze everything else.
    Returns the names of the adapted modules. alpha defaults to rank (scaling 1)."""
    check_rank(rank, model.config.emb_dim)
    alpha = float(rank if alpha is None else alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise LoRAError(f"lora alpha must be a positive number, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"lora dropout must be in [0, 1), got {dropout}")
    tg = parse_targets(targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("this model already carries LoRA layers; merge them (merge_lora) or start from the base")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    names = []
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and name.startswith("transformer.h.") and _matches(name, tg):
            parent, attr = _parent(model, name)
            setattr(parent, attr, LoRALinear(mod, rank, alpha, dropout))
            names.append(name)
    if not names:
        raise LoRAError(f"no module of the model matches the lora targets {tg}")
    return names


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, attr = name.rsplit(".", 1)
    return model.get_submodule(path), attr


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def cast_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Hold the frozen Linear weights of the blocks in ``dtype`` (e.g. bf16: half the memory).
    Embeddings, LayerNorms, biases and LoRA factors stay as they are. Returns the tensors cast."""
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("transformer.h.") and not mod.weight.requires_grad:
            mod.weight.data = mod.weight.data.to(dtype)
            n += 1
    return n


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA term into its weight (W += scaling * B A, computed in fp32) and put the plain
    nn.Linear back; the model then has the base's exact parameter names and no adapter."""
    for name, mod in lora_layers(model).items():
        w = mod.weight
        merged = (w.float() + mod.delta_weight().to(w.device)).to(w.dtype)
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(merged, requires_grad=w.requires_grad)
        if mod.bias is not None:
            lin.bias = mod.bias
        parent, attr = _parent(model, name)
        setattr(parent, attr, lin)
    return model


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict without LoRA tensors (the base's own parameter names)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" not in k}


# ---- identity of a base ----------------------------------------------------------------------------
@torch.no_grad()
def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base weights (a strided sample of each tensor rounded to bf16, so an fp32
    base and its bf16 copy agree; the position table is left out: it may be cropped)."""
    h = hashlib.sha256()
    sd = base_state_dict(model)
    cfg = getattr(model, "config", None)
    for k in sorted(sd):
        if k == "transformer.wpe.weight" or (k == "lm_head.weight" and cfg is not None and cfg.tie_weights):
            continue
        t = sd[k].detach().flatten()
        step = max(1, t.numel() // 2048)
        sample = t[::step][:2048].to(torch.bfloat16).float().cpu().contiguous()
        h.update(k.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


_COMPARED = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias", "pos_emb", "ff_mult", "tie_weights")


def _config_diff(saved: dict, cfg) -> list[str]:
    now = cfg.to_dict()
    return [f"{k}: adapter's base {saved[k]!r}, this model {now.get(k)!r}" for k in _COMPARED
            if k in saved and saved[k] != now.get(k)]


# ---- the PEFT layout ---------------------------------------------------------------------------------
def peft_config(model: nn.Module, base_name: Optional[str] = None) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA layers to save")
    any_l = next(iter(layers.values()))
    suffixes = sorted({n.split(".", 3)[-1] for n in layers})  # attn.c_attn, mlp.c_fc, ...
    p = any_l.lora_dropout.p if isinstance(any_l.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": any_l.rank, "lora_alpha": any_l.alpha, "lora_dropout": p, "target_modules": suffixes,
        "fan_in_fan_out": True, "bias": "none", "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike, base_name: Optional[str] = None,
                 base_info: Optional[dict] = None) -> Path:
    """Write ``path/adapter_config.json`` + ``path/adapter_model.safetensors`` (PEFT's layout).
    base_info (default: computed now) holds the base's model config and weight fingerprint."""
    from safetensors.torch import save_file

    from gptcore.io import atomic_write_text

    cfg = peft_config(model, base_name)
    tensors = {}
    for name, m in lora_layers(model).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()
    info = dict(base_info or {"model_config": model.config.to_dict(), "base_fingerprint": base_fingerprint(model)})
    info.update(format=ADAPTER_FORMAT, base=base_name)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "gptcore_adapter": json.dumps(info)})
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(cfg, indent=2) + "\n")
    return out


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(transformer\.h\.\d+\.(?:attn|mlp)\.(?:c_attn|c_proj|c_fc))"
                       r"\.lora_([AB])(?:\.default)?\.weight$")


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter_config, tensors by PEFT name, gptcore info or {}) of an adapter folder."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    cfg_path, w_path = p / ADAPTER_CONFIG, p / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise LoRAError(f"{p} is not an adapter folder: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                        f"(gptcore.finetune writes them to OUT_DIR/adapter)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{cfg_path} is not valid JSON ({e})") from None
    try:
        with safe_open(str(w_path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"cannot read {w_path}: {e}") from None
    info = json.loads(meta["gptcore_adapter"]) if "gptcore_adapter" in meta else {}
    return cfg, tensors, info


def load_adapter(model: nn.Module, path: str | os.PathLike, allow_other_base: bool = False) -> list[str]:
    """Put the adapter saved at ``path`` onto ``model`` (a GPT without LoRA layers), unmerged.

    Reads gptcore's and PEFT's own GPT-2 LoRA adapters. An adapter made for another architecture is
    a LoRAError naming the fields that differ; for other base *weights* (same shapes, another
    fingerprint) too, unless allow_other_base. Returns the adapted module names.
    """
    cfg, tensors, info = read_adapter(path)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise LoRAError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise LoRAError(f"{path}: DoRA adapters (use_dora) are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise LoRAError(f"{path}: adapters that also train biases or whole modules (bias, modules_to_save) are "
                        f"not supported")
    if info:
        diffs = _config_diff(info.get("model_config", {}), model.config)
        if diffs:
            raise LoRAError(f"{path} was trained on another base ({info.get('base') or 'unnamed'}): "
                            + "; ".join(diffs))
        fp = base_fingerprint(model)
        if info.get("base_fingerprint") not in (None, fp) and not allow_other_base:
            raise LoRAError(
                f"{path} was trained on base {info.get('base') or '(unnamed)'} whose weights differ from this "
                f"model's (fingerprint {info['base_fingerprint']} vs {fp}; same architecture). Load the base it was "
                f"trained on, or pass allow_other_base=True (--adapter-any-base) to apply it anyway")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = _PEFT_KEY.match(k)
        if m is None:
            raise LoRAError(f"{path}: tensor {k!r} is not a GPT-2 LoRA factor (expected names like "
                            f"{PEFT_PREFIX}transformer.h.0.attn.c_attn.lora_A.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    if not pairs:
        raise LoRAError(f"{path}: {ADAPTER_WEIGHTS} holds no LoRA tensors")
    ranks = {t["A"].shape[0] for t in pairs.values() if "A" in t}
    if len(ranks) != 1 or cfg.get("rank_pattern"):
        raise LoRAError(f"{path}: layers of different ranks (rank_pattern) are not supported")
    r = int(cfg.get("r", next(iter(ranks))))
    alpha = float(cfg.get("lora_alpha", r))
    names = sorted(pairs)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise LoRAError(f"{path} adapts {missing[0]}, which this model ({model.config.n_layers} layers) does not have")
    apply_lora(model, r, alpha, dropout=float(cfg.get("lora_dropout", 0.0)), targets=names,
               freeze=True)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    layers = lora_layers(model)
    with torch.no_grad():
        for n in names:
            lay, t = layers[n], pairs[n]
            if set(t) != {"A", "B"}:
                raise LoRAError(f"{path}: {n} lacks lora_{'B' if 'A' in t else 'A'}")
            want_a, want_b = tuple(lay.lora_A.shape), tuple(lay.lora_B.shape)
            if tuple(t["A"].shape) != want_a or tuple(t["B"].shape) != want_b:
                raise LoRAError(f"{path}: {n} has lora_A {tuple(t['A'].shape)} / lora_B {tuple(t['B'].shape)}, this "
                                f"model needs {want_a} / {want_b}: the adapter is for a model of another width")
            lay.lora_A.copy_(t["A"])
            lay.lora_B.copy_(t["B"])
            lay.scaling = scale
    return names

