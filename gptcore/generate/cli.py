"""python -m gptcore.generate: text from a checkpoint (any format gptcore.io reads) or a preset.

CLI (``python -m gptcore.generate --help`` explains every flag):
    python -m gptcore.generate --preset tiny --prompt "Hello" --max-new-tokens 20
    python -m gptcore.generate --ckpt out --prompt "Once upon a time" --stream --top-k 50   # a run dir: its latest
    python -m gptcore.generate --ckpt ~/models/gpt2 --prompt "Hello"    # any checkpoint inspect_ckpt reads
    python -m gptcore.generate --preset tiny --prompt-ids 1,2,3 --num-beams 4 --max-new-tokens 8
    python -m gptcore.generate --ckpt BASE --adapter out-sft/adapter --prompt "..."   # a LoRA adapter, unmerged
"""
from __future__ import annotations

import argparse
import codecs
import sys

import torch

from gptcore.generate.generator import Generator
from gptcore.generate.sampling import StreamFn


# ---- CLI --------------------------------------------------------------------------------------
def _tokenizer():
    from gptcore.tokenizer import get_encoding

    return get_encoding("gpt2")


def _print_stream(enc) -> StreamFn:
    """A stream callback printing each token as it comes (bytes of a split UTF-8 character wait)."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(seq: int, tok: int) -> None:
        text = utf8.decode(enc.decode_single_token_bytes(tok)) if enc is not None else f" {tok}"
        print(text, end="", flush=True)

    return show


def _parse_args(argv=None):
    from gptcore.config import PRESETS
    from gptcore.ops import BACKENDS, default_backend

    p = argparse.ArgumentParser(
        prog="python -m gptcore.generate",
        description="Generate text with a gptcore GPT model and its KV cache; prints each completion "
                    "and the speed (new tokens/s) at the end.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="PATH",
                     help="checkpoint to load, any format python -m gptcore.inspect_ckpt reads: a gptcore checkpoint "
                          "or run directory (its latest), a Hugging Face GPT-2 folder, nanoGPT ckpt.pt, "
                          "LLMs-from-scratch .pth, a bare state_dict (gptcore.io.load_model)")
    src.add_argument("--preset", choices=sorted(PRESETS),
                     help="build this preset with random weights (seeded by --seed), e.g. to measure speed")
    p.add_argument("--config", metavar="PRESET|JSON", default=None,
                   help="with --ckpt: the model config of weights that carry none (LLMs-from-scratch .pth, bare "
                        "state_dict) and have no JSON beside them; a preset name, JSON file or inline JSON")
    p.add_argument("--trust-pickle", action="store_true",
                   help="with --ckpt: allow full unpickling of a .pt/.pth/.bin that a weights-only load refuses; "
                        "this can run code stored in the file: use only for files you trust")
    p.add_argument("--adapter", metavar="DIR",
                   help="a LoRA adapter folder (adapter_config.json + adapter_model.safetensors, as gptcore.finetune "
                        "or HF PEFT writes it) to run on top of the model, unmerged")
    p.add_argument("--adapter-any-base", action="store_true",
                   help="apply --adapter even if its recorded base weights differ from this model's (same "
                        "architecture); without it that is an error")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text; repeat the flag for several prompts, which run as one batch")
    p.add_argument("--prompt-file", action="append", default=[], metavar="PATH",
                   help="read a prompt from a file (the whole file is one prompt; repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 464,2068 (repeatable; no tokenizer needed)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate per sequence (default 50)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature; 0 = greedy (always the most likely token). Default 1.0")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only among the most likely tokens whose probabilities sum to p (nucleus)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling (and for --preset's random weights, default 0): same seed, same output")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt, all in one batch (default 1)")
    p.add_argument("--stop-token", type=int, action="append", default=[], metavar="ID",
                   help="end a sequence once it emits this token id, e.g. 50256 = <|endoftext|> (repeatable)")
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam search with this many beams (1 = off): prints each prompt's best beam and its "
                        "log-probability; sampling flags do not apply, --stop-token ends a beam")
    p.add_argument("--stream", action="store_true",
                   help="print tokens as they are generated (one sequence: one prompt, --num-samples 1)")
    p.add_argument("--no-cache", action="store_true",
                   help="no KV cache: recompute the whole sequence for every token (the slow reference)")
    p.add_argument("--paged", action="store_true", help="use the paged KV cache (blocks from a free list)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block of the paged cache (default 16)")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly even on CUDA")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help=f"kernels to run: reference, torch or triton (default here: {default_backend()})")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights and KV-cache dtype (default: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    from gptcore.cli import add_debug_flag

    add_debug_flag(p)
    args = p.parse_args(argv)
    if not (args.prompt or args.prompt_file or args.prompt_ids):
        p.error("give at least one prompt: --prompt TEXT, --prompt-file PATH or --prompt-ids IDS")
    if args.num_samples < 1:
        p.error("--num-samples must be >= 1")
    if args.num_beams < 1:
        p.error("--num-beams must be >= 1")
    if (args.config or args.trust_pickle) and not args.ckpt:
        p.error("--config and --trust-pickle apply to --ckpt")
    if args.num_beams > 1 and (args.stream or args.no_cache or args.num_samples > 1):
        p.error("--num-beams runs one cached beam search per prompt: leave out --stream, --no-cache, --num-samples")
    return args


def _check_args(args) -> None:
    """Every numeric flag in range before anything is loaded (UsageError names the flag)."""
    from gptcore.cli import MAX_SEED, UsageError, check_finite, check_int_range

    check_int_range("--max-new-tokens", args.max_new_tokens, 1, 1 << 24)
    check_int_range("--num-samples", args.num_samples, 1, 1 << 16)
    check_int_range("--block-size", args.block_size, 1, 1 << 16)
    if args.block_size != 16 and not args.paged:
        raise UsageError("--block-size sets the paged cache's block: add --paged, or drop --block-size")
    if args.paged and args.no_cache:
        raise UsageError("--paged chooses the KV cache's layout and --no-cache runs without one: give one of them")
    check_finite("--temperature", args.temperature, low=0.0, high=1e4)
    if args.top_k is not None:
        check_int_range("--top-k", args.top_k, 1)
    if args.top_p is not None:
        check_finite("--top-p", args.top_p, low=0.0, high=1.0, low_open=True)
    if args.seed is not None:
        check_int_range("--seed", args.seed, 0, MAX_SEED)
    for t in args.stop_token:
        check_int_range("--stop-token", t, 0, 1 << 31)


def _read_prompt_file(path: str) -> str:
    from gptcore.cli import UsageError

    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 26)
    except OSError as e:
        raise UsageError(f"--prompt-file {path}: cannot be read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompt-file {path} is not UTF-8 text (byte {e.start}); convert it "
                         f"(e.g. iconv -t utf-8) or pass token ids with --prompt-ids") from None


def main(argv=None) -> int:
    """Exit status: 0 generated; 2 bad flags, prompt or checkpoint, or a request that cannot fit
    (one line; --debug for the traceback); 130 / 143 stopped by Ctrl-C / SIGTERM."""
    from gptcore.cli import run_cli

    return run_cli("gptcore.generate", _main, argv)


def _main(argv) -> int:
    from gptcore.cli import UsageError, check_backend, check_device, refuse_if_too_big

    args = _parse_args(argv)
    _check_args(args)
    device = str(check_device(args.device or "auto"))
    check_backend(args.backend)
    if args.dtype is None:
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    from gptcore.config import GPTConfig
    from gptcore.model import GPT
    from gptcore.ops import default_backend

    texts = list(args.prompt) + [_read_prompt_file(f) for f in args.prompt_file]
    enc = _tokenizer() if texts or not args.prompt_ids else None
    prompts = [enc.encode(t, allowed_special={"<|endoftext|>"}) for t in texts]
    for ids in args.prompt_ids:
        try:
            prompts.append([int(x) for x in ids.split(",") if x.strip()])
        except ValueError:
            raise UsageError(f"--prompt-ids {ids!r}: expected comma-separated integers") from None
    batch = [p for p in prompts for _ in range(args.num_samples)]
    if args.stream and len(batch) != 1:
        raise UsageError("--stream prints one sequence: give one prompt and --num-samples 1")

    if args.ckpt:
        from gptcore.io import load_model

        model = load_model(args.ckpt, device=device, backend=args.backend, config=args.config,
                           trust_pickle=args.trust_pickle)
    else:
        cfg = GPTConfig.from_preset(args.preset)
        n = cfg.vocab_size * cfg.emb_dim + cfg.n_layers * (4 + 2 * cfg.ff_mult) * cfg.emb_dim ** 2
        refuse_if_too_big(f"--preset {args.preset} ({n / 1e6:,.0f}M parameters)", n * 4, device,
                          "pick a smaller --preset")
        torch.manual_seed(0 if args.seed is None else args.seed)
        model = GPT(cfg, backend=args.backend or default_backend(device))
    if args.adapter:
        from gptcore.lora import LoRAError, load_adapter

        try:
            load_adapter(model, args.adapter, allow_other_base=args.adapter_any_base)
        except LoRAError as e:
            raise UsageError(f"--adapter: {e}") from None
    model = model.to(device=device, dtype=dtype).eval()
    cfg = model.config
    longest = max(len(p) for p in batch)
    if longest + args.max_new_tokens > cfg.context_length:
        raise UsageError(f"the longest prompt ({longest} tokens) + --max-new-tokens {args.max_new_tokens} = "
                         f"{longest + args.max_new_tokens} positions, more than the model's context_length "
                         f"{cfg.context_length}; ask for at most {max(0, cfg.context_length - longest)} new tokens "
                         f"or shorten the prompt")
    kv = 2 * cfg.n_layers * cfg.emb_dim * torch.finfo(dtype).bits // 8  # bytes a token
    refuse_if_too_big(f"{len(batch)} sequences x {longest + args.max_new_tokens} positions of KV cache",
                      len(batch) * (longest + args.max_new_tokens) * kv, device, "lower --num-samples or "
                      "--max-new-tokens, or give fewer prompts")

    def show(ids):
        return enc.decode(ids) if enc is not None else " ".join(map(str, ids))

    if args.stream:
        print(show(batch[0]), end="", flush=True)
    stream = _print_stream(enc) if args.stream else None
    gen = Generator(model, paged=args.paged, block_size=args.block_size, cuda_graph=not args.no_cuda_graph)
    if args.num_beams > 1:
        for i, p in enumerate(batch):
            try:
                toks, score = gen.beam_search(p, args.max_new_tokens, args.num_beams, stop_tokens=args.stop_token)
            except ValueError as e:
                raise SystemExit(f"error: {e}")
            print(f"--- prompt {i}: best of {args.num_beams} beams, log-probability {score:.3f}")
            print(show(p) + show(toks) if enc is not None else f"{show(p)} | {show(toks)}")
        return 0
    try:
        new = gen.generate(batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, stop_tokens=args.stop_token, seed=args.seed,
                           use_cache=not args.no_cache, stream=stream)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.stream:
        print()
    else:
        for i, (p, n) in enumerate(zip(batch, new)):
            print(f"--- sample {i} (prompt {i // args.num_samples})")
            print(show(p) + show(n) if enc is not None else f"{show(p)} | {show(n)}")
    s = gen.stats
    kv = f"{s['cache']} KV cache, {s['kv_bytes_per_token'] / 1024:.1f} KiB/token" if s["cache"] else "no KV cache"
    print(f"{s['new_tokens']} new tokens in {s['seconds']:.3f} s: {s['tokens_per_s']:.1f} tokens/s "
          f"(prefill {s['prefill_ms']:.1f} ms, {s['decode_ms_per_step']:.2f} ms/step; batch {s['batch']}; "
          f"decode: {s['decode_mode']}; {kv}; {model.backend} backend, {dtype}, {device})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
