"""Launch helpers shared by the row-wise kernels (layer_norm.py, gelu.py).

- ``check_tensor``: the boundary check every public kernel function runs on its tensors
  (floating dtype the kernels support, a device Triton can run on, same device as x).
- ``as_rows``: flatten leading dims to (M, N) rows with unit column stride, copying only when
  the layout cannot be expressed as one row stride.
- ``persistent_programs``: how many programs a persistent (grid-stride over rows) kernel gets.
"""
from __future__ import annotations

import functools
import math
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, name: str, op: str, device: torch.device | None = None) -> None:
    """Raise a clear error unless t is a float32/float16/bfloat16 tensor the kernels can read."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; the Triton kernel supports float32, float16 and "
            f"bfloat16 (cast with .float() or .to(torch.bfloat16))"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}; put both on the same device")
    if t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{op}: {name} is a CPU tensor; the Triton kernel needs a CUDA tensor. Move it with "
                f".cuda(), use backend='torch', or set TRITON_INTERPRET=1 (before importing "
                f"gptcore.kernels) to run the kernel slowly on the CPU"
            )
    elif t.device.type != "cuda":
        raise ValueError(f"{op}: {name} is on {t.device}; the Triton kernel runs on CUDA tensors only")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) view whose columns are unit-stride; copies once if no such view exists."""
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, per_sm: int) -> int:
    """per_sm programs per streaming multiprocessor on CUDA; 4 under the interpreter (enough to
    exercise the cross-program reduction, few enough to stay quick on a CPU)."""
    if device.type != "cuda":
        return 4
    return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
