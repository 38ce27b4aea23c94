"""Checkpoints of an FSDP run, and moving optimizer state between sharded and unsharded runs.

An FSDP checkpoint is today's checkpoint directory plus one folder:

    ckpt-NNNNNNN/
      meta.json, model.safetensors   full weights, gathered to rank 0: every gptcore tool reads them
      state.pt                       step, tokens, RNG, ...; its "optimizer" is None, "optimizer_dcp" names:
      optim/                         the AdamW state, sharded: torch.distributed.checkpoint (DCP), one file
                                     per rank plus .metadata; keys are parameter names (FQNs)

Saving is atomic like save_checkpoint: every rank writes its DCP shard into out_dir/.NAME.tmp-sharded/,
rank 0 then writes the rest there (save_checkpoint) and renames the finished directory into place;
remove_stale_temps clears what an interrupted save leaves. The optimizer state loads into any world
size and either parallelism: DCP reshards it for FSDP, and hands a DDP or single-process run the
full tensors; the reverse (a state.pt optimizer into an FSDP run) is sharded by
set_optimizer_state_dict. Every rank must see out_dir (one host, or a shared filesystem across nodes).
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from gptcore.io import save_checkpoint
from gptcore.io.durable import replace_dir as _replace_dir
from gptcore.train.distributed import is_sharded

OPTIM_DIR = "optim"


class _Weights(nn.Module):
    """Carries a gathered state dict (and the model config) to save_checkpoint."""

    def __init__(self, weights: dict, config):
        super().__init__()
        self._weights, self.config = weights, config

    def state_dict(self, *args, **kwargs):  # noqa: D102 - save_checkpoint reads the weights here
        return dict(self._weights)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's full fp32 weights on the CPU: on rank 0 (an empty dict elsewhere) for a sharded
    model, where every rank must call it (an all-gather); the plain state dict otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def _portable(osd: dict) -> dict:
    """An FQN-keyed optimizer state dict with device-tensor lrs written as floats (loadable anywhere)."""
    for g in osd.get("param_groups", []):
        if isinstance(g.get("lr"), Tensor):
            g["lr"] = float(g["lr"])
    return osd


def save_sharded(final: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, meta: dict,
                 main: bool) -> Optional[Path]:
    """Write checkpoint ``final`` of a sharded run (every rank calls this); returns it on rank 0."""
    weights = full_weights(model)
    staging = final.with_name(f".{final.name}.tmp-sharded")
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save(_portable(get_optimizer_state_dict(model, optimizer)), checkpoint_id=str(staging / OPTIM_DIR))
    dist.barrier()
    error = [None]
    if main:
        try:
            meta = {**meta, "optimizer_state": {"format": "torch.distributed.checkpoint", "dir": OPTIM_DIR,
                                                "world_size": dist.get_world_size()}}
            save_checkpoint(staging / "main", _Weights(weights, model.config), {**state, "optimizer": None,
                                                                                  "optimizer_dcp": OPTIM_DIR}, meta)
            os.rename(staging / OPTIM_DIR, staging / "main" / OPTIM_DIR)
            _replace_dir(staging / "main", final)
        except Exception as e:  # noqa: BLE001 - the other ranks learn of it below, then it is raised
            error[0] = f"{type(e).__name__}: {e}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"saving the sharded checkpoint {final} failed on rank 0 ({error[0]})")
    return final if main else None


def load_dcp_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load the DCP optimizer state at ``path`` into ``optimizer`` (sharded or not; any world size).
    Every rank of a process group calls it; a single process needs none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}/.metadata is missing: the sharded optimizer state is incomplete")
    osd = _portable(get_optimizer_state_dict(model, optimizer))  # this run's layout, state initialised
    with warnings.catch_warnings():  # one process without a group: DCP says it loads without one, as meant
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
        dcp.load(osd, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, osd)


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a torch-native optimizer state dict (state keyed by parameter index, as state.pt stores it)
    into the optimizer of a sharded model: indices become parameter names, then each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    try:
        by_name = {"state": {order[int(i)]: st for i, st in sd["state"].items()},
                   "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in sd["param_groups"]]}
    except (IndexError, ValueError) as e:
        raise ValueError(f"the optimizer state has other parameters than this model ({e})") from None
    set_optimizer_state_dict(model, optimizer, _portable(by_name), options=_options(full_state_dict=True))
