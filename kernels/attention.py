"""Fused causal attention in Triton (the flash-attention algorithm), forward and backward.

    from gptcore.kernels.attention import attention
    y = attention(q, k, v, causal=True, dropout_p=0.0, scale=None)   # q (B,H,Tq,D), k/v (B,H,Tk,D)

What is here, bottom up:
  _fwd_kernel        one program per (query block, head, batch): streams key/value blocks through
                     an online softmax; writes O and the row log-sum-exp (fp32, base 2). Never
                     materialises the (Tq, Tk) score matrix.
  _bwd_delta_kernel  delta = rowsum(dO * O) in fp32 (the softmax-Jacobian correction term).
  _bwd_dkdv_kernel   one program per key block: holds K, V, loops over query blocks, recomputes
                     P from Q, K and the saved log-sum-exp, accumulates dK and dV.
  _bwd_dq_kernel     one program per query block: holds Q, dO, loops over key blocks, accumulates dQ.
                     Each gradient is written by exactly one program: no atomics, so the backward
                     pass is deterministic (the price is recomputing QK^T and dO V^T twice).
  dropout_mask()     the exact keep-mask the kernels use for a seed (for tests and debugging).
  _Attention         the torch.autograd.Function; attention() is the public entry point.

Files: the jit kernels above are in attention_kernels.py, their launch configs and autotuning in
attention_configs.py (its public names are re-exported here); this file holds the launchers, the
input checks, the launcher ops and the autograd Functions.

Conventions:
  * Causal with Tq < Tk aligns the queries to the END of the keys (prefill over a KV cache):
    query i sits at position P + i, P = Tk - Tq, and sees keys 0..P+i (kernels/reference.py).
  * Causal key blocks entirely above the diagonal are never visited (loop bounds); blocks entirely
    below it run an unmasked loop; only the diagonal blocks and the ragged last block get masks.
  * Inputs may be non-contiguous (the model passes permuted views of its qkv projection): every
    kernel takes (batch, head, row) strides; only a last dim with stride != 1 is copied once.
  * Dropout uses Philox (tl.philox, counter (j, i, b*H + h)): the forward and backward kernels
    regenerate the same mask, independent of block sizes, and a fixed seed reproduces it.
  * dtypes: fp16 and bf16 run tensor-core dots with fp32 accumulation and an fp32 softmax; fp32
    inputs run tl.dot with input_precision="ieee" (true fp32, not TF32) on smaller blocks.
  * Block sizes, warps, stages and pointer-vs-TMA loads come from a table per head_dim and GPU
    generation; on CUDA the first large call (>= 2^24 scores) for each (kernel, head_dim, dtype,
    causal, dropout, power-of-two length bucket) times the candidate configs and keeps the
    fastest (GPTCORE_ATTN_AUTOTUNE=0: table only). chosen_config() says what was used.

Tests: tests/test_attention.py (CPU: TRITON_INTERPRET=1, small shapes). Benchmark:
python -m bench.kernels_attention.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
from torch import Tensor

from gptcore.kernels._launch import cdiv, tma_descriptor
from gptcore.kernels._oplib import launcher_op
from gptcore.kernels.attention_configs import (KERNELS, KernelConfig, _arch, _pick, _tma_ok, _tune_key,
                                               candidates, chosen_config, tuning_log, use_config)
from gptcore.kernels.attention_kernels import (_bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel,
                                               _dropout_mask_kernel, _fwd_kernel)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # 1 / ln(2): softmax runs in base 2 (exp2 is one instruction)

__all__ = ["attention", "attention_qkv", "split_qkv", "dropout_mask", "out_layout", "SUPPORTED_HEAD_DIMS",
           "SUPPORTED_DTYPES", "KERNELS", "KernelConfig", "candidates", "chosen_config", "tuning_log", "use_config"]


# ============================================================================================
# Launchers
# ============================================================================================
def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output and workspace comes from here (tests swap in a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def out_layout(B: int, H: int, T: int, D: int, dtype, device) -> torch.Tensor:
    """An empty (B, H, T, D) output laid out as (B, T, H, D) in memory: the model's
    o.transpose(1, 2).reshape(B, T, H * D) is then a view, not a copy of the whole output."""
    return _alloc((B, T, H, D), dtype, device).transpose(1, 2)


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is Triton's default; 16-bit dots ignore it


def _operands(tma: bool, tensors_and_rows):
    """The kernel's tensor arguments: the tensors themselves, or with tma one (B, H, T, D)
    descriptor each whose block is (1, 1, rows, D)."""
    if not tma:
        return [t for t, _ in tensors_and_rows]
    return [tma_descriptor(t, [1, 1, rows, t.shape[3]]) for t, rows in tensors_and_rows]


def _forward(q, k, v, causal: bool, p_drop: float, scale: float, seed: int, bthd_out: bool = True):
    """bthd_out: o in (B, T, H, D) memory (out_layout); False gives a contiguous (B, H, T, D) o."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    o = out_layout(B, H, Tq, D, q.dtype, q.device) if bthd_out else _alloc((B, H, Tq, D), q.dtype, q.device)
    lse = _alloc((B, H, Tq), torch.float32, q.device)
    drop_scale = 1.0 / (1.0 - p_drop)
    tma_ok = _tma_ok(q, k, v, o)

    def launch(cfg: KernelConfig):
        bm, bn, tma = cfg.block_m, cfg.block_n, cfg.tma and tma_ok
        args = _operands(tma, [(q, bm), (k, bn), (v, bn), (o, bm)])
        _fwd_kernel[(cdiv(Tq, bm), H, B)](
            *args, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, Tq, Tk, scale * LOG2E, seed, p_drop, drop_scale,
            D=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, DROPOUT=p_drop > 0.0,
            DOT_PREC=_dot_prec(q.dtype), TMA=tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    key = _tune_key("fwd", D, q.dtype, causal, p_drop > 0, Tq, Tk, _arch(q.device), tma_ok)
    launch(_pick("fwd", key, launch, B * H * Tq * Tk))
    return o, lse


def _backward(do, q, k, v, o, lse, causal: bool, p_drop: float, scale: float, seed: int, out=None):
    """-> dq, dk, dv. out: optional (dq, dk, dv) views to write instead (dk and dv with equal
    strides, last dim unit-stride), e.g. the three parts of one packed dqkv buffer."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = _alloc((B, H, Tq), torch.float32, q.device)
    if out is None:
        dq = _alloc((B, H, Tq, D), q.dtype, q.device)
        dk = _alloc((B, H, Tk, D), k.dtype, k.device)
        dv = _alloc((B, H, Tk, D), v.dtype, v.device)
    else:
        dq, dk, dv = out
        assert dk.stride() == dv.stride() and dq.stride(-1) == dk.stride(-1) == 1, "dk, dv must share strides"
    drop_scale = 1.0 / (1.0 - p_drop)
    dropout = p_drop > 0.0
    prec = _dot_prec(q.dtype)
    arch = _arch(q.device)
    tma_ok = _tma_ok(q, k, v, do, dq, dk, dv)

    block = 64 if q.is_cuda else 32
    _bwd_delta_kernel[(cdiv(Tq, block), H, B)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Tq, D=D, BLOCK_M=block)

    common = (H, Tq, Tk, scale * LOG2E, scale, seed, p_drop, drop_scale)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])

    def launch_dkdv(cfg: KernelConfig):
        bm, bn, tma = cfg.block_m, cfg.block_n, cfg.tma and tma_ok
        args = _operands(tma, [(q, bm), (k, bn), (v, bn), (do, bm), (dk, bn), (dv, bn)])
        _bwd_dkdv_kernel[(cdiv(Tk, bn), H, B)](
            *args, lse, delta, *strides, *dk.stride()[:3], *common,
            D=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, DROPOUT=dropout, DOT_PREC=prec,
            TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def launch_dq(cfg: KernelConfig):
        bm, bn, tma = cfg.block_m, cfg.block_n, cfg.tma and tma_ok
        args = _operands(tma, [(q, bm), (k, bn), (v, bn), (do, bm), (dq, bm)])
        _bwd_dq_kernel[(cdiv(Tq, bm), H, B)](
            *args, lse, delta, *strides, *dq.stride()[:3], *common,
            D=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, DROPOUT=dropout, DOT_PREC=prec,
            TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    n_scores = B * H * Tq * Tk
    launch_dkdv(_pick("dkdv", _tune_key("dkdv", D, q.dtype, causal, dropout, Tq, Tk, arch, tma_ok), launch_dkdv,
                      n_scores))
    launch_dq(_pick("dq", _tune_key("dq", D, q.dtype, causal, dropout, Tq, Tk, arch, tma_ok), launch_dq, n_scores))
    return dq, dk, dv


@functools.lru_cache(maxsize=None)
def _bf16_ok(index) -> bool:
    return torch.cuda.is_bf16_supported()  # ~10 us a call uncached; fixed per device


def _check_device(t: torch.Tensor) -> None:
    if t.is_cuda:
        if t.dtype == torch.bfloat16 and not _bf16_ok(t.device.index):
            raise ValueError("attention: this GPU has no bfloat16 support; use float16 inputs")
        return
    if t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "attention: CPU tensors need the Triton interpreter; move q, k, v to a CUDA device, "
                "set TRITON_INTERPRET=1 before importing gptcore (slow, for tests), or use the "
                "'torch' backend")
        return
    raise ValueError(f"attention: unsupported device {t.device}; use CUDA tensors")


def _check_inputs(q, k, v, causal: bool, dropout_p: float, scale: float | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: dtype {q.dtype} is not supported; use one of "
                         f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on "
                         "batch, heads and head_dim (B, H, *, D)")
    D = q.shape[3]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention: head_dim {D} is not supported; the Triton kernel handles head_dim "
                         f"in {SUPPORTED_HEAD_DIMS} (use the 'torch' backend for others)")
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq < 1 or Tk < 1 or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"attention: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    if causal and Tq > Tk:
        raise ValueError(f"attention: causal attention needs Tq <= Tk (queries are the last Tq of the "
                         f"keys), got Tq={Tq}, Tk={Tk}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not (scale > 0.0 and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a positive finite number, got {scale}")
    _check_device(q)


# ============================================================================================
# Autograd and public API
# ============================================================================================
# ---- launcher ops (kernels/_oplib.py): the launchers above, eager or traced --------------------------
# The dropout seed travels as a (1,) int64 CPU tensor (None without dropout): under torch.compile it
# is drawn by a graph op (torch.randint), not a host .item(), and the backward regenerates the mask
# from the saved seed tensor.
def _seed_int(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed)


def _fwd_launcher(q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, scale: float,
                  seed: Optional[Tensor], bthd_out: bool) -> tuple[Tensor, Tensor]:
    """q (B, H, Tq, D), k, v (B, H, Tk, D) -> o (B, H, Tq, D) in q's dtype (laid out (B, T, H, D) in
    memory when bthd_out, else contiguous), lse (B, H, Tq) fp32."""
    return _forward(q, k, v, causal, dropout_p, scale, _seed_int(seed), bthd_out)


def _fwd_fake(q, k, v, causal, dropout_p, scale, seed, bthd_out):
    _check_inputs(q, k, v, causal, dropout_p, scale)
    B, H, T, D = q.shape
    o = q.new_empty((B, T, H, D)).transpose(1, 2) if bthd_out else q.new_empty(q.shape)
    return o, q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_launcher(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                  dropout_p: float, scale: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv (shapes and dtypes of q, k, v; contiguous)."""
    return _backward(do, q, k, v, o, lse, causal, dropout_p, scale, _seed_int(seed))


def _bwd_fake(do, q, k, v, o, lse, causal, dropout_p, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _qkv_fwd_launcher(qkv: Tensor, n_heads: int, causal: bool, dropout_p: float, scale: float,
                      seed: Optional[Tensor], bthd_out: bool) -> tuple[Tensor, Tensor]:
    """qkv (B, T, 3 H D) packed -> o (B, H, T, D) (layout as in _fwd_launcher), lse (B, H, T) fp32."""
    return _forward(*split_qkv(qkv, n_heads), causal, dropout_p, scale, _seed_int(seed), bthd_out)


def _qkv_fwd_fake(qkv, n_heads, causal, dropout_p, scale, seed, bthd_out):
    _check_qkv(qkv, n_heads)
    _check_inputs(*split_qkv(qkv, n_heads), causal, dropout_p, scale)
    B, T, C3 = qkv.shape
    D = C3 // (3 * n_heads)
    o = qkv.new_empty((B, T, n_heads, D)).transpose(1, 2) if bthd_out else qkv.new_empty((B, n_heads, T, D))
    return o, qkv.new_empty((B, n_heads, T), dtype=torch.float32)


def _qkv_bwd_launcher(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, n_heads: int, causal: bool,
                      dropout_p: float, scale: float, seed: Optional[Tensor]) -> Tensor:
    """-> dqkv (B, T, 3 H D) contiguous: the kernels write dq, dk, dv straight into its three parts."""
    dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    _backward(do, *split_qkv(qkv, n_heads), o, lse, causal, dropout_p, scale, _seed_int(seed),
              out=split_qkv(dqkv, n_heads))
    return dqkv


def _qkv_bwd_fake(do, qkv, o, lse, n_heads, causal, dropout_p, scale, seed):
    return qkv.new_empty(qkv.shape)


_fwd_op = launcher_op("gptcore::attention_fwd", _fwd_launcher, _fwd_fake)
_bwd_op = launcher_op("gptcore::attention_bwd", _bwd_launcher, _bwd_fake)
_qkv_fwd_op = launcher_op("gptcore::attention_qkv_fwd", _qkv_fwd_launcher, _qkv_fwd_fake)
_qkv_bwd_op = launcher_op("gptcore::attention_qkv_bwd", _qkv_bwd_launcher, _qkv_bwd_fake)


def _bthd_out() -> bool:
    # eager: o in (B, T, H, D) memory, so the model's transpose-reshape is a view. Compiled: a
    # contiguous o (a transposed custom-op output sent Inductor's GPU codegen into an exponential
    # IR-printing loop on a 12-layer model).
    return not torch.compiler.is_compiling()


class _Attention(torch.autograd.Function):
    """The one autograd path of attention, eager and compiled (kernels/_oplib.py)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, scale, seed):
        o, lse = _fwd_op(q, k, v, causal, dropout_p, scale, seed, _bthd_out())
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.args = (causal, dropout_p, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = _bwd_op(do, q, k, v, o, lse, *ctx.args, seed)
        return dq, dk, dv, None, None, None, None


def split_qkv(qkv: torch.Tensor, n_heads: int):
    """(B, T, 3 * H * D) -> q, k, v (B, H, T, D) views, the model's layout of one c_attn output."""
    B, T, C3 = qkv.shape
    return qkv.view(B, T, 3, n_heads, C3 // (3 * n_heads)).permute(2, 0, 3, 1, 4).unbind(0)


class _AttentionQKV(torch.autograd.Function):
    """Attention over q, k, v read in place from one packed (B, T, 3C) tensor; the backward writes
    dq, dk, dv straight into one packed dqkv (no stack/permute copy of three separate grads)."""

    @staticmethod
    def forward(ctx, qkv, n_heads, causal, dropout_p, scale, seed):
        o, lse = _qkv_fwd_op(qkv, n_heads, causal, dropout_p, scale, seed, _bthd_out())
        ctx.save_for_backward(qkv, o, lse, seed)
        ctx.args = (n_heads, causal, dropout_p, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse, seed = ctx.saved_tensors
        return _qkv_bwd_op(do, qkv, o, lse, *ctx.args, seed), None, None, None, None, None


def _check_qkv(qkv, n_heads: int) -> None:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3:
        raise ValueError(f"attention_qkv: qkv must be a (B, T, 3 * n_heads * head_dim) tensor, got "
                         f"{tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__}")
    if n_heads < 1 or qkv.shape[2] % (3 * n_heads):
        raise ValueError(f"attention_qkv: last dim {qkv.shape[2]} is not 3 * n_heads * head_dim for "
                         f"n_heads={n_heads}")


def _seed_for(dropout_p: float, seed: int | None) -> Optional[Tensor]:
    """The dropout seed as a (1,) int64 CPU tensor (drawn from torch's CPU generator when None, so
    torch.manual_seed makes runs repeat); None without dropout."""
    if seed is not None and not 0 <= int(seed) < 2**31:
        raise ValueError(f"attention: seed must be in [0, 2**31), got {seed}")
    if dropout_p > 0.0:
        return torch.randint(0, 2**31 - 1, (1,)) if seed is None else torch.tensor([int(seed)])
    return None


def attention_qkv(qkv, n_heads: int, causal: bool = True, dropout_p: float = 0.0, scale: float | None = None,
                  seed: int | None = None) -> torch.Tensor:
    """attention(*split_qkv(qkv, n_heads), ...) for the model's packed c_attn output (B, T, 3C);
    same result, and its gradient arrives as one packed (B, T, 3C) tensor. Returns (B, H, T, D)."""
    scale = None if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not torch.compiler.is_compiling():  # while tracing, the fake impl checks (on metadata)
        _check_qkv(qkv, n_heads)
        _check_inputs(*split_qkv(qkv, n_heads), causal, dropout_p, scale)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    scale = 1.0 / math.sqrt(qkv.shape[2] // (3 * n_heads)) if scale is None else scale
    return _AttentionQKV.apply(qkv, int(n_heads), bool(causal), dropout_p, scale, _seed_for(dropout_p, seed))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale: float | None = None,
              seed: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ causal mask]) v with optional attention dropout; (B, H, Tq, D).

    q: (B, H, Tq, D); k, v: (B, H, Tk, D); fp16, bf16 or fp32; D in SUPPORTED_HEAD_DIMS; any
    strides (a last dim with stride != 1 is copied). causal needs Tq <= Tk and aligns the queries
    to the end of the keys. scale defaults to 1/sqrt(D). dropout_p > 0 drops attention
    probabilities with a Philox mask from ``seed`` (default: drawn from torch's CPU generator, so
    torch.manual_seed makes runs repeatable); dropout_mask(seed, ...) returns that mask.
    """
    scale = None if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if not torch.compiler.is_compiling():  # while tracing, the fake impl checks (on metadata)
        _check_inputs(q, k, v, causal, dropout_p, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seed = _seed_for(dropout_p, seed)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _Attention.apply(q, k, v, bool(causal), dropout_p, scale, seed)


def dropout_mask(seed: int, B: int, H: int, Tq: int, Tk: int, p: float, device=None) -> torch.Tensor:
    """The bool keep-mask (B, H, Tq, Tk) that attention(..., dropout_p=p, seed=seed) applies.

    Pass it as attention_ref(..., dropout_p=p, dropout_mask=mask) to reproduce the kernel exactly.
    device defaults to CUDA when available, else the CPU (interpreter).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    mask = _alloc((B, H, Tq, Tk), torch.uint8, device)
    _check_device(mask)
    bm, bn = (32, 128) if device.type == "cuda" else (16, 32)
    _dropout_mask_kernel[(cdiv(Tq, bm), cdiv(Tk, bn), B * H)](
        mask, Tq, Tk, int(seed), float(p), BLOCK_M=bm, BLOCK_N=bn)
    return mask.view(torch.bool)
