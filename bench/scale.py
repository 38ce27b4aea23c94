"""Data-parallel scaling of the trainer: tokens/s, MFU and peak memory of ``python -m gptcore.train`` at
world sizes 1, 2, 4, 8 (as many as the GPUs allow), DDP and FSDP2, and the loss check (1 GPU with
grad_accum N against N GPUs: the same global batch, so the same loss sequence).

    python -m bench scale                                   # gpt2 (ddp) and gpt2-xl (ddp, fsdp), every world size
    python -m bench.scale --presets gpt2 --world-sizes 1,2 --steps 30
    python -m bench.scale --presets gpt2-xl --parallel fsdp --world-sizes 4 --batch-size 8
    python -m bench.scale --quick                           # smoke run: tiny preset; on a CPU gloo, worlds 1 and 2

Each point is one real training run (a subprocess: plain python for world 1, torchrun --standalone
above), bf16 on a GPU, on the embedded corpus, into a temporary out dir deleted afterwards. Rows
(area "scale", op "throughput"): preset, parallel (ddp / fsdp; world 1 ddp = one plain process),
world_size, per_gpu_batch, seq_len, tokens_per_s (global, median over the steps after the warm-up),
scaling (tokens/s over the world-1 run of the same preset in this JSON; the 1-GPU run of a preset is
its baseline for ddp and fsdp alike), mfu (per GPU), peak_GiB (rank 0's max_memory_allocated),
step_ms, target / meets_target where the issue sets one (gpt2: 1.9x on 2, 3.7x on 4, 7.2x on 8;
gpt2-xl fsdp on 4: 40% MFU). The op "loss_check" row: max relative difference of the two loss
sequences, and whether they are identical.

--cuda-graph off (default) runs the eager step at every world size: the graph-captured step is not
used under DDP/FSDP, so with it on the 1-GPU baseline would get the graph and the scaling would
compare two different steps. NCCL_NVLS_ENABLE=0 is set for the children (NVLink multicast off).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

TARGET_SCALING = {("gpt2", 2): 1.9, ("gpt2", 4): 3.7, ("gpt2", 8): 7.2}
TARGET_MFU = {("gpt2-xl", "fsdp", 4): 0.40}
DEFAULT_BATCH = {"gpt2": 16, "gpt2-xl": 8}


def _worlds(requested: Optional[list[int]], on_gpu: bool) -> list[int]:
    avail = torch.cuda.device_count() if on_gpu else 2  # gloo processes on a CPU
    worlds = requested or [w for w in (1, 2, 4, 8) if w <= avail]
    too_many = [w for w in worlds if w > avail]
    if too_many:
        print(f"scale: world sizes {too_many} skipped: {avail} {'GPU' if on_gpu else 'CPU process'}(s) here")
    return [w for w in worlds if w <= avail]


def _command(world: int, args: list[str]) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "gptcore.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
            "-m", "gptcore.train", *args]


def _train(world: int, args: list[str], timeout: float) -> tuple[list[dict], str]:
    """Run the trainer; returns (its train metrics rows, an error message or '')."""
    out = Path(tempfile.mkdtemp(prefix="gptcore-scale-"))
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")
    try:
        try:
            r = subprocess.run(_command(world, [*args, "--out-dir", str(out / "run")]), env=env,
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [], f"timed out after {timeout:.0f} s"
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            return [], f"exit status {r.returncode}: {tail[:300]}"
        rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        return [row for row in rows if row.get("kind") == "train"], ""
    finally:
        shutil.rmtree(out, ignore_errors=True)  # gpt2-xl checkpoints are ~18 GB


def _summarize(rows: list[dict], warmup: int) -> dict:
    steady = [r for r in rows if r["step"] > warmup] or rows
    med = lambda k: statistics.median(r[k] for r in steady) if all(r.get(k) is not None for r in steady) else None
    mem = [r["mem_gib"] for r in rows if r.get("mem_gib") is not None]
    step_s = med("step_s")
    return {"tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"), "peak_GiB": max(mem) if mem else None,
            "step_ms": step_s * 1e3 if step_s is not None else None, "steps_timed": len(steady)}


def _base_args(preset: str, batch: int, seq_len: int, steps: int, on_gpu: bool, cuda_graph: str) -> list[str]:
    args = ["--preset", preset, "--context-length", str(seq_len), "--batch-size", str(batch),
            "--max-steps", str(steps), "--warmup-steps", "2", "--eval-interval", "0", "--eval-steps", "1",
            "--ckpt-interval", "0", "--keep-last", "1", "--sample-tokens", "0", "--no-progress",
            "--log-interval", "5", "--drop-rate", "0"]
    if on_gpu:
        return args + ["--device", "cuda", "--dtype", "bf16", "--cuda-graph", cuda_graph]
    return args + ["--device", "cpu", "--dtype", "fp32"]


def run(quick: bool = False, preset: Optional[str] = None, presets: Optional[list[str]] = None,
        world_sizes: Optional[list[int]] = None,
        parallel: Optional[list[str]] = None, steps: Optional[int] = None, batch_size: Optional[int] = None,
        seq_len: Optional[int] = None, cuda_graph: str = "off", loss_check: bool = True,
        timeout_s: float = 900) -> list[dict]:
    """The rows described in the module doc (bench/__main__.py calls this for ``python -m bench scale``)."""
    on_gpu = torch.cuda.is_available()
    presets = presets or ([preset] if preset else None) or (["tiny"] if quick or not on_gpu else ["gpt2", "gpt2-xl"])
    steps = steps or (6 if quick else 30)
    T = seq_len or (64 if not on_gpu or presets == ["tiny"] else 1024)
    worlds = _worlds(world_sizes, on_gpu)
    warmup = min(10, steps // 3)  # the first read-back interval: Triton JIT, autotuning, allocator warm-up
    out: list[dict] = []
    for preset in presets:
        kinds = parallel or (["ddp", "fsdp"] if preset == "gpt2-xl" else ["ddp"])
        B = batch_size or (4 if not on_gpu else DEFAULT_BATCH.get(preset, 8))
        base = _base_args(preset, B, T, steps, on_gpu, cuda_graph)
        baseline = None
        for kind in kinds:
            for world in worlds:
                if kind == "fsdp" and world == 1 and baseline is not None:
                    continue  # sharding over one rank only adds overhead; the 1-GPU baseline stands
                t0 = time.perf_counter()
                rows, err = _train(world, base + ["--parallel", kind], timeout_s)
                row = {"area": "scale", "op": "throughput", "impl": f"{kind}x{world}", "preset": preset,
                       "parallel": kind, "world_size": world, "per_gpu_batch": B, "seq_len": T,
                       "cuda_graph": cuda_graph if on_gpu else "off", "wall_s": round(time.perf_counter() - t0, 1)}
                if err:
                    row["error"] = err
                else:
                    row.update(_summarize(rows, warmup))
                    if world == 1 and baseline is None:
                        baseline = row.get("tokens_per_s")
                row["scaling"] = (row["tokens_per_s"] / baseline if baseline and row.get("tokens_per_s") else None)
                tgt = TARGET_SCALING.get((preset, world)) if kind == "ddp" else None
                mfu_tgt = TARGET_MFU.get((preset, kind, world))
                if tgt is not None:
                    row["target"] = f"scaling >= {tgt}"
                    row["meets_target"] = row["scaling"] is not None and row["scaling"] >= tgt
                elif mfu_tgt is not None:
                    row["target"] = f"mfu >= {mfu_tgt}"
                    row["meets_target"] = row.get("mfu") is not None and row["mfu"] >= mfu_tgt
                print(f"scale: {preset} {kind} world {world}: "
                      + (row["error"] if err else f"{row['tokens_per_s']:,.0f} tok/s, scaling "
                         f"{row['scaling'] or float('nan'):.2f}, peak {row['peak_GiB'] or float('nan'):.1f} GiB"),
                      flush=True)
                out.append(row)
    if loss_check:
        out.append(_loss_check(presets[0], worlds, batch_size or (4 if not on_gpu else 8), T, on_gpu, timeout_s))
    return out


def _loss_check(preset: str, worlds: list[int], B: int, T: int, on_gpu: bool, timeout_s: float) -> dict:
    """1 process with grad_accum N against N processes (grad_accum 1): identical global batches."""
    N = max(worlds)
    row = {"area": "scale", "op": "loss_check", "impl": f"1x accum {N} vs {N}x1", "preset": preset,
           "world_size": N, "per_gpu_batch": B, "seq_len": T}
    if N < 2:
        row["skipped"] = "needs 2 or more GPUs"
        return row
    base = _base_args(preset, B, T, 10, on_gpu, "off") + ["--parallel", "ddp"]
    one, err1 = _train(1, base + ["--grad-accum", str(N)], timeout_s)
    many, err2 = _train(N, base, timeout_s)
    if err1 or err2:
        row["error"] = err1 or err2
        return row
    a, b = [r["loss"] for r in one], [r["loss"] for r in many]
    row.update({"losses_1": a, f"losses_{N}": b, "identical": a == b,
                "max_rel_diff": max(abs(x - y) / abs(x) for x, y in zip(a, b)) if a and len(a) == len(b) else None})
    print(f"scale: loss check ({preset}, 1 x accum {N} vs {N} x 1): identical {row['identical']}, "
          f"max rel diff {row['max_rel_diff']}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    names = lambda s: [x for x in s.split(",") if x]
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny preset, 6 steps")
    ap.add_argument("--presets", type=names, default=None,
                    help="comma-separated presets (default: gpt2,gpt2-xl on a GPU, tiny on a CPU)")
    ap.add_argument("--world-sizes", type=ints, default=None,
                    help="comma-separated world sizes (default: 1,2,4,8 up to the GPUs here; 1,2 on a CPU)")
    ap.add_argument("--parallel", type=names, default=None,
                    help="comma-separated ddp,fsdp (default: ddp; ddp,fsdp for gpt2-xl)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 30; 6 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per GPU per step (default: 16 for gpt2, 8 for gpt2-xl, 4 on a CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024 on a GPU, 64 tiny)")
    ap.add_argument("--cuda-graph", choices=["off", "auto"], default="off",
                    help="the trainer's --cuda-graph for every run (default off: see above)")
    ap.add_argument("--no-loss-check", action="store_true", help="skip the grad-accum N vs N-GPU loss check")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per training run (default 900)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default: bench/results/)")
    a = ap.parse_args(argv)
    from bench import harness

    rows = run(quick=a.quick, presets=a.presets, world_sizes=a.world_sizes, parallel=a.parallel, steps=a.steps,
               batch_size=a.batch_size, seq_len=a.seq_len, cuda_graph=a.cuda_graph, loss_check=not a.no_loss_check,
               timeout_s=a.timeout)
    cols = ["preset", "parallel", "world_size", "per_gpu_batch", "tokens_per_s", "scaling", "mfu", "peak_GiB",
            "step_ms", "target", "meets_target", "identical", "max_rel_diff", "skipped", "error"]
    harness.print_table(rows, [c for c in cols if any(r.get(c) is not None for r in rows)], "scale")
    command = "python -m bench.scale " + " ".join(sys.argv[1:] if argv is None else argv)
    path = harness.write_json("bench-scale", rows, extra={"command": command, "args": vars(a)}, out_dir=a.out)
    print(f"results: {path}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
