"""Data-parallel set-up: rank, world and device from torchrun's environment, the process group,
and the module DDP wraps."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from gptcore.model import GPT
from gptcore.train.config import ConfigError


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
