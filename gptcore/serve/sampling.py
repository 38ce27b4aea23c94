"""Per-request sampling settings and the batched token pick of the serving engine.

    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, stop=["\\n\\n"], seed=1)
    params.validate(vocab_size=50257, context_length=1024, can_decode_text=True)   # ParamError

Every running sequence carries its own settings; one engine step picks the next token of every
row of a (B, V) logits tensor at once, on the device, without a host sync (``pick``):
  0. a batch of only greedy rows without penalties or logprobs (the common serving case) is one
     argmax over the logits as they are;
  1. presence / frequency penalties (OpenAI's definition): logit -= presence * [count > 0]
     + frequency * count, over the tokens this sequence generated so far (the engine keeps one
     count row per batch slot on the device; the penalty is one vectorised pass over all rows);
  2. logprobs (when asked): log-softmax of those logits, the raw model distribution, before
     temperature and filtering (what OpenAI and vLLM report);
  3. temperature 0 rows: argmax. Other rows: logits / temperature, top-k / top-p filtered by
     gptcore.generate.filter_logits, then the exponential race argmax(score - log E), E ~ Exp(1),
     drawn from the sequence's own torch.Generator when it has a seed (so a seeded request gives
     the same tokens whatever else runs beside it, and the same tokens as offline
     gptcore.generate with that seed), else from the engine's generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from gptcore.generate.sampling import _argmax, filter_logits

MAX_LOGPROBS = 20  # top alternatives one token may report (OpenAI's chat limit)


class ParamError(ValueError):
    """A bad request setting; ``field`` names it (the HTTP layer answers 400 with it as ``param``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class SamplingParams:
    """How one request samples and when it stops (see the module doc).

    top_k None = off; top_p 1.0 = off; stop: strings that end the text (not included in it);
    stop_token_ids: token ids that end it (not included); the engine's eos token also ends it
    unless ignore_eos; logprobs None = none, k >= 0 = the chosen token's logprob and the k most
    likely alternatives; n completions per prompt (choice j samples with seed + j).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    seed: Optional[int] = None
    n: int = 1
    logprobs: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False

    def validate(self, vocab_size: int, can_decode_text: bool = True) -> "SamplingParams":
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ParamError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not is_num(self.temperature) or not 0 <= self.temperature <= 100:
            raise ParamError("temperature", f"must be a number in [0, 100] (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ParamError("top_k", f"must be a positive integer (or null/-1 for no limit), got {self.top_k!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ParamError("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        stops = list(self.stop)
        if len(stops) > 16 or any(not isinstance(s, str) or not s for s in stops):
            raise ParamError("stop", "must be at most 16 non-empty strings")
        if stops and not can_decode_text:
            raise ParamError("stop", "stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        if any(not is_int(t) or not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ParamError("stop_token_ids", f"must be token ids in [0, {vocab_size})")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 63):
            raise ParamError("seed", f"must be a non-negative integer, got {self.seed!r}")
        if not is_int(self.n) or not 1 <= self.n <= 16:
            raise ParamError("n", f"must be an integer in [1, 16], got {self.n!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ParamError("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                raise ParamError(name, f"must be a number in [-2, 2], got {v!r}")
        self.stop = tuple(stops)
        self.stop_token_ids = tuple(self.stop_token_ids)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class Pick:
    """One step's result for R rows, on the device (the engine copies it to the host without
    waiting): tokens (R,) long; with logprobs, the chosen token's logprob (R,) and the top-k
    alternatives (R, k) values / ids, k the largest any row asked for."""

    tokens: torch.Tensor
    logprobs: Optional[torch.Tensor] = None
    top_v: Optional[torch.Tensor] = None
    top_i: Optional[torch.Tensor] = None


def _put_default(device):
    return lambda rows, dtype=torch.long: torch.tensor(rows, dtype=dtype, device=device)


def pick(logits: torch.Tensor, params: Sequence[SamplingParams], rngs: Sequence[Optional[torch.Generator]],
         counts: Optional[torch.Tensor], shared_rng: torch.Generator, put: Optional[Callable] = None) -> Pick:
    """Next token of each row of logits (R, V) under each row's settings, on the device (no sync).

    counts: (R, V) float32 tokens generated so far per row (needed when a row is penalized);
    rngs[b]: the row's own generator (seeded requests) or None (draws from shared_rng);
    put(list, dtype) -> device tensor: how host numbers reach the device (the engine's pinned
    stage; default torch.tensor on the device, which synchronises on CUDA).
    """
    R, V = logits.shape
    put = put or _put_default(logits.device)
    if all(p.greedy and not p.penalized and p.logprobs is None for p in params):
        return Pick(_argmax(logits))        # argmax of bf16 == argmax of its exact fp32 widening
    logits = logits.float()
    if any(p.penalized for p in params):
        # one vectorised pass over every row (rows without penalties subtract exact zeros)
        pen = put([[p.presence_penalty for p in params], [p.frequency_penalty for p in params]], torch.float32)
        logits = logits - (pen[0][:, None] * (counts > 0).float() + pen[1][:, None] * counts)
    greedy = [b for b, p in enumerate(params) if p.greedy]
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if not sampled:
        out = _argmax(logits)
    else:
        out = torch.empty(R, dtype=torch.long, device=logits.device)
        if greedy:
            gi = put(greedy)
            out[gi] = _argmax(logits.index_select(0, gi))
        si = put(sampled) if greedy else None
        temps = put([params[b].temperature for b in sampled], torch.float32)
        scores = (logits if si is None else logits.index_select(0, si)) / temps[:, None]
        # rows with the same filter settings are filtered together, by the offline generator's code
        groups: dict[tuple, list[int]] = {}
        for r, b in enumerate(sampled):
            groups.setdefault((params[b].top_k, params[b].top_p), []).append(r)
        for (k, p), rows in groups.items():
            if k is None and p >= 1.0:
                continue
            if len(rows) == len(sampled):
                scores = filter_logits(scores, k, p)
            else:
                ri = put(rows)
                scores[ri] = filter_logits(scores.index_select(0, ri), k, p)
        noise = torch.empty_like(scores)
        if all(rngs[b] is None for b in sampled):
            noise.exponential_(generator=shared_rng)
        else:
            for r, b in enumerate(sampled):
                noise[r].exponential_(generator=rngs[b] if rngs[b] is not None else shared_rng)
        pick_s = _argmax(scores - noise.clamp_min(torch.finfo(torch.float32).tiny).log())
        if si is None:
            out = pick_s
        else:
            out[si] = pick_s
    want = [p.logprobs for p in params if p.logprobs is not None]
    if not want:
        return Pick(out)
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(1, out[:, None])[:, 0]
    k = max(want)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], out[:, None][:, :0])
    return Pick(out, chosen, top_v, top_i)
