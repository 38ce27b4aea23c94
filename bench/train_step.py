"""Train-step benchmark: tokens/s, MFU and peak memory of a full GPT-2 step on every backend.

    python -m bench train [--quick] [--preset gpt2] [--batch-size 16] [--seq-len 1024]

One step = forward + loss under bf16 autocast (fp32 master weights), backward, fused AdamW step,
zero_grad(set_to_none=True), on synthetic token ids. Configurations (rows), in the order they run:

    torch            PyTorch's fused ops, full fp32 logits + F.cross_entropy (the nanoGPT baseline)
    triton           gptcore's kernels + the chunked LM head/cross-entropy (gptcore.loss)
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

import gc
import time
from dataclasses import dataclass

import torch

from bench import harness
from gptcore import GPT, GPTConfig

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


CONFIGS = (
    Config("torch", "torch", False, False, 10),
    Config("triton", "triton", False, True, 15),
    Config("torch+compile", "torch", True, False, 90),
    Config("triton+compile", "triton", True, True, 90),
    Config("torch+fusedCE", "torch", False, True, 10),
    Config("reference", "reference", False, False, 20),
    Config("torch+compile-cg", "torch", True, False, 120, "reduce-overhead", True),
    Config("triton+compile-cg", "triton", True, True, 120, "reduce-overhead", True),
)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def _build(preset: str, backend: str, context_length: int, device: str):
    base = GPTConfig.from_preset(preset)
    cfg = base.replace(context_length=max(base.context_length, context_length))
    model = GPT(cfg, backend=backend).to(device)
    fused_opt = {"fused": True} if device == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, **fused_opt)
    return model, opt


def _make_step(model, opt, x, y, fused_loss: bool, loss_fn=None):
    """The timed unit: forward + loss (bf16 autocast on CUDA), backward, AdamW step, zero_grad."""
    loss_fn = loss_fn or model.loss
    on_cuda = x.is_cuda

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            loss = loss_fn(x, y, fused=fused_loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


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


def _bench_config(c: Config, preset: str, B: int, T: int, device: str, rep_ms: float) -> dict:
    row = {"area": "train", "op": "train_step", "impl": c.label, "backend": c.backend, "compile": c.compile,
           "loss": "chunked linear+CE" if c.fused_loss else "full logits + F.cross_entropy",
           "preset": preset, "shape": f"B{B}xT{T}", "B": B, "T": T,
           "dtype": "bf16 autocast, fp32 master" if device == "cuda" else "fp32"}
    model, opt = _build(preset, c.backend, T, device)
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
    step = _make_step(model, opt, x, y, c.fused_loss, loss_fn)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
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
        # so for the reduce-overhead configs this is the step's peak; one step's peak is not
        row["peak_GiB_whole_run"] = torch.cuda.max_memory_allocated() / 2**30
        if c.compile_mode == "reduce-overhead":
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
def _fits(c: Config, preset: str, T: int, device: str) -> tuple[bool, float | None, str | None]:
    """(fits, peak GiB, error other than OOM) for one train step at batch 1, context T."""
    model = opt = None
    try:
        model, opt = _build(preset, c.backend, T, device)
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


def _longest_context(c: Config, preset: str, device: str, cap: int, box_s: float, grain: int = 512) -> dict:
    row = {"area": "train", "op": "max_context_b1", "impl": c.label, "backend": c.backend, "preset": preset,
           "shape": "B1", "cap": cap}
    t_end = time.perf_counter() + box_s
    tried = []
    ok, fail, peak_ok = None, None, None
    T = 1024
    while T <= cap and time.perf_counter() < t_end:  # doubling
        fit, peak, err = _fits(c, preset, T, device)
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
        fit, peak, err = _fits(c, preset, mid, device)
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
        context_cap: int = 65536, context_box_s: float = 20.0) -> list[dict]:
    """Rows of the train-step table (and, unless quick, the longest-context search)."""
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
        if not on_gpu and (c.compile or c.backend == "triton"):
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
            rows.append(_bench_config(c, preset, batch_size, seq_len, device, rep_ms))
        except Exception as e:  # noqa: BLE001 - recorded in the row, the suite goes on
            rows.append({"area": "train", "op": "train_step", "impl": c.label, "preset": preset,
                         "shape": f"B{batch_size}xT{seq_len}", "error": _err(e)})
        finally:
            if c.compile:
                torch._dynamo.reset()
            _free()
    _add_ratios(rows)
    if on_gpu and context_search and not quick:
        for c in (c for c in wanted if not c.compile):
            left = time_budget_s - (time.perf_counter() - t_start)
            if left < context_box_s:
                rows.append({"area": "train", "op": "max_context_b1", "impl": c.label,
                             "skipped": f"time budget: {left:.0f} s left"})
                continue
            print(f"train: longest context at batch 1, {c.label} ...", flush=True)
            rows.append(_longest_context(c, preset, device, context_cap, context_box_s))
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
    """The issue's targets, checked against this run (a report, not an assertion)."""
    t = {r["impl"]: r for r in rows if r.get("op") == "train_step" and r.get("tokens_per_s") and r.get("peak_GiB")}
    checks = [  # (fast, baseline, wanted speed ratio, memory test, memory wording)
        ("triton", "torch", 1.3, lambda m: m <= 0.65, "<= 0.65x"),
        ("triton+compile", "torch+compile", 1.0, lambda m: m < 1.0, "< 1x"),
        ("triton+compile-cg", "torch+compile-cg", 1.0, lambda m: m < 1.0, "< 1x"),
    ]
    for fast, ref, speed, mem_ok, mem_txt in checks:
        if fast in t and ref in t:
            s = t[fast]["tokens_per_s"] / t[ref]["tokens_per_s"]
            m = t[fast]["peak_GiB"] / t[ref]["peak_GiB"]
            verdict = "met" if s >= speed and mem_ok(m) else "NOT met"
            print(f"train target {fast} vs {ref}: {s:.2f}x tokens/s (want >= {speed}x), "
                  f"{m:.2f}x peak memory (want {mem_txt}): {verdict}")
    # the "triton + compile >= torch + compile": each side in its faster compile mode
    fast = [t[k] for k in ("triton+compile", "triton+compile-cg") if k in t]
    ref = [t[k] for k in ("torch+compile", "torch+compile-cg") if k in t]
    if fast and ref:
        f = max(fast, key=lambda r: r["tokens_per_s"])
        r = max(ref, key=lambda r: r["tokens_per_s"])
        s, m = f["tokens_per_s"] / r["tokens_per_s"], f["peak_GiB"] / r["peak_GiB"]
        verdict = "met" if s >= 1.0 and m < 1.0 else "NOT met"
        print(f"train target best compiled triton ({f['impl']}) vs best compiled torch ({r['impl']}): "
              f"{s:.2f}x tokens/s (want >= 1.0x), {m:.2f}x peak memory (want < 1x): {verdict}")
