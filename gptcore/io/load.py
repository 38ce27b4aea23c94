"""A GPT from any checkpoint: the model-building entry points over ``read_checkpoint``."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from gptcore.config import GPTConfig
from gptcore.io.common import ConfigSpec, PathLike
from gptcore.io.formats import read_checkpoint
from gptcore.io.hf import KNOWN_MODELS, download, find_cached, read_hf_folder
from gptcore.io.weights import build_model, check_state_dict
from gptcore.model import GPT


def load_any(path: PathLike, trust_pickle: bool = False, config: ConfigSpec = None
             ) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state_dict, meta) of a checkpoint in any supported format.

    config is needed only for formats that carry none (LLMs-from-scratch, bare state_dicts) and
    no JSON file sits beside them. meta holds "format", "description", "notes" and what the file
    records ("step", "tokens", "tokenizer", ...).
    """
    ck = read_checkpoint(path, trust_pickle=trust_pickle, config=config)
    check_state_dict(ck.model_config, ck.state_dict, source=str(ck.path))
    meta = {"format": ck.format, "description": ck.description, "notes": list(ck.notes), **ck.summary()}
    return ck.config, ck.state_dict, meta


def load_model(path: PathLike, device="cpu", backend: Optional[str] = None, dtype=None,
               trust_pickle: bool = False, config: ConfigSpec = None, verify: bool = True) -> GPT:
    """The GPT stored at ``path`` in any format ``read_checkpoint`` reads (a gptcore checkpoint or
    run directory, a Hugging Face folder, nanoGPT, LLMs-from-scratch, a bare state_dict), in eval
    mode on ``device``; backend None: the fastest that runs there; dtype None: the file's."""
    ck = read_checkpoint(path, trust_pickle=trust_pickle, config=config, verify=verify)
    return build_model(ck.model_config, ck.state_dict, backend=backend, dtype=dtype, device=device,
                       source=str(ck.path))


def load_pretrained(name_or_path: str, backend: Optional[str] = None, dtype=None, cache_dir=None,
                    trust_pickle: bool = False, **overrides: Any):
    """GPT from a path (any format read_checkpoint reads) or a known name (gpt2, gpt2-medium,
    gpt2-large, gpt2-xl, distilgpt2) or Hub id: local Hugging Face cache first, else download.

    A path that exists wins over a name, so a local folder called "gpt2" is what loads.
    overrides change config fields that keep the weights valid, e.g. drop_rate=0.0 for
    fine-tuning, or a shorter context_length (the position table is cropped to it).
    The model comes back in eval mode.
    """
    if Path(name_or_path).exists():
        ck = read_checkpoint(name_or_path, trust_pickle=trust_pickle)
        cfg, sd = ck.model_config, ck.state_dict
    elif name_or_path in KNOWN_MODELS or re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        folder = find_cached(name_or_path, cache_dir) or download(name_or_path, cache_dir)
        ck = read_hf_folder(folder)
        cfg, sd = ck.model_config, ck.state_dict
    else:
        raise ValueError(
            f"{name_or_path!r} is neither an existing file/folder nor a known model name "
            f"({', '.join(KNOWN_MODELS)}) or Hub id (owner/name)"
        )
    if overrides:
        T = overrides.get("context_length", cfg.context_length)
        if T > cfg.context_length:
            raise ValueError(f"context_length={T} is longer than the {cfg.context_length} positions "
                             f"{name_or_path} was trained with; it can only be shortened")
        if T < cfg.context_length and "transformer.wpe.weight" in sd:
            sd = {**sd, "transformer.wpe.weight": sd["transformer.wpe.weight"][:T]}
        cfg = cfg.replace(**overrides)
    return build_model(cfg, sd, backend=backend, dtype=dtype, source=str(ck.path))
