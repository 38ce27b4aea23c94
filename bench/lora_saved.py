"""Activation bytes a LoRA step saves for backward vs a full fine-tune: a deterministic CPU proxy of
their peak-memory ratio (issue 20's target: LoRA <= 0.6x the full fine-tune's peak memory).

    TRITON_INTERPRET=1 python -m bench.lora_saved --backend triton          # 12 x 64 model, ~3 min
    python -m bench.lora_saved --backend torch --emb-dim 128 --n-layers 2   # seconds
    python -m bench.lora_saved --store-inputs                                # LoRA as before: inputs stored

One forward + loss (rows=all, half the targets masked) of a model built from the tiny preset, full
weights vs LoRA (rank 16 on c_attn, c_proj, c_fc, base in bf16), under bf16 autocast. Every tensor
saved for backward is seen through ``torch.autograd.graph.saved_tensors_hooks``, each storage
counted once and charged to the model function that saved it first (call-stack attribution).
Weight-shaped tensors drop out: the count is taken at batch 2 and 4 and the difference is
reported, per token, per layer, in units of the width C (bytes / (token * layer * C)).
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch

from gptcore import GPT, GPTConfig
from gptcore.lora import LoRALinear, apply_lora, cast_base

SITES = ("LoRALinear.add_lora", "LoRALinear.forward", "_add_ln", "MLP.forward", "CausalSelfAttention.forward",
         "GPT.loss", "GPT.hidden_states")


def _site() -> str:
    f, names = sys._getframe(2), []
    while f is not None:
        names.append(f.f_code.co_qualname)
        f = f.f_back
    return next((s for s in SITES if s in names), "other")


def saved_bytes(model: GPT, x: torch.Tensor, y: torch.Tensor) -> collections.Counter:
    """Bytes saved for backward by model.loss(x, y) under bf16 autocast, per (site, dtype)."""
    seen, per = set(), collections.Counter()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(st.data_ptr())
            per[f"{_site()} {str(t.dtype).removeprefix('torch.')}"] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.loss(x, y)
    return per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lora_saved", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="triton", choices=["torch", "triton"])
    ap.add_argument("--emb-dim", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--store-inputs", action="store_true",
                    help="LoRALinear.remake_inputs = False: the LoRA layers store their inputs (the old path)")
    a = ap.parse_args(argv)
    LoRALinear.remake_inputs = not a.store_inputs
    C, L, T = a.emb_dim, a.n_layers, a.seq_len
    cfg = GPTConfig.from_preset("tiny", emb_dim=C, n_heads=4, n_layers=L, context_length=T)

    def batch(B):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        y[:, : T // 2] = -100
        return x, y

    total = {}
    for name in ("full", "lora"):
        torch.manual_seed(0)
        model = GPT(cfg, backend=a.backend).train()
        model.loss_rows = "all"
        if name == "lora":
            apply_lora(model, a.rank, 2 * a.rank, 0.0, "c_attn,c_proj,c_fc")
            cast_base(model, torch.bfloat16)
        per = saved_bytes(model, *batch(4))
        per.subtract(saved_bytes(model, *batch(2)))
        unit = 2 * T * L * C  # the 2 extra sequences' tokens x layers x width
        total[name] = sum(per.values()) / unit
        print(f"== {name}: {total[name]:.2f} C bytes per token per layer")
        for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
            if v:
                print(f"   {v / unit:7.2f}  {k}")
    print(f"lora / full = {total['lora'] / total['full']:.3f}"
          f"{' (inputs stored, the old path)' if a.store_inputs else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
