"""What one generate() call asks for, checked: sampling on the device (filter_logits, sample: the
exponential race, no host sync), the prompts, stop tokens, and the streamer that hands tokens over
one step late."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

Prompts = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]
StreamFn = Callable[[int, int], None]  # (sequence index, token id)


# ---- sampling ---------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """logits (B, V) with disallowed tokens set to -inf.

    top_k keeps the k largest logits (ties with the k-th are kept too); top_p keeps the smallest
    set of most likely tokens whose probability reaches top_p (the most likely token always stays).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs   # mass of the more likely tokens
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    return logits


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, noise: Optional[torch.Tensor] = None,
           pick: Optional[Callable] = None) -> torch.Tensor:
    """Next token (B,) int64 from logits (B, V), on the logits' device, without a host sync.

    temperature 0 is greedy (argmax). Otherwise the filtered, tempered logits are sampled by the
    exponential race: argmax_i(logit_i - log E_i) with E_i ~ Exp(1) i.i.d. (``noise``, (B, V)
    float32) picks token i with probability softmax(logits)_i, and never a filtered token.
    pick: the (B, V) -> (B,) argmax to use (the model backend's ``ops.token_pick``; default torch's).
    """
    pick = pick or _argmax
    if temperature == 0:
        return pick(logits)
    if noise is None:
        raise ValueError("sample: temperature > 0 needs noise, a (B, V) tensor of Exp(1) draws")
    scores = filter_logits(logits.float() / temperature, top_k, top_p)
    return pick(scores - noise.clamp_min(torch.finfo(torch.float32).tiny).log())


def _argmax(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(dim=-1)


def _check_sampling(temperature, top_k, top_p, max_new_tokens):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _as_prompt_lists(prompts: Prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompts tensor must be (B, T) or (T,) integer token ids, got "
                             f"{tuple(prompts.shape)} {prompts.dtype}")
        return prompts.tolist()
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    out = [[int(t) for t in p] for p in prompts]
    if not out:
        raise ValueError("generate: no prompts given")
    return out


# ---- streaming --------------------------------------------------------------------------------
class _Streamer:
    """Hands each step's tokens to ``fn(seq, token)`` one step late, so the GPU queue never drains.

    A step's tokens are copied to pinned host memory behind a CUDA event; they are delivered when
    the next step has been queued (or at the end). A sequence's tokens stop after its stop token.
    """

    def __init__(self, fn: StreamFn, device: torch.device, stop: set[int]):
        self.fn, self.device, self.stop = fn, device, stop
        self.pending = None
        self.finished: set[int] = set()

    def push(self, rows: list[int], tok: torch.Tensor) -> None:
        if self.device.type == "cuda":
            host = torch.empty(tok.shape, dtype=tok.dtype, pin_memory=True)
            host.copy_(tok, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = tok.clone(), None
        self.flush()
        self.pending = (list(rows), host, event)

    def flush(self) -> None:
        if self.pending is None:
            return
        rows, host, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        for seq, t in zip(rows, host.view(-1).tolist()):
            if seq in self.finished:
                continue
            self.fn(seq, t)
            if t in self.stop:
                self.finished.add(seq)


# ---- one call ---------------------------------------------------------------------------------
@dataclass
class _Request:
    """One generate() call, validated."""

    prompts: list[list[int]]
    new_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    stops: list[int]
    rng: torch.Generator
    stream: Optional[StreamFn]

    @property
    def lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def sampling(self) -> tuple:
        return (self.temperature, self.top_k, self.top_p)

    def sample(self, logits: torch.Tensor, noise: Optional[torch.Tensor], pick=None) -> torch.Tensor:
        return sample(logits, self.temperature, self.top_k, self.top_p, noise, pick)

    def streamer(self, device: torch.device) -> Optional["_Streamer"]:
        return _Streamer(self.stream, device, set(self.stops)) if self.stream else None
