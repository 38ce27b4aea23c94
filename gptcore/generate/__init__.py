"""Text generation: ``Generator`` (KV cache, CUDA-graph decode and prefill) and ``generate``.

    from gptcore.generate import generate, Generator
    new = generate(model, [[464, 2068, 7586], [40]], max_new_tokens=20, temperature=0)  # greedy

Modules: sampling (device-side sampling and one call's request), generator (the Generator), cli
(``python -m gptcore.generate``; ``main`` here is its entry point).
"""
from gptcore.generate.cli import main
from gptcore.generate.generator import Generator, generate
from gptcore.generate.sampling import filter_logits, sample

__all__ = ["Generator", "generate", "filter_logits", "sample", "main"]
