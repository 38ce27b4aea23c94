"""Data-parallel set-up: rank, world and device from torchrun's environment, the process group,
the module DDP wraps, and the choice between DDP and FSDP2 (--parallel) with the sharding itself.

    torchrun --nproc_per_node 8 -m gptcore.train --preset gpt2-xl --parallel fsdp     # one host
    torchrun --nnodes 2 --node-rank R --nproc_per_node 8 --master-addr HOST0 --master-port 29500 \
        -m gptcore.train ...                                                            # two hosts (R = 0, 1)
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

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


def _setup_dist(device_arg: str, group: bool = False) -> _Dist:
    """Rank, world and device from torchrun's environment; joins the process group if world > 1
    (or, with ``group``, a one-process group: FSDP needs one even alone)."""
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
    elif group and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    return _Dist(rank, world, local, device)


class _LossModule(nn.Module):
    """forward(idx, targets) -> mean loss, so DDP's hooks and torch.compile see the loss call."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model.loss(idx, targets)


# ---- choosing and applying the parallelism ------------------------------------------------------------
PARALLEL_MODES = ("auto", "ddp", "fsdp")
FIT_FRACTION = 0.9  # auto: what share of the GPU's memory the estimate may take before FSDP is chosen


def choose_parallel(mode: str, model: GPT, *, world: int, device: torch.device, batch_size: int, seq_len: int,
                    precision: str, refusal: Optional[str] = None) -> tuple[str, str]:
    """("ddp" or "fsdp", the start-up line saying which and why) for --parallel ``mode``.

    ddp is also the single-process case (world 1: no wrapper at all). auto picks fsdp when world > 1 and
    model.estimate_memory (fp32 weights, grads, AdamW moments, activations, logits) exceeds FIT_FRACTION
    of one GPU's memory; on a CPU it keeps ddp (there is no GPU memory to run out of)."""
    if mode not in PARALLEL_MODES:
        raise ConfigError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    what = "ddp" if world > 1 else "single process"
    if mode == "fsdp":
        if refusal:
            raise ConfigError(f"--parallel fsdp: {refusal}")
        if precision == "fp16":
            raise ConfigError("--parallel fsdp with --dtype fp16: loss scaling of sharded gradients is not "
                              "supported; use --dtype bf16 (or fp32)")
        return "fsdp", (f"parallel: fsdp (--parallel fsdp): params, grads and AdamW state sharded over {world} "
                        f"rank{'s' if world > 1 else ''}, one FSDP unit per transformer block plus the root")
    if mode == "ddp":
        return "ddp", f"parallel: {what} (--parallel ddp)"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    est = model.estimate_memory(batch_size, seq_len, dtype=dtype)
    state = est["params"] + est["grads"] + est["optimizer"]
    sizes = (f"model + optimizer state {state / 2**30:.1f} GiB + activations ~"
             f"{(est['total'] - state) / 2**30:.1f} GiB (model.estimate_memory)")
    if device.type != "cuda":
        return "ddp", f"parallel: {what} (auto: on the {device.type} memory is not a GPU's; {sizes})"
    cap = torch.cuda.get_device_properties(device).total_memory
    if est["total"] <= FIT_FRACTION * cap:
        return "ddp", f"parallel: {what} (auto: {sizes} fit one GPU of {cap / 2**30:.0f} GiB)"
    if world == 1:
        return "ddp", (f"parallel: single process (auto: {sizes} exceed one GPU of {cap / 2**30:.0f} GiB, but "
                       f"FSDP needs more ranks: torchrun --nproc_per_node N, or --parallel fsdp "
                       f"--fsdp-cpu-offload)")
    if refusal or precision == "fp16":
        why = refusal or "fp16 loss scaling is not supported under FSDP"
        return "ddp", f"parallel: ddp (auto: {sizes} exceed one GPU of {cap / 2**30:.0f} GiB, but {why})"
    return "fsdp", (f"parallel: fsdp (auto: {sizes} exceed one GPU of {cap / 2**30:.0f} GiB; sharding the "
                    f"model and optimizer state over {world} ranks)")


def shard_model(model: GPT, device: torch.device, precision: str, cpu_offload: bool) -> str:
    """FSDP2 in place: fully_shard each transformer block, then the whole model (the root: embeddings,
    final LayerNorm, the tied LM head); GPT.loss runs the root's hooks too. bf16: parameters are
    all-gathered in bf16 and gradients reduce-scattered in fp32. Returns a one-line description."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw: dict = {"mesh": mesh}
    notes = []
    if precision == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        notes.append("bf16 params / fp32 reduce")
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        notes.append("params, grads and AdamW state offloaded to the CPU (the optimizer steps there)")
    # Block returns its MLP output as a view; nothing changes it in place (the next LayerNorm adds it to
    # the residual out of place), so FSDP2's warning about in-place ops on views does not apply here
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    for name in ("loss", "hidden_states"):
        register_fsdp_forward_method(model, name)
    return f"fsdp: {len(model.transformer.h)} block units + root" + (f"; {', '.join(notes)}" if notes else "")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is (or holds) an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())
