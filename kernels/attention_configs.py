"""Launch configs of gptcore.kernels.attention: a table per GPU generation, refined by autotuning.

    from gptcore.kernels.attention_configs import chosen_config, use_config, tuning_log
    chosen_config(64, torch.bfloat16, causal=True, Tq=1024)   # {'fwd': 'M128/N64/w4/s3/tma', ..., 'source': ...}
    with use_config(fwd=cfg, dkdv=cfg2, dq=cfg3): ...        # every attention call inside uses these

Each kernel (fwd, dkdv, dq) takes block sizes, warps, stages and pointer-vs-TMA loads from a
candidate list per head_dim size and GPU generation (sm_90, sm_80 and others, fp32, the
interpreter). On CUDA the first large call (>= 2^24 scores) for each (kernel, head_dim, dtype,
causal, dropout, power-of-two length bucket) times the candidates and keeps the fastest
(GPTCORE_ATTN_AUTOTUNE=0: the table's first entry only). gptcore.kernels.attention re-exports the
public names.

Tests: tests/test_attention.py (autotuning: -m gpu).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query rows per block
    block_n: int  # key rows per block
    num_warps: int
    num_stages: int
    tma: bool = False  # Hopper tensor-memory-accelerator loads/stores through tensor descriptors

    def __str__(self) -> str:
        return f"M{self.block_m}/N{self.block_n}/w{self.num_warps}/s{self.num_stages}" + ("/tma" if self.tma else "")


KERNELS = ("fwd", "dkdv", "dq")

# Candidates, best guess first (the first one is the table entry used without autotuning).
# fwd and dq hold a query block (BLOCK_M) and stream key blocks; dkdv holds a key block
# (BLOCK_N) and streams query blocks. BLOCK_M = 128 with 4 or 8 warps lets Triton emit Hopper
# wgmma; shared memory per stage is (BLOCK_N or BLOCK_M) x D x 2 tensors x 2 bytes. Without
# dropout none of these spills registers on sm_90 in bf16 (checked with ptxas). On Hopper every
# config is also tried with TMA loads (tma=True) when the tensors allow it.
_C = KernelConfig
_SM90 = {
    ("fwd", "small"): [_C(128, 64, 4, 3), _C(128, 64, 8, 3), _C(128, 128, 8, 3), _C(64, 64, 4, 4),
                       _C(128, 32, 4, 4), _C(64, 128, 4, 3)],
    ("fwd", "large"): [_C(128, 64, 8, 3), _C(128, 128, 8, 2), _C(128, 64, 8, 4), _C(128, 32, 8, 4),
                       _C(64, 64, 4, 3)],
    ("dkdv", "small"): [_C(64, 128, 8, 3), _C(32, 128, 8, 3), _C(64, 128, 8, 2), _C(64, 64, 4, 3),
                        _C(32, 64, 4, 4), _C(64, 64, 8, 3)],
    ("dkdv", "large"): [_C(32, 128, 8, 3), _C(32, 128, 8, 2), _C(16, 128, 8, 4), _C(64, 64, 8, 3),
                        _C(32, 64, 8, 3)],
    ("dq", "small"): [_C(128, 64, 8, 3), _C(128, 32, 4, 4), _C(64, 64, 4, 3), _C(64, 32, 4, 4)],
    ("dq", "large"): [_C(128, 64, 8, 2), _C(128, 32, 8, 3), _C(64, 64, 4, 3), _C(64, 32, 4, 3)],
}
# Larger tiles that only fit in registers without per-element pointers (TMA variants only).
_SM90_TMA_ONLY = {
    ("fwd", "small"): [_C(128, 128, 8, 4, True)],
    ("fwd", "large"): [],
    ("dkdv", "small"): [_C(64, 128, 8, 4, True)],
    ("dkdv", "large"): [],
    ("dq", "small"): [_C(128, 128, 8, 2, True)],
    ("dq", "large"): [_C(128, 128, 8, 2, True)],
}
# Ampere / Ada and anything else with bf16: less shared memory (100-164 KB), no wgmma.
_SM80 = {
    ("fwd", "small"): [_C(64, 64, 4, 3), _C(128, 64, 4, 2), _C(128, 32, 4, 3)],
    ("fwd", "large"): [_C(128, 64, 8, 2), _C(64, 64, 4, 2)],
    ("dkdv", "small"): [_C(32, 64, 4, 2), _C(32, 128, 4, 2), _C(64, 128, 8, 2)],
    ("dkdv", "large"): [_C(64, 64, 4, 2), _C(32, 64, 4, 2)],
    ("dq", "small"): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(128, 32, 4, 2)],
    ("dq", "large"): [_C(64, 64, 4, 2), _C(128, 32, 8, 1), _C(64, 32, 4, 2)],
}
# fp32 on any GPU: ieee dots run on FMA units (no tensor cores) from 4-byte tiles, so small
# blocks and 8 warps keep registers in check. A correctness path, not a fast one.
_FP32 = {("fwd", "small"): _C(32, 32, 8, 2), ("fwd", "large"): _C(32, 16, 8, 2),
         ("dkdv", "small"): _C(16, 32, 8, 2), ("dkdv", "large"): _C(16, 32, 8, 2),
         ("dq", "small"): _C(32, 32, 8, 2), ("dq", "large"): _C(32, 32, 8, 2)}
# Triton interpreter (CPU): small blocks so the tests' short sequences still span several
# blocks, with block_m != block_n so ragged diagonals are exercised.
_INTERPRETER = {"fwd": _C(32, 16, 1, 1), "dkdv": _C(16, 32, 1, 1), "dq": _C(32, 16, 1, 1)}

_AUTOTUNE = os.environ.get("GPTCORE_ATTN_AUTOTUNE", "1") != "0"
# Smaller problems (B*H*Tq*Tk scores; decode steps, short prompts) take the table entry: tuning
# them would cost more compile time than it could save.
_TUNE_MIN_SCORES = 1 << 24
_TUNED: dict[tuple, KernelConfig] = {}  # autotune results, keyed by _tune_key()
_TUNING_LOG: list[dict] = []  # every tuning run's candidate timings (see tuning_log())
_FORCED: dict[str, KernelConfig] | None = None  # set by use_config()


def _arch(device: torch.device) -> int | None:
    """Compute capability as 90, 80, ... or None for the interpreter (CPU tensors)."""
    if device.type != "cuda":
        return None
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    # cached: torch.cuda.get_device_capability costs ~10 us a call, and every launch asks
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def candidates(kernel: str, D: int, dtype: torch.dtype, arch: int | None, tma_ok: bool = True) -> list[KernelConfig]:
    """The configs autotuning tries for one kernel, table default first.

    tma_ok: the tensors meet TMA's alignment rules (see _tma_ok); TMA variants exist on sm_90+.
    """
    return list(_candidates(kernel, D, dtype, arch, tma_ok))


@functools.lru_cache(maxsize=None)
def _candidates(kernel: str, D: int, dtype: torch.dtype, arch: int | None, tma_ok: bool) -> tuple[KernelConfig, ...]:
    if arch is None:
        return (_INTERPRETER[kernel],)
    size = "large" if D > 64 else "small"
    if dtype == torch.float32:
        return (_FP32[(kernel, size)],)
    if arch >= 90:
        base = _SM90[(kernel, size)]
        with_tma = [dataclasses.replace(c, tma=True) for c in base] + _SM90_TMA_ONLY[(kernel, size)]
        return tuple(base + (with_tma if tma_ok else []))
    return tuple(_SM80[(kernel, size)])


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Rank-4 TMA descriptors need 16-byte aligned base addresses and strides, last dim contiguous.

    The interpreter (CPU) emulates descriptors; on CUDA they need sm_90+.
    """
    for t in tensors:
        if t.data_ptr() & 15 or not _tma_layout_ok(t.stride(), t.element_size(), _arch(t.device)):
            return False
    return True


@functools.lru_cache(maxsize=4096)
def _tma_layout_ok(strides: tuple, elem_size: int, arch: int | None) -> bool:
    if arch is not None and arch < 90:
        return False
    return strides[-1] == 1 and not any(s * elem_size % 16 for s in strides[:-1])


def _bucket(t: int) -> int:
    """Sequence lengths share a tuning result within a power-of-two bucket."""
    return 1 << max(0, (t - 1).bit_length())


def _tune_key(kernel, D, dtype, causal, dropout, Tq, Tk, arch, tma_ok):
    return (kernel, D, dtype, causal, dropout, _bucket(Tq), _bucket(Tk), arch, tma_ok)


def _pick(kernel: str, key: tuple, launch, n_scores: int) -> KernelConfig:
    """The config for one launch: forced > tuned > (tune now, if big enough) > table default."""
    if _FORCED is not None:
        return _FORCED[kernel]
    if key in _TUNED:
        return _TUNED[key]
    _, D, dtype, *_rest, arch, tma_ok = key
    cands = _candidates(kernel, D, dtype, arch, tma_ok)
    if not (_AUTOTUNE and arch is not None and len(cands) > 1 and n_scores >= _TUNE_MIN_SCORES):
        return cands[0]
    from triton.testing import do_bench

    timings, errors = {}, []
    for cfg in cands:
        try:
            timings[cfg] = do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # a candidate that does not fit this GPU (shared memory, registers)
            errors.append(f"{cfg}: {type(e).__name__}: {e}")
    # Nothing ran (e.g. no memory left for timing): the table entry, whose launch raises if it is broken.
    best = min(timings, key=timings.get) if timings else cands[0]
    _TUNED[key] = best
    _TUNING_LOG.append({
        "kernel": kernel, "head_dim": D, "dtype": str(dtype), "causal": key[3], "dropout": key[4],
        "Tq_bucket": key[5], "Tk_bucket": key[6], "arch": arch, "best": str(best),
        "ms": {str(c): round(t, 5) for c, t in sorted(timings.items(), key=lambda ct: ct[1])}, "errors": errors})
    return best


def tuning_log() -> list[dict]:
    """One entry per autotuning run so far: every candidate's median ms, failures and the pick."""
    return list(_TUNING_LOG)


@contextlib.contextmanager
def use_config(fwd: KernelConfig, dkdv: KernelConfig, dq: KernelConfig):
    """Run every attention call inside the block with these configs (no table, no autotuning)."""
    global _FORCED
    prev, _FORCED = _FORCED, {"fwd": fwd, "dkdv": dkdv, "dq": dq}
    try:
        yield
    finally:
        _FORCED = prev


def chosen_config(D: int, dtype: torch.dtype, causal: bool = True, Tq: int = 1024, Tk: int | None = None,
                  dropout: bool = False, device=None) -> dict:
    """What attention() uses for these shapes: {'fwd': 'M128/N64/w4/s3/tma', 'dkdv': ..., 'dq': ...,
    'source': 'autotuned' | 'table' | 'forced'} ('table' also means: not tuned yet)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = _arch(device)
    Tk = Tq if Tk is None else Tk
    out, sources = {}, set()
    for kernel in KERNELS:
        tuned = [_TUNED.get(_tune_key(kernel, D, dtype, causal, dropout, Tq, Tk, arch, ok)) for ok in (True, False)]
        tuned = [c for c in tuned if c is not None]
        if _FORCED is not None:
            cfg, src = _FORCED[kernel], "forced"
        elif tuned:
            cfg, src = tuned[0], "autotuned"
        else:
            cfg, src = candidates(kernel, D, dtype, arch)[0], "table"
        out[kernel] = str(cfg)
        sources.add(src)
    out["source"] = "+".join(sorted(sources))
    return out
