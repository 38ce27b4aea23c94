"""Launch helpers and the partial-sum reduction shared by the row-wise kernels (layer_norm.py, gelu.py).

- ``check_tensor``: the boundary check every public kernel function runs on its tensors
  (floating dtype the kernels support, a device Triton can run on, same device as x).
- ``check_out_dtype``: the same for an op's requested output dtype.
- ``as_rows``: flatten leading dims to (M, N) rows with unit column stride, copying only when
  the layout cannot be expressed as one row stride.
- ``persistent_programs``: how many programs a persistent (row-run per program) kernel gets.
- ``sum_partials``: the second step of a deterministic column reduction: one small kernel sums
  the (P, N) fp32 per-program partials of one or two quantities over P and stores each in its
  parameter's dtype (one launch instead of a sum and a cast per quantity).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from gptcore.kernels._launch import cdiv, planned

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


def check_out_dtype(out_dtype, op: str) -> None:
    """Raise a clear error unless out_dtype is None or a dtype the kernels can store."""
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


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


@planned
@triton.jit(do_not_specialize=["P"])
def _sum_partials_kernel(
    PART,  # (K, P, N) fp32 per-program partial sums, K = 2 if TWO else 1
    OUT0,  # (N,) out: sum over P of PART[0], in its own dtype
    OUT1,  # (N,) out: sum over P of PART[1] (unused unless TWO)
    P,
    N,
    TWO: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    acc0 = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        mask = (rows < P)[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        acc0 += tl.load(PART + offs, mask=mask, other=0.0)
        if TWO:
            acc1 += tl.load(PART + P * N + offs, mask=mask, other=0.0)
    tl.store(OUT0 + cols, tl.sum(acc0, axis=0).to(OUT0.dtype.element_ty), mask=col_ok)
    if TWO:
        tl.store(OUT1 + cols, tl.sum(acc1, axis=0).to(OUT1.dtype.element_ty), mask=col_ok)


# (BLOCK_P, BLOCK_N, num_warps) of the partial-sum kernel: the fastest of bench/sweep_layer_norm.py's
# bwd sweep (GPT-2's (2112, 768) fp32 partials x 2), well ahead of the former (64, 32, 4)
SUM_PARTIALS_CONFIG = (128, 16, 4)


def sum_partials(part: torch.Tensor, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """part (K, P, N) fp32, K = len(dtypes) in (1, 2) -> K tensors (N,): sums over P in those dtypes.

    Fixed summation order (column blocks of BLOCK_N, P walked in BLOCK_P steps, then a tree over
    BLOCK_P), so the result is bit-identical from run to run.
    """
    k, p, n = part.shape
    outs = [torch.empty(n, dtype=dt, device=part.device) for dt in dtypes]
    block_p, block_n, warps = SUM_PARTIALS_CONFIG
    _sum_partials_kernel[(cdiv(n, block_n),)](
        part, outs[0], outs[-1], p, n, TWO=k == 2, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps,
    )
    return outs
