"""What every checkpoint reader shares: the errors, the one ``Checkpoint`` record, the wrapper
prefix stripper, and the safe low-level readers (safetensors, weights-only torch.load, JSON)."""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from gptcore.config import GPTConfig

PathLike = Union[str, os.PathLike]
ConfigSpec = Union[None, str, dict, GPTConfig]

# One version for gptcore's own formats (the training checkpoint's meta.json and the weights
# sidecar gptcore.json); a reader refuses a newer one.
FORMAT_VERSION = 1
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# Wrappers that torch.compile (`_orig_mod.`) and DistributedDataParallel (`module.`) put on keys.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# What inspect shows of a training checkpoint's meta.json besides config and weights.
TRAIN_SUMMARY = ("step", "tokens", "tokenizer", "best_val", "data", "data_hash", "saved_at")


class CheckpointError(RuntimeError):
    """A missing, corrupt, truncated or incompatible checkpoint; the message says which and why."""


class FormatError(CheckpointError, ValueError):
    """The file is not a checkpoint gptcore can read, or its contents do not fit its config."""


class UntrustedPickleError(CheckpointError):
    """The file holds pickled Python objects; loading it could run code from the file."""


@dataclass
class Checkpoint:
    """What a checkpoint holds, in gptcore's terms, whatever format it came in."""

    path: Path
    format: str                                # gptcore-train, gptcore, gptcore-pt, hf, nanogpt, ...
    description: str
    state_dict: dict[str, torch.Tensor]        # gptcore names and layout, lm_head.weight included
    config: Optional[GPTConfig]                # None when the file carries none and none was given
    meta: dict[str, Any] = field(default_factory=dict)  # what the file records: step, tokens, ...
    notes: list[str] = field(default_factory=list)      # conversions made on the way in
    config_error: Optional[str] = None         # why config is None
    state: Optional[dict] = None               # a training checkpoint's state.pt, when asked for

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return self.state_dict

    @property
    def model_config(self) -> GPTConfig:
        if self.config is None:
            raise FormatError(self.config_error or f"{self.path} carries no model config")
        return self.config

    def summary(self) -> dict[str, Any]:
        """What the file records beyond weights and config (what inspect shows)."""
        if self.format == "gptcore-train":
            return {k: self.meta[k] for k in TRAIN_SUMMARY if k in self.meta}
        return dict(self.meta)


def strip_prefixes(state: dict) -> dict:
    """Keys without torch.compile's ``_orig_mod.`` or DDP's ``module.`` prefixes (nested too)."""
    out = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def torch_load(path: PathLike, trust_pickle: bool = False) -> Any:
    """torch.load on the CPU that runs no code from the file unless trust_pickle is set."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if m is None:
            raise FormatError(f"{path} is not a gptcore checkpoint: not a checkpoint torch.load can read "
                              f"({last_line(e)})") from None
        raise UntrustedPickleError(
            f"{path} holds pickled Python objects that a weights-only load refuses (it needs "
            f"{m.group(1)}); loading it in full would run code stored in the file. Only if you trust "
            f"where the file came from, pass trust_pickle=True (on the command line: --trust-pickle)."
        ) from None
    except Exception as e:  # a truncated, foreign or corrupt file: torch raises many error types
        raise FormatError(f"{path} is not a gptcore checkpoint: not a checkpoint torch.load can read "
                          f"({type(e).__name__}: {last_line(e)})") from None


def load_safetensors(path: PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors' load_file with a FormatError naming the file when it is not one."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as e:  # SafetensorError (bad header), OSError
        raise FormatError(f"{path}: not a readable safetensors file ({last_line(e)})") from None


def existing_path(path: PathLike) -> Path:
    """``path`` (``~`` expanded), or a CheckpointError saying why it cannot be opened or does not exist."""
    p = Path(path).expanduser()
    try:
        exists = p.exists()
    except OSError as e:  # a symlink loop, a name too long
        raise CheckpointError(f"checkpoint {p} cannot be opened ({e.strerror or e})") from None
    if not exists:
        raise CheckpointError(f"checkpoint {p} does not exist (no such file or folder)")
    return p


def read_json(path: PathLike) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"cannot read JSON {path}: {e}") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def last_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Check the doc")]
    return lines[-1] if lines else type(e).__name__


def clip(items: list, n: int = 8, sep: str = ", ") -> str:
    head = sep.join(map(str, items[:n]))
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def natural(key: str) -> list:
    """Sort key putting transformer.h.2 before transformer.h.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]
