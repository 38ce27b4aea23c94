"""Generation benchmark: gptcore's KV cache, fused decode step and CUDA-graph decode beside the
references, in one run.

    python -m bench.generate            # H200: gpt2, gpt2-medium, gpt2-xl (random init), bf16, 16-token
                                        # prompts, 128 new greedy tokens (64 for gpt2-xl), batch 1, 8, 32
    python -m bench.generate --quick    # fewer tokens and calls (a smoke run; on a CPU: tiny preset)
    python -m bench.generate --sections generate --presets gpt2 --batches 1 32 --reference-rows

Sections (one JSON file via bench.harness.write_json("generate", rows)):
  generate  the decode matrix, one model per preset reused by its rows: for each batch, static and
            paged cache, the Generator's decode (triton backend: the fused step of
            gptcore.decode_step inside the CUDA graph) with ms_per_step (decode steps only),
            new_tok_s (whole generate() calls, prefill included), frac_weight_bound (weight bytes
            / ms_per_step / copy bandwidth measured in this run) and kernels_per_step (device
            activities of one graph replay, torch.profiler); beside it, for the first preset at
            the smallest and largest batch, the gpt-fast-style reference (static KV cache, SDPA
            with a mask, one-token step under torch.compile(mode="reduce-overhead",
            fullgraph=True)) and today's unfused step (name "cache + graph, unfused");
            then the prefill of a 512-token prompt at batch 1 per preset. A time budget (default
            270 s) bounds the section: rows past it are listed as skipped. --reference-rows adds
            the older slow rows (no cache on the reference and torch backends, eager cache, the
            torch backend with a graph, HF transformers generate).
  mixed     a batch of prompts of mixed lengths: tokens/s and the share of KV-cache bytes in use
            that hold no token (padding / reserved room), static vs paged.
  append    KV append GB/s (bytes read + written) for large appends: gptcore kv_append_kv and
            paged_append vs PyTorch indexing (one slice assignment when every sequence shares a
            position; a per-sequence loop when they differ); paged_gather vs torch indexing.
  decode    decode attention GB/s (K and V bytes read): Triton flash-decoding (static, paged) vs
            SDPA with a length mask and the reference masked softmax.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time
import traceback

import torch

from bench.harness import ceilings, gpu_time_ms, print_table, time_ms, write_json

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU smoke runs: Triton kernels interpreted

from gptcore import GPT, GPTConfig  # noqa: E402
from gptcore import _ext  # noqa: E402
from gptcore.generate import Generator  # noqa: E402
from gptcore.kernels.reference import decode_attention_ref  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"


def _gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _frac(gbps):
    copy = ceilings()["copy_GBps"]
    return gbps / copy if copy and gbps else None


def _attempt(rows: list, section: str, name: str, fn) -> None:
    """Run one case (fn returns its rows); a failure becomes a row naming the error instead of
    ending the run, so one broken path never costs the other measurements."""
    try:
        new = fn()
        rows.extend(new)
        for r in new:  # as measured, so a run cut short still shows what it got
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                  flush=True)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.append({"section": section, "name": name, "error": f"{type(e).__name__}: {e}"})


def _timed(fn, slow=False) -> dict:
    return time_ms(fn, warmup_ms=1 if slow else 25, rep_ms=1 if slow else 200)


def _device_us(fn):
    """Median µs of fn replayed from a CUDA graph (the kernels alone, no host work between them),
    or None (no CUDA, or fn cannot be captured)."""
    if not ON_GPU:
        return None
    try:
        return gpu_time_ms(fn)["median"] * 1e3
    except Exception as e:  # noqa: BLE001 - a row without device time still has its eager time
        print(f"  (no device time: {type(e).__name__}: {e})")
        return None


def _bw_row(moved: int, eager_ms: float, dev_us) -> dict:
    """Eager and device µs, GB/s and fraction of copy bandwidth for `moved` bytes."""
    gb = _gbps(moved, eager_ms)
    gb_dev = _gbps(moved, dev_us * 1e-3) if dev_us else None
    return {"us": eager_ms * 1e3, "GBps": gb, "frac_copy_bw": _frac(gb), "us_gpu": dev_us, "GBps_gpu": gb_dev,
            "frac_copy_bw_gpu": _frac(gb_dev) if gb_dev else None}


def _time_generation(gen: Generator, prompts, new_tokens: int, slow: bool, **kw) -> dict:
    """Median time of whole generate() calls, after one warm-up call (kernel compilation and tuning,
    CUDA-graph capture: later calls of the same shape reuse the cache and the graph)."""
    gen.generate(prompts, new_tokens, temperature=0, **kw)
    return _timed(lambda: gen.generate(prompts, new_tokens, temperature=0, **kw), slow)


# ---- end-to-end generation -----------------------------------------------------------------------
def _gptcore_model(cfg, backend, dtype):
    torch.manual_seed(0)
    return GPT(cfg, backend=backend).to(DEV, dtype).eval()


def _hf_rows(cfg, dtype, batch, prompt_len, new_tokens) -> list[dict]:
    """transformers' GPT2LMHeadModel.generate on a random GPT-2 of the same shape (KV cache on)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads)
    model = GPT2LMHeadModel(hf_cfg).to(DEV, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=DEV)
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def run():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == prompt_len + new_tokens
        return out

    run()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return [_gen_row("HF transformers generate", "transformers", batch, _timed(run, slow=True), new_tokens,
                     weight_bytes, {})]


def _gptcore_rows(cfg, dtype, name, backend, B, prompts, new_tokens, gen_kw, call_kw, slow) -> list[dict]:
    model = _gptcore_model(cfg, backend, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = Generator(model, **gen_kw)
    t = _time_generation(gen, prompts, new_tokens, slow, **call_kw)
    return [_gen_row(name, backend, B, t, new_tokens, weight_bytes, gen.stats)]


def _reference_rows(cfg, dtype, B, prompts, new_tokens, quick) -> list[dict]:
    """Today's other paths for one batch: no cache, eager cache, torch backend, HF (gpt2 only)."""
    rows = []
    backends = ["triton", "torch"] if ON_GPU else ["torch"]
    configs = [  # (name, backend, Generator kwargs, generate kwargs, slow)
        ("no cache", "reference", {}, {"use_cache": False}, True),
        ("no cache", "torch", {}, {"use_cache": False}, True),
        ("cache, eager", backends[0], {"cuda_graph": False}, {}, True),
    ]
    if ON_GPU:
        configs.append(("cache + graph", "torch", {}, {}, False))
    if quick:
        configs = [c for c in configs if c[1] != "reference"]
    for name, backend, gen_kw, call_kw, slow in configs:
        print(f"generate: {name} ({backend}, batch {B}) ...", flush=True)
        _attempt(rows, "generate", f"{name} ({backend}, batch {B})", lambda: _gptcore_rows(
            cfg, dtype, name, backend, B, prompts, new_tokens, gen_kw, call_kw, slow))
    if importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: no HF row")
    else:
        _attempt(rows, "generate", f"HF transformers generate (batch {B})",
                 lambda: _hf_rows(cfg, dtype, B, len(prompts[0]), new_tokens))
    return rows


def bench_generation(cfg, dtype, batches, prompt_len, new_tokens, quick) -> list[dict]:
    """The older rows of one preset (kept for continuity; bench_decode adds the preset matrix)."""
    rows = []
    for B in batches:
        prompts = [[random.Random(b).randrange(cfg.vocab_size) for _ in range(prompt_len)] for b in range(B)]
        rows += _reference_rows(cfg, dtype, B, prompts, new_tokens, quick)
    return rows


# ---- the decode matrix: presets x batches x static/paged, fused vs gpt-fast-style -------------------
def _weight_bytes(model) -> int:
    """Bytes a decode step must read: every parameter once (a tied LM head counts once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _bound_frac(weight_bytes: int, ms_step) -> float | None:
    """(weight bytes / step time) / measured copy bandwidth: the weight-read bound's share reached."""
    copy = ceilings()["copy_GBps"]
    if not copy or not ms_step:
        return None
    return weight_bytes / (ms_step * 1e-3) / (copy * 1e9)


def _count_kernels(fn) -> int | None:
    """Device activities (kernels, memcpy, memset) of one fn() call under torch.profiler (CUDA)."""
    if not ON_GPU:
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _median_calls(fn, calls: int) -> float:
    """Median ms of `calls` calls of fn after one warm-up (a whole generate() is many ms: a few calls
    measure it; do_bench's hundreds would blow the time budget)."""
    fn()
    times = []
    for _ in range(calls):
        if ON_GPU:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _decode_row(name, backend, preset, B, cache, total_ms, ms_step, new_tokens, weight_bytes, kernels,
                stats) -> dict:
    return {
        "section": "generate", "name": name, "backend": backend, "preset": preset, "batch": B, "cache": cache,
        "new_tokens": new_tokens, "ms": total_ms, "new_tok_s": B * new_tokens / (total_ms * 1e-3),
        "ms_per_token": total_ms / new_tokens, "ms_per_step": ms_step,
        "decode_tok_s": B / (ms_step * 1e-3) if ms_step else None,
        "frac_weight_bound": _bound_frac(weight_bytes, ms_step),
        "frac_weight_bw": _frac(_gbps(weight_bytes, total_ms / new_tokens)), "kernels_per_step": kernels,
        "weight_MB": weight_bytes / 1e6, "kv_B_per_token": stats.get("kv_bytes_per_token"),
        "decode_mode": stats.get("decode_mode"), "decode_step": stats.get("decode_step"),
        "prefill_ms": stats.get("prefill_ms"), "decode_ms_per_step": stats.get("decode_ms_per_step"),
    }


def _generator_row(model, preset, B, prompts, new_tokens, paged, calls, name=None) -> dict:
    """gptcore's Generator (whatever decode step it picks: fused where it can) at one shape."""
    gen = Generator(model, paged=paged)
    run_once = lambda: gen.generate(prompts, new_tokens, temperature=0)  # noqa: E731
    total = _median_calls(run_once, calls)
    stats = dict(gen.stats)
    kernels = None
    graphs = [g for g in gen._graphs.values() if g.graph is not None]
    if graphs:  # one replay of the captured decode step (it writes one more slot of the idle cache)
        g, cache = graphs[0], gen.cache
        cache.reserve(1)
        kernels = _count_kernels(g.graph.replay) or None
        if kernels is None:  # the profiler saw no kernels inside the graph: count one eager step instead
            cache.reserve(1)

            def eager_step():
                with torch.no_grad(), cache.external_reservation():
                    if g.fused is not None:
                        g.fused.greedy(g.tok, out=g.tok.view(-1))
                    else:
                        model.ops.token_pick(model(g.tok, kv_cache=cache)[:, -1])

            kernels = _count_kernels(eager_step)
    ms_step = stats["decode_ms_per_step"]
    default = ("paged + graph" if paged else "cache + graph") if stats["decode_mode"] == "cuda-graph" else \
        ("paged, eager" if paged else "cache, eager")
    return _decode_row(name or default, model.backend, preset, B, "paged" if paged else "static", total, ms_step,
                       new_tokens, _weight_bytes(model), kernels, stats)


class _GptFastDecoder(torch.nn.Module):
    """What a PyTorch user would write instead (gpt-fast's recipe): a static KV cache written at
    input_pos by index_put, SDPA with a boolean mask over the whole cache, plain torch ops, and the
    one-token step compiled with torch.compile(mode="reduce-overhead", fullgraph=True). Uses the
    gptcore model's parameters (no copy)."""

    def __init__(self, model, batch: int, max_len: int):
        super().__init__()
        cfg = model.config
        self.m, self.H, self.D = model, cfg.n_heads, cfg.head_dim
        p = model.lm_head.weight
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=p.device, dtype=p.dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=p.device, dtype=p.dtype), persistent=False)
        self.register_buffer("positions", torch.arange(max_len, device=p.device), persistent=False)

    def forward(self, tok, input_pos):
        """tok (B, T) at positions input_pos (T,) -> next greedy token (B,)."""
        import torch.nn.functional as F

        t = self.m.transformer
        B, T = tok.shape
        x = t.wte(tok) + t.wpe(input_pos)
        mask = (self.positions[None, :] <= input_pos[:, None])[None, None]       # (1, 1, T, max_len)
        for i, blk in enumerate(t.h):
            h = F.layer_norm(x, (x.shape[-1],), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
            q, k, v = blk.attn.c_attn(h).view(B, T, 3, self.H, self.D).permute(2, 0, 3, 1, 4)
            self.k_cache[i][:, :, input_pos] = k
            self.v_cache[i][:, :, input_pos] = v
            y = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask)
            x = x + blk.attn.c_proj(y.transpose(1, 2).reshape(B, T, -1))
            h = F.layer_norm(x, (x.shape[-1],), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
            x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(h), approximate="tanh"))
        x = F.layer_norm(x[:, -1], (x.shape[-1],), t.ln_f.weight, t.ln_f.bias, t.ln_f.eps)
        return self.m.lm_head(x).argmax(dim=-1)


def _gptfast_row(model, preset, B, prompt_len, new_tokens, calls) -> dict:
    cfg = model.config
    dec = _GptFastDecoder(model, B, prompt_len + new_tokens)
    step = torch.compile(dec, mode="reduce-overhead", fullgraph=True) if ON_GPU else dec
    ids = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=DEV)
    timing = {}

    @torch.no_grad()
    def run():
        t0 = time.perf_counter()
        tok = dec(ids, torch.arange(prompt_len, device=DEV))[:, None]              # eager prefill
        if ON_GPU:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = [tok]
        for i in range(prompt_len, prompt_len + new_tokens - 1):
            if ON_GPU:
                torch.compiler.cudagraph_mark_step_begin()
            tok = step(tok, torch.tensor([i], device=DEV))[:, None].clone()
            out.append(tok)
        if ON_GPU:
            torch.cuda.synchronize()
        timing["prefill_ms"], timing["step_ms"] = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3 / max(1, new_tokens - 1)
        return out

    run()  # compiles (the slow part) and records the graphs
    total = _median_calls(run, calls)
    stats = {"decode_mode": "torch.compile reduce-overhead (CUDA graphs)" if ON_GPU else "eager (CPU smoke)",
             "decode_step": "gpt-fast-style", "prefill_ms": timing["prefill_ms"],
             "decode_ms_per_step": timing["step_ms"]}
    kernels = None
    if ON_GPU:
        tok = torch.zeros(B, 1, dtype=torch.long, device=DEV)
        pos = torch.tensor([prompt_len], device=DEV)

        def one():
            torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                step(tok, pos)

        one()
        kernels = _count_kernels(one) or None
    return _decode_row("gpt-fast-style", "torch.compile", preset, B, "static", total, timing["step_ms"], new_tokens,
                       _weight_bytes(model), kernels, stats)


def _prefill_row(model, preset, T, calls) -> dict:
    """Prefill of one T-token prompt (batch 1): the Generator's prefill (graph-replayed after the first
    call of the shape) plus the first token."""
    gen = Generator(model)
    prompt = [[random.Random(7).randrange(model.config.vocab_size) for _ in range(T)]]
    times = []
    gen.generate(prompt, 1, temperature=0)
    for _ in range(calls):
        gen.generate(prompt, 1, temperature=0)
        times.append(gen.stats["prefill_ms"])
    times.sort()
    return {"section": "generate", "name": f"prefill {T}", "backend": model.backend, "preset": preset, "batch": 1,
            "prompt_len": T, "prefill_ms": times[len(times) // 2], "prefill_tok_s": T / (times[len(times) // 2] * 1e-3),
            "prefill_mode": gen.stats["prefill_mode"]}


def bench_decode(presets, batches, dtype, prompt_len, new_tokens, quick, budget_s: float) -> list[dict]:
    """The decode matrix in one run: for each preset (one model, reused by every row), batch and cache
    layout, the Generator's decode (fused on the triton backend) with ms/step, tokens/s, fraction of the
    weight-read bound and kernels per step; the gpt-fast-style compiled decode beside it (gpt2 only:
    each batch size is a fresh compile), today's unfused step (GPTCORE_FUSED_DECODE=0) for gpt2, and the
    prefill of a 512-token prompt. Rows past the time budget are listed as skipped."""
    rows = []
    t_start = time.perf_counter()

    def over(what: str) -> bool:
        if time.perf_counter() - t_start > budget_s:
            rows.append({"section": "generate", "name": what, "skipped": f"time budget {budget_s:.0f} s"})
            print(f"generate: skipped {what} (time budget)", flush=True)
            return True
        return False

    calls = 1 if quick else 3
    for preset in presets:
        if not ON_GPU:
            preset = "tiny"  # a CPU smoke run; GPTCORE_FUSED_DECODE=1 runs the fused step in the interpreter
        cfg = GPTConfig.from_preset(preset)
        backend = "triton" if ON_GPU or os.environ.get("GPTCORE_FUSED_DECODE") == "1" else "torch"
        with torch.device(DEV):
            torch.manual_seed(0)
            model = GPT(cfg, backend=backend)
        model = model.to(DEV, dtype).eval()
        toks = new_tokens if preset != "gpt2-xl" else max(8, new_tokens // 2)
        for B in batches:
            prompts = [[random.Random(b).randrange(cfg.vocab_size) for _ in range(prompt_len)] for b in range(B)]
            for paged in (False, True):
                what = f"{preset} batch {B} {'paged' if paged else 'static'}"
                if over(what):
                    continue
                print(f"generate: {what} ...", flush=True)
                _attempt(rows, "generate", what, lambda: [_generator_row(model, preset, B, prompts, toks, paged, calls)])
            if preset in (presets[0], "tiny") and B in (batches[0], batches[-1]):
                if not over(f"{preset} batch {B} gpt-fast-style"):
                    print(f"generate: gpt-fast-style {preset} batch {B} ...", flush=True)
                    _attempt(rows, "generate", f"gpt-fast-style {preset} batch {B}",
                             lambda: [_gptfast_row(model, preset, B, prompt_len, toks, calls)])
                if ON_GPU and not over(f"{preset} batch {B} unfused"):
                    os.environ["GPTCORE_FUSED_DECODE"] = "0"
                    try:
                        _attempt(rows, "generate", f"unfused {preset} batch {B}", lambda: [_generator_row(
                            model, preset, B, prompts, toks, False, calls, name="cache + graph, unfused")])
                    finally:
                        os.environ.pop("GPTCORE_FUSED_DECODE", None)
        T = min(512, cfg.context_length - 1)
        if not over(f"{preset} prefill {T}"):
            _attempt(rows, "generate", f"{preset} prefill {T}", lambda: [_prefill_row(model, preset, T, calls)])
        del model
        if ON_GPU:
            torch.cuda.empty_cache()
    return rows


def bench_mixed(cfg, dtype, quick) -> list[dict]:
    """Mixed prompt lengths in one batch: speed, and KV bytes in use that hold no token."""
    rng = random.Random(0)
    B = 8 if quick else 32
    new_tokens = 32 if quick else 128
    top = min(cfg.context_length - new_tokens, 512)
    lens = [rng.randint(4, top) for _ in range(B)]
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(n)] for n in lens]
    rows = []
    for paged in (False, True):
        gen = Generator(_gptcore_model(cfg, "triton" if ON_GPU else "torch", dtype), paged=paged)
        t = _time_generation(gen, prompts, new_tokens, slow=False)
        c = gen.cache
        rows.append({
            "section": "mixed", "name": "paged + graph" if paged else "cache + graph", "batch": B,
            "prompt_lens": f"{min(lens)}..{max(lens)}", "new_tokens": new_tokens,
            "new_tok_s": B * new_tokens / (t["median"] * 1e-3), "ms": t["median"],
            "kv_MB_in_use": c.bytes_in_use() / 1e6, "kv_MB_tokens": c.bytes_for_tokens() / 1e6,
            "unused_frac": c.unused_fraction(), "decode_mode": gen.stats["decode_mode"],
        })
    return rows


# ---- KV append / gather --------------------------------------------------------------------------
def bench_append(dtype, quick) -> list[dict]:
    ops = _ext.ops()
    B, H, D = (32, 12, 64) if ON_GPU else (4, 2, 16)
    Tn = (256 if quick else 1024) if ON_GPU else 32
    Tmax, bs = 2 * Tn, 16
    kc = torch.zeros(B, H, Tmax, D, device=DEV, dtype=dtype)
    vc = torch.zeros_like(kc)
    qkv = torch.randn(B, Tn, 3, H, D, device=DEV, dtype=dtype)
    k, v = qkv.permute(2, 0, 3, 1, 4)[1], qkv.permute(2, 0, 3, 1, 4)[2]   # the model's strided views
    same = torch.full((B,), Tn // 2, device=DEV, dtype=torch.long)
    mixed = torch.randint(0, Tmax - Tn + 1, (B,), device=DEV)
    mixed_host = mixed.tolist()
    mb = Tmax // bs
    table = torch.randperm(B * mb, device=DEV).view(B, mb).to(torch.int32)
    pk = torch.zeros(B * mb, H, bs, D, device=DEV, dtype=dtype)
    pv = torch.zeros_like(pk)
    kx, vx = k.contiguous(), v.contiguous()  # the same append from (B, H, Tn, D) contiguous sources
    moved = 2 * 2 * k.numel() * k.element_size()  # k and v, read + written

    def torch_slice():
        p = Tn // 2
        kc[:, :, p:p + Tn] = k
        vc[:, :, p:p + Tn] = v

    def torch_loop():
        for b, p in enumerate(mixed_host):
            kc[b, :, p:p + Tn] = k[b]
            vc[b, :, p:p + Tn] = v[b]

    cases = [
        ("gptcore kv_append_kv", "same", lambda: ops.kv_append_kv(kc, vc, k, v, same)),
        ("gptcore kv_append_kv", "mixed", lambda: ops.kv_append_kv(kc, vc, k, v, mixed)),
        ("gptcore kv_append_kv, contiguous k/v", "mixed", lambda: ops.kv_append_kv(kc, vc, kx, vx, mixed)),
        ("torch slice assign", "same", torch_slice),
        ("torch per-sequence loop", "mixed", torch_loop),
        ("gptcore paged_append", "mixed", lambda: ops.paged_append(pk, pv, k, v, table, mixed)),
    ]
    rows = []
    for name, pos, fn in cases:
        # eager: one call as a user makes it (the gptcore ops' bounds check reads pos on the host
        # first: a sync per call); device: graph replay, the copy kernel alone (the check is
        # skipped under capture, as in the decode graph)
        rows.append({"section": "append", "name": name, "positions": pos, "shape": f"{B}x{H}x{Tn}x{D}",
                     **_bw_row(moved, _timed(fn)["median"], _device_us(fn))})
    lengths = mixed + Tn
    # bytes: the stored positions read from the blocks + the whole (B, H, Tmax, D) output written
    gathered = (int(lengths.sum()) + B * Tmax) * H * D * k.element_size()

    def torch_gather():  # indexing reference: gather blocks, then lay them out (B, H, T, D)
        return pk[table.long()].permute(0, 2, 1, 3, 4).reshape(B, H, Tmax, D)

    for name, fn in (("gptcore paged_gather", lambda: ops.paged_gather(pk, table, lengths, Tmax)),
                     ("torch index gather", torch_gather)):
        rows.append({"section": "append", "name": name, "positions": "mixed", "shape": f"{B}x{H}x{Tmax}x{D}",
                     **_bw_row(gathered, _timed(fn)["median"], _device_us(fn))})
    # one decode step's append: latency, not bandwidth
    k1, v1 = k[:, :, :1], v[:, :, :1]
    one = lambda: ops.kv_append_kv(kc, vc, k1, v1, mixed)  # noqa: E731
    rows.append({"section": "append", "name": "gptcore kv_append_kv (1 token)", "positions": "mixed",
                 "shape": f"{B}x{H}x1x{D}", "us": _timed(one)["median"] * 1e3, "GBps": None, "frac_copy_bw": None,
                 "us_gpu": _device_us(one), "GBps_gpu": None, "frac_copy_bw_gpu": None})
    return rows


# ---- decode attention ------------------------------------------------------------------------------
def bench_decode_attention(dtype, quick) -> list[dict]:
    from gptcore.kernels.decode_attention import decode_attention
    import torch.nn.functional as F

    shapes = [(32, 12, 1024, 64), (1, 12, 4096, 64), (8, 16, 2048, 128)] if ON_GPU else [(2, 2, 64, 16)]
    if quick:
        shapes = shapes[:1]
    rows = []
    for B, H, T, D in shapes:
        q = torch.randn(B, H, 1, D, device=DEV, dtype=dtype)
        k = torch.randn(B, H, T, D, device=DEV, dtype=dtype)
        v = torch.randn_like(k)
        lengths = torch.full((B,), T, device=DEV, dtype=torch.long)
        bs = 16
        table = torch.randperm(B * (T // bs), device=DEV).view(B, T // bs).to(torch.int32)
        pk = k.view(B, H, T // bs, bs, D).permute(0, 2, 1, 3, 4).reshape(B * (T // bs), H, bs, D)
        pk = pk[table.flatten().argsort()].contiguous()  # block table[b, j] holds k[b, :, j*bs:(j+1)*bs]
        pv = v.view(B, H, T // bs, bs, D).permute(0, 2, 1, 3, 4).reshape(B * (T // bs), H, bs, D)
        pv = pv[table.flatten().argsort()].contiguous()
        mask = (torch.arange(T, device=DEV)[None, :] < lengths[:, None])[:, None, None, :]
        read = 2 * k.numel() * k.element_size()
        ref = decode_attention_ref(q.float(), k.float(), v.float(), lengths)
        cases = [
            ("triton decode (static)", lambda: decode_attention(q, k, v, lengths)),
            ("triton decode (paged)", lambda: decode_attention(q, pk, pv, lengths, block_table=table)),
            ("SDPA + length mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
            ("reference masked softmax", lambda: decode_attention_ref(q, k, v, lengths)),
        ]
        for name, fn in cases:
            err = (fn().float() - ref).abs().max().item()
            rows.append({"section": "decode", "name": name, "shape": f"{B}x{H}x{T}x{D}",
                         **_bw_row(read, _timed(fn)["median"], _device_us(fn)), "max_err_vs_fp32": err})
    return rows


SECTIONS = ("generate", "mixed", "append", "decode")


PRESETS = ("gpt2", "gpt2-medium", "gpt2-xl")


def run(quick: bool = False, sections=SECTIONS, preset: str | None = None, presets=None, batches=None,
        time_budget_s: float | None = None, reference_rows: bool = False) -> list[dict]:
    """presets / batches: the decode matrix (default gpt2, gpt2-medium, gpt2-xl x 1, 8, 32; preset: just
    that one); time_budget_s: seconds for the generate section (default 270); reference_rows: also the
    slow older rows (no cache, eager cache, torch backend, HF) for the first preset."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    presets = list(presets or ([preset] if preset else PRESETS))
    if ON_GPU:
        cfg = GPTConfig.from_preset(presets[0])
        batches = list(batches or [1, 8, 32])
        prompt_len, new_tokens = 16, (32 if quick else 128)
    else:  # a CPU smoke run of the whole script
        cfg = GPTConfig.from_preset("tiny")
        presets, batches, prompt_len, new_tokens = presets[:1], [1, 4], 8, 8
    budget = (60.0 if quick else 270.0) if time_budget_s is None else time_budget_s
    print(f"device: {torch.cuda.get_device_name() if ON_GPU else 'cpu'}; ceilings: {ceilings()}")
    rows = []
    if "generate" in sections:
        t0 = time.perf_counter()
        rows += bench_decode(presets, batches, dtype, prompt_len, new_tokens, quick, budget)
        if reference_rows:
            rows += bench_generation(cfg, dtype, [batches[0], batches[-1]], prompt_len, new_tokens, quick)
        print(f"generate section: {time.perf_counter() - t0:.0f} s", flush=True)
    if "mixed" in sections:
        _attempt(rows, "mixed", "mixed prompt lengths", lambda: bench_mixed(cfg, dtype, quick))
    if "append" in sections:
        _attempt(rows, "append", "KV append / gather", lambda: bench_append(dtype, quick))
    if "decode" in sections:
        _attempt(rows, "decode", "decode attention", lambda: bench_decode_attention(dtype, quick))
    tables = [
        ("generate", ["name", "backend", "preset", "batch", "cache", "new_tok_s", "ms_per_step", "frac_weight_bound",
                      "kernels_per_step", "decode_step", "prefill_ms"],
         f"generation: {new_tokens} new tokens ({max(8, new_tokens // 2)} for gpt2-xl), {prompt_len}-token prompts, "
         f"greedy; frac_weight_bound = weight bytes / step time / measured copy GB/s"),
        ("mixed", ["name", "batch", "prompt_lens", "new_tok_s", "kv_MB_in_use", "kv_MB_tokens", "unused_frac"],
         "mixed prompt lengths: KV bytes in use vs bytes holding tokens"),
        ("append", ["name", "positions", "shape", "us", "GBps", "frac_copy_bw", "us_gpu", "GBps_gpu",
                    "frac_copy_bw_gpu"],
         "KV append / gather (effective bytes read + written; eager call, then device time)"),
        ("decode", ["name", "shape", "us", "GBps", "frac_copy_bw", "us_gpu", "GBps_gpu", "frac_copy_bw_gpu",
                    "max_err_vs_fp32"], "decode attention (K + V bytes read; eager call, then device time)"),
    ]
    for section, cols, title in tables:
        print_table([r for r in rows if r["section"] == section and "error" not in r], cols, title=title)
    for r in rows:
        if "error" in r:
            print(f"FAILED {r['section']}: {r['name']}: {r['error']}")
    _print_targets(rows)
    path = write_json("generate", rows, extra={"config": cfg.to_dict(), "dtype": str(dtype), "quick": quick,
                                               "sections": list(sections), "presets": presets, "batches": batches})
    print(f"\nwrote {path}")
    return rows


def _print_targets(rows: list[dict]) -> None:
    """Issue 17's targets (context, not assertions)."""
    def get(name, preset, batch, cache="static"):
        got = [r for r in rows if r["section"] == "generate" and r.get("name") == name and r.get("preset") == preset
               and r.get("batch") == batch and r.get("cache", "static") == cache and "error" not in r]
        return got[0] if got else {}

    b1, fast1 = get("cache + graph", "gpt2", 1), get("gpt-fast-style", "gpt2", 1)
    b32, xl = get("cache + graph", "gpt2", 32), get("cache + graph", "gpt2-xl", 1)
    ratio = b1["new_tok_s"] / fast1["new_tok_s"] if b1 and fast1 else None
    print(f"\ntargets: gpt2 batch 1 {b1.get('new_tok_s')} tok/s (>= 4000) and {ratio} x gpt-fast-style (>= 2); "
          f"batch 32 {b32.get('new_tok_s')} (>= 100000); gpt2-xl batch 1 {xl.get('frac_weight_bound')} of the "
          f"weight-read bound (>= 0.65); kernels/step gpt2 {b1.get('kernels_per_step')} (<= 5 x 12 + 3 = 63)")
    for r in rows:
        if r.get("section") == "generate" and r.get("name") == "paged + graph" and "error" not in r:
            s = get("cache + graph", r["preset"], r["batch"])
            if s.get("ms_per_step") and r.get("ms_per_step"):
                print(f"  paged/static step time {r['preset']} batch {r['batch']}: "
                      f"{r['ms_per_step'] / s['ms_per_step']:.3f} (<= 1.05)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and rows (a smoke run)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                   help=f"which parts to run, any of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=None, metavar="PRESET",
                   help=f"model presets of the decode matrix (default: {' '.join(PRESETS)}; tiny on a CPU)")
    p.add_argument("--batches", nargs="+", type=int, default=None, metavar="B",
                   help="batch sizes of the decode matrix (default: 1 8 32)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="seconds for the generate section; rows past it are listed as skipped (default 270, 60 with --quick)")
    p.add_argument("--reference-rows", action="store_true",
                   help="also the older slow rows: no cache (reference, torch), eager cache, torch backend + graph, HF")
    args = p.parse_args(argv)
    run(quick=args.quick, sections=args.sections, presets=args.presets, batches=args.batches,
        time_budget_s=args.time_budget, reference_rows=args.reference_rows)


if __name__ == "__main__":
    main()
