"""The trainer's settings: one dataclass (TrainConfig) drives the YAML/JSON config files, the
command line (one flag per field, help text from the field) and the type checks.

    cfg = make_config(("config file", load_config_file("run.yaml")), ("command line", {"lr": 1e-3}))
    cfg = parse_args(["--preset", "tiny", "--lr", "1e-3"])

gptcore.finetune reuses all of it over its own subclass (make_config/build_parser/parse_args take
the class and its keys).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

import torch

from gptcore.cli import MAX_SEED, UsageError, add_debug_flag, check_finite, check_int_range
from gptcore.config import PRESETS, GPTConfig
from gptcore.ops import BACKENDS

TOKENIZER = "gpt2"
DEFAULT_MAX_STEPS = 200
EVAL_SEED = 20240601  # the held-out windows do not depend on --seed, so runs compare
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConfigError(ValueError):
    """A bad setting: unknown key, wrong type or invalid value. Exit status 2."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite steps, out of memory). Exit status 1."""


# ---- configuration --------------------------------------------------------------------------------
def _opt(default, help: str, group: str, choices=None, shown: Optional[str] = None):
    meta = {"help": help, "group": group, "choices": choices, "shown": shown}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # model
    preset: str = _opt("tiny", "model preset", "model", choices=sorted(PRESETS))
    init_from: str = _opt("scratch", "'scratch', a gptcore checkpoint (dir or run dir), or a GPT-2 "
                          "name / Hugging Face folder (gpt2, gpt2-medium, ...)", "model")
    trust_pickle: bool = _opt(False, "let --init-from unpickle .pt/.pth/.bin files that a weights-only load "
                              "refuses; this can run code stored in the file: only for files you trust", "model")
    backend: Optional[str] = _opt(None, "kernel backend", "model", choices=list(BACKENDS),
                                  shown="triton on a GPU, else torch")
    grad_checkpointing: bool = _opt(False, "recompute each block in backward (less memory, ~1/3 more compute)",
                                    "model")
    compile: bool = _opt(False, "torch.compile the model", "model")
    compile_mode: str = _opt("default", "torch.compile mode with --compile; 'reduce-overhead' replays each "
                             "step as CUDA graphs, which the triton backend needs to beat torch's compiled "
                             "step (its kernels are host-heavy custom ops)", "model",
                             choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    model: dict = _opt({}, "model fields overriding the preset", "model")
    # data
    data: str = _opt("default", "text file, folder, glob, 'default' (embedded corpus), 'shakespeare' "
                     "or 'tinystories'", "data")
    data_errors: str = _opt("strict", "non-UTF-8 input: 'strict' (error) or 'replace' (U+FFFD)", "data",
                            choices=["strict", "replace"])
    val_fraction: float = _opt(0.1, "share of the tokens held out for evaluation", "data")
    # batch and length
    batch_size: int = _opt(8, "sequences per micro-batch per process", "batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step", "batch")
    max_steps: Optional[int] = _opt(None, "optimizer steps", "batch",
                                    shown=f"{DEFAULT_MAX_STEPS} when neither --max-tokens nor --epochs is given")
    max_tokens: Optional[int] = _opt(None, "train until this many tokens (rounded up to whole steps)", "batch")
    epochs: Optional[float] = _opt(None, "train for this many passes over the train split's tokens", "batch")
    # optimizer
    lr: float = _opt(3e-3, "peak learning rate (AdamW)", "optimizer")
    min_lr: Optional[float] = _opt(None, "learning rate at the end of the cosine decay", "optimizer", shown="lr / 10")
    warmup_steps: int = _opt(20, "linear warmup steps", "optimizer")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices and embeddings only)", "optimizer")
    betas: tuple[float, float] = _opt((0.9, 0.95), "AdamW betas", "optimizer")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)", "optimizer")
    max_bad_steps: int = _opt(5, "stop after this many non-finite steps in a row", "optimizer")
    dtype: str = _opt("auto", "compute precision (weights stay fp32): bf16 autocast, fp16 autocast with "
                      "loss scaling, or fp32", "optimizer", choices=["auto", "bf16", "fp16", "fp32"],
                      shown="auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    # evaluation, checkpoints, logging
    eval_interval: int = _opt(50, "evaluate on the val split every N steps (0: only at the end)", "eval")
    eval_steps: int = _opt(10, "val batches per evaluation (fixed windows)", "eval")
    ckpt_interval: int = _opt(100, "save a checkpoint every N steps (0: only at the end)", "eval")
    keep_last: int = _opt(2, "keep the newest K ckpt-* directories (best/ is kept besides); only "
                         "checkpoints this process wrote are deleted, never an earlier run's", "eval")
    out_dir: str = _opt("out", "directory for checkpoints, metrics.jsonl and loss.png", "eval")
    resume: Optional[str] = _opt(None, "continue a run: 'auto' (the newest complete state in out_dir, ckpt-* or "
                                 "best/, or a new run if there is none) or a checkpoint path; --resume alone means "
                                 "auto. Nothing the earlier run wrote is truncated: metrics.jsonl is appended to",
                                 "eval", shown="start a new run; a non-empty out_dir is refused")
    overwrite: bool = _opt(False, "start a new run in a non-empty out_dir: deletes its ckpt-*, best/, latest, "
                           "metrics.jsonl and loss.png (other files stay); with --resume PATH: allow replacing "
                           "the later checkpoints out_dir holds", "eval")
    log_interval: int = _opt(10, "print a line every N steps (with the progress bar: refresh its loss, lr, "
                              "tok/s, mfu and mem every N steps)", "eval")
    sample_every: int = _opt(0, "print a sample every N steps (0: only at the end)", "eval")
    sample_prompt: str = _opt("The", "prompt of the samples", "eval")
    sample_tokens: int = _opt(40, "tokens per sample (0: no samples)", "eval")
    sample_temperature: float = _opt(0.8, "sampling temperature (0: greedy)", "eval")
    # runtime
    seed: int = _opt(1337, "random seed (init, data order, dropout)", "runtime")
    device: str = _opt("auto", "cpu, cuda, cuda:N", "runtime",
                       shown="auto: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu")
    progress: bool = _opt(True, "show a progress bar (--no-progress: plain log lines)", "runtime")
    cuda_graph: str = _opt("auto", "capture each whole optimizer step (micro-batches, clipping, AdamW, the "
                           "non-finite skip) in one CUDA graph: auto (on with CUDA where the run allows it; the "
                           "start-up log says why not), on (an error where it cannot), off (the eager step)",
                           "runtime", choices=["auto", "on", "off"])
    parallel: str = _opt("auto", "how processes under torchrun share the work: ddp (each rank holds the whole "
                         "model; gradients all-reduced in buckets during backward), fsdp (FSDP2: params, grads and "
                         "AdamW state sharded over the ranks, one unit per transformer block; checkpoints save the "
                         "optimizer sharded through torch.distributed.checkpoint), or auto (fsdp when "
                         "model.estimate_memory says the model, its optimizer state and activations would not fit "
                         "one GPU; the start-up log says which and why). --fsdp is short for --parallel fsdp",
                         "runtime", choices=["auto", "ddp", "fsdp"])
    fsdp_cpu_offload: bool = _opt(False, "with fsdp: keep the sharded params, grads and AdamW state in CPU memory "
                                  "(FSDP2 CPUOffloadPolicy; the optimizer steps on the CPU): slower, for models "
                                  "whose state does not fit the GPUs", "runtime")
    ddp_bucket_mb: int = _opt(25, "with ddp: gradient bucket size in MiB (DDP's bucket_cap_mb); each full bucket is "
                              "all-reduced while backward goes on, and micro-batches before the last of a step "
                              "skip the all-reduce (no_sync)", "runtime")

    def validate(self) -> None:
        _check_numbers(self)
        positive = ["batch_size", "grad_accum", "eval_steps", "keep_last", "log_interval", "max_bad_steps",
                    "ddp_bucket_mb"]
        for k in positive:
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ["warmup_steps", "eval_interval", "ckpt_interval", "sample_every", "sample_tokens",
                  "weight_decay", "grad_clip", "sample_temperature"]:
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.fsdp_cpu_offload and self.parallel != "fsdp":
            raise ConfigError("--fsdp-cpu-offload applies under FSDP: add --parallel fsdp (or --fsdp)")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile_mode {self.compile_mode!r} applies under --compile: add --compile, or drop "
                              f"--compile-mode")
        lengths = [k for k in ("max_steps", "max_tokens", "epochs") if getattr(self, k) is not None]
        if len(lengths) > 1:
            raise ConfigError(f"give only one of max_steps, max_tokens, epochs (got {', '.join(lengths)})")
        for k in lengths:
            if not getattr(self, k) > 0:
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be in [0, 1), got {list(self.betas)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            v = getattr(self, f.name)
            if choices and v is not None and v not in choices:
                raise ConfigError(f"{f.name} must be one of {choices}, got {v!r}")
        try:
            GPTConfig.from_preset(self.preset, **self.model)  # with --init-from: checks the values alone
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


_MODEL_HELP = {
    "vocab_size": "vocabulary size (>= 50257 for the GPT-2 tokenizer; 50304 pads for speed)",
    "context_length": "tokens per training sequence = the model's positions (shorter than a loaded "
                      "model's: its position table is cropped)",
    "emb_dim": "residual width", "n_heads": "attention heads", "n_layers": "transformer blocks",
    "drop_rate": "dropout probability", "qkv_bias": "bias on the q/k/v projection",
    "pos_emb": "'learned' or 'rope'", "rope_theta": "rotary base", "ff_mult": "MLP width / emb_dim",
    "ln_eps": "LayerNorm epsilon", "tie_weights": "LM head shares the token embedding",
}
_GROUPS = {
    "model": "model", "shape": "model shape (each defaults to the preset's value)", "data": "data",
    "batch": "batch and run length", "optimizer": "optimization and precision",
    "eval": "evaluation, checkpoints, logging", "runtime": "runtime",
}
TRAIN_KEYS = [f.name for f in fields(TrainConfig) if f.name != "model"]
MODEL_KEYS = [f.name for f in fields(GPTConfig)]


def _type_name(tp) -> str:
    if get_origin(tp) is Union:
        inner = [a for a in get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if get_origin(tp) is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_type(key: str, value: Any, tp) -> Any:
    """``value`` converted to ``tp`` (int -> float allowed), or ConfigError naming the key."""
    declared = tp
    if get_origin(tp) is Union:
        if value is None:
            return None
        tp = next(a for a in get_args(tp) if a is not type(None))
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif get_origin(tp) is tuple:
        args = get_args(tp)
        ok = isinstance(value, (list, tuple)) and len(value) == len(args)
        if ok:
            value = tuple(_check_type(key, v, a) for v, a in zip(value, args))
    elif tp is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(declared)}, got {type(value).__name__} {value!r}")
    return value


def _unknown(key: str, where: str, keys: Optional[list] = None) -> ConfigError:
    valid = (TRAIN_KEYS if keys is None else keys) + MODEL_KEYS
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint}; valid keys: {', '.join(valid)}")


def load_config_file(path: str | os.PathLike) -> dict:
    """The settings of a YAML or JSON file, flat (a ``model:`` section merges in), keys with _."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror or e})") from None
    if len(data) > 1 << 20:
        raise ConfigError(f"config file {p} is {len(data):,} bytes: not a settings file (they are a few hundred)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not a UTF-8 text file (byte {e.start}); give a YAML or JSON "
                          f"settings file") from None
    if "\x00" in text:
        raise ConfigError(f"config file {p} holds NUL bytes: not a YAML or JSON text file")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            raw = _yaml_load(text)
        elif p.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"config file {p}: use a .yaml, .yml or .json file")
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError(f"config file {p} does not parse: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings, got {type(raw).__name__}")
    flat = {}
    for k, v in raw.items():
        k = str(k).replace("-", "_")
        if k == "model" and isinstance(v, dict):
            flat.update({str(mk).replace("-", "_"): mv for mk, mv in v.items()})
        else:
            flat[k] = v
    return flat


_YAML_FLOAT = re.compile(r"""^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$""")


def _yaml_load(text: str):
    """yaml.safe_load, but 1e-3 and 3E5 are floats (YAML 1.1 wants a dot: 1.0e-3; YAML 1.2 and
    every user expect a number). Real words (inf, nan, 1_000 as int) keep their YAML meaning."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def make_config(*sources: tuple[str, dict], cls=None, keys: Optional[list] = None):
    """cls (default TrainConfig; gptcore.finetune passes its subclass) from (where, settings) pairs,
    later ones winning; every value type-checked; keys: the settings cls accepts besides the model's."""
    cls = cls or TrainConfig
    keys = TRAIN_KEYS if keys is None else keys
    own_types, model_types = get_type_hints(cls), get_type_hints(GPTConfig)
    kw: dict = {}
    model: dict = {}
    for where, values in sources:
        for k, v in values.items():
            if k in model_types:
                model[k] = _check_type(k, v, model_types[k])
            elif k in keys:
                kw[k] = _check_type(k, v, own_types[k])
            else:
                raise _unknown(k, where, keys)
    cfg = cls(**kw, model=model)
    cfg.validate()
    return cfg


def build_parser(cls=None, prog: str = "python -m gptcore.train", description: Optional[str] = None,
                 groups: Optional[dict] = None, skip: tuple = ()) -> argparse.ArgumentParser:
    """The CLI of a config dataclass: one flag per field (but ``skip``) and per GPTConfig field."""
    cls = cls or TrainConfig
    # the package's doc (gptcore/train/__init__.py) is the trainer's --help text
    package_doc = sys.modules[__package__].__doc__
    ap = argparse.ArgumentParser(prog=prog, description=package_doc if description is None else description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False, argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", metavar="FILE",
                    help="YAML or JSON file of settings (the keys below, with _ or -, and an optional "
                         "'model:' section); flags given on the command line override it (default: none)")
    add_debug_flag(ap)
    groups = {k: ap.add_argument_group(v) for k, v in (groups or _GROUPS).items()}
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name == "model" or f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f.metadata["shown"] or (list(default) if isinstance(default, tuple) else default)
        _add_flag(groups[f.metadata["group"]], f.name, hints[f.name], f"{f.metadata['help']} (default: {shown})",
                  f.metadata["choices"])
    mhints = get_type_hints(GPTConfig)
    for f in fields(GPTConfig):
        _add_flag(groups["shape"], f.name, mhints[f.name], f"{_MODEL_HELP[f.name]} (default: the preset's)", None)
    return ap


def _add_flag(group, name: str, tp, help: str, choices) -> None:
    flag = "--" + name.replace("_", "-")
    if get_origin(tp) is Union:
        tp = next(a for a in get_args(tp) if a is not type(None))
    if name == "resume":
        group.add_argument(flag, nargs="?", const="auto", metavar="auto|PATH", help=help)
    elif name == "parallel":
        group.add_argument(flag, type=tp, choices=choices, help=help)
        group.add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp",
                           help="the same as --parallel fsdp")
    elif tp is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
    elif get_origin(tp) is tuple:
        group.add_argument(flag, nargs=len(get_args(tp)), type=get_args(tp)[0], metavar="B", help=help)
    else:
        group.add_argument(flag, type=tp, choices=choices, metavar=None if choices else name.upper(), help=help)


def parse_args(argv: list[str], parser: Optional[argparse.ArgumentParser] = None,
               make: Optional[Callable] = None, keys: Optional[list] = None) -> TrainConfig:
    """Flags (and a --config file under them) -> config; parser / make / keys: another CLI's
    (gptcore.finetune passes its own)."""
    ns, extra = (parser or build_parser()).parse_known_args(argv)
    make = make or make_config
    if extra:
        flag = next((a for a in extra if a.startswith("-")), extra[0])
        raise _unknown(flag.lstrip("-").split("=")[0].replace("-", "_"), "the command line", keys)
    cli = {k: v for k, v in vars(ns).items() if k not in ("config", "debug")}
    file_vals = load_config_file(ns.config) if getattr(ns, "config", None) else {}
    return make(("config file", file_vals), ("command line", cli))



# Upper bounds of the integer settings (beyond them a value is a typo, not a plan).
_INT_LIMITS = {"seed": (0, MAX_SEED), "sample_tokens": (0, 100_000), "batch_size": (1, 1 << 40),
               "grad_accum": (1, 1 << 40), "eval_steps": (1, 1 << 40), "max_steps": (1, 1 << 62),
               "max_tokens": (1, 1 << 62), "keep_last": (1, 1 << 40), "ddp_bucket_mb": (1, 1 << 20)}


def _check_numbers(cfg: "TrainConfig") -> None:
    """NaN, inf and out-of-range numbers are refused at start-up, naming the field."""
    try:
        for f in fields(cfg):
            v = getattr(cfg, f.name)
            if isinstance(v, float):
                check_finite(f.name, v)
            elif isinstance(v, int) and not isinstance(v, bool) and f.name in _INT_LIMITS:
                check_int_range(f.name, v, *_INT_LIMITS[f.name])
        for b in cfg.betas:
            check_finite("betas", b)
        for k, v in cfg.model.items():
            if isinstance(v, float):
                check_finite(k, v)
        if cfg.lr * cfg.weight_decay >= 1:
            raise UsageError(f"lr * weight_decay must be < 1 (AdamW multiplies the weights by 1 - lr * weight_decay "
                             f"each step), got lr {cfg.lr} x weight_decay {cfg.weight_decay}")
    except UsageError as e:
        raise ConfigError(str(e)) from None
