"""Generation benchmark: gptcore's KV cache, decode attention and CUDA-graph decode beside the
references, in one run.

    python -m bench.generate            # H100: GPT-2 124M (random init), bf16, 16-token prompts,
                                        # 256 new tokens, greedy, batch 1 and 32
    python -m bench.generate --quick    # fewer tokens and rows (a smoke run; on a CPU: tiny preset)

Sections (one JSON file via bench.harness.write_json("generate", rows)):
  generate  new tokens/s and ms/token for: no cache (reference and torch backends; every step
            recomputes the sequence), gptcore cache eager, cache + CUDA graph (static and paged;
            triton and torch backends), and Hugging Face transformers GPT2LMHeadModel.generate
            (random GPT2Config, use_cache=True) when transformers is installed. frac_weight_bw =
            (model bytes / time per decode step) / measured copy bandwidth: the share of the
            bound every decode step pays to read the weights once. kv_B_per_token: KV bytes per
            token (~36 KB for GPT-2 124M in bf16).
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


def bench_generation(cfg, dtype, batches, prompt_len, new_tokens, quick) -> list[dict]:
    rows = []
    backends = ["triton", "torch"] if ON_GPU else ["torch"]
    for B in batches:
        prompts = [[random.Random(b).randrange(cfg.vocab_size) for _ in range(prompt_len)] for b in range(B)]
        configs = [  # (name, backend, Generator kwargs, generate kwargs, slow)
            ("no cache", "reference", {}, {"use_cache": False}, True),
            ("no cache", "torch", {}, {"use_cache": False}, True),
            ("cache, eager", backends[0], {"cuda_graph": False}, {}, True),
            ("cache + graph", backends[0], {}, {}, False),
            ("paged + graph", backends[0], {"paged": True}, {}, False),
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
            continue
        _attempt(rows, "generate", f"HF transformers generate (batch {B})",
                 lambda: _hf_rows(cfg, dtype, B, prompt_len, new_tokens))
    return rows


def _gen_row(name, backend, B, t, new_tokens, weight_bytes, stats):
    ms = t["median"]
    ms_step = ms / new_tokens
    return {
        "section": "generate", "name": name, "backend": backend, "batch": B, "new_tokens": new_tokens,
        "ms": ms, "p20_ms": t["p20"], "p80_ms": t["p80"],
        "new_tok_s": B * new_tokens / (ms * 1e-3), "ms_per_token": ms_step,
        "frac_weight_bw": _frac(_gbps(weight_bytes, ms_step)),
        "kv_B_per_token": stats.get("kv_bytes_per_token"), "decode_mode": stats.get("decode_mode", "HF eager"),
        # the last timed call's split: prefill (prompt forward + first token) and each decode step
        "prefill_ms": stats.get("prefill_ms"), "decode_ms_per_step": stats.get("decode_ms_per_step"),
    }


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


def run(quick: bool = False, sections=SECTIONS) -> list[dict]:
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    if ON_GPU:
        cfg = GPTConfig.from_preset("gpt2")
        batches, prompt_len, new_tokens = [1, 32], 16, (64 if quick else 256)
    else:  # a CPU smoke run of the whole script
        cfg = GPTConfig.from_preset("tiny")
        batches, prompt_len, new_tokens = [1, 4], 8, 8
    print(f"device: {torch.cuda.get_device_name() if ON_GPU else 'cpu'}; ceilings: {ceilings()}")
    rows = bench_generation(cfg, dtype, batches, prompt_len, new_tokens, quick) if "generate" in sections else []
    if "mixed" in sections:
        _attempt(rows, "mixed", "mixed prompt lengths", lambda: bench_mixed(cfg, dtype, quick))
    if "append" in sections:
        _attempt(rows, "append", "KV append / gather", lambda: bench_append(dtype, quick))
    if "decode" in sections:
        _attempt(rows, "decode", "decode attention", lambda: bench_decode_attention(dtype, quick))
    tables = [
        ("generate", ["name", "backend", "batch", "new_tok_s", "ms_per_token", "frac_weight_bw", "kv_B_per_token",
                      "decode_mode"], f"generation: {new_tokens} new tokens, {prompt_len}-token prompts, greedy"),
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
                                               "sections": list(sections)})
    print(f"\nwrote {path}")
    return rows


def _print_targets(rows: list[dict]) -> None:
    """The issue's targets (context, not assertions): batch 1 >= 2000 and batch 32 >= 25000 new
    tokens/s with the CUDA graph; append >= 80% of copy bandwidth."""
    def best(batch):
        got = [r["new_tok_s"] for r in rows if r["section"] == "generate" and r.get("batch") == batch
               and r.get("name") == "cache + graph" and r.get("backend") == "triton"]
        return max(got) if got else None

    app = [r for r in rows if r["section"] == "append" and r.get("name") == "gptcore kv_append_kv"]
    eager = max((r["frac_copy_bw"] for r in app if r.get("frac_copy_bw")), default=None)
    dev = max((r["frac_copy_bw_gpu"] for r in app if r.get("frac_copy_bw_gpu")), default=None)
    print("\ntargets: batch 1 cache+graph {} tok/s (>= 2000); batch 32 {} tok/s (>= 25000); kv_append_kv {} of "
          "copy bandwidth on device time, {} per eager call with its host bounds check (>= 0.80)".format(
              best(1), best(32), dev, eager))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and rows (a smoke run)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                   help=f"which parts to run, any of {', '.join(SECTIONS)} (default: all)")
    args = p.parse_args(argv)
    run(quick=args.quick, sections=args.sections)


if __name__ == "__main__":
    main()
