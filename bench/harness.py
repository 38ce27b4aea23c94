"""One timing harness for every benchmark in bench/.

- ``time_ms(fn)``: median and 20/80 quantiles in ms of an eager call (triton.testing.do_bench on
  CUDA, a perf_counter loop on the CPU): what a Python caller waits, host launch overhead included
  whenever the host is slower than the GPU.
- ``gpu_time_ms(fn)``: the same from CUDA-graph replays of many unrolled calls of fn, captured on
  ``capture_stream()`` (build autograd graphs there to time a backward alone): device time alone, the kernels' own speed with every launch's host overhead removed (what a
  training step that runs ahead of the GPU, or a captured graph, pays).
- ``peak_gib(fn)``: peak CUDA memory of one call after a reset.
- ``ceilings()``: this GPU's measured copy bandwidth and bf16 matmul rate, so every row can
  say what fraction of the ceiling it reached.
- ``environment()`` / ``write_json()``: GPU, versions, date, git commit and the exact command
  stored with every result under bench/results/.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """{'median': ms, 'p20': ms, 'p80': ms} of fn()."""
    if torch.cuda.is_available():
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median": q[0], "p20": q[1], "p80": q[2]}
    fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1000
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    pick = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"median": pick(0.5), "p20": pick(0.2), "p80": pick(0.8)}


_CAPTURE_STREAM = None


def capture_stream():
    """The side stream gpu_time_ms captures on (None without CUDA).

    Autograd runs each backward kernel on the stream its forward ran on, and a capture records
    only its own stream; so a step that calls backward over a graph built earlier must build that
    graph under ``with torch.cuda.stream(harness.capture_stream()):``.
    """
    global _CAPTURE_STREAM
    if _CAPTURE_STREAM is None and torch.cuda.is_available():
        _CAPTURE_STREAM = torch.cuda.Stream()
    return _CAPTURE_STREAM


def gpu_time_ms(fn: Callable[[], object], rep_ms: float = 100, retries: int = 10) -> dict | None:
    """{'median', 'p20', 'p80'} ms of fn replayed from a CUDA graph; None without CUDA.

    fn is captured as many unrolled calls in one graph (about rep_ms / retries of work), so a
    closure that rotates over buffer sets still rotates inside the graph; each of the ``retries``
    replays gives one per-call time. Raises whatever capture raises (e.g. a host sync inside fn).
    """
    if not torch.cuda.is_available():
        return None
    s = capture_stream()
    s.wait_stream(torch.cuda.current_stream())

    def timed(graph, n_calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(s)
        graph.replay()
        b.record(s)
        b.synchronize()
        return a.elapsed_time(b) / n_calls

    with torch.cuda.stream(s):
        fn()  # warm-up outside the capture (JIT, autotuning, lazy allocations)
        one = torch.cuda.CUDAGraph()
        with torch.cuda.graph(one, stream=s):
            fn()
        one.replay()
        est = min(timed(one, 1) for _ in range(5))
        del one
        n = max(1, min(10_000, int(rep_ms / retries / max(est, 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            for _ in range(n):
                fn()
        graph.replay()  # first replay uploads the graph
        times = sorted(timed(graph, n) for _ in range(retries))
        del graph
    torch.cuda.current_stream().wait_stream(s)
    pick = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"median": pick(0.5), "p20": pick(0.2), "p80": pick(0.8)}


def peak_gib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory (GiB) allocated during one call of fn, above what was live before."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


_CEILINGS: dict | None = None


def ceilings() -> dict:
    """Measured copy bandwidth (GB/s, bytes read + written) and bf16 matmul TFLOP/s on this GPU."""
    global _CEILINGS
    if _CEILINGS is not None:
        return _CEILINGS
    if not torch.cuda.is_available():
        _CEILINGS = {"copy_GBps": None, "bf16_matmul_TFLOPs": None}
        return _CEILINGS
    n = 1 << 28  # 512 MiB of bf16 per buffer, well beyond L2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src))["median"]
    copy = 2 * src.numel() * src.element_size() / (t * 1e-3) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = time_ms(lambda: a @ b)["median"]
    mm = 2 * m**3 / (t * 1e-3) / 1e12
    _CEILINGS = {"copy_GBps": round(copy, 1), "bf16_matmul_TFLOPs": round(mm, 1)}
    return _CEILINGS


def _git_commit() -> str | None:
    """HEAD (with -dirty for local changes), or $GPTCORE_GIT_COMMIT where the run's copy of the tree
    carries no usable git history (e.g. a working tree synced to a remote GPU machine)."""
    if os.environ.get("GPTCORE_GIT_COMMIT"):
        return os.environ["GPTCORE_GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except OSError:
        return None


def environment() -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "host": platform.node(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def write_json(name: str, rows: list[dict], extra: dict | None = None, out_dir: Path | None = None) -> Path:
    """Write {'env': ..., 'ceilings': ..., 'rows': rows} to bench/results/<name>-<gpu>-<stamp>.json."""
    out_dir = Path(out_dir or os.environ.get("GPTCORE_BENCH_OUT", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    gpu = (env["gpu"] or "cpu").replace(" ", "_").replace("/", "_")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{name}-{gpu}-{stamp}.json"
    payload = {"env": env, "ceilings": ceilings(), "rows": rows, **(extra or {})}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def print_table(rows: list[dict], cols: list[str], title: str = "") -> None:
    """A plain aligned table of the chosen columns."""
    if title:
        print(f"\n== {title}")
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v))
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
