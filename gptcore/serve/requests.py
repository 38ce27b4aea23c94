"""Requests, their choices and what they hand out: the serving engine's host-side bookkeeping.

    req = Request(rid, prompt_ids, params, on_event, reserve=blocks)
    seq = Seq(req, index=0)               # one choice: tokens, blocks, incremental text
    seq.add_text(tokenizer, token)        # detokenise one token; hit_stop / holdback decide the cut

Events (``Event``) carry, per choice, the tokens and text new since the previous event; text is
held back while it may be the start of a stop string or of a split UTF-8 character.
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import Callable, Optional

from gptcore.serve.sampling import SamplingParams


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True)
class Event:
    """What one request produced in one step, for one of its choices (``index``).

    tokens / text: new since the previous event (text held back while it may be the start of a
    stop string or of a split UTF-8 character); finish_reason set on the choice's last event;
    ``done`` on the request's very last event (every choice finished).
    """

    request_id: int
    index: int
    tokens: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: Optional[str] = None
    done: bool = False
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


EventFn = Callable[[Event], None]


class Seq:
    """One completion (choice) of a request: its tokens, blocks and text state.

    ``length`` counts the tokens whose keys/values the launched forwards write (so it runs one
    step ahead of ``tokens`` while a step is in flight); ``inflight`` the sampled tokens of
    launched steps the host has not read yet.
    """

    def __init__(self, req: "Request", index: int, device):
        import torch

        self.req, self.index = req, index
        self.tokens: list[int] = []
        self.blocks: list[int] = []
        self.length = 0
        self.slot = -1
        self.inflight = 0
        p = req.params
        self.rng = None
        if p.seed is not None and not p.greedy:
            self.rng = torch.Generator(device=device)
            self.rng.manual_seed(p.seed + index)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0                   # characters of text already handed out
        self.pending_tokens: list[int] = []
        self.pending_lp: list[TokenLogprob] = []
        self.finish: Optional[str] = None
        self.finish_sent = False
        self.cut_by_stop = False        # the text ends where a stop string began

    def hit_stop(self) -> bool:
        """Cut the text at the first stop string (searching only the part not handed out yet)."""
        stops = self.req.params.stop
        longest = max(len(x) for x in stops)
        lo = max(0, self.sent - longest)
        cut = min((i for i in (self.text.find(x, lo) for x in stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return True
        return False

    def holdback(self) -> int:
        """Characters at the end of the text that may begin a stop string (not handed out yet)."""
        h = 0
        if self.text.endswith("\ufffd"):
            h = 1  # a replacement char may be an incomplete UTF-8 sequence still resolving
        for x in self.req.params.stop:
            for n in range(min(len(x) - 1, len(self.text)), 0, -1):
                if self.text.endswith(x[:n]):
                    h = max(h, n)
                    break
        return h

    def take_text(self) -> str:
        """The text to hand out now (all of it once the choice has finished)."""
        if self.finish is None:
            end = len(self.text) - self.holdback()
        else:
            if not self.cut_by_stop:
                self.text += self.utf8.decode(b"", final=True)   # an incomplete UTF-8 tail becomes U+FFFD
            end = len(self.text)
        text = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return text


class Request:
    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, on_event: EventFn, reserve: int):
        self.id, self.prompt, self.params, self.on_event = rid, prompt, params, on_event
        self.reserve = reserve
        self.prefilled = 0
        self.seqs: list[Seq] = []
        self.arrival = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.done = False
