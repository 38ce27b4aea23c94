"""LayerNorm (plain and fused with the residual add) and bias+GELU: gptcore's Triton kernels
beside the reference twin, torch eager and torch.compile, in one run.

    python -m bench.kernels_norm            # bf16, 16384 rows, widths 768/1024/1600/4096, GELU 16384x3072
    python -m bench.kernels_norm --quick    # width 768 and the GELU shape only
    python -m bench.kernels_norm --no-compile --out DIR

Rows (one per op, mode, shape, implementation): median ms with 20/80 quantiles, GB/s from the
bytes the op must move, % of this GPU's measured copy bandwidth (harness.ceilings()), speed-up
over torch eager and over the best reference (fastest of reference, torch, torch.compile), and
the max |difference| from torch eager's output as a sanity check. Bytes counted:
  LN fwd      read x, write y                         2 M N e
  LN bwd      read x, dy, write dx                    3 M N e   (weight/bias/statistics traffic
  LN+res fwd  read x, r, write h, y                   4 M N e    is O(N + M) and left out)
  LN+res bwd  read h, dy, dh, write dx (= d r)        4 M N e
  GELU fwd    read x, write y                         2 M N e
  GELU f+b    fwd + read x, dy, write dx              5 M N e
Two timings per row: ``ms`` is an eager call (harness.time_ms, triton.testing.do_bench, which also
clears L2 before every call), host launch overhead included where the host is the slower side;
``gpu_ms`` is device time from CUDA-graph replays (harness.gpu_time_ms), the kernels alone. GB/s,
% of copy and the ratios are given for both (suffix _gpu for device time). Inputs rotate over enough buffer sets that one pass through them exceeds 4x a 50 MB L2.
Backward rows time torch.autograd.grad over a graph built once per buffer set (built on
harness.capture_stream(), so the backward alone can be captured for its device time).
On a machine without CUDA it runs a tiny smoke version under TRITON_INTERPRET=1 (no GB/s worth
reading, no torch.compile). ``run(quick)`` returns the rows for ``python -m bench``.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported

from bench import harness  # noqa: E402
from gptcore.kernels.gelu import gelu  # noqa: E402
from gptcore.kernels.layer_norm import layer_norm  # noqa: E402
from gptcore.kernels.reference import gelu_ref, layer_norm_ref  # noqa: E402

IMPLS = ("triton", "reference", "torch", "torch.compile")
L2_BYTES = 50 * 2**20
EPS = 1e-5


# torch eager references; each op has its own function so torch.compile caches them apart.
def _torch_ln(x, w, b, eps=EPS):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _torch_add_ln(x, w, b, eps=EPS, residual=None):
    h = x + residual
    return F.layer_norm(h, (h.shape[-1],), w, b, eps), h


def _torch_gelu(x, bias=None):
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def _impls(triton_fn, ref_fn, torch_fn, use_compile: bool) -> dict[str, Callable]:
    fns = {"triton": triton_fn, "reference": ref_fn, "torch": torch_fn}
    if use_compile:
        # Compiled per shape (static shapes, as a training run sees them); the reset drops earlier
        # shapes' entries so no recompile limit can quietly send a shape back to eager.
        torch._dynamo.reset()
        fns["torch.compile"] = torch.compile(torch_fn, dynamic=False)
    return fns


_CPU_GEN = torch.Generator().manual_seed(0)


def _randn(shape, dev, dtype) -> torch.Tensor:
    """Random inputs drawn on the CPU: a CUDA-graph capture that fails (a reference that cannot be
    captured) leaves CUDA's generator unusable, and the run must go on after it."""
    return torch.randn(shape, generator=_CPU_GEN).to(dev, dtype)


def _n_sets(bytes_per_set: int) -> int:
    """Buffer sets to rotate over: one pass moves more than 4x L2 (2 sets on the CPU smoke run)."""
    if not torch.cuda.is_available():
        return 2
    return max(2, math.ceil(4 * L2_BYTES / bytes_per_set))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _forward_step(fn, sets):
    """sets: list of argument tuples; each call takes the next set."""
    it = itertools.cycle(sets)
    return lambda: fn(*next(it))


def _graphs(fn, sets, grads_for):
    """One forward per set: (args, outputs, tensors needing grad, output grads drawn now).

    Built on harness.capture_stream(): their backward kernels run there (autograd's stream rule),
    which is what lets harness.gpu_time_ms capture a backward-only step."""
    graphs = []
    s = harness.capture_stream()
    if s is not None:
        s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s) if s is not None else contextlib.nullcontext():
        for args in sets:
            outs = fn(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            graphs.append((args, outs, wrt, grads_for(outs)))
    if s is not None:
        torch.cuda.current_stream().wait_stream(s)
    return graphs


def _backward_step(fn, sets, grads_for):
    """Build one graph per set; each call runs autograd.grad over the next one."""
    it = itertools.cycle(_graphs(fn, sets, grads_for))

    def step():
        _, outs, wrt, g = next(it)
        return torch.autograd.grad(outs, wrt, g, retain_graph=True)

    return step


def _fwd_bwd_step(fn, sets, grads_for):
    """Forward and backward per call; output grads are drawn beforehand, outside the timing."""
    it = itertools.cycle([(args, wrt, g) for args, _, wrt, g in _graphs(fn, sets, grads_for)])

    def step():
        args, wrt, g = next(it)
        outs = fn(*args)
        return torch.autograd.grad(outs if isinstance(outs, tuple) else (outs,), wrt, g)

    return step


def _bench_op(op, mode, shape, bytes_moved, fns, sets, grads_for=None) -> list[dict]:
    """Time every implementation of one op/mode/shape; returns rows with ratios filled in."""
    rows = []
    outputs = {}
    for impl, fn in fns.items():
        row = {"op": op, "mode": mode, "shape": "x".join(map(str, shape)), "dtype": str(sets[0][0].dtype),
               "impl": impl, "bytes": bytes_moved}
        try:
            outputs[impl] = _first(fn(*sets[0])).detach()  # also compiles / warms up
            if mode == "fwd":
                step = _forward_step(fn, sets)
            elif mode == "bwd":
                step = _backward_step(fn, sets, grads_for)
            else:
                step = _fwd_bwd_step(fn, sets, grads_for)
            t = harness.time_ms(step)
            row.update(ms=t["median"], p20_ms=t["p20"], p80_ms=t["p80"])
            try:
                g = harness.gpu_time_ms(step)
                if g is not None:
                    row.update(gpu_ms=g["median"], gpu_p20_ms=g["p20"], gpu_p80_ms=g["p80"])
            except Exception as e:  # a reference that cannot be captured in a graph keeps its eager time
                row["gpu_error"] = f"{type(e).__name__}: {e}"[:300]
        except Exception as e:  # a failing reference (e.g. torch.compile) must not sink the run
            row.update(ms=None, error=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
    copy = harness.ceilings()["copy_GBps"]
    for suffix in ("", "_gpu"):  # eager-call timing, then device time from CUDA-graph replay
        key = "ms" if not suffix else "gpu_ms"
        eager = next((r.get(key) for r in rows if r["impl"] == "torch"), None)
        refs = [r[key] for r in rows if r["impl"] != "triton" and r.get(key)]
        best_ref = min(refs) if refs else None
        for r in rows:
            ms = r.get(key)
            if not ms:
                continue
            r["GBps" + suffix] = bytes_moved / (ms * 1e-3) / 1e9
            r["pct_copy" + suffix] = 100.0 * r["GBps" + suffix] / copy if copy else None
            r["vs_torch" + suffix] = eager / ms if eager else None
            r["vs_best_ref" + suffix] = best_ref / ms if best_ref else None
    for r in rows:
        if "torch" in outputs and r["impl"] in outputs:
            r["max_abs_diff_vs_torch"] = (outputs[r["impl"]].float() - outputs["torch"].float()).abs().max().item()
    return rows


def _ln_rows(rows_m, width, dtype, dev, use_compile) -> list[dict]:
    out = []
    e = torch.finfo(dtype).bits // 8
    mne = rows_m * width * e

    def make_sets(n_tensors_per_set, residual):
        n = _n_sets(n_tensors_per_set * mne)
        w = _randn((width,), dev, dtype).requires_grad_()
        b = _randn((width,), dev, dtype).requires_grad_()
        sets = []
        for _ in range(n):
            x = _randn((rows_m, width,), dev, dtype).requires_grad_()
            if residual:
                r = _randn((rows_m, width,), dev, dtype).requires_grad_()
                sets.append((x, w, b, EPS, r))
            else:
                sets.append((x, w, b, EPS))
        return sets

    grads = lambda outs: [_randn(o.shape, o.device, o.dtype) for o in outs]
    shape = (rows_m, width)
    # Plain LayerNorm: forward moves x, y; backward x, dy, dx.
    fns = _impls(layer_norm, layer_norm_ref, _torch_ln, use_compile)
    sets = make_sets(3, residual=False)
    out += _bench_op("layer_norm", "fwd", shape, 2 * mne, fns, sets)
    out += _bench_op("layer_norm", "bwd", shape, 3 * mne, fns, sets, grads)
    del sets
    # Residual add fused into the LayerNorm: forward moves x, r, h, y; backward h, dy, dh, dx.
    fns = _impls(layer_norm, layer_norm_ref, _torch_add_ln, use_compile)
    sets = make_sets(4, residual=True)
    out += _bench_op("add+layer_norm", "fwd", shape, 4 * mne, fns, sets)
    out += _bench_op("add+layer_norm", "bwd", shape, 4 * mne, fns, sets, grads)
    return out


def _gelu_rows(rows_m, width, dtype, dev, use_compile) -> list[dict]:
    e = torch.finfo(dtype).bits // 8
    mne = rows_m * width * e
    b = _randn((width,), dev, dtype).requires_grad_()
    sets = [(_randn((rows_m, width,), dev, dtype).requires_grad_(), b)
            for _ in range(_n_sets(3 * mne))]
    fns = _impls(gelu, gelu_ref, _torch_gelu, use_compile)
    grads = lambda outs: [_randn(o.shape, o.device, o.dtype) for o in outs]
    shape = (rows_m, width)
    return (_bench_op("bias+gelu", "fwd", shape, 2 * mne, fns, sets)
            + _bench_op("bias+gelu", "fwd+bwd", shape, 5 * mne, fns, sets, grads))


def run(quick: bool = False, use_compile: bool = True) -> list[dict]:
    """All rows of this benchmark (see the module docstring)."""
    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16
    if on_gpu:
        rows_m, widths, gelu_shape = 16384, ([768] if quick else [768, 1024, 1600, 4096]), (16384, 3072)
    else:  # interpreter smoke run: exercises every code path, times nothing worth reporting
        rows_m, widths, gelu_shape, use_compile = 16, [256], (16, 512), False
    torch.manual_seed(0)
    rows = []
    for width in widths:
        rows += _ln_rows(rows_m, width, dtype, dev, use_compile)
    rows += _gelu_rows(*gelu_shape, dtype, dev, use_compile)
    return rows


COLS = ["op", "mode", "shape", "impl", "ms", "GBps", "vs_torch", "gpu_ms", "GBps_gpu", "pct_copy_gpu", "vs_torch_gpu",
        "vs_best_ref_gpu", "max_abs_diff_vs_torch"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="width 768 and the GELU shape only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--out", type=Path, default=None, help="JSON folder (default bench/results or $GPTCORE_BENCH_OUT)")
    args = p.parse_args(argv)
    rows = run(quick=args.quick, use_compile=not args.no_compile)
    ceil = harness.ceilings()
    harness.print_table(rows, COLS, f"LayerNorm / bias+GELU, bf16 (copy ceiling {ceil['copy_GBps']} GB/s)")
    for r in rows:
        if r.get("error"):
            print(f"  {r['op']} {r['mode']} {r['shape']} {r['impl']}: {r['error']}")
    compiled = not args.no_compile and torch.cuda.is_available()  # the CPU smoke run never compiles
    extra = {"config": {"quick": args.quick, "torch_compile": compiled, "dtype": "bfloat16"}}
    path = harness.write_json("kernels_norm", rows, extra=extra, out_dir=args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
