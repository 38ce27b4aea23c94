"""Fine-tuning step benchmark: LoRA and full SFT against HF transformers + PEFT and the pretraining step.

    python -m bench finetune [--quick] [--preset gpt2] [--batch-size 16] [--seq-len 1024] [--configs ...]
    python -m bench.finetune  [same flags]                       # this section alone, its own JSON

One step = zero_grad, forward + loss under bf16 autocast, backward, clip_grad_norm_(1.0) over the
trainable parameters, fused AdamW, on synthetic SFT batches: B sequences of T random token ids whose
first half is "prompt" (target -100) and second half "response", as instruction data looks.
Configurations (rows), GPT-2 124M random init, triton backend unless named. On a GPU the rows
without a suffix run the step the way the trainer and gptcore.finetune run it by default there: the
whole step captured in one CUDA graph (gptcore.graph_step.GraphedStep, --cuda-graph auto), which needs
static shapes, so rows=all; ``-eager`` rows step the same thing without the graph.

    pretrain            full weights, every position a target (the gptcore.train step): the speed SFT must keep
    full-sft            full weights, masked targets, LM head over every row (rows=all)
    full-sft-rows       full weights, masked targets, LM head over the target rows only (rows=targets, eager:
                        its shapes change with the batch, so gptcore.finetune's eager fallback)
    lora                LoRA rank 16 on c_attn, c_proj (attention and MLP) and c_fc, alpha 32, base frozen
                        in bf16, only the adapters in the optimizer, rows=all
    lora-ckpt           the same with --grad-checkpointing (each block recomputed in backward)
    lora-rows           lora with rows=targets (eager)
    pretrain-eager, full-sft-eager, lora-eager, lora-ckpt-eager   the graph rows stepped eagerly
    hf-peft-lora        transformers GPT2LMHeadModel (SDPA attention) + peft LoRA with the same rank,
                        alpha and targets, base in bf16 (adapters fp32, as PEFT casts them), labels -100
                        on the prompt, the same optimizer and clipping

Reported per row: ms (median, p20-p80 of do_bench), tokens/s (B*T positions per second, padding and
prompt included, so every row counts the same work), peak_GiB (max_memory_allocated over one step
after warm-up: weights, gradients and optimizer state included) and trainable parameters.
Targets (issue 20): lora >= 1.5x hf-peft-lora tokens/s and <= 0.6x full-sft peak memory; full-sft
within 5% of pretrain tokens/s. Without a GPU the tiny preset runs a smoke version on the CPU in fp32.
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench import harness
from bench.train_step import _err, _free

CONFIGS = ("pretrain", "full-sft", "lora", "lora-ckpt", "full-sft-rows", "lora-rows", "pretrain-eager",
           "full-sft-eager", "lora-eager", "lora-ckpt-eager", "hf-peft-lora")
RANK, ALPHA, TARGETS = 16, 32, "c_attn,c_proj,c_fc"


def _batch(B: int, T: int, vocab: int, device, masked: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (B, T), generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g)
    if masked:
        y[:, : T // 2] = -100
    return x.to(device), y.to(device)


def _gptcore_step(cfg_name: str, preset: str, B: int, T: int, device, dtype):
    from gptcore import GPT, GPTConfig
    from gptcore.graph_step import GraphedStep, adamw
    from gptcore.lora import apply_lora, cast_base

    graph = device.type == "cuda" and not cfg_name.endswith(("-rows", "-eager"))
    cfg_name = cfg_name.removesuffix("-eager")
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, context_length=max(T, 64) if preset == "tiny" else T)
    backend = "triton" if device.type == "cuda" else "torch"
    model = GPT(cfg, backend=backend).to(device).train()
    lora = cfg_name.startswith("lora")
    if lora:
        apply_lora(model, RANK if cfg.emb_dim >= RANK else 4, ALPHA, 0.0, TARGETS)
        if dtype == torch.bfloat16:
            cast_base(model, torch.bfloat16)
    model.loss_rows = "targets" if cfg_name.endswith("-rows") else "all"
    model.grad_checkpointing = cfg_name.endswith("-ckpt")
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = _batch(B, T, cfg.vocab_size, device, masked=cfg_name != "pretrain")
    if graph:  # the trainer's default step on CUDA: one captured graph, capturable fused AdamW
        opt = adamw([{"params": params}], 1e-4, (0.9, 0.999), device)
        gs = GraphedStep(lambda xb, yb: model.loss(xb, yb), params, opt, accum=1, batch_size=B, seq_len=T,
                         device=device, autocast=lambda: torch.autocast("cuda", dtype=dtype), grad_clip=1.0)
        gs.load(0, x, y)
        gs.capture()
        return (lambda: gs.replay(1e-4)), sum(p.numel() for p in params), (model, gs)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    ac = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)

    def step():
        opt.zero_grad(set_to_none=True)
        with ac:
            loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step, sum(p.numel() for p in params), model


def _hf_step(preset: str, B: int, T: int, device, dtype):
    import transformers
    from peft import LoraConfig, get_peft_model

    from gptcore import GPTConfig
    from gptcore.io import config_to_hf

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(preset, context_length=max(T, 64) if preset == "tiny" else T)
    hf_cfg = transformers.GPT2Config(**{k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures",)})
    model = transformers.GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="sdpa").to(device)
    if dtype == torch.bfloat16:
        model = model.to(torch.bfloat16)
    lcfg = LoraConfig(r=RANK if cfg.emb_dim >= RANK else 4, lora_alpha=ALPHA, lora_dropout=0.0,
                      target_modules=TARGETS.split(","), fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters in fp32, as PEFT's autocast_adapter_dtype does for bf16 bases
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    x, y = _batch(B, T, cfg.vocab_size, device, masked=True)
    # HF shifts labels inside the loss: give it labels aligned with the inputs
    labels = torch.cat([torch.full_like(y[:, :1], -100), y[:, :-1]], dim=1)
    ac = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)

    def step():
        opt.zero_grad(set_to_none=True)
        with ac:
            loss = pm(input_ids=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step, sum(p.numel() for p in params), pm


def _measure(name: str, build, B: int, T: int, quick: bool) -> dict:
    row = {"area": "finetune", "op": "sft_step", "impl": name, "shape": {"B": B, "T": T}}
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        step, n_train, keep = build()
        graph = isinstance(keep, tuple)  # a GraphedStep: its activations live in the graph's pool
        row["cuda_graph"] = graph
        for _ in range(3):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            if graph:  # a replay allocates nothing: the peak is the one reached while capturing
                row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            else:
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        t = harness.time_ms(step, warmup_ms=25 if quick else 100, rep_ms=100 if quick else 500)
        row.update(ms=t["median"], ms_p20=t["p20"], ms_p80=t["p80"], tokens_per_s=B * T / (t["median"] / 1e3),
                   trainable_params=n_train)
        del step, keep
    except Exception as e:  # noqa: BLE001 - the error lands in the row, the others still run
        row["error"] = _err(e)
    _free()
    return row


def run(quick: bool = False, preset: str | None = None, batch_size: int | None = None, seq_len: int | None = None,
        configs: list[str] | None = None) -> list[dict]:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    preset = preset or ("gpt2" if on_gpu else "tiny")
    B = batch_size or (16 if on_gpu else 2)
    T = seq_len or (1024 if on_gpu else 64)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    wanted = configs or list(CONFIGS)
    bad = [c for c in wanted if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown finetune configs {bad}; choose from {', '.join(CONFIGS)}")
    rows = []
    for name in wanted:
        if name == "hf-peft-lora":
            try:
                import peft  # noqa: F401
                import transformers  # noqa: F401
            except ImportError as e:
                rows.append({"area": "finetune", "op": "sft_step", "impl": name, "skipped": f"needs transformers and "
                             f"peft ({e}); pip install peft"})
                continue
            build = lambda: _hf_step(preset, B, T, device, dtype)  # noqa: E731
        else:
            build = lambda n=name: _gptcore_step(n, preset, B, T, device, dtype)  # noqa: E731
        print(f"finetune: {name} ...", flush=True)
        rows.append(_measure(name, build, B, T, quick))
    by = {r["impl"]: r for r in rows if r.get("tokens_per_s")}
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        if "hf-peft-lora" in by:
            r["vs_hf_peft"] = r["tokens_per_s"] / by["hf-peft-lora"]["tokens_per_s"]
        # eager rows against the eager pretrain / full-SFT rows, graph rows against the graph rows
        sfx = "-eager" if r.get("cuda_graph") is False and "pretrain-eager" in by else ""
        pre, full = by.get("pretrain" + sfx), by.get("full-sft" + sfx)
        if pre:
            r["vs_pretrain"] = r["tokens_per_s"] / pre["tokens_per_s"]
        if full and r.get("peak_GiB") and full.get("peak_GiB"):
            r["mem_vs_full_sft"] = r["peak_GiB"] / full["peak_GiB"]
    return rows


def targets(rows: list[dict]) -> list[str]:
    """One line per target of issue 20, met or not (only where both sides were measured)."""
    by = {r["impl"]: r for r in rows if r.get("tokens_per_s")}
    out = []
    for lora in ("lora", "lora-ckpt", "lora-rows", "lora-eager"):
        if lora in by and "hf-peft-lora" in by:
            v = by[lora]["vs_hf_peft"]
            out.append(f"{lora} vs HF+PEFT tokens/s: {v:.2f}x (target >= 1.5x): {'met' if v >= 1.5 else 'NOT met'}")
        if lora in by and by[lora].get("mem_vs_full_sft"):
            m = by[lora]["mem_vs_full_sft"]
            out.append(f"{lora} peak memory vs full-sft: {m:.2f}x (target <= 0.6x): {'met' if m <= 0.6 else 'NOT met'}")
    for full in ("full-sft", "full-sft-rows", "full-sft-eager"):
        if full in by and "pretrain" in by:
            v = by[full]["vs_pretrain"]
            out.append(f"{full} vs pretrain tokens/s: {v:.3f}x (target >= 0.95x): {'met' if v >= 0.95 else 'NOT met'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter timing")
    ap.add_argument("--preset", default=None, help="model preset (default: gpt2 on a GPU, tiny on the CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16; 2 on the CPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; 64 on the CPU)")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default: bench/results/)")
    a = ap.parse_args(argv)
    rows = run(a.quick, a.preset, a.batch_size, a.seq_len, a.configs.split(",") if a.configs else None)
    harness.print_table(rows, ["impl", "ms", "tokens_per_s", "peak_GiB", "trainable_params", "vs_hf_peft",
                               "vs_pretrain", "mem_vs_full_sft", "error", "skipped"], "finetune step")
    lines = targets(rows)
    for line in lines:
        print(line)
    from pathlib import Path

    path = harness.write_json("finetune", rows, extra={"targets": lines, "args": vars(a)},
                              out_dir=Path(a.out) if a.out else None)
    print(f"results: {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
