"""The benchmark suite's command line.

    python -m bench [kernels|train|generate|host|serve|finetune|scale|all] [--quick] [--out DIR] [--preset NAME] ...

First prints this GPU's measured ceilings (copy GB/s, bf16 matmul TFLOP/s), then runs each area's
modules (imported lazily; a module that fails is reported and the run goes on):

    kernels    bench.kernels_norm, bench.kernels_attention, bench.kernels_kv   (CUDA GPU only)
    train      bench.train_step
    generate   bench.generate
    host       bench.host_cost    host us per op call, gptcore beside its torch twin (CUDA GPU only)
    serve      bench.serve     (continuous batching vs static Generator batches, one request set)
    finetune   bench.finetune   (LoRA / full SFT step vs HF+PEFT and the pretraining step)
    scale      bench.scale      (trainer runs under torchrun at world sizes 1..8, DDP and FSDP2; not in 'all':
                                 python -m bench.scale --help for its own options)

Each module has ``run(quick=False, ...) -> list[dict]`` (row schema: bench/README.md). Output: a
table per area on the terminal, one JSON with every row plus GPU, versions, date, git commit and
the exact command (harness.write_json, into --out or bench/results/), and PNG plots beside it.
Exit status 1 if a module failed, else 0.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import traceback

import torch

from bench import harness, plots

# Row defaults for modules that leave out a schema key (see bench/README.md).
DEFAULT_AREA = {"bench.kernels_norm": "norm", "bench.kernels_attention": "attention", "bench.kernels_kv": "kv",
                "bench.train_step": "train", "bench.generate": "generate", "bench.host_cost": "host",
                "bench.serve": "serve", "bench.finetune": "finetune", "bench.scale": "scale"}
AREAS = {
    "kernels": ("bench.kernels_norm", "bench.kernels_attention", "bench.kernels_kv"),
    "train": ("bench.train_step",),
    "generate": ("bench.generate",),
    "host": ("bench.host_cost",),
    "serve": ("bench.serve",),
    "finetune": ("bench.finetune",),
    "scale": ("bench.scale",),
}
NOT_IN_ALL = ("scale",)  # many full training runs, sized for multi-GPU hosts
COLUMNS = ("op", "impl", "shape", "ms", "host_ms", "host_us", "ratio_vs_torch", "ms_gc_frozen", "TFLOPs", "GBps", "tokens_per_s", "peak_GiB", "pct_of_ceiling",
           "MFU_nominal_pct", "ratio_vs_best_ref", "max_T", "skipped", "error")


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("area", nargs="?", default="all", choices=[*AREAS, "all"], help="what to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run: fewer shapes and repetitions")
    ap.add_argument("--out", default=None, help="folder for the JSON and plots (default: bench/results/)")
    ap.add_argument("--preset", default=None, help="model preset for train/generate (default: gpt2; tiny on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="train: sequences per step (default 16)")
    ap.add_argument("--seq-len", type=int, default=None, help="train: tokens per sequence (default 1024)")
    ap.add_argument("--rope", action="store_true",
                    help="train: rotary position embeddings (pos_emb='rope') instead of the preset's")
    ap.add_argument("--configs", default=None,
                    help="train: comma-separated subset of torch,triton (graph-captured, the trainer's "
                         "default),triton-nograph,torch+compile,triton+compile,torch+fusedCE,reference and, "
                         "only when named, torch+compile-cg,triton+compile-cg")
    ap.add_argument("--time-budget", type=float, default=None, help="train / generate: seconds for the area (train default 240; generate: its decode matrix, default 270)")
    ap.add_argument("--no-context-search", action="store_true", help="train: skip the longest-context search")
    ap.add_argument("--no-plots", action="store_true", help="write no PNG files")
    return ap.parse_args(argv)


def _kwargs_for(fn, args) -> dict:
    """The CLI options this module's run() accepts (those the user gave, plus quick)."""
    given = {"quick": args.quick, "preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "configs": args.configs.split(",") if args.configs else None, "time_budget_s": args.time_budget,
             "context_search": False if args.no_context_search else None,
             "pos_emb": "rope" if args.rope else None}
    params = inspect.signature(fn).parameters
    return {k: v for k, v in given.items() if v is not None and k in params}


def _run_module(name: str, args) -> tuple[list[dict], dict]:
    """(rows, status) of one module; status['status'] is ok / skipped / failed."""
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - reported, the suite goes on
        traceback.print_exc()
        return [], {"status": "failed", "detail": f"import: {type(e).__name__}: {e}"}
    fn = getattr(mod, "run", None)
    if not callable(fn):
        return [], {"status": "failed", "detail": f"{name} has no run(quick=...) function"}
    try:
        rows = fn(**_kwargs_for(fn, args))
    except SystemExit as e:  # a module that declines to run here (e.g. "needs a CUDA GPU")
        return [], {"status": "skipped", "detail": str(e.code)}
    except Exception as e:  # noqa: BLE001 - reported, the suite goes on
        traceback.print_exc()
        return [], {"status": "failed", "detail": f"{type(e).__name__}: {e}",
                    "seconds": round(time.perf_counter() - t0, 1)}
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return [], {"status": "failed", "detail": f"{name}.run returned {type(rows).__name__}, not a list of dicts"}
    for r in rows:
        _normalize(r, name)
    return rows, {"status": "ok", "rows": len(rows), "seconds": round(time.perf_counter() - t0, 1)}


def _normalize(row: dict, module: str) -> None:
    """Fill the schema keys a module left out: area from the module, op from mode/section/kind,
    impl from name, shape from B/H/T/D."""
    row.setdefault("module", module)
    row.setdefault("area", DEFAULT_AREA.get(module, module.rsplit(".", 1)[-1]))
    if "op" not in row:
        row["op"] = next((str(row[k]) for k in ("mode", "section", "kind") if k in row), row["area"])
    if "impl" not in row and "name" in row:
        row["impl"] = row["name"]
    if "shape" not in row:
        dims = {k: row[k] for k in ("B", "H", "T", "D") if isinstance(row.get(k), int)}
        if dims:
            row["shape"] = dims


def _display(rows: list[dict]) -> list[dict]:
    """Rows made printable: dict shapes as 'B4xT1024', long messages cut."""
    out = []
    for r in rows:
        d = dict(r)
        if isinstance(d.get("shape"), dict):
            d["shape"] = "x".join(f"{k}{v}" for k, v in d["shape"].items())
        for k in ("error", "skipped"):
            if isinstance(d.get(k), str) and len(d[k]) > 70:
                d[k] = d[k][:67] + "..."
        out.append(d)
    return out


def _print_rows(title: str, rows: list[dict]) -> None:
    ratios = sorted({k for r in rows for k in r if k.startswith("vs_") and k not in COLUMNS})
    cols = [c for c in (*COLUMNS[:-2], *ratios, *COLUMNS[-2:]) if any(r.get(c) is not None for r in rows)]
    harness.print_table(_display(rows), cols, title)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.out:  # modules that also write their own JSON put it beside ours
        os.environ["GPTCORE_BENCH_OUT"] = str(args.out)
    on_gpu = torch.cuda.is_available()
    env = harness.environment()
    print(f"gptcore bench: {args.area}{' (quick)' if args.quick else ''} | torch {env['torch']} | "
          f"triton {env['triton']} | {env['gpu'] or 'no CUDA GPU'} | commit {env['git_commit']}")
    if on_gpu:
        c = harness.ceilings()
        print(f"ceilings (measured on this GPU): copy {c['copy_GBps']:.0f} GB/s, "
              f"bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    else:
        print("no CUDA GPU: ceilings not measured; GPU-only benchmarks are skipped and the train step "
              "runs the tiny preset on the CPU")
    areas = [a for a in AREAS if a not in NOT_IN_ALL] if args.area == "all" else [args.area]
    rows: list[dict] = []
    status: dict[str, dict] = {}
    for area in areas:
        if area == "kernels" and not on_gpu:
            print("\nkernels: need a CUDA GPU (kernels are timed on GPU only; their correctness tests run "
                  "on the CPU under TRITON_INTERPRET=1): skipped")
        for name in AREAS[area]:
            if area == "kernels" and not on_gpu:
                status[name] = {"status": "skipped", "detail": "needs a CUDA GPU (kernels are timed on GPU only)"}
                print(f"{name}: skipped")
                continue
            print(f"\n== {name}", flush=True)
            got, st = _run_module(name, args)
            status[name] = st
            if st["status"] != "ok":
                print(f"{name}: {st['status']}: {st['detail']}")
            by_area: dict[str, list[dict]] = {}
            for r in got:
                by_area.setdefault(str(r.get("area", area)), []).append(r)
            for a, rs in by_area.items():
                _print_rows(f"{name} ({a})", rs)
            rows += got
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    path = harness.write_json(f"bench-{args.area}", rows,
                              extra={"command": command, "modules": status, "args": vars(args)}, out_dir=args.out)
    print(f"\nresults: {path}")
    if not args.no_plots:
        for kind, fn in (("attention", plots.plot_attention), ("train", plots.plot_train)):
            png = fn(rows, path.with_name(f"{path.stem}-{kind}.png"))
            if png:
                print(f"plot:    {png}")
    failed = [n for n, s in status.items() if s["status"] == "failed"]
    if failed:
        print(f"failed modules: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
