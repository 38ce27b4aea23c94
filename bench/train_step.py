"""Train-step benchmark: tokens/s, MFU and peak memory of a full GPT-2 step on every backend.

    python -m bench train [--quick] [--preset gpt2] [--batch-size 16] [--seq-len 1024] [--rope]
    python -m bench train --preset small-384 --batch-size 64 --seq-len 512 [--rope]   # the TinyStories shape

One step = forward + loss under bf16 autocast (fp32 master weights), backward, fused AdamW step,
zero_grad(set_to_none=True), on synthetic token ids. Configurations (rows), in the order they run:

    torch            PyTorch's fused ops, full fp32 logits + F.cross_entropy (the nanoGPT baseline)
    triton           the trainer's default path: gptcore's kernels + the chunked LM head/cross-entropy,
                     the whole step captured in one CUDA graph by gptcore.graph_step.GraphedStep (the
                     trainer's module: it also clips the gradient norm to 1.0 and decides the non-finite
                     skip on the device, which the other rows do not; grads are zeroed in place)
    triton-nograph   the same kernels stepped eagerly (no graph, no compile)
    torch+compile    torch.compile(model.loss) of the baseline (Inductor fuses the loss itself)
    triton+compile   torch.compile(model.loss) of the triton backend
    torch+compile-cg, triton+compile-cg
                     the same with mode="reduce-overhead": the compiled forward and backward replay
                     as CUDA graphs (no per-op host work); named in --configs only
    torch+fusedCE    the torch backend's default: PyTorch's ops + the chunked loss (torch row step)
    reference        the textbook path (explicit T x T softmax): the oracle, slow and big

MFU = model.flops_per_token(T) x tokens/s over this GPU's measured bf16 matmul rate
(harness.ceilings(); the row's pct_of_ceiling) and over H100 SXM's nominal 989 TFLOP/s dense bf16
(MFU_nominal_pct). Then the longest context each eager configuration trains at batch 1: doubling
T from 1024, then bisecting between the last fit and the first OOM, capped and time-boxed.

Each row also carries host_ms (the host's time to enqueue one step on an idle GPU: near ms means
the host sets the pace) and ms_gc_frozen (the timing repeated after gc.freeze(), which shows how
much of a Python-heavy step's spread is garbage-collection pauses).

Every configuration runs in try/except (the error lands in its row), memory is freed between them,
torch.compile's warm-up is timed separately (compile_s) and excluded from ms, and a time budget
(default 240 s) skips what would not fit. --quick: shorter timing, no compiled configs (unless
named in configs), no context search. Without a GPU the tiny preset runs on the CPU in fp32,
reference and torch only.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass

import torch

from bench import harness
from gptcore import GPT, GPTConfig
from gptcore.graph_step import GraphedStep, adamw
from gptcore.ops import device_time_first

NOMINAL_H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16, from NVIDIA's datasheet
REFERENCE_SIDE = ("reference", "torch", "torch+compile")  # what ratio_vs_best_ref divides by


@dataclass(frozen=True)
class Config:
    label: str
    backend: str
    compile: bool
    fused_loss: bool
    est_s: float  # rough wall time on an H100, for the budget
    compile_mode: str | None = None  # torch.compile's mode (None: its default)
    on_request: bool = False  # runs only when named in --configs
    graph: bool = False  # the step captured by gptcore.graph_step.GraphedStep (as the trainer runs it)


CONFIGS = (
    Config("torch", "torch", False, False, 10),
    Config("triton", "triton", False, True, 20, graph=True),
    Config("triton-nograph", "triton", False, True, 15),
    Config("torch+compile", "torch", True, False, 90),
    Config("triton+compile", "triton", True, True, 90),
    Config("torch+fusedCE", "torch", False, True, 10),
    Config("reference", "reference", False, False, 20),
    Config("torch+compile-cg", "torch", True, False, 120, "reduce-overhead", True),
    Config("triton+compile-cg", "triton", True, True, 120, "reduce-overhead", True),
    # torch.compile (default mode) inside the trainer's whole-step graph: `--compile` on CUDA
    Config("triton+compile+graph", "triton", True, True, 120, on_request=True, graph=True),
)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


LR = 6e-4
GRAPH_CLIP = 1.0  # the trainer's default --grad-clip


def _build(preset: str, backend: str, context_length: int, device: str, pos_emb: str | None = None,
           graph: bool = False):
    base = GPTConfig.from_preset(preset)
    cfg = base.replace(context_length=max(base.context_length, context_length))
    if pos_emb:
        cfg = cfg.replace(pos_emb=pos_emb)
    model = GPT(cfg, backend=backend).to(device)
    if graph:  # the trainer's optimizer: fused, capturable, lr a device tensor
        opt = adamw([{"params": list(model.parameters()), "weight_decay": 0.1}], LR, (0.9, 0.95), torch.device(device))
        return model, opt
    fused_opt = {"fused": True} if device == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1, **fused_opt)
    return model, opt


def _make_step(model, opt, x, y, fused_loss: bool, loss_fn=None):
    """The timed unit: forward + loss (bf16 autocast on CUDA), backward, AdamW step, zero_grad."""
    loss_fn = loss_fn or model.loss
    on_cuda = x.is_cuda
    # GPTCORE_DEVICE_TIME_FIRST=1: the graph's device-time op variants, eagerly (as the trainer reads it)
    device_first = os.environ.get("GPTCORE_DEVICE_TIME_FIRST") == "1"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda), \
                (device_time_first() if device_first else contextlib.nullcontext()):
            loss = loss_fn(x, y, fused=fused_loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _make_graph_step(model, opt, x, y, fused_loss: bool, loss_fn=None):
    """The trainer's graph-captured step (gptcore.graph_step.GraphedStep, one micro-batch): capture()
    warms up (updates skipped) and captures; each call of the returned step is one replay."""
    loss_fn = loss_fn or model.loss
    B, T = x.shape
    gs = GraphedStep(lambda xb, yb: loss_fn(xb, yb, fused=fused_loss), list(model.parameters()), opt, accum=1,
                     batch_size=B, seq_len=T, device=x.device,
                     autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16), grad_clip=GRAPH_CLIP)
    gs.load(0, x, y)
    gs.capture()
    return lambda: gs.replay(LR)


def make_step(c: "Config", model, opt, x, y, loss_fn=None):
    """The timed unit of configuration c (graph-captured or eager); also used by bench.profile_step."""
    return (_make_graph_step if c.graph else _make_step)(model, opt, x, y, c.fused_loss, loss_fn)


def _graph_breaks() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return sum(counters["graph_break"].values())
    except (ImportError, AttributeError, KeyError):
        return None


def _host_ms(step, n: int = 10) -> float:
    """Median host time to enqueue one step on an idle GPU (step returns before its kernels end):
    close to the step's wall time means the host, not the GPU, sets the pace."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[n // 2]


def _bench_config(c: Config, preset: str, B: int, T: int, device: str, rep_ms: float,
                  pos_emb: str | None = None) -> dict:
    row = {"area": "train", "op": "train_step", "impl": c.label, "backend": c.backend, "compile": c.compile,
           "cuda_graph": c.graph, "loss": "chunked linear+CE" if c.fused_loss else "full logits + F.cross_entropy",
           "preset": preset, "shape": f"B{B}xT{T}", "B": B, "T": T,
           "dtype": "bf16 autocast, fp32 master" if device == "cuda" else "fp32"}
    model, opt = _build(preset, c.backend, T, device, pos_emb, graph=c.graph)
    row["pos_emb"] = model.config.pos_emb
    if c.graph:
        row["step"] = f"GraphedStep: clip {GRAPH_CLIP}, on-device non-finite skip, capturable fused AdamW"
    row["backend_report"] = model.backend_report()
    g = torch.Generator(device=device).manual_seed(0)
    V = model.config.vocab_size
    x = torch.randint(0, V, (B, T), device=device, generator=g)
    y = torch.randint(0, V, (B, T), device=device, generator=g)
    loss_fn = None
    if c.compile:
        torch._dynamo.reset()
        try:
            from torch._dynamo.utils import counters

            counters.clear()
        except ImportError:
            pass
        loss_fn = torch.compile(model.loss, mode=c.compile_mode)
        row["compile_mode"] = c.compile_mode or "default"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step = make_step(c, model, opt, x, y, loss_fn)  # a graph config warms up and captures here
    for _ in range(3):  # compile / Triton JIT / autotuning / AdamW state allocation
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    row["warmup_s"] = round(time.perf_counter() - t0, 2)
    if c.compile:
        row["compile_s"] = row["warmup_s"]
        row["graph_breaks"] = _graph_breaks()
    t = harness.time_ms(step, warmup_ms=100, rep_ms=rep_ms)
    row.update(ms=t["median"], p20_ms=t["p20"], p80_ms=t["p80"])
    if device == "cuda":
        row["host_ms"] = _host_ms(step)
        # the same timing with the warm-up's objects moved out of the garbage collector's view
        # (gc.freeze): shows how much of a Python-heavy step's spread is collection pauses
        gc.collect()
        gc.freeze()
        try:
            tf = harness.time_ms(step, warmup_ms=50, rep_ms=rep_ms)
            row.update(ms_gc_frozen=tf["median"], p20_ms_gc_frozen=tf["p20"], p80_ms_gc_frozen=tf["p80"])
        finally:
            gc.unfreeze()
        # over the whole run (warm-up, compile, CUDA-graph capture, timing): a CUDA-graph replay
        # allocates nothing new (its activations live in the graph's pool, allocated at capture),
        # so for the reduce-overhead and GraphedStep configs this is the step's peak; one step's peak is not
        row["peak_GiB_whole_run"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_GiB_whole_run"] = torch.cuda.max_memory_reserved() / 2**30
        if c.compile_mode == "reduce-overhead" or c.graph:
            row["peak_GiB"] = row["peak_GiB_whole_run"]
        else:
            row["peak_GiB"] = torch.cuda.memory_allocated() / 2**30 + harness.peak_gib(step)
    tok_s = B * T / (t["median"] / 1e3)
    row["tokens_per_s"] = tok_s
    tflops = model.flops_per_token(T) * tok_s / 1e12
    row["TFLOPs"] = tflops
    peak = harness.ceilings().get("bf16_matmul_TFLOPs")
    row["pct_of_ceiling"] = 100 * tflops / peak if peak else None
    row["MFU_nominal_pct"] = 100 * tflops / NOMINAL_H100_BF16_TFLOPS if device == "cuda" else None
    del model, opt, step, loss_fn, x, y
    return row


# ---- longest trainable context at batch 1 ----------------------------------------------------------
def _fits(c: Config, preset: str, T: int, device: str,
          pos_emb: str | None = None) -> tuple[bool, float | None, str | None]:
    """(fits, peak GiB, error other than OOM) for one eager train step at batch 1, context T."""
    model = opt = None
    try:
        model, opt = _build(preset, c.backend, T, device, pos_emb)
        V = model.config.vocab_size
        x = torch.randint(0, V, (1, T), device=device)
        torch.cuda.reset_peak_memory_stats()
        _make_step(model, opt, x, x, c.fused_loss)()
        torch.cuda.synchronize()
        return True, torch.cuda.max_memory_allocated() / 2**30, None
    except torch.cuda.OutOfMemoryError:
        return False, None, None
    except Exception as e:  # noqa: BLE001 - recorded in the row, the suite goes on
        if "out of memory" in str(e).lower():  # e.g. raised from inside a Triton launch or autotuner
            return False, None, None
        return False, None, _err(e)
    finally:
        del model, opt  # the caller frees the cache once the exception (and its frames) is gone


def _longest_context(c: Config, preset: str, device: str, cap: int, box_s: float, grain: int = 512,
                     pos_emb: str | None = None) -> dict:
    row = {"area": "train", "op": "max_context_b1", "impl": c.label, "backend": c.backend, "preset": preset,
           "shape": "B1", "cap": cap}
    extra = (pos_emb,) if pos_emb else ()  # _fits(c, preset, T, device[, pos_emb])
    t_end = time.perf_counter() + box_s
    tried = []
    ok, fail, peak_ok = None, None, None
    T = 1024
    while T <= cap and time.perf_counter() < t_end:  # doubling
        fit, peak, err = _fits(c, preset, T, device, *extra)
        _free()
        tried.append([T, fit])
        if err:
            row["error"] = f"T={T}: {err}"
            break
        if not fit:
            fail = T
            break
        ok, peak_ok = T, peak
        T *= 2
    while ok and fail and fail - ok > grain and time.perf_counter() < t_end and "error" not in row:  # bisect
        mid = (ok + fail) // 2 // grain * grain
        fit, peak, err = _fits(c, preset, mid, device, *extra)
        _free()
        tried.append([mid, fit])
        if err:
            row["error"] = f"T={mid}: {err}"
            break
        if fit:
            ok, peak_ok = mid, peak
        else:
            fail = mid
    if ok == cap:
        note = "reached the cap"
    elif fail is None and "error" not in row:
        note = "time box ended the search before an OOM: max_T is a lower bound"
    elif fail is not None and ok is not None and fail - ok > grain:
        note = "time box ended the search"
    else:
        note = None
    row.update(max_T=ok, first_oom_T=fail, peak_GiB=peak_ok, tried=tried, note=note)
    return row


# ---- the area's entry point --------------------------------------------------------------------------
def run(quick: bool = False, preset: str = "gpt2", batch_size: int = 16, seq_len: int = 1024,
        configs: list[str] | None = None, time_budget_s: float = 240.0, context_search: bool = True,
        context_cap: int = 65536, context_box_s: float = 20.0, pos_emb: str | None = None) -> list[dict]:
    """Rows of the train-step table (and, unless quick, the longest-context search). pos_emb overrides
    the preset's position embedding ('rope' for the rotary variant)."""
    t_start = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    wanted = [c for c in CONFIGS if (configs is None and not c.on_request) or (configs and c.label in configs)]
    if configs:
        unknown = set(configs) - {c.label for c in CONFIGS}
        if unknown:
            raise ValueError(f"unknown train config(s) {sorted(unknown)}; choose from {[c.label for c in CONFIGS]}")
    if not on_gpu:
        if preset != "tiny" or batch_size * seq_len > 4 * 64:
            print(f"train: no CUDA GPU; timing the tiny preset at B=4, T=64 in fp32 on the CPU "
                  f"instead of {preset} B={batch_size} T={seq_len}")
        preset, batch_size, seq_len = "tiny", min(batch_size, 4), min(seq_len, 64)
    rep_ms = 300 if quick or not on_gpu else 1000
    rows = []
    for c in wanted:
        left = time_budget_s - (time.perf_counter() - t_start)
        skip = None
        if not on_gpu and (c.compile or c.backend == "triton" or c.graph):
            skip = "needs a CUDA GPU (compiled and Triton paths are timed on GPU only)"
        elif quick and c.compile and configs is None:
            skip = "--quick: compile warm-up takes minutes (name it in --configs to run it)"
        elif left < c.est_s:
            skip = f"time budget: {left:.0f} s left of {time_budget_s:.0f} s, this config needs ~{c.est_s:.0f} s"
        if skip:
            rows.append({"area": "train", "op": "train_step", "impl": c.label, "preset": preset,
                         "shape": f"B{batch_size}xT{seq_len}", "skipped": skip})
            continue
        print(f"train: {c.label} ...", flush=True)
        try:
            rows.append(_bench_config(c, preset, batch_size, seq_len, device, rep_ms, pos_emb))
        except Exception as e:  # noqa: BLE001 - recorded in the row, the suite goes on
            rows.append({"area": "train", "op": "train_step", "impl": c.label, "preset": preset,
                         "shape": f"B{batch_size}xT{seq_len}", "error": _err(e)})
        finally:
            if c.compile:
                torch._dynamo.reset()
            _free()
    _add_ratios(rows)
    if on_gpu and context_search and not quick:
        for c in (c for c in wanted if not c.compile and not c.graph):  # a graph holds the eager step's activations
            left = time_budget_s - (time.perf_counter() - t_start)
            if left < context_box_s:
                rows.append({"area": "train", "op": "max_context_b1", "impl": c.label,
                             "skipped": f"time budget: {left:.0f} s left"})
                continue
            print(f"train: longest context at batch 1, {c.label} ...", flush=True)
            rows.append(_longest_context(c, preset, device, context_cap, context_box_s, pos_emb=pos_emb))
    _print_targets(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    timed = {r["impl"]: r for r in rows if r.get("op") == "train_step" and r.get("tokens_per_s")}
    refs = [timed[k]["tokens_per_s"] for k in REFERENCE_SIDE if k in timed]
    base = timed.get("torch")
    for r in timed.values():
        if refs:
            r["ratio_vs_best_ref"] = r["tokens_per_s"] / max(refs)
        if base:
            r["speedup_vs_torch"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r.get("peak_GiB") and base.get("peak_GiB"):
                r["mem_vs_torch"] = r["peak_GiB"] / base["peak_GiB"]


def _print_targets(rows: list[dict]) -> None:
    """The issue's targets (issue 15), checked against this run (a report, not an assertion)."""
    t = {r["impl"]: r for r in rows if r.get("op") == "train_step" and r.get("tokens_per_s") and r.get("peak_GiB")}

    def speed(fast: str, ref: str, want: float) -> None:
        if fast in t and ref in t:
            s = t[fast]["tokens_per_s"] / t[ref]["tokens_per_s"]
            print(f"train target {fast} vs {ref}: {s:.2f}x tokens/s (want >= {want}x): "
                  f"{'met' if s >= want else 'NOT met'}")

    if "triton-nograph" in t and t["triton-nograph"].get("host_ms"):
        r = t["triton-nograph"]
        f = r["host_ms"] / r["ms"]
        print(f"train target triton-nograph host_ms {r['host_ms']:.1f} / ms {r['ms']:.1f} = {f:.2f} "
              f"(want <= 0.8, device-bound): {'met' if f <= 0.8 else 'NOT met'}")
    speed("triton-nograph", "torch+compile", 1.0)
    speed("triton", "torch+compile-cg", 1.05)
    speed("triton", "torch+compile", 1.1)
    if "triton" in t and "torch+compile" in t:
        m = t["triton"]["peak_GiB"] / t["torch+compile"]["peak_GiB"]
        print(f"train target triton vs torch+compile peak memory: {m:.2f}x (want <= 0.8x): "
              f"{'met' if m <= 0.8 else 'NOT met'}")
    speed("triton+compile", "torch+compile", 1.05)
