"""``python -m gptcore.serve``: an OpenAI-compatible HTTP server for a gptcore model.

    python -m gptcore.serve --preset tiny --port 8000                 # random weights (testing)
    python -m gptcore.serve --ckpt out/run1 --host 0.0.0.0 --port 8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "tiny", "prompt": "Hello", "max_tokens": 16, "temperature": 0}'

SIGTERM (or Ctrl-C) stops accepting connections, lets running requests finish, then exits.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from gptcore.config import PRESETS
    from gptcore.ops import BACKENDS

    p = argparse.ArgumentParser(
        prog="python -m gptcore.serve",
        description="Serve a gptcore GPT model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics) with continuous batching "
                    "over a paged KV cache.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", metavar="PATH",
                     help="checkpoint to load, any format python -m gptcore.inspect_ckpt reads (a gptcore checkpoint "
                          "or run directory, a Hugging Face GPT-2 folder, nanoGPT ckpt.pt, ...)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="build this preset with random weights (seed --seed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the preset or checkpoint name)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights and KV-cache dtype (default: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="kernels: reference, torch or triton (default: the fastest that runs on the device)")
    p.add_argument("--max-batch", type=int, default=64, help="sequences decoded together at most (default 64)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV-cache blocks (default: enough for --max-batch sequences of the full context)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block, a power of two (default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for admission; beyond it requests get HTTP 503 (default 256)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per engine step, interleaved with decoding (default 256)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="positions per sequence (prompt + output), at most the model's context (default: context)")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="decode and prefill eagerly even on CUDA (no graphs captured at start-up)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of --preset's random weights and of unseeded sampling (default 0)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")
    return p


def build_engine(args):
    import torch

    from gptcore.config import GPTConfig
    from gptcore.model import GPT
    from gptcore.ops import default_backend
    from gptcore.serve.engine import Engine
    from gptcore.tokenizer import get_encoding

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if args.ckpt:
        from gptcore.io import load_model

        model = load_model(args.ckpt, device=device, backend=args.backend)
        name = args.model_name or os.path.basename(os.path.normpath(args.ckpt))
    else:
        torch.manual_seed(args.seed)
        model = GPT(GPTConfig.from_preset(args.preset), backend=args.backend or default_backend(device))
        name = args.model_name or args.preset
    model = model.to(device=device, dtype=dtype).eval()
    tok = get_encoding("gpt2") if model.config.vocab_size >= 50257 else None
    engine = Engine(model, tokenizer=tok, block_size=args.block_size, num_blocks=args.num_blocks,
                    max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                    max_seq_len=args.max_seq_len, cuda_graphs=not args.no_cuda_graph, seed=args.seed)
    engine.capture_graphs()   # CUDA: every decode and prefill bucket before the first request (else nothing)
    # everything built so far lives as long as the server: keep it out of the cyclic collector's
    # scans, whose full passes would otherwise pause the engine thread (inter-token latency spikes)
    gc.collect()
    gc.freeze()
    return engine, name


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError as e:
        raise SystemExit(f"the server needs fastapi and uvicorn ({e}): pip install 'gptcore[serve]'")
    from contextlib import asynccontextmanager

    from gptcore.serve.api import create_app

    try:
        engine, name = build_engine(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    app = create_app(engine, name)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop(drain=True)   # uvicorn has already waited for open responses

    app.router.lifespan_context = lifespan
    print(f"serving {name!r} ({engine.num_blocks} KV blocks of {engine.block_size} tokens, batch "
          f"<= {engine.max_batch}, {engine.device}) on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    server = _server_class(uvicorn)(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    server.run()
    return 0


def _server_class(uvicorn):
    """uvicorn's Server, except that after a SIGTERM/SIGINT drain it exits with status 0 instead of
    re-raising the signal (uvicorn's default), so a supervisor sees a clean shutdown."""
    import contextlib
    import signal

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            sigs = (signal.SIGINT, signal.SIGTERM)
            prev = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in prev.items():
                    signal.signal(s, h)

    return Server


if __name__ == "__main__":
    sys.exit(main())
