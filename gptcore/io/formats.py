"""Readers of the formats other programs write, and gptcore's weights-only format.

  gptcore            folder with model.safetensors + gptcore.json, or X.safetensors + X.json: weights
                     in safetensors, the rest (config, step, tokens, tokenizer, ...) in the JSON sidecar
                     (``save_gptcore`` writes it)
  gptcore-pt         torch.save'd dict {"model": state_dict, "config": {...}, ...} with gptcore names
  nanogpt            nanoGPT's ckpt.pt {"model_args": {...}, "model": state_dict, "iter_num": ...},
                     with or without torch.compile's "_orig_mod." prefix; bias=False loads with zero
                     biases (the same function)
  llms-from-scratch  state_dict of LLMs-from-scratch's GPTModel (tok_emb, trf_blocks.i.att.W_query,
                     ...), bare or as {"model_state_dict": ...}
  state_dict         bare state_dict with gptcore/nanoGPT names (or HF names, Conv1D layout)

The last two carry no config: pass one (preset name, JSON file or dict with LLMs-from-scratch,
nanoGPT or gptcore keys), or put it in a JSON file beside the weights (X.json or config.json);
n_heads cannot be read off the weights.

``read_checkpoint`` tells every format apart (gptcore's training checkpoints and Hugging Face
folders included: ``gptcore.io.train_ckpt``, ``gptcore.io.hf``) and returns one ``Checkpoint``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from gptcore.config import PRESETS, GPTConfig
from gptcore.io import hf, train_ckpt
from gptcore.io.common import (FORMAT_VERSION, TORCH_SUFFIXES, WRAPPER_PREFIXES, Checkpoint, ConfigSpec, FormatError,
                               PathLike, clip, existing_path, load_safetensors, read_json, strip_prefixes, torch_load)
from gptcore.io.weights import expected_shapes, finish_state_dict, infer_config_fields, model_state_dict, unwrap

GPTCORE_WEIGHTS = "model.safetensors"
GPTCORE_SIDECAR = "gptcore.json"
# Causal-mask buffers some implementations keep in their state_dict (nanoGPT without flash, HF).
_ATTN_BUFFER = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


def read_checkpoint(path: PathLike, trust_pickle: bool = False, config: ConfigSpec = None,
                    verify: bool = True) -> Checkpoint:
    """Detect the format of ``path`` and convert its weights to gptcore names (no model is built).

    This is the one reader: inspect, eval, generate, serve and the trainer's --init-from all read
    through it. ``config`` is needed only for weights that carry none; ``verify`` checks a training
    checkpoint's SHA-256s; ``trust_pickle`` allows full unpickling (only for files you trust).
    """
    p = existing_path(path)
    if train_ckpt.is_training_checkpoint(p):
        return train_ckpt.load_checkpoint(p, load_state=False, verify=verify)
    if p.is_dir():
        if (p / GPTCORE_SIDECAR).is_file():
            return _read_gptcore(p / GPTCORE_WEIGHTS, p / GPTCORE_SIDECAR)
        if _is_hf_config(p / "config.json"):
            return hf.read_hf_folder(p, trust_pickle=trust_pickle)
        weights = [x for x in p.iterdir() if x.suffix in TORCH_SUFFIXES + (".safetensors",)]
        if len(weights) == 1:
            return read_checkpoint(weights[0], trust_pickle=trust_pickle, config=config)
        found = ", ".join(sorted(x.name for x in p.iterdir())[:20]) or "nothing"
        raise FormatError(
            f"{p} is not a gptcore checkpoint (a training checkpoint: meta.json + model.safetensors + state.pt, "
            f"or its run directory; or {GPTCORE_SIDECAR} + {GPTCORE_WEIGHTS}), not a Hugging Face folder "
            f"(config.json + model.safetensors), nor a folder with one weights file; it holds: {found}"
        )
    if p.name == "config.json" or (_is_hf_weight_file(p) and _is_hf_config(p.parent / "config.json")):
        return hf.read_hf_folder(p.parent, trust_pickle=trust_pickle)
    if p.suffix == ".safetensors":
        sidecar = p.with_suffix(".json")
        if sidecar.is_file() and _json_format(sidecar) == "gptcore":
            return _read_gptcore(p, sidecar)
        return _read_bare(p, load_safetensors(p), config, "safetensors")
    if p.suffix == ".json":
        raise FormatError(f"{p} is a JSON file; pass the weights file or the folder that holds it")
    obj = torch_load(p, trust_pickle=trust_pickle)
    return _read_torch_object(p, obj, config)


def save_gptcore(path: PathLike, model, **meta: Any) -> Path:
    """Write gptcore's weights format: PATH/model.safetensors + PATH/gptcore.json.

    meta goes into the JSON sidecar (e.g. step=..., tokens=..., tokenizer="gpt2"); it must be
    JSON-serialisable. Tied weights are stored once. Returns the folder.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg: GPTConfig = unwrap(model).config
    sd = model_state_dict(model)  # a tied head once, no wrapper prefixes
    save_file(sd, str(out / GPTCORE_WEIGHTS), metadata={"format": "pt"})
    sidecar = {"format": "gptcore", "format_version": FORMAT_VERSION, "config": cfg.to_dict(), **meta}
    (out / GPTCORE_SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


# ---- config helpers -----------------------------------------------------------------------
def resolve_config(spec: ConfigSpec) -> Optional[GPTConfig]:
    """A GPTConfig from a preset name, a JSON file, inline JSON, a dict, or a GPTConfig."""
    if spec is None or isinstance(spec, GPTConfig):
        return spec
    if isinstance(spec, dict):
        return _config_from_json_dict(spec, where="config dict")
    if isinstance(spec, (str, os.PathLike)):
        s = str(spec)
        if s in PRESETS:
            return GPTConfig.from_preset(s)
        if s.lstrip().startswith("{"):
            try:
                return _config_from_json_dict(json.loads(s), where="inline JSON")
            except json.JSONDecodeError as e:
                raise ValueError(f"--config: inline JSON does not parse: {e}") from None
        if Path(s).is_file():
            return _config_from_json_dict(read_json(Path(s)), where=s)
        raise ValueError(
            f"config {s!r} is not a preset ({', '.join(PRESETS)}), a JSON file, or inline JSON"
        )
    raise TypeError(f"config must be a preset name, JSON path/string, dict or GPTConfig, got {type(spec)}")


def _config_from_json_dict(d: dict, where: str) -> GPTConfig:
    if d.get("model_type") is not None:
        return hf.config_from_hf(d)[0]
    if isinstance(d.get("config"), dict):  # a gptcore sidecar
        d = d["config"]
    if d.get("bias") is False:
        d = {k: v for k, v in d.items() if k != "bias"} | {"qkv_bias": False}
    try:
        return GPTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


# ---- format readers -----------------------------------------------------------------------
def _read_gptcore(weights: Path, sidecar: Path) -> Checkpoint:
    meta = read_json(sidecar)
    if not weights.is_file():
        raise FormatError(f"{sidecar} has no weights file beside it (expected {weights.name})")
    if not isinstance(meta.get("config"), dict):
        raise FormatError(f"{sidecar}: no 'config' object; a gptcore sidecar holds the model config")
    version = meta.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise FormatError(f"{sidecar}: format_version {version} is newer than this gptcore reads "
                          f"({FORMAT_VERSION}); upgrade gptcore")
    config = GPTConfig.from_dict(meta["config"])
    sd = finish_state_dict(load_safetensors(weights), config)
    rest = {k: v for k, v in meta.items() if k not in ("format", "format_version", "config")}
    desc = f"gptcore weights ({weights.name} + {sidecar.name})"
    return Checkpoint(weights.parent if weights.name == GPTCORE_WEIGHTS else weights, "gptcore",
                      desc, sd, config, rest)


def _read_torch_object(p: Path, obj: Any, config: ConfigSpec) -> Checkpoint:
    if isinstance(obj, torch.nn.Module):  # torch.save(model): only loads with trust_pickle=True
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise FormatError(f"{p}: expected a dict (a state_dict or a checkpoint), found {type(obj).__name__}")
    if "model_args" in obj and "model" in obj:
        return _read_nanogpt(p, obj)
    if "model" in obj and isinstance(obj.get("config"), dict):
        return _read_gptcore_pt(p, obj)
    if "model_state_dict" in obj:
        return _read_bare(p, obj["model_state_dict"], config, "torch.save {'model_state_dict': ...}")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return _read_bare(p, obj["state_dict"], config, "torch.save {'state_dict': ...}")
    return _read_bare(p, obj, config, "torch.save state_dict")


def _read_nanogpt(p: Path, obj: dict) -> Checkpoint:
    args = dict(obj["model_args"])
    bias = args.pop("bias", True)
    sd = {k: v for k, v in strip_prefixes(obj["model"]).items() if not _ATTN_BUFFER.search(k)}
    notes = []
    if any(k.startswith(WRAPPER_PREFIXES) for k in obj["model"]):
        notes.append("removed the '_orig_mod.'/'module.' key prefix of a compiled/DDP model")
    fields_ = infer_config_fields(sd)
    try:
        config = GPTConfig.from_dict({**args, "qkv_bias": bool(bias),
                                      "tie_weights": fields_.get("tie_weights", True)})
    except (TypeError, ValueError) as e:
        raise FormatError(f"{p}: nanoGPT model_args {args} do not make a gptcore config: {e}") from None
    if not bias:
        sd = _zero_missing_biases(sd, config)
        notes.append("nanoGPT bias=False: LayerNorm and Linear biases loaded as zeros (same function)")
    meta: dict[str, Any] = {}
    if "iter_num" in obj:
        meta["step"] = int(obj["iter_num"])
    if obj.get("best_val_loss") is not None:
        meta["best_val_loss"] = float(obj["best_val_loss"])
    train_cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    if "dataset" in train_cfg:
        meta["dataset"] = train_cfg["dataset"]
    per_step = [train_cfg.get(k) for k in ("gradient_accumulation_steps", "batch_size", "block_size")]
    if "step" in meta and all(isinstance(x, int) for x in per_step):
        meta["tokens"] = meta["step"] * per_step[0] * per_step[1] * per_step[2]
        notes.append("tokens = iter_num x gradient_accumulation_steps x batch_size x block_size "
                     "(nanoGPT's training config)")
    return Checkpoint(p, "nanogpt", "nanoGPT checkpoint (model_args + model)",
                      finish_state_dict(sd, config), config, meta, notes)


def _read_gptcore_pt(p: Path, obj: dict) -> Checkpoint:
    try:
        config = GPTConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as e:
        raise FormatError(f"{p}: its 'config' is not a gptcore config: {e}") from None
    sd = strip_prefixes(obj["model"])
    meta = dict(obj["meta"]) if isinstance(obj.get("meta"), dict) else {}
    for key in ("step", "tokens", "tokenizer"):
        if key in obj and key not in meta:
            meta[key] = obj[key]
    return Checkpoint(p, "gptcore-pt", "gptcore torch checkpoint (model + config)",
                      finish_state_dict(sd, config), config, meta)


def _read_bare(p: Path, raw: dict, config: ConfigSpec, container: str) -> Checkpoint:
    """A state_dict without a config: LLMs-from-scratch names, gptcore/nanoGPT names or HF names."""
    raw = strip_prefixes(raw)
    notes: list[str] = []
    if "tok_emb.weight" in raw:
        fmt, desc = "llms-from-scratch", f"LLMs-from-scratch GPTModel state_dict ({container})"
        sd = convert_llms_from_scratch(raw)
    elif _looks_hf(raw):
        fmt, desc = "state_dict", f"state_dict with Hugging Face GPT-2 names ({container})"
        sd = hf.state_dict_from_hf(raw)
        notes.append("HF Conv1D weights transposed to (out, in)")
    elif "transformer.wte.weight" in raw:
        fmt, desc = "state_dict", f"state_dict with gptcore/nanoGPT names ({container})"
        sd = {k: v for k, v in raw.items() if not _ATTN_BUFFER.search(k)}
    else:
        sample = ", ".join(list(raw)[:6])
        raise FormatError(
            f"{p}: not a format gptcore knows ({container} with keys {sample}, ...). Supported: gptcore, "
            f"Hugging Face GPT-2 folder, nanoGPT ckpt.pt, LLMs-from-scratch GPTModel state_dict"
        )
    cfg, source, error = None, None, None
    spec = config if config is not None else _sibling_config(p)
    if spec is not None:
        source = "given" if config is not None else str(spec)
        cfg = resolve_config(spec)
        if not _sets_tie(spec):
            # LLMs-from-scratch's out_head is its own matrix: tie only where it equals tok_emb.
            cfg = cfg.replace(tie_weights=infer_config_fields(sd).get("tie_weights", cfg.tie_weights))
    else:
        error = (f"{p} holds weights without a config, and n_heads cannot be read off the weights: pass "
                 f"one (config=... / --config PRESET|JSON, e.g. LLMs-from-scratch's GPT_CONFIG dict saved "
                 f"as JSON) or save it as {p.with_suffix('.json').name} beside the weights")
    if cfg is not None:
        sd = finish_state_dict(sd, cfg)
    meta = {"config_source": source} if source else {}
    return Checkpoint(p, fmt, desc, sd, cfg, meta, notes, error)


def convert_llms_from_scratch(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLMs-from-scratch GPTModel names -> gptcore names; W_query/W_key/W_value fuse into c_attn."""
    top = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
           "final_norm.scale": "transformer.ln_f.weight", "final_norm.shift": "transformer.ln_f.bias",
           "out_head.weight": "lm_head.weight"}
    block = {"norm1.scale": "ln_1.weight", "norm1.shift": "ln_1.bias",
             "norm2.scale": "ln_2.weight", "norm2.shift": "ln_2.bias",
             "att.out_proj.weight": "attn.c_proj.weight", "att.out_proj.bias": "attn.c_proj.bias",
             "ff.layers.0.weight": "mlp.c_fc.weight", "ff.layers.0.bias": "mlp.c_fc.bias",
             "ff.layers.2.weight": "mlp.c_proj.weight", "ff.layers.2.bias": "mlp.c_proj.bias"}
    sd: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in raw.items():
        if k in top:
            sd[top[k]] = v
            continue
        m = re.match(r"trf_blocks\.(\d+)\.(.+)$", k)
        if m is None:
            unknown.append(k)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in block:
            sd[f"transformer.h.{i}.{block[rest]}"] = v
        elif (mq := re.match(r"att\.W_(query|key|value)\.(weight|bias)$", rest)):
            qkv.setdefault((i, mq.group(2)), {})[mq.group(1)] = v
        elif rest != "att.mask":  # the causal-mask buffer
            unknown.append(k)
    if unknown:
        raise FormatError(f"LLMs-from-scratch state_dict has keys gptcore does not know: {clip(sorted(unknown))}")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise FormatError(f"trf_blocks.{i}.att: W_query/W_key/W_value {kind}s incomplete ({sorted(parts)})")
        # (C, C) x 3 -> (3C, C): rows q then k then v, each split into heads the same way as ours.
        sd[f"transformer.h.{i}.attn.c_attn.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return sd


def _zero_missing_biases(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    dtype = sd["transformer.wte.weight"].dtype
    for k, shape in expected_shapes(config).items():
        if k.endswith(".bias") and k not in sd:
            sd[k] = torch.zeros(shape, dtype=dtype)
    return sd


def _looks_hf(raw: dict) -> bool:
    """HF GPT-2 names: 'wte.weight'/'h.0...' without prefix, or Conv1D c_attn weights (C, 3C)."""
    if "wte.weight" in raw:
        return True
    w = raw.get("transformer.h.0.attn.c_attn.weight")
    return w is not None and w.dim() == 2 and w.shape[1] == 3 * w.shape[0]


def _is_hf_weight_file(p: Path) -> bool:
    return p.name.startswith(("model", "pytorch_model")) and p.suffix in (".safetensors", ".bin") \
        or p.name.endswith(".index.json")


def _sibling_config(p: Path) -> Optional[dict]:
    for cand in (p.with_suffix(".json"), p.parent / f"{p.stem}_config.json", p.parent / "config.json"):
        if cand.is_file():
            return read_json(cand)
    return None


def _sets_tie(spec: ConfigSpec) -> bool:
    """Whether a config spec says tie_weights itself (a GPTConfig, or JSON with the key); a
    preset or a dict without the key leaves it to the weights."""
    if isinstance(spec, GPTConfig):
        return True
    if isinstance(spec, (str, os.PathLike)) and str(spec) not in PRESETS:
        s = str(spec)
        spec = json.loads(s) if s.lstrip().startswith("{") else read_json(Path(s))
    if isinstance(spec, dict):
        inner = spec.get("config") if isinstance(spec.get("config"), dict) else spec
        return "tie_weights" in inner or "tie_word_embeddings" in inner
    return False


def _is_hf_config(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        d = read_json(path)
    except FormatError:
        return False
    return "model_type" in d or "n_embd" in d


def _json_format(path: Path) -> Optional[str]:
    try:
        d = read_json(path)
    except FormatError:
        return None
    return d.get("format") if isinstance(d, dict) else None
