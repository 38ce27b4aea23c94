"""Evaluate a checkpoint: mean loss, perplexity and next-token accuracy.

    python -m gptcore.eval --ckpt out/best --data default             # the held-out (val) split
    python -m gptcore.eval --ckpt out --file notes.txt --stride 32    # a whole file, sliding windows
    python -m gptcore.eval --ckpt out/best --data default --json      # one JSON object on stdout

Windows are cut with data.GPTDataset. Every target token is scored exactly once: the first
window scores all its targets, each later one only the targets no earlier window scored (with
stride < context_length those have at least context_length - stride tokens of context), and a
last window aligned to the end covers the tail. The val split uses stride = context_length.
The split is rebuilt with the val_fraction the checkpoint was trained with.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from gptcore.cli import (UsageError, add_debug_flag, check_backend, check_device, check_int_range,
                         refuse_if_too_big, run_cli)
from gptcore.io import build_model, read_checkpoint
from gptcore.data import DataError, GPTDataset, Source, prepare
from gptcore.model import GPT
from gptcore.ops import BACKENDS
from gptcore.tokenizer import ENDOFTEXT, get_encoding


def _windows(n: int, T: int, stride: int, n_regular: int) -> list[tuple[int, int, int]]:
    """(start, length, first scored position) of the windows over n tokens (n - 1 targets):
    the n_regular windows of GPTDataset(ids, T, stride), then a tail window if targets remain."""
    if n - 1 <= T:
        return [(0, n - 1, 0)]
    starts = [i * stride for i in range(n_regular)]
    if starts[-1] + T < n - 1:
        starts.append(n - 1 - T)
    out, scored_end = [], 1  # scored_end: absolute index of the first target not yet scored
    for s in starts:
        out.append((s, T, scored_end - s - 1))
        scored_end = s + T + 1
    return out


@torch.no_grad()
def evaluate_tokens(model: GPT, ids, context_length: Optional[int] = None, stride: Optional[int] = None,
                    batch_size: int = 8, dtype: Optional[torch.dtype] = None, progress: bool = False) -> dict:
    """Loss (nats/token), perplexity and top-1 accuracy of ``model`` on the token sequence ``ids``."""
    T = context_length or model.config.context_length
    stride = stride or T
    if T > model.config.context_length:
        raise ValueError(f"context_length {T} exceeds the model's {model.config.context_length}")
    if not 0 < stride <= T:
        raise ValueError(f"stride must be in [1, context_length={T}], got {stride}")
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if len(ids) < 2:
        raise DataError(f"{len(ids)} token(s): need at least 2 to score one prediction")
    ds = GPTDataset(ids, T, stride) if len(ids) > T else None
    windows = _windows(len(ids), T, stride, ds.n if ds is not None else 0)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype not in (None, torch.float32) else nullcontext()
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    n_batches = -(-len(windows) // batch_size)
    bar = None
    if progress and n_batches >= 20:  # a long evaluation shows progress at once (Ctrl-C stops it)
        from tqdm.auto import tqdm

        bar = tqdm(total=n_batches, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
    for b in range(0, len(windows), batch_size):
        if bar is not None:
            bar.update(1)
        chunk = windows[b:b + batch_size]
        xs, ys = [], []
        for s, length, first in chunk:
            regular = ds is not None and s % stride == 0 and s // stride < ds.n
            x, y = ds[s // stride] if regular else (ids[s:s + length], ids[s + 1:s + length + 1])
            y = y.clone()
            y[:first] = -100  # scored by an earlier window
            xs.append(x)
            ys.append(y)
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)  # (b, T)
        with autocast:
            logits = model(x).float()  # (b, T, V)
        mask = y != -100
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        correct += int(((logits.argmax(-1) == y) & mask).sum())
        count += int(mask.sum())
    if bar is not None:
        bar.close()
    model.train(was_training)
    loss = loss_sum / count
    return {"tokens": count, "loss": loss, "perplexity": math.exp(min(loss, 700)), "accuracy": correct / count,
            "context_length": T, "stride": stride}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gptcore.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    ap.add_argument("--ckpt", required=True,
                    help="any checkpoint inspect reads: a checkpoint or run directory (uses its latest), a Hugging "
                         "Face folder, nanoGPT ckpt.pt, ... (data and tokenizer default to gpt2's 'default' corpus "
                         "when the file does not record its own)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", default=None,
                     help="corpus whose split to score: a file, folder, glob or 'default' (default: the "
                          "checkpoint's training data)")
    src.add_argument("--file", default=None, help="score this whole text file with sliding windows instead")
    ap.add_argument("--split", default=None, choices=["val", "train"], help="split of --data (default: val)")
    ap.add_argument("--context-length", type=int, default=None, help="window length (default: the model's)")
    ap.add_argument("--stride", type=int, default=None,
                    help="window step for --file (default: the context length; the val split always uses it)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (default: all)")
    ap.add_argument("--data-errors", default="strict", choices=["strict", "replace"],
                    help="non-UTF-8 input: error or U+FFFD (default: strict)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    ap.add_argument("--backend", default=None, choices=list(BACKENDS), help="kernel backend (default: best here)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="autocast dtype (default: bf16 on a GPU, fp32 on CPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr for long evaluations")
    add_debug_flag(ap)
    return ap


def main(argv=None) -> int:
    """Exit status: 0 scored; 2 bad flags, data or checkpoint (one line; --debug for the traceback);
    130 / 143 stopped by Ctrl-C / SIGTERM."""
    return run_cli("gptcore.eval", _main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_int_range("--batch-size", args.batch_size, 1, 1 << 20)
    if args.file is not None and args.split is not None:
        raise UsageError("--split chooses a split of --data; --file scores the whole file: give one of them")
    if args.file is None and args.stride is not None:
        raise UsageError("--stride applies to --file (the val/train split is scored in whole windows): drop it "
                         "or score a file with --file")
    args.split = args.split or "val"
    if args.max_tokens is not None:
        check_int_range("--max-tokens", args.max_tokens, 2)
    for flag, v in (("--context-length", args.context_length), ("--stride", args.stride)):
        if v is not None:
            check_int_range(flag, v, 1, 1 << 24)
    device = check_device(args.device)
    check_backend(args.backend)
    if args.dtype == "fp16" and device.type != "cuda":
        raise UsageError("--dtype fp16 needs a CUDA GPU; on a CPU use fp32 or bf16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    if args.file is not None and not Path(args.file).is_file():
        raise DataError(f"--file {args.file}: not found (give a text file)")
    ck = read_checkpoint(args.ckpt)  # any format inspect reads
    meta, mc = ck.meta, ck.model_config
    # gptcore's formats name their tokenizer; every other GPT-2 checkpoint uses GPT-2's
    tokenizer = meta.get("tokenizer", "gpt2") if ck.format.startswith("gptcore") else "gpt2"
    T = args.context_length or mc.context_length
    if T > mc.context_length:
        raise UsageError(f"--context-length {T} exceeds the model's {mc.context_length}")
    refuse_if_too_big(f"--batch-size {args.batch_size} x context {T} (fp32 logits over {mc.vocab_size} tokens)",
                      2 * 4 * args.batch_size * T * mc.vocab_size, device, "lower --batch-size")
    model = build_model(mc, ck.state_dict, backend=args.backend, dtype=torch.float32, device=device,
                        source=str(ck.path))  # fp32 weights; --dtype autocasts
    tcfg = meta.get("train_config", {})
    if args.file is not None:
        if not Path(args.file).is_file():
            raise DataError(f"{args.file} not found (give a text file)")
        text = Source(args.file).read(args.data_errors)
        ids = get_encoding(tokenizer).encode(text, allowed_special={ENDOFTEXT})
        source, split, stride, matches = args.file, "whole file", args.stride, None
    else:
        spec = args.data or meta.get("data") or "default"
        data = prepare(spec, tokenizer=tokenizer,
                       val_fraction=tcfg.get("val_fraction", 0.1), errors=args.data_errors, progress=False)
        ids = data.splits[args.split]
        source, split, stride, matches = spec, args.split, None, data.hash == meta.get("data_hash")
        if len(ids) < 2:
            raise DataError(f"the {split} split of {spec} holds {len(ids)} tokens: nothing to score")
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    res = evaluate_tokens(model, ids, args.context_length, stride, args.batch_size, dtype,
                          progress=not args.no_progress)
    out = {"checkpoint": str(ck.path), "step": meta.get("step"), "source": source, "split": split,
           "data_matches_checkpoint": matches, **res}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['checkpoint']} (step {out['step']}) on {source} [{split}]: {res['tokens']:,} tokens scored, "
              f"context {res['context_length']}, stride {res['stride']}")
        print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.2f}  accuracy {100 * res['accuracy']:.2f}%")
        if matches is False:
            print("note: this data differs from the checkpoint's training data (manifest hash)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
