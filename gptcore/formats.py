"""Checkpoint formats: read any of them into gptcore, and gptcore's own weights format.

    from gptcore.formats import load_any, load_model, save_gptcore
    config, state_dict, meta = load_any("out/ckpt.pt")        # format detected: here nanoGPT
    model = load_model("gpt2-folder", backend="torch")         # any format -> GPT
    save_gptcore("out/my-model", model, step=1000, tokenizer="gpt2")

Formats (told apart by the path and the file's contents):
  gptcore            folder with model.safetensors + gptcore.json, or X.safetensors + X.json: weights
                     in safetensors, the rest (config, step, tokens, tokenizer, ...) in the JSON sidecar
  gptcore-pt         torch.save'd dict {"model": state_dict, "config": {...}, ...} with gptcore names
  hf                 Hugging Face GPT-2 folder: config.json + model.safetensors / pytorch_model.bin
                     (sharded *.index.json too); the conversion lives in gptcore.hf
  nanogpt            nanoGPT's ckpt.pt {"model_args": {...}, "model": state_dict, "iter_num": ...},
                     with or without torch.compile's "_orig_mod." prefix; bias=False loads with zero
                     biases (the same function)
  llms-from-scratch  state_dict of LLMs-from-scratch's GPTModel (tok_emb, trf_blocks.i.att.W_query,
                     ...), bare or as {"model_state_dict": ...}
  state_dict         bare state_dict with gptcore/nanoGPT names (or HF names, Conv1D layout)
The last two carry no config: pass one (preset name, JSON file or dict with LLMs-from-scratch,
nanoGPT or gptcore keys), or put it in a JSON file beside the weights (X.json or config.json);
n_heads cannot be read off the weights.

Every loader returns a state_dict with gptcore's names and layout (Linear weights (out, in)),
lm_head.weight included (the same tensor as transformer.wte.weight when tied).

Pickle safety: .pt/.pth/.bin files are read with torch.load(weights_only=True), which refuses to
run code stored in the file. A file that needs full unpickling raises UntrustedPickleError unless
the caller passes trust_pickle=True (--trust-pickle): do that only for files you trust.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from gptcore.config import PRESETS, GPTConfig

PathLike = Union[str, os.PathLike]
ConfigSpec = Union[None, str, dict, GPTConfig]

GPTCORE_WEIGHTS = "model.safetensors"
GPTCORE_SIDECAR = "gptcore.json"
FORMAT_VERSION = 1
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# Wrappers that torch.compile (`_orig_mod.`) and DistributedDataParallel (`module.`) put on keys.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Causal-mask buffers some implementations keep in their state_dict (nanoGPT without flash, HF).
_ATTN_BUFFER = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")


class FormatError(ValueError):
    """The file is not a checkpoint gptcore can read, or its contents do not fit its config."""


class UntrustedPickleError(RuntimeError):
    """The file holds pickled Python objects; loading it could run code from the file."""


@dataclass
class Checkpoint:
    """What a file holds, in gptcore's terms."""

    path: str
    format: str
    description: str
    state_dict: dict[str, torch.Tensor]        # gptcore names and layout
    config: Optional[GPTConfig]                # None when the file carries none and none was given
    meta: dict[str, Any] = field(default_factory=dict)  # step, tokens, tokenizer, ... when present
    notes: list[str] = field(default_factory=list)      # conversions made on the way in
    config_error: Optional[str] = None         # why config is None


# ---- public entry points ------------------------------------------------------------------
def load_any(path: PathLike, trust_pickle: bool = False, config: ConfigSpec = None
             ) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state_dict, meta) of a checkpoint in any supported format.

    config is needed only for formats that carry none (LLMs-from-scratch, bare state_dicts) and
    no JSON file sits beside them. meta holds "format", "description", "notes" and whatever the
    file records ("step", "tokens", "tokenizer", ...).
    """
    ck = read_checkpoint(path, trust_pickle=trust_pickle, config=config)
    if ck.config is None:
        raise FormatError(ck.config_error)
    check_state_dict(ck.config, ck.state_dict, source=ck.path)
    meta = {"format": ck.format, "description": ck.description, "notes": list(ck.notes), **ck.meta}
    return ck.config, ck.state_dict, meta


def load_model(path: PathLike, backend: Optional[str] = None, dtype=None, trust_pickle: bool = False,
               config: ConfigSpec = None):
    """A GPT built from a checkpoint in any supported format (dtype None: the file's dtype)."""
    cfg, sd, _ = load_any(path, trust_pickle=trust_pickle, config=config)
    return build_model(cfg, sd, backend=backend, dtype=dtype)


def build_model(config: GPTConfig, state_dict: dict[str, torch.Tensor], backend: Optional[str] = None,
                dtype=None):
    """GPT(config) holding state_dict's weights, in dtype (None: the state_dict's float dtype).

    The model comes back in eval mode (dropout off), as from transformers' from_pretrained;
    call .train() to fine-tune.
    """
    from gptcore.model import GPT

    check_state_dict(config, state_dict)
    dtype = as_dtype(dtype) if dtype is not None else state_dict_dtype(state_dict)
    model = GPT(config, backend=backend).to(dtype)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def save_gptcore(path: PathLike, model, **meta: Any) -> Path:
    """Write gptcore's weights format: PATH/model.safetensors + PATH/gptcore.json.

    meta goes into the JSON sidecar (e.g. step=..., tokens=..., tokenizer="gpt2"); it must be
    JSON-serialisable. Tied weights are stored once. Returns the folder.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg: GPTConfig = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_weights:
        del sd["lm_head.weight"]
    save_file(sd, str(out / GPTCORE_WEIGHTS), metadata={"format": "pt"})
    sidecar = {"format": "gptcore", "format_version": FORMAT_VERSION, "config": cfg.to_dict(), **meta}
    (out / GPTCORE_SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def read_checkpoint(path: PathLike, trust_pickle: bool = False, config: ConfigSpec = None) -> Checkpoint:
    """Detect the format of path and convert its weights to gptcore names (no model is built)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_dir():
        if (p / "latest").is_file() or _is_training_checkpoint(p):
            return _read_training_checkpoint(p)
        if (p / GPTCORE_SIDECAR).is_file():
            return _read_gptcore(p / GPTCORE_WEIGHTS, p / GPTCORE_SIDECAR)
        if _is_hf_config(p / "config.json"):
            from gptcore import hf
            return hf.read_hf_folder(p, trust_pickle=trust_pickle)
        weights = [x for x in p.iterdir() if x.suffix in TORCH_SUFFIXES + (".safetensors",)]
        if len(weights) == 1:
            return read_checkpoint(weights[0], trust_pickle=trust_pickle, config=config)
        found = ", ".join(sorted(x.name for x in p.iterdir())[:20]) or "nothing"
        raise FormatError(
            f"{p} is a folder but neither a gptcore checkpoint ({GPTCORE_SIDECAR} + {GPTCORE_WEIGHTS}), "
            f"a Hugging Face folder (config.json + model.safetensors), nor a folder with one weights "
            f"file; it holds: {found}"
        )
    if p.name == "config.json" or (_is_hf_weight_file(p) and _is_hf_config(p.parent / "config.json")):
        from gptcore import hf
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


def torch_load(path: PathLike, trust_pickle: bool = False) -> Any:
    """torch.load on the CPU that runs no code from the file unless trust_pickle is set."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if m is None:
            raise FormatError(f"{path}: not a checkpoint torch.load can read ({_last_line(e)})") from None
        raise UntrustedPickleError(
            f"{path} holds pickled Python objects that a weights-only load refuses (it needs "
            f"{m.group(1)}); loading it in full would run code stored in the file. Only if you trust "
            f"where the file came from, pass trust_pickle=True (on the command line: --trust-pickle)."
        ) from None
    except Exception as e:  # a truncated, foreign or corrupt file: torch raises many error types
        raise FormatError(f"{path}: not a checkpoint torch.load can read ({type(e).__name__}: "
                          f"{_last_line(e)})") from None


def load_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    """safetensors' load_file with a FormatError naming the file when it is not one."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (bad header), OSError
        raise FormatError(f"{path}: not a readable safetensors file ({_last_line(e)})") from None


def _last_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Check the doc")]
    return lines[-1] if lines else type(e).__name__


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
        from gptcore import hf
        return hf.config_from_hf(d)[0]
    if isinstance(d.get("config"), dict):  # a gptcore sidecar
        d = d["config"]
    if d.get("bias") is False:
        d = {k: v for k, v in d.items() if k != "bias"} | {"qkv_bias": False}
    try:
        return GPTConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


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
    from gptcore.model import GPT

    with torch.device("meta"):
        model = GPT(config, backend="reference")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def diff_state_dict(config: GPTConfig, sd: dict[str, torch.Tensor]) -> dict[str, list]:
    """What keeps sd from loading into GPT(config): missing / unexpected keys, shape mismatches."""
    want = expected_shapes(config)
    return {
        "missing": sorted((k for k in want if k not in sd), key=_natural),
        "unexpected": sorted((k for k in sd if k not in want), key=_natural),
        "shape_mismatch": sorted(
            ((k, tuple(sd[k].shape), want[k]) for k in want if k in sd and tuple(sd[k].shape) != want[k]),
            key=lambda t: _natural(t[0]),
        ),
    }


def _natural(key: str) -> list:
    """Sort key putting transformer.h.2 before transformer.h.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def check_state_dict(config: GPTConfig, sd: dict[str, torch.Tensor], source: str = "state_dict") -> None:
    """Raise FormatError naming every key and shape that does not fit GPT(config)."""
    d = diff_state_dict(config, sd)
    problems = []
    if d["missing"]:
        problems.append(f"missing keys: {_clip(d['missing'])}")
    if d["unexpected"]:
        problems.append(f"unexpected keys: {_clip(d['unexpected'])}")
    if d["shape_mismatch"]:
        problems.append("shape mismatches: " + _clip([f"{k} {a} vs {b}" for k, a, b in d["shape_mismatch"]]))
    if problems:
        raise FormatError(f"{source} does not fit config {config}: " + "; ".join(problems))
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


def finish_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Point lm_head.weight at the token embedding when config ties them and the file omits it."""
    if config.tie_weights and "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


# ---- format readers -----------------------------------------------------------------------
def _is_training_checkpoint(p: Path) -> bool:
    return (p / "meta.json").is_file() and (p / GPTCORE_WEIGHTS).is_file()


def _read_training_checkpoint(p: Path) -> Checkpoint:
    """A checkpoint written by python -m gptcore.train (or its run folder, via ``latest``)."""
    from gptcore import checkpoint

    ck = checkpoint.resolve_checkpoint(p)
    meta = checkpoint.read_meta(ck)  # types checked: an edited meta.json is named, not a TypeError later
    if not isinstance(meta.get("model_config"), dict):
        raise FormatError(f"{ck / 'meta.json'}: no 'model_config' object; not a gptcore training checkpoint")
    config = GPTConfig.from_dict(meta["model_config"])
    sd = finish_state_dict(load_safetensors(ck / GPTCORE_WEIGHTS), config)
    rest = {k: meta[k] for k in ("step", "tokens", "tokenizer", "best_val", "data", "data_hash", "saved_at")
            if k in meta}
    desc = "gptcore training checkpoint (model.safetensors + meta.json + state.pt)"
    return Checkpoint(str(ck), "gptcore-train", desc, sd, config, rest)


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
    return Checkpoint(str(weights.parent if weights.name == GPTCORE_WEIGHTS else weights), "gptcore",
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
    sd = {k: v for k, v in strip_wrappers(obj["model"]).items() if not _ATTN_BUFFER.search(k)}
    notes = []
    if any(k.startswith(_WRAPPER_PREFIXES) for k in obj["model"]):
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
    return Checkpoint(str(p), "nanogpt", "nanoGPT checkpoint (model_args + model)",
                      finish_state_dict(sd, config), config, meta, notes)


def _read_gptcore_pt(p: Path, obj: dict) -> Checkpoint:
    try:
        config = GPTConfig.from_dict(obj["config"])
    except (TypeError, ValueError) as e:
        raise FormatError(f"{p}: its 'config' is not a gptcore config: {e}") from None
    sd = strip_wrappers(obj["model"])
    meta = dict(obj["meta"]) if isinstance(obj.get("meta"), dict) else {}
    for key in ("step", "tokens", "tokenizer"):
        if key in obj and key not in meta:
            meta[key] = obj[key]
    return Checkpoint(str(p), "gptcore-pt", "gptcore torch checkpoint (model + config)",
                      finish_state_dict(sd, config), config, meta)


def _read_bare(p: Path, raw: dict, config: ConfigSpec, container: str) -> Checkpoint:
    """A state_dict without a config: LLMs-from-scratch names, gptcore/nanoGPT names or HF names."""
    raw = strip_wrappers(raw)
    notes: list[str] = []
    if "tok_emb.weight" in raw:
        fmt, desc = "llms-from-scratch", f"LLMs-from-scratch GPTModel state_dict ({container})"
        sd = convert_llms_from_scratch(raw)
    elif _looks_hf(raw):
        from gptcore import hf
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
    return Checkpoint(str(p), fmt, desc, sd, cfg, meta, notes, error)


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
        raise FormatError(f"LLMs-from-scratch state_dict has keys gptcore does not know: {_clip(sorted(unknown))}")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise FormatError(f"trf_blocks.{i}.att: W_query/W_key/W_value {kind}s incomplete ({sorted(parts)})")
        # (C, C) x 3 -> (3C, C): rows q then k then v, each split into heads the same way as ours.
        sd[f"transformer.h.{i}.attn.c_attn.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0)
    return sd


def strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop torch.compile's `_orig_mod.` and DDP's `module.` key prefixes."""
    out = {}
    for k, v in sd.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


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


def read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"cannot read JSON {path}: {e}") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def _clip(items: list, n: int = 8) -> str:
    head = ", ".join(map(str, items[:n]))
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")
