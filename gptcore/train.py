"""Minimal training loop on the embedded corpus (placeholder until the full trainer lands).

    python -m gptcore.train [--preset tiny] [--max-steps 200]
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from gptcore.config import PRESETS, GPTConfig
from gptcore.data import prepare
from gptcore.model import GPT


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gptcore.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default: tiny)")
    ap.add_argument("--data", default="default", help="text file, folder, glob, or 'default' (embedded corpus)")
    ap.add_argument("--max-steps", type=int, default=200, help="optimizer steps (default: 200)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    ap.add_argument("--context-length", type=int, default=64, help="tokens per sequence (default: 64)")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    ap.add_argument("--backend", default=None, choices=["reference", "torch", "triton"],
                    help="kernel backend (default: triton on a GPU, else torch)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = prepare(args.data)
    cfg = GPTConfig.from_preset(args.preset, context_length=max(args.context_length, 1))
    data.check_vocab(cfg.vocab_size)
    model = GPT(cfg, backend=args.backend).to(device)
    print(f"gptcore.train: {args.preset} ({model.num_params() / 1e6:.1f}M params), backend {model.backend}, "
          f"{device}, {data.manifest['train_tokens']} train tokens")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    bar = tqdm(range(args.max_steps), desc="train")
    for step in bar:
        x, y = data.get_batch("train", args.batch_size, args.context_length, g, device)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    dt = time.perf_counter() - t0
    print(f"done: final train loss {loss.item():.3f}, "
          f"{args.max_steps * args.batch_size * args.context_length / dt:,.0f} tokens/s")


if __name__ == "__main__":
    main()
