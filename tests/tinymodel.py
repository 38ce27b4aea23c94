"""The tiny test model the generation tests share (generate, beam search, serve, fused decode).

A random GPT-2 with tied embeddings mostly repeats its input token, which would make token-equality
tests too easy; this one is untied and its matrices are scaled by 3, so greedy tokens vary and
near-ties are rare.
"""
import torch

from gptcore import GPT, GPTConfig


def spread_tiny(vocab_size: int, seed: int = 0, backend: str = "torch", **cfg) -> GPT:
    """The "tiny" preset, untied, with every 2-D weight scaled by 3; in eval mode, on the CPU."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig.from_preset("tiny", vocab_size=vocab_size, tie_weights=False, **cfg), backend=backend)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return m.eval()
