"""The trainer: resumable, robust to bad steps and signals, observable, data-parallel.

    python -m gptcore.train                                  # tiny model on the embedded corpus (~1-2 min, CPU)
    python -m gptcore.train --config run.yaml --lr 1e-3      # a YAML/JSON file, flags on top
    python -m gptcore.train --out-dir out --resume auto      # continue the run saved in out/
    torchrun --nproc_per_node=8 -m gptcore.train --preset gpt2 --data tinystories --dtype bf16

Batches. One optimizer step sees  batch_size x grad_accum x world_size  sequences of
context_length tokens (the global batch). Micro-batch ``micro`` of rank ``r`` is drawn with a
generator seeded by (seed, step, m), m = r * grad_accum + micro, and dropout is seeded the same
way, so the data is a function of the step alone: resuming needs no loader state, and
(world W, grad_accum A) trains on the same global batch as (world 1, grad_accum W*A).
Each micro-batch loss is divided by grad_accum; DDP averages gradients over ranks (no
division by world size anywhere else), and gradients are all-reduced on the last micro-step only.

Steps. On a CUDA GPU the whole optimizer step (every micro-batch's forward and backward, gradient
clipping, AdamW, the non-finite skip) is captured once in a CUDA graph and replayed (--cuda-graph
auto; gptcore.graph_step); the start-up log says when it is not and why (DDP, fp16, ...). Neither path
waits for the GPU per step: loss and grad norm stay on the device and are read back every
--log-interval steps (every step on the CPU) and before evaluations, samples and checkpoints; the
metrics rows are still one per step, and a run of non-finite steps stops the run at that read-back.

Out dir: ckpt-NNNNNNN/ (the last --keep-last; a resumed run prunes only its own), best/ (lowest val
loss), latest (names the newest ckpt), metrics.jsonl (one row per step and per evaluation), loss.png
(with matplotlib).

Exit status: 0 done; 1 the run failed while training (non-finite loss --max-bad-steps times in
a row, out of memory); 2 it could not start: bad config or flag, bad data, a bad checkpoint, an
out dir that is in use (another run holds its lock), not empty (without --resume / --overwrite),
or unwritable, a size that cannot fit (one line, the traceback with --debug or GPTCORE_DEBUG=1);
130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM after saving a checkpoint at the end of the
current step or evaluation (the message prints the resume command). A second Ctrl-C stops at
once (no checkpoint).

Out dir ownership: one process at a time (out_dir/.gptcore.lock: pid and host; a lock left by a
dead process is taken over with a note). A new run into a non-empty out dir is refused: continue
it with --resume auto (the newest complete state, ckpt-* or best/) or start over with --overwrite.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from gptcore.cli import (MAX_SEED, UsageError, add_debug_flag, check_backend, check_finite, check_int_range,
                         debug_enabled, refuse_if_too_big, run_cli)
from gptcore.io import (CheckpointError, capture_rng, load_checkpoint, load_pretrained, load_weights,
                        prune_checkpoints, remove_stale_temps, resolve_checkpoint, restore_rng, save_checkpoint,
                        update_latest)
from gptcore.config import PRESETS, GPTConfig
from gptcore.data import prepare
from gptcore.graph_step import (GraphedStep, GraphUnavailable, adamw, after_load_state_dict, clip_and_check,
                                portable_state_dict, resolve, set_lr, skip_if, unavailable_reason)
from gptcore.model import GPT
from gptcore.ops import BACKENDS, default_backend
from gptcore.rundir import (RunLock, append_run_marker, best_state, overwrite, read_metrics, resumable_states,
                            run_contents)
from gptcore.tokenizer import ENDOFTEXT, get_encoding

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

    def validate(self) -> None:
        _check_numbers(self)
        positive = ["batch_size", "grad_accum", "eval_steps", "keep_last", "log_interval", "max_bad_steps"]
        for k in positive:
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ["warmup_steps", "eval_interval", "ckpt_interval", "sample_every", "sample_tokens",
                  "weight_decay", "grad_clip", "sample_temperature"]:
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
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
    ap = argparse.ArgumentParser(prog=prog, description=__doc__ if description is None else description,
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


# ---- runtime pieces ---------------------------------------------------------------------------------
# Dense bf16 tensor-core peak FLOP/s by GPU name (first match wins), for MFU.
PEAK_BF16_FLOPS = [
    (r"B200", 2250e12), (r"H200|GH200", 989e12), (r"H100.*PCIe", 756e12), (r"H100.*NVL", 835e12),
    (r"H100|H800", 989e12), (r"A100|A800", 312e12), (r"L40S", 362e12), (r"\bL4\b", 121e12),
    (r"RTX 4090", 165e12), (r"RTX 3090", 71e12), (r"V100", 125e12),
]


def peak_flops(device_name: str) -> Optional[float]:
    """Peak dense bf16 FLOP/s of the GPU called ``device_name`` (None if unknown)."""
    return next((f for pat, f in PEAK_BF16_FLOPS if re.search(pat, device_name)), None)


def micro_seed(seed: int, step: int, m: int) -> int:
    """The seed of micro-batch m (= rank * grad_accum + micro) of optimizer step ``step``."""
    digest = hashlib.blake2b(f"{seed}/{step}/{m}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - min_lr)


@torch.no_grad()
def sample_text(model: GPT, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    """A short continuation of ``prompt`` (no KV cache: fine for a few dozen tokens)."""
    enc = get_encoding(TOKENIZER)
    ids = enc.encode(prompt, allowed_special={ENDOFTEXT}) or [enc.eot_token]
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)  # (1, T)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(x[:, -model.config.context_length:])[:, -1, :].float()  # (1, V)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=gen)
        x = torch.cat([x, nxt], dim=1)
    model.train(was_training)
    return enc.decode(x[0, len(ids):].tolist())


def plot_losses(metrics: Path, png: Path) -> str:
    """Train and val loss against step from metrics.jsonl into png; returns a one-line note."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: skipped the loss curve (pip install matplotlib)"
    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and r["loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return f"loss curve: {png}"


def _peak_rss_gib() -> Optional[float]:
    try:
        import resource  # Unix only
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB (Linux) -> GiB


def _json_num(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


class _StoppedInEval(Exception):
    """A signal came during an evaluation: train() saves the state after the last step and stops."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _GracefulStop:
    """First SIGINT/SIGTERM: finish the current step, save, stop. A second SIGINT: stop now."""

    active: Optional["_GracefulStop"] = None  # the one in force (evaluate() checks it between batches)

    def __init__(self, announce: bool):
        self.signum: Optional[int] = None
        self.announce = announce
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        _GracefulStop.active = self
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\ngptcore.train: {signal.Signals(signum).name} received: saving a checkpoint after this "
                  f"step (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        _GracefulStop.active = None
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class _Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _setup_dist(device_arg: str) -> _Dist:
    """Rank, world and device from torchrun's environment; joins the process group if world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(device_arg)
        except (RuntimeError, ValueError):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device_arg!r}") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"--device {device_arg}: no CUDA GPU is visible; use --device cpu")
            if device.index is None:
                device = torch.device(f"cuda:{local}")
            elif world > 1:
                raise ConfigError(f"under torchrun give --device cuda (rank r uses cuda:LOCAL_RANK), "
                                  f"not {device_arg}")
        elif device.type != "cpu":
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device_arg!r}")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank, world, local, device)


class _LossModule(nn.Module):
    """forward(idx, targets) -> mean loss, so DDP's hooks and torch.compile see the loss call."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model.loss(idx, targets)


@dataclass
class TrainResult:
    out_dir: Path
    step: int                          # optimizer steps completed (skipped non-finite steps count)
    tokens: int                        # tokens seen
    losses: dict[int, float]           # step -> mean train loss of that step (steps run in this call)
    val_losses: dict[int, float]       # step -> val loss
    best_val: Optional[float]
    last_checkpoint: Optional[Path]
    stopped_by: Optional[int] = None   # SIGINT / SIGTERM when a signal stopped the run


def _crop_context(model: GPT, T: int) -> None:
    """Keep the first T positions of a loaded model (nanoGPT's crop_block_size)."""
    cfg = model.config
    if T == cfg.context_length:
        return
    if T > cfg.context_length:
        raise ConfigError(f"context_length {T} exceeds the loaded model's {cfg.context_length}")
    if "wpe" in model.transformer:
        old = model.transformer.wpe
        model.transformer["wpe"] = nn.Embedding(T, cfg.emb_dim).to(old.weight.device)
        model.transformer.wpe.weight.data.copy_(old.weight.data[:T])
    else:
        model.rope_cos, model.rope_sin = model.rope_cos[:T], model.rope_sin[:T]
    model.config = cfg.replace(context_length=T)


def _set_dropout(model: GPT, p: float) -> None:
    model.config = model.config.replace(drop_rate=p)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "drop_rate"):
            m.drop_rate = p


def _is_gptcore_checkpoint(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.exists() and ((p / "meta.json").is_file() or (p / "latest").is_file())


# Upper bounds of the integer settings (beyond them a value is a typo, not a plan).
_INT_LIMITS = {"seed": (0, MAX_SEED), "sample_tokens": (0, 100_000), "batch_size": (1, 1 << 40),
               "grad_accum": (1, 1 << 40), "eval_steps": (1, 1 << 40), "max_steps": (1, 1 << 62),
               "max_tokens": (1, 1 << 62), "keep_last": (1, 1 << 40)}


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


def estimate_train_bytes(mc: GPTConfig, batch_size: int, backend: str) -> int:
    """A lower bound of the memory one training step of ``mc`` needs: fp32 weights, gradients and
    the two AdamW moments (16 bytes a parameter), plus a few fp32 activations per layer and token,
    plus the full logits where the backend materializes them and the T x T scores of reference attention."""
    B, T, C, L, V = batch_size, mc.context_length, mc.emb_dim, mc.n_layers, mc.vocab_size
    params = V * C + (T * C if mc.pos_emb == "learned" else 0) + L * (4 + 2 * mc.ff_mult) * C * C
    acts = 4 * B * T * C * L * 4
    if backend != "triton":
        acts += 4 * B * T * V
    if backend == "reference":
        acts += 4 * B * mc.n_heads * T * T
    return 16 * params + acts


# ---- the trainer ------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, dist_: _Dist, resume_hint: Optional[str] = None):
        self.cfg, self.dist, self.device = cfg, dist_, dist_.device
        self.resume_hint = resume_hint
        self.out_dir = Path(cfg.out_dir)
        self.bar = None
        self._resume_notes: list[str] = []
        self.precision = self._precision()
        self.backend = cfg.backend or default_backend(self.device)
        torch.manual_seed(cfg.seed)
        ck = self._find_resume()
        self.data = self._prepare_data()
        if ck is not None or cfg.init_from == "scratch":  # sizes known before a byte is allocated
            try:
                mc = ck.model_config if ck is not None else GPTConfig.from_preset(cfg.preset, **cfg.model)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{ck.path}/meta.json: invalid model_config ({e})") from None
            self._check_fits(mc)
        self.model = self._build_model(ck)
        self._check_fits(self.model.config)
        self.T = self.model.config.context_length
        if self.model.config.vocab_size < self.data.manifest["n_vocab"]:
            self.data.check_vocab(self.model.config.vocab_size)
        self.data.check_block("train", self.T)
        self.eval_batches = self._eval_batches()
        self.model.to(self.device).train()
        self.model.grad_checkpointing = cfg.grad_checkpointing
        self.use_graph, self.graph_note = self._graph_decision()
        self.graph: Optional[GraphedStep] = None  # captured in run(), after the optimizer state is restored
        self._pending: list = []  # (step, lr, tokens, device record) of the steps not read back yet
        self._losses: dict[int, float] = {}  # step -> mean train loss, as read back
        self._train_time: list[tuple[int, float]] = []  # (steps, seconds) of each read-back interval
        self._mark = time.perf_counter()  # start of the current read-back interval
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step, self.tokens, self.best_val, self.bad_run = 0, 0, None, 0
        self.last_ckpt: Optional[Path] = None
        self._written_ckpts: set[Path] = set()  # ckpt-* this process saved: the only ones --keep-last prunes
        self.last_val: Optional[float] = None
        if ck is not None:
            self._restore(ck)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * dist_.world * self.T
        self.max_steps = self._max_steps()
        module: nn.Module = _LossModule(self.model)
        if dist_.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.ddp = dist_.world > 1
        self.ddp_module = module  # no_sync() lives here; the compiled wrapper calls into it
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        self.train_module = torch.compile(module, mode=mode) if cfg.compile else module
        self.flops_per_token = self.model.flops_per_token(self.T)
        self.peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if dist_.main:
            self._open_metrics()
        self._announce()

    # -- setup ------------------------------------------------------------------------------------
    def _precision(self) -> str:
        want, cuda = self.cfg.dtype, self.device.type == "cuda"
        if want == "auto":
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        if want == "fp16" and not cuda:
            raise ConfigError("--dtype fp16 needs a CUDA GPU (its loss scaling is CUDA-only); "
                              "on a CPU use fp32 or bf16")
        if want == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU has no bf16: use --dtype fp16 (with loss scaling) or fp32")
        return want

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.precision])

    def log(self, msg: str) -> None:
        if not self.dist.main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def _find_resume(self):
        cfg, out = self.cfg, self.out_dir
        if cfg.resume == "auto" and cfg.overwrite:
            raise ConfigError("--resume auto continues the run in --out-dir and --overwrite starts a new one "
                              "there: give one of them")
        contents = run_contents(out)
        if cfg.resume is None:
            if contents and not cfg.overwrite:
                shown = ", ".join(contents[:6]) + (f" and {len(contents) - 6} more" if len(contents) > 6 else "")
                raise ConfigError(
                    f"{out} is not empty ({shown}); continue the run in it with --resume auto, start a new run "
                    f"there with --overwrite (deletes its ckpt-*, best/, latest, metrics.jsonl and loss.png), or "
                    f"give a fresh --out-dir (nothing was changed)")
            return None
        if cfg.resume == "auto":
            states = resumable_states(out)
            if not states:
                partial = [c for c in contents if c.startswith("ckpt-") or c in ("best", "latest")]
                if partial:
                    raise ConfigError(
                        f"--resume auto: {out} holds {', '.join(partial)} but no complete checkpoint (meta.json, "
                        f"model.safetensors and state.pt) to resume from; resume from a checkpoint elsewhere with "
                        f"--resume PATH, or start a new run with --overwrite (nothing was changed)")
                self.log(f"--resume auto: no checkpoint in {out}; starting a new run"
                         + (" (metrics.jsonl is kept and appended to)" if "metrics.jsonl" in contents else ""))
                return None
            try:
                return load_checkpoint(states[0].path, map_location="cpu")
            except CheckpointError as e:
                nxt = (f"; the next complete state is {states[1].path} (step {states[1].step}): resume it with "
                       f"--resume {shlex.quote(str(states[1].path))}" if len(states) > 1 else "")
                raise CheckpointError(f"{e}{nxt} (nothing was changed)") from None
        ck = load_checkpoint(resolve_checkpoint(cfg.resume), map_location="cpu")
        step = ck.meta.get("step")
        later = [s for s in resumable_states(out)
                 if isinstance(step, int) and s.step > step and s.path.resolve() != ck.path.resolve()]
        if later and not cfg.overwrite:
            raise ConfigError(
                f"{out} holds later states than {ck.path} (step {step}): "
                f"{', '.join(f'{s.path.name} (step {s.step})' for s in later)}; the run would replace them. "
                f"Resume the newest with --resume auto, give another --out-dir, or add --overwrite to replace "
                f"them (nothing was changed)")
        return ck

    def _prepare_data(self):
        cfg = self.cfg
        # rank 0 tokenizes and fills the cache; the others then read it
        if not self.dist.main:
            self.dist.barrier()
        data = prepare(cfg.data, tokenizer=TOKENIZER, val_fraction=cfg.val_fraction, errors=cfg.data_errors,
                       progress=self.dist.main and cfg.progress)
        if self.dist.main:
            self.dist.barrier()
        return data

    def _build_model(self, ck) -> GPT:
        cfg = self.cfg
        if ck is not None:
            self._check_resume(ck)
            model = GPT(ck.model_config, backend=self.backend)
            load_weights(model, ck.weights, source=str(ck.path))
            self.init_note = f"resumed from {ck.path} (step {ck.meta['step']})"
            return model
        if cfg.init_from == "scratch":
            self.init_note = f"preset {cfg.preset}, random init (seed {cfg.seed})"
            return GPT(GPTConfig.from_preset(cfg.preset, **cfg.model), backend=self.backend)
        if _is_gptcore_checkpoint(cfg.init_from):
            src = load_checkpoint(cfg.init_from, load_state=False)
            if src.meta.get("tokenizer", TOKENIZER) != TOKENIZER:
                raise CheckpointError(f"{src.path} was trained with tokenizer {src.meta['tokenizer']!r}, "
                                      f"this data uses {TOKENIZER!r}")
            model = GPT(src.model_config, backend=self.backend)
            load_weights(model, src.weights, source=str(src.path))
            self.init_note = f"weights of {src.path}"
        else:
            model = self._load_pretrained(cfg.init_from)
            self.init_note = f"pretrained {cfg.init_from}"
        fixed = {k: v for k, v in cfg.model.items() if k not in ("drop_rate", "context_length")}
        clash = [f"{k}: {getattr(model.config, k)!r} there, {v!r} here" for k, v in fixed.items()
                 if getattr(model.config, k) != v]
        if clash:
            raise ConfigError(f"the architecture comes from --init-from {cfg.init_from}; only drop_rate and a shorter "
                              f"context_length can change ({'; '.join(clash)})")
        if "drop_rate" in cfg.model:
            _set_dropout(model, cfg.model["drop_rate"])
        if "context_length" in cfg.model:
            _crop_context(model, cfg.model["context_length"])
        return model

    def _load_pretrained(self, name: str) -> GPT:
        return load_pretrained(name, trust_pickle=self.cfg.trust_pickle).set_backend(self.backend)

    def _check_resume(self, ck) -> None:
        """Refuse a checkpoint whose model differs; say which settings changed."""
        old, new = ck.meta.get("train_config", {}), self.cfg.to_dict()
        if ck.meta.get("tokenizer") != TOKENIZER:
            raise CheckpointError(f"{ck.path} was trained with tokenizer {ck.meta.get('tokenizer')!r}, "
                                  f"not {TOKENIZER!r}")
        diffs = []
        for key in ("preset", "init_from"):
            if old.get(key) != new[key]:
                diffs.append(f"{key}: checkpoint {old.get(key)!r}, now {new[key]!r}")
        om, nm = old.get("model", {}), new["model"]
        for key in sorted(set(om) | set(nm)):
            if om.get(key) != nm.get(key):
                diffs.append(f"{key}: checkpoint {om.get(key, '(preset)')!r}, now {nm.get(key, '(preset)')!r}")
        if diffs:
            raise CheckpointError(
                f"cannot resume from {ck.path}: its model settings differ from this run's ({'; '.join(diffs)}). "
                f"Resume with the settings the run started with, or start a new run in another --out-dir "
                f"(nothing was overwritten)"
            )
        world = ck.meta.get("world_size")
        repro = {"batch_size": (old.get("batch_size"), new["batch_size"]),
                 "grad_accum": (old.get("grad_accum"), new["grad_accum"]),
                 "seed": (old.get("seed"), new["seed"]), "world_size": (world, self.dist.world)}
        changed = [f"{k} {a} -> {b}" for k, (a, b) in repro.items() if a != b]
        if changed:
            self._resume_notes.append("warning: " + ", ".join(changed) + ": the run goes on but will not "
                                      "reproduce the uninterrupted one")
        other = [k for k in new if k not in repro and k not in ("resume", "overwrite", "model", "preset", "init_from")
                 and old.get(k) != new[k]]
        if other:
            self._resume_notes.append("changed since the checkpoint: " +
                                      ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in other))

    def _graph_decision(self) -> tuple[bool, str]:
        """--cuda-graph: whether run() captures the step, and the start-up line that says so (and why not)."""
        cfg = self.cfg
        reason = unavailable_reason(device=self.device, world=self.dist.world, precision=self.precision,
                                    compile=cfg.compile, compile_mode=cfg.compile_mode, backend=self.backend,
                                    drop_rate=self.model.config.drop_rate,
                                    grad_checkpointing=cfg.grad_checkpointing)
        try:
            return resolve(cfg.cuda_graph, reason)
        except GraphUnavailable as e:
            raise ConfigError(str(e)) from None

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; on CUDA fused and capturable with a device lr, for the graph and the eager step alike
        (so both skip a non-finite step on the device and a checkpoint resumes on either)."""
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        other = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
        return adamw(groups, self.cfg.lr, self.cfg.betas, self.device)

    def _restore(self, ck) -> None:
        st = ck.state
        if st is None:
            raise CheckpointError(f"{ck.path} holds weights only (no state.pt): use --init-from to start from it")
        if not isinstance(st, dict):
            raise CheckpointError(f"{ck.path}/state.pt holds a {type(st).__name__}, not a gptcore state (a dict of "
                                  f"optimizer, step, tokens, rng): use another checkpoint")
        if ck.meta.get("data_hash") != self.data.hash:
            self._resume_notes.append(
                f"warning: the data differs from the checkpoint's (manifest hash {str(ck.meta.get('data_hash'))[:12]} "
                f"-> {self.data.hash[:12]}): the run goes on with the new data")
        try:
            self.optimizer.load_state_dict(st["optimizer"])
            after_load_state_dict(self.optimizer, self.cfg.lr)  # this device's AdamW flags, lr and step tensors
            if self.scaler is not None and st.get("scaler"):
                self.scaler.load_state_dict(st["scaler"])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            raise CheckpointError(f"{ck.path}/state.pt: optimizer state does not fit this model ({e})") from None
        for g, wd in zip(self.optimizer.param_groups, (self.cfg.weight_decay, 0.0)):
            g["betas"], g["weight_decay"] = self.cfg.betas, wd  # this run's settings win
        try:
            self.step, self.tokens = int(st["step"]), int(st["tokens"])
            self.best_val = st.get("best_val")
            if self.best_val is not None:
                self.best_val = float(self.best_val)
            rng = st["rng"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{ck.path}/state.pt lacks or garbles the step, tokens, best_val or rng state "
                                  f"({type(e).__name__}: {e}); use another checkpoint") from None
        best = best_state(self.out_dir)
        if best is not None and best.val_loss is not None and (self.best_val is None or best.val_loss < self.best_val):
            # best/ holds a better model than this state knew of (an explicit --resume of an older
            # checkpoint): only a model better than that one replaces it
            self.best_val = best.val_loss
        try:
            restore_rng(rng)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{ck.path}/state.pt: its RNG state cannot be restored ({type(e).__name__}: "
                                  f"{e}); use another checkpoint") from None
        self.last_ckpt = ck.path
        if self.dist.main:
            newer = [p.name for p in self.out_dir.glob("ckpt-*") if p.name > f"ckpt-{self.step:07d}"]
            if newer:
                self._resume_notes.append(f"note: {self.out_dir} holds later checkpoints ({', '.join(sorted(newer))}); "
                                          f"this run replaces them as it passes their steps")

    def _max_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_steps is not None:
            return cfg.max_steps
        if cfg.max_tokens is not None:
            return math.ceil(cfg.max_tokens / self.tokens_per_step)
        if cfg.epochs is not None:
            return math.ceil(cfg.epochs * self.data.manifest["train_tokens"] / self.tokens_per_step)
        return DEFAULT_MAX_STEPS

    def _check_fits(self, mc: GPTConfig) -> None:
        """Refuse, before allocating, a model and batch that cannot fit this device at all."""
        c = self.cfg
        need = estimate_train_bytes(mc, c.batch_size, self.backend)
        try:
            refuse_if_too_big(f"training {mc.n_layers} layers x width {mc.emb_dim} (vocab {mc.vocab_size}) at "
                              f"batch_size {c.batch_size} x context_length {mc.context_length}", need, self.device,
                              "lower --batch-size (raise --grad-accum to keep the global batch), shorten "
                              "--context-length, or pick a smaller model")
        except UsageError as e:
            raise ConfigError(str(e)) from None

    def _eval_batches(self) -> list:
        n_val = len(self.data.splits["val"])
        if n_val < self.T + 1:
            self.log(f"warning: the val split has {n_val} tokens, fewer than one window of {self.T + 1}: "
                     f"no evaluation and no best/ checkpoint (raise --val-fraction or add data)")
            return []
        c = self.cfg
        need = c.eval_steps * c.batch_size * self.T * 16  # x and y, int64
        try:
            refuse_if_too_big(f"--eval-steps {c.eval_steps} (held-out batches of {c.batch_size} x {self.T} tokens, "
                              f"kept in memory)", need, "cpu", "lower --eval-steps")
        except UsageError as e:
            raise ConfigError(str(e)) from None
        gen = torch.Generator().manual_seed(EVAL_SEED)
        steps = range(c.eval_steps)
        if self.dist.main and c.progress and c.eval_steps >= 200:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="eval batches", leave=False, dynamic_ncols=True)
        out = []
        for _ in steps:
            out.append(self.data.get_batch("val", c.batch_size, self.T, gen))
        return out

    def stop_after_eval(self, signum: int) -> TrainResult:
        """A signal stopped an evaluation: save the state of the last finished step, say how to resume."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.last_ckpt is None or self.last_ckpt.name != f"ckpt-{self.step:07d}":
            self.save()
        if self.dist.main:
            self.log(f"gptcore.train: {signal.Signals(signum).name} during the evaluation at step {self.step}: "
                     f"stopped without its val loss")
            self._summary({}, {}, 0.0, signum)
        return TrainResult(self.out_dir, self.step, self.tokens, {}, {}, self.best_val, self.last_ckpt, signum)

    def _open_metrics(self) -> None:
        """metrics.jsonl is appended to, never truncated: a row {"kind": "run"} marks where this run
        starts (step 0) or resumes (its step); rundir.read_metrics applies it."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.overwrite and self.cfg.resume is None:
            removed = overwrite(self.out_dir)
            if removed:
                self.log(f"--overwrite: removed {', '.join(removed)} from {self.out_dir}")
        for p in remove_stale_temps(self.out_dir):
            self.log(f"removed {p.name}, left by an interrupted save")
        append_run_marker(self.metrics_path, {"event": "resume" if self.step else "start", "step": self.step,
                                              "from": str(self.last_ckpt) if self.step else None,
                                              "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _metric(self, row: dict) -> None:
        if self.dist.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _announce(self) -> None:
        if not self.dist.main:
            return
        cfg, m = self.cfg, self.model
        print("gptcore.train: config\n" + json.dumps(cfg.to_dict(), indent=1), flush=True)
        print(f"model: {json.dumps(m.config.to_dict())}", flush=True)
        report = ", ".join(f"{k}={v}" for k, v in m.backend_report().items())
        print(f"model: {m.num_params() / 1e6:.2f}M parameters, {self.init_note}; backend {m.backend} ({report})")
        print(f"device {self.device}, world {self.dist.world}, dtype {self.precision}"
              f"{', compiled' if cfg.compile else ''}{', grad checkpointing' if cfg.grad_checkpointing else ''}")
        print(self.graph_note, flush=True)
        epochs = self.max_steps * self.tokens_per_step / max(1, self.data.manifest["train_tokens"])
        print(f"data: {cfg.data} ({self.data.manifest['train_tokens']:,} train / {self.data.manifest['val_tokens']:,} "
              f"val tokens, manifest {self.data.hash[:12]})")
        print(f"global batch: {cfg.batch_size} x grad_accum {cfg.grad_accum} x world {self.dist.world} = "
              f"{cfg.batch_size * cfg.grad_accum * self.dist.world} sequences of {self.T} = "
              f"{self.tokens_per_step:,} tokens/step; steps {self.step} -> {self.max_steps} (~{epochs:.2f} epochs)",
              flush=True)
        for note in self._resume_notes:
            print(note, flush=True)

    # -- one step ---------------------------------------------------------------------------------
    # A step leaves its record on the device: [sum of its micro-batch losses, grad norm, ok(, stop)].
    # _read_back turns the queued records into metrics rows with one host sync every
    # _readback_interval() steps (and before evaluations, samples, checkpoints and the end).
    def train_step(self, stop_requested: Callable[[], bool] = lambda: False) -> bool:
        """Forward/backward over grad_accum micro-batches, then one optimizer update unless the loss
        or gradient is non-finite (decided on the device). Queues the step's record for _read_back and
        returns whether this process was asked to stop (under DDP the ranks agree at the read-back)."""
        lr = lr_at(self.step, self.cfg, self.max_steps)
        rec = self._graph_step(lr) if self.graph is not None else self._eager_step(lr, stop_requested)
        self.step += 1
        self.tokens += self.tokens_per_step
        self._pending.append((self.step, lr, self.tokens, rec))
        # one process: a signal that came during the update counts for this step already
        return not self.ddp and stop_requested()

    def _micro_batch(self, micro: int):
        """Micro-batch ``micro`` of this rank at the current step, on the device; seeds dropout too."""
        cfg = self.cfg
        seed = micro_seed(cfg.seed, self.step, self.dist.rank * cfg.grad_accum + micro)
        torch.manual_seed(seed)  # dropout masks, too, are a function of (seed, step, m)
        return self.data.get_batch("train", cfg.batch_size, self.T, torch.Generator().manual_seed(seed),
                                   self.device)  # (B, T), (B, T)

    def _graph_step(self, lr: float) -> torch.Tensor:
        for micro in range(self.cfg.grad_accum):
            self.graph.load(micro, *self._micro_batch(micro))
        # one seed per step for the graph's dropout (its micro-batches draw successive philox offsets)
        torch.manual_seed(micro_seed(self.cfg.seed, self.step, 0))
        return self.graph.replay(lr)

    def _eager_step(self, lr: float, stop_requested: Callable[[], bool]) -> torch.Tensor:
        cfg, accum = self.cfg, self.cfg.grad_accum
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self._micro_batch(micro)
            sync_later = self.ddp and micro < accum - 1
            with (self.ddp_module.no_sync() if sync_later else nullcontext()), self.autocast():
                loss = self.train_module(x, y)
            loss_sum += loss.detach().float()
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        stop = torch.zeros((), device=self.device)
        if self.ddp:
            packed = torch.stack([loss_sum, torch.full((), float(stop_requested()), device=self.device)])
            dist.all_reduce(packed)
            loss_sum, stop = packed[0], packed[1]
        params = list(self.model.parameters())
        if self.scaler is not None:
            # fp16: an overflowing gradient is routine; the scaler skips that update and lowers the scale.
            # A non-finite loss poisons the grads so that the scaler skips its update too.
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, torch.where(torch.isfinite(loss_sum), 1.0, float("nan")))
            self.scaler.unscale_(self.optimizer)
        gnorm, finite = clip_and_check(params, loss_sum, cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # fused AdamW: the scaler's skip is decided on the device
            self.scaler.update()
            ok = torch.isfinite(loss_sum)
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False):  # CUDA: fused AdamW
            skip_if(self.optimizer, (~finite).float())
            ok = finite
        else:  # CPU: reading the flag costs no device sync
            ok = finite
            if bool(finite):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss_sum, gnorm, ok.float(), stop])

    def _capture_graph(self) -> None:
        """Capture the step (--cuda-graph): after the optimizer state is restored, before the first step.
        With auto, a failed capture falls back to the eager step with a warning."""
        cfg = self.cfg
        gs = GraphedStep(self.train_module, list(self.model.parameters()), self.optimizer, accum=cfg.grad_accum,
                         batch_size=cfg.batch_size, seq_len=self.T, device=self.device, autocast=self.autocast,
                         grad_clip=cfg.grad_clip)
        for micro in range(cfg.grad_accum):  # the warm-up runs on the first step's batch (its updates skipped)
            gs.load(micro, *self._micro_batch(micro))
        t0 = time.perf_counter()
        try:
            gs.capture()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - auto falls back, on reports it
            what = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if cfg.cuda_graph == "on":
                raise TrainingError(f"--cuda-graph on: capturing the step failed ({what}); train with "
                                    f"--cuda-graph off (or auto, which falls back to the eager step)") from e
            self.optimizer.zero_grad(set_to_none=True)
            self.log(f"warning: cuda graph: capturing the step failed ({what}); falling back to the eager step")
            return
        self.graph = gs
        self.log(f"cuda graph: captured one optimizer step ({cfg.grad_accum} micro-batch"
                 f"{'es' if cfg.grad_accum > 1 else ''}) in {time.perf_counter() - t0:.1f} s")

    def _readback_interval(self) -> int:
        """Steps between host reads of the queued records: log_interval on a GPU; every step on the CPU,
        where reading costs no device sync."""
        return 1 if self.device.type == "cpu" else self.cfg.log_interval

    def _read_back(self) -> bool:
        """Read the queued step records (one sync), write their metrics rows, count non-finite steps.
        Returns whether any rank asked to stop during those steps."""
        if not self._pending:
            return False
        pending, self._pending = self._pending, []
        vals = torch.cat([rec.reshape(-1) for *_, rec in pending]).tolist()
        now = time.perf_counter()
        elapsed = now - self._mark
        self._train_time.append((len(pending), elapsed))
        dt = elapsed / len(pending)  # the steps ran back to back: each gets the mean
        self._mark = now
        div, i, stop = self.cfg.grad_accum * self.dist.world, 0, False
        for step, lr, tokens, rec in pending:
            row = vals[i:i + rec.numel()]
            i += rec.numel()
            stop = stop or (len(row) > 3 and row[3] > 0)
            loss = row[0] / div
            self._losses[step] = loss
            self._after_step(step, loss, row[1], row[2] > 0.5, lr, tokens, dt)
        return stop

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over the fixed val windows (shared out over ranks)."""
        if not self.eval_batches:
            return None
        self.model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=self.device)
        idx = range(self.dist.rank, len(self.eval_batches), self.dist.world)
        bar = None
        if self.dist.main and len(idx) >= 50:  # long evaluations show progress at once
            from tqdm.auto import tqdm

            bar = tqdm(total=len(idx), desc="eval", leave=False, dynamic_ncols=True, disable=not self.cfg.progress)
            self.log(f"evaluating {len(self.eval_batches)} batches (--eval-steps); Ctrl-C / SIGTERM stops "
                     f"after the current batch")
        for i in idx:
            stopper = _GracefulStop.active
            if stopper is not None and stopper.signum is not None and not self.ddp:
                if bar is not None:
                    bar.close()
                self.model.train()
                raise _StoppedInEval(stopper.signum)
            if bar is not None:
                bar.update(1)
            x, y = (t.to(self.device) for t in self.eval_batches[i])
            with self.autocast():
                tot[0] += self.model.loss(x, y).double()
            tot[1] += 1
        if bar is not None:
            bar.close()
        if self.ddp:
            dist.all_reduce(tot)
        self.model.train()
        return (tot[0] / tot[1]).item()

    def save(self, name: Optional[str] = None) -> Optional[Path]:
        """Checkpoint (rank 0): out_dir/ckpt-{step}/ + latest + pruning, or out_dir/best/."""
        if not self.dist.main:
            return None
        cfg_d = self.cfg.to_dict()
        name = name or f"ckpt-{self.step:07d}"
        state = {
            "optimizer": portable_state_dict(self.optimizer),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step, "tokens": self.tokens, "best_val": self.best_val,
            "rng": capture_rng(),
            # batches are drawn from generators seeded by (seed, step, micro-batch): no loader state
            "data": {"sampling": "seeded by (seed, step, rank * grad_accum + micro)", "seed": self.cfg.seed,
                     "next_step": self.step, "manifest_hash": self.data.hash},
            "train_config": cfg_d, "model_config": self.model.config.to_dict(),
            "tokenizer": TOKENIZER, "world_size": self.dist.world,
        }
        meta = {
            "step": self.step, "tokens": self.tokens, "train_config": cfg_d,
            "model_config": self.model.config.to_dict(), "tokenizer": TOKENIZER, "data": self.cfg.data,
            "data_hash": self.data.hash, "world_size": self.dist.world, "best_val": self.best_val,
            "val_loss": self.last_val, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        path = save_checkpoint(self.out_dir / name, self.model, state, meta)
        if name != "best":
            update_latest(self.out_dir, path)
            self._written_ckpts.add(path)
            # only what this process wrote: an earlier run's checkpoints (before a resume) stay
            prune_checkpoints(self.out_dir, self.cfg.keep_last, only=self._written_ckpts)
            self.last_ckpt = path
        return path

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        vals = {}
        self._losses, self._train_time = {}, []
        if self.step == 0 and self.eval_batches:
            val = vals[0] = self.last_val = self.evaluate()
            self._metric({"kind": "eval", "step": 0, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
            self.log(f"step 0: val loss {val:.4f}")
        if self.use_graph and self.graph is None and self.step < self.max_steps:
            self._capture_graph()
        stopped_by = None
        saved_at = -1
        t_start = time.perf_counter()
        with _GracefulStop(self.dist.main) as stopper:
            if self.dist.main and cfg.progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
            try:
                self._mark = time.perf_counter()
                every = self._readback_interval()
                while self.step < self.max_steps:
                    stop = self.train_step(lambda: stopper.signum is not None)
                    s = self.step
                    evaluate = bool(self.eval_batches and cfg.eval_interval and s % cfg.eval_interval == 0
                                    and s < self.max_steps)
                    sample = bool(cfg.sample_every and cfg.sample_tokens and s % cfg.sample_every == 0)
                    periodic = bool(cfg.ckpt_interval and s % cfg.ckpt_interval == 0)
                    if stop or evaluate or sample or periodic or s % every == 0 or s == self.max_steps:
                        stop = self._read_back() or stop  # rows, non-finite count and the ranks' stop flags
                    if evaluate:
                        vals[s] = self._eval_and_best()
                    if sample:
                        self._sample()
                    if stop or (periodic and self.bad_run == 0 and s < self.max_steps):
                        self.save()
                        saved_at = s
                    if stop:
                        stopped_by = stopper.signum or signal.SIGTERM  # a peer rank got the signal
                        break
                    if not self._pending:  # evaluations, samples and checkpoints are not train time
                        self._mark = time.perf_counter()
            finally:
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None
            if stopped_by is None:  # still inside: a signal now does not cut the final save short
                if self.eval_batches and self.step not in vals:
                    vals[self.step] = self._eval_and_best()
                if saved_at != self.step:
                    self.save()
        elapsed = time.perf_counter() - t_start
        if self.dist.main:
            self._summary(self._losses, vals, elapsed, stopped_by)
        self.dist.barrier()
        return TrainResult(self.out_dir, self.step, self.tokens, self._losses, vals, self.best_val, self.last_ckpt,
                           stopped_by)

    def _after_step(self, step: int, loss: float, gnorm: float, ok: bool, lr: float, tokens: int,
                    dt: float) -> None:
        """The metrics row, non-finite count and log line of one step, read back from the device."""
        cfg = self.cfg
        tok_s = self.tokens_per_step / dt
        mfu = (self.flops_per_token * tok_s / self.dist.world / self.peak) if self.peak else None
        if self.device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            mem = _peak_rss_gib()
        self._metric({"kind": "train", "step": step, "loss": _json_num(loss), "lr": lr,
                      "grad_norm": _json_num(gnorm), "tokens": tokens, "tokens_per_s": tok_s,
                      "mfu": mfu, "mem_gib": mem, "skipped": not ok, "step_s": dt})
        if not ok:
            self.bad_run += 1
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            self.log(f"warning: step {step}: non-finite {what} (loss {loss}, grad norm {gnorm}); skipped the "
                     f"update ({self.bad_run}/{cfg.max_bad_steps} in a row)")
            if self.bad_run >= cfg.max_bad_steps:
                last = self.last_ckpt or "none (no checkpoint was saved)"
                raise TrainingError(
                    f"{self.bad_run} steps in a row had a non-finite loss or gradient; stopped at step {step}. "
                    f"Last good checkpoint: {last}. Try a lower --lr (now {cfg.lr}), --grad-clip 1.0, a longer "
                    f"--warmup-steps, or --dtype bf16/fp32 instead of fp16"
                )
        else:
            self.bad_run = 0
        mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "-"
        mem_s = f"{mem:.2f} GiB" if mem is not None else "-"
        if self.bar is not None:
            self.bar.update(1)
            if step % cfg.log_interval == 0 or step == self.max_steps:  # --log-interval: the bar's numbers
                self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s mfu {mfu_s} "
                                         f"mem {mem_s}", refresh=False)
        elif step % cfg.log_interval == 0 or step == self.max_steps:
            self.log(f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                     f"grad norm {gnorm:.3f} | {tok_s:,.0f} tok/s | mfu {mfu_s} | mem {mem_s}")

    def _eval_and_best(self) -> float:
        val = self.last_val = self.evaluate()
        self._metric({"kind": "eval", "step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
        better = self.best_val is None or val < self.best_val
        if better:
            self.best_val = val
            self.save("best")
        self.log(f"step {self.step}: val loss {val:.4f}{' (best)' if better else ''}")
        return val

    def _sample(self) -> None:
        if self.dist.main:
            cfg = self.cfg
            text = sample_text(self.model, cfg.sample_prompt, cfg.sample_tokens, cfg.sample_temperature,
                               seed=cfg.seed + self.step)
            self.log(f"sample @ step {self.step}: {cfg.sample_prompt + text!r}")

    def _oom_message(self) -> str:
        c = self.cfg
        return (f"out of GPU memory at batch_size {c.batch_size}, context_length {self.T}, grad_accum "
                f"{c.grad_accum}, dtype {self.precision}, grad_checkpointing {c.grad_checkpointing}. To fit: "
                f"lower --batch-size and raise --grad-accum by the same factor (same global batch), add "
                f"--grad-checkpointing, use --dtype bf16, or shorten --context-length")

    def _throughput(self) -> str:
        """Train tokens/s over the steps alone (evaluations, samples, checkpoints and the capture excluded),
        and without the first read-back interval (Triton JIT, autotuning, torch.compile warm-up)."""
        def rate(parts):
            n, sec = sum(p[0] for p in parts), sum(p[1] for p in parts)
            return n * self.tokens_per_step / sec if sec > 0 else float("nan")

        parts = self._train_time
        msg = f"throughput: {rate(parts):,.0f} tokens/s over the train steps (evaluations and checkpoints excluded)"
        if len(parts) > 1:
            msg += f"; {rate(parts[1:]):,.0f} tokens/s after the first {parts[0][0]} step(s)"
        return msg

    def _summary(self, losses, vals, elapsed, stopped_by) -> None:
        cfg = self.cfg
        good = [v for v in losses.values() if math.isfinite(v)]
        if good:
            tail = good[-min(10, len(good)):]
            msg = f"train loss {good[0]:.4f} -> {sum(tail) / len(tail):.4f} (mean of the last {len(tail)} steps)"
            if len(vals) > 1:
                last_step = max(vals)
                msg += f"; val loss {vals[min(vals)]:.4f} -> {vals[last_step]:.4f}"
            if self.best_val is not None:
                msg += f" (best {self.best_val:.4f})"
            print(f"{'stopped' if stopped_by else 'done'}: {len(losses)} steps, "
                  f"{len(losses) * self.tokens_per_step:,} tokens in {elapsed:.1f} s; {msg}", flush=True)
            print(self._throughput(), flush=True)
        if stopped_by is None:
            if cfg.sample_tokens:
                self._sample()
            print(plot_losses(self.metrics_path, self.out_dir / "loss.png"), flush=True)
            best = self.out_dir / "best"
            target = best if best.exists() else self.last_ckpt
            print(f"checkpoint: {self.last_ckpt}" + (f" (best: {best})" if best.exists() else ""))
            print(f"evaluate: python -m gptcore.eval --ckpt {shlex.quote(str(target))} --data {shlex.quote(cfg.data)}",
                  flush=True)
        else:
            name = signal.Signals(stopped_by).name
            hint = self.resume_hint or f"python -m gptcore.train --out-dir {shlex.quote(cfg.out_dir)} --resume auto"
            print(f"gptcore.train: stopped by {name} at step {self.step}; checkpoint saved to {self.last_ckpt}.\n"
                  f"resume with:\n  {hint}", flush=True)


def train(cfg: TrainConfig, resume_hint: Optional[str] = None) -> TrainResult:
    """Run (or continue) training as configured; see the module docstring. The process owns
    cfg.out_dir (gptcore.rundir.RunLock) from before it looks inside until it returns."""
    check_backend(cfg.backend)
    d = _setup_dist(cfg.device)
    lock = RunLock(cfg.out_dir, resume_hint) if d.main else None
    try:
        if lock is not None:
            lock.acquire()
            if lock.note:
                print(lock.note, flush=True)
        trainer = Trainer(cfg, d, resume_hint)
        try:
            return trainer.run()
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(trainer._oom_message()) from None
        except _StoppedInEval as e:
            return trainer.stop_after_eval(e.signum)
    finally:
        if lock is not None:
            lock.release()
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same flags with --resume auto."""
    args, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume":
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
        elif not a.startswith("--resume=") and a not in ("--overwrite", "--no-overwrite"):
            args.append(a)  # --overwrite started the run; the resume must not start it over
        i += 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = world // max(1, local)
        head = ["torchrun", f"--nproc_per_node={local}"] + ([f"--nnodes={nodes}"] if nodes > 1 else [])
        head += ["-m", "gptcore.train"]
    else:
        head = ["python", "-m", "gptcore.train"]
    return shlex.join(head + args + ["--resume", "auto"])


def run_main(argv: list[str], prog: str, parse: Callable, run: Callable, oom_hint: Callable,
             interrupted: str, stopped_by: Callable) -> int:
    """The exit statuses of a training CLI (train, finetune): 2 for a config error or an OOM while
    setting up, 1 for a run that started and failed, 130 for a second Ctrl-C, 128 + signal for a
    graceful stop, else 0; with --debug each failure raises instead."""
    cfg = None
    try:
        cfg = parse(argv)
        result = run(cfg)
    except ConfigError as e:
        if debug_enabled(argv):
            raise
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:  # the run started and failed: status 1, the checkpoint named
        if debug_enabled(argv):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        if debug_enabled(argv) or cfg is None:
            raise
        print(f"{prog}: error: out of GPU memory while setting up{oom_hint(cfg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug_enabled(argv):
            raise
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    stop = stopped_by(result)
    return 0 if stop is None else 128 + int(stop)


def _main(argv: list[str]) -> int:
    return run_main(argv, "gptcore.train", parse_args, lambda cfg: train(cfg, resume_command(argv)),
                    lambda cfg: (f" (batch_size {cfg.batch_size}, grad_accum {cfg.grad_accum}). To fit: lower "
                                 f"--batch-size (raise --grad-accum to keep the global batch), add "
                                 f"--grad-checkpointing, use --dtype bf16, shorten --context-length, or train "
                                 f"with FSDP"),
                    "interrupted: stopped at once, no checkpoint of this step", lambda r: r.stopped_by)


def main(argv: Optional[list[str]] = None) -> int:
    """Exit status: see the module docstring; bad data, checkpoints, paths and run dirs are 2."""
    return run_cli("gptcore.train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
