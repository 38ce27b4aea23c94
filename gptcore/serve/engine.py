"""The serving engine: continuous batching over a paged KV cache, one iteration at a time.

    engine = Engine(model, tokenizer=get_encoding("gpt2"), num_blocks=1024, max_batch=64)
    rid = engine.submit(prompt_ids, SamplingParams(max_tokens=32), on_event)  # any thread
    engine.start()          # a background thread runs step() while there is work
    engine.cancel(rid)      # any thread: its blocks are freed at the next step
    engine.stop(drain=True) # refuse new requests, finish the accepted ones, join the thread
    outs = engine.generate([[464, 2068], [40]], SamplingParams(max_tokens=8, temperature=0))  # offline

One step (``step``), the scheduler's iteration:
  1. cancellations are applied (blocks back to the free list at once);
  2. waiting requests are admitted in arrival order while the block budget and the batch slots
     allow: a request reserves n * ceil((prompt + max_tokens) / block_size) blocks, the most it
     can ever hold, so a running request never runs out of blocks and nothing needs to be
     preempted; blocks themselves are taken from the free list only as tokens arrive, and the
     utilisation metric counts those;
  3. launch: one decode forward over every decoding sequence, (B, 1) tokens, each at its own
     position, its input token read on the device from the previous step's sample (on CUDA
     replayed from a CUDA graph captured per batch-size bucket, padding rows writing into a
     scratch block; elsewhere eager); then up to ``prefill_chunk`` prompt tokens of the admitted
     requests, oldest first (the oldest chunked when it does not fit, the others only whole),
     every first chunk of the step in one right-padded forward (on CUDA replayed from a graph
     of its (rows, tokens) bucket), a later chunk attending to its earlier ones through the
     cache (eager); then one batched sampling pass over all rows
     (gptcore.serve.sampling.pick) whose tokens go to the device's last-token buffer and, by one
     non-blocking copy, to the host;
  4. while the device runs that, the host reads the *previous* step's tokens (one wait on its
     copy, normally already done) and does the per-token work: stop tokens, stop strings,
     max_tokens, text, events; a finished request returns its blocks and its reservation.
So the host's bookkeeping overlaps the device's forward instead of following it, requests join
and leave the running batch at every step, and a long prompt is spread over several steps
instead of stalling the running streams. A sequence that turns out to have stopped (a stop token
seen one step late) has computed one token too many; it is dropped, its blocks are already free
(the device runs the freed blocks' next owner after the dropped step, in stream order).
Sequences that reach max_tokens are never launched past it.

Queue: at most ``max_queue`` requests wait for admission; ``submit`` beyond that raises
``EngineFull`` (the HTTP layer answers 503), as does a request whose reservation exceeds the
whole cache (``ParamError``, 400). Every request ends with exactly one final event
(finish_reason "stop", "length", "cancelled" or "error"), after which it holds no block:
``free_blocks() == num_blocks`` whenever nothing runs (the tests assert it).

Modules: this one schedules (queue, admission, prefill plan, which rows decode, stops, events);
gptcore.serve.runner runs the device side of a step (prefill / decode forwards, graphs, sampling,
the copy to the host); gptcore.serve.paged holds the block pool, device block table, pinned stage,
the model's cache view and the decode graphs; gptcore.serve.requests the requests, choices, text
and events; gptcore.serve.sampling the parameters and the batched pick.
"""
from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from typing import Optional, Sequence

import torch

from gptcore.serve.requests import Event, EventFn, Request, Seq, TokenLogprob
from gptcore.serve.runner import Launched, ModelRunner
from gptcore.serve.sampling import ParamError, SamplingParams

__all__ = ["Engine", "EngineFull", "Event", "TokenLogprob"]


class EngineFull(RuntimeError):
    """The waiting queue is full (or the engine is draining): try again later."""


class Engine:
    """Continuous-batching generation for one model (see the module doc).

    num_blocks:    KV blocks of block_size tokens (default: enough for max_batch sequences of
                   max_seq_len); max_batch: sequences decoding at once; max_queue: requests
                   waiting for admission before submit refuses; prefill_chunk: prompt tokens
                   prefilled per step (the rest waits for the next steps); cuda_graphs: replay
                   the decode step from graphs captured for batch buckets 1, 2, 4, ... max_batch
                   and first-chunk prefill groups from graphs of (rows, tokens) buckets.
    tokenizer:     a tiktoken-like Encoding (decode_single_token_bytes) for text and stop strings;
                   eos_token_id ends a sequence unless a request sets ignore_eos (default 50256
                   when the vocabulary has it).
    """

    def __init__(self, model, *, tokenizer=None, block_size: int = 16, num_blocks: Optional[int] = None,
                 max_batch: int = 32, max_queue: int = 256, prefill_chunk: int = 256,
                 max_seq_len: Optional[int] = None, cuda_graphs: bool = True,
                 eos_token_id: Optional[int] = -1, seed: Optional[int] = None):
        cfg = model.config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = cfg.vocab_size
        self.eos = (50256 if cfg.vocab_size > 50256 else None) if eos_token_id == -1 else eos_token_id
        self.max_seq_len = min(cfg.context_length, max_seq_len or cfg.context_length)
        for name, v in (("block_size", block_size), ("max_batch", max_batch), ("max_queue", max_queue),
                        ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Engine: {name} must be a positive integer, got {v!r}")
        if block_size & (block_size - 1):
            raise ValueError(f"Engine: block_size must be a power of two, got {block_size}")
        self.block_size, self.max_batch, self.max_queue = block_size, max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self.max_blocks = -(-self.max_seq_len // block_size)
        self.num_blocks = num_blocks or max_batch * self.max_blocks
        self.runner = ModelRunner(model, block_size=block_size, num_blocks=self.num_blocks, max_batch=max_batch,
                                  max_seq_len=self.max_seq_len, prefill_chunk=prefill_chunk,
                                  cuda_graphs=cuda_graphs, seed=seed)
        self.pool = self.runner.pool
        self.device = self.runner.device
        self._launched: Optional[Launched] = None   # the step whose tokens the host reads next
        self._reserved = 0
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._inbox: deque[Request] = deque()
        self._cancels: set[int] = set()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._decoding: list[Seq] = []
        self._requests: dict[int, Request] = {}
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self._stop = False
        self.generated_tokens = 0         # output tokens since start (metrics)
        self.steps = 0
        self._rate = deque(maxlen=64)     # (time, tokens) per recent step, for tokens_per_s
        # host seconds per phase, summed over steps (bench.serve reports them per step):
        # schedule (intake, cancels, admission), prefill / decode / sample (launching the device
        # work), wait (the host blocked on the device's tokens), accept (the per-token host work)
        self.timings = dict.fromkeys(("schedule", "prefill", "decode", "sample", "wait", "accept"), 0.0)

    # ---- public, any thread ------------------------------------------------------------------
    def blocks_for(self, prompt_len: int, params: SamplingParams) -> int:
        return params.n * -(-(prompt_len + params.max_tokens) // self.block_size)

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise ParamError naming the field when this request can never run here."""
        params.validate(self.vocab_size, can_decode_text=self.tokenizer is not None)
        if not prompt:
            raise ParamError("prompt", "is empty; give at least one token")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in prompt):
            raise ParamError("prompt", f"token ids must be integers in [0, {self.vocab_size})")
        if len(prompt) >= self.max_seq_len:
            raise ParamError("prompt", f"has {len(prompt)} tokens; the context holds {self.max_seq_len} "
                                       f"positions, so at most {self.max_seq_len - 1} prompt tokens")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ParamError("max_tokens", f"{params.max_tokens} new tokens after a prompt of {len(prompt)} need "
                                           f"{len(prompt) + params.max_tokens} positions, more than the context "
                                           f"length {self.max_seq_len}; ask for at most "
                                           f"{self.max_seq_len - len(prompt)}")
        if self.blocks_for(len(prompt), params) > self.num_blocks:
            raise ParamError("n" if params.n > 1 else "max_tokens",
                             f"the request needs {self.blocks_for(len(prompt), params)} KV blocks, more than the "
                             f"{self.num_blocks} the server has; ask for fewer tokens or choices")
        if params.n > self.max_batch:
            raise ParamError("n", f"at most {self.max_batch} choices run at once here")

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_event: EventFn) -> int:
        """Queue a request; returns its id. Raises ParamError (bad request) or EngineFull."""
        prompt = list(prompt)
        self.check(prompt, params)
        with self._lock:
            if self._closing:
                raise EngineFull("the server is shutting down and takes no new requests")
            if len(self._inbox) + len(self._waiting) >= self.max_queue:
                raise EngineFull(f"the server is at capacity: {self.max_queue} requests are already waiting; "
                                 f"retry later")
            req = Request(next(self._ids), prompt, params, on_event, self.blocks_for(len(prompt), params))
            self._inbox.append(req)
            self._lock.notify_all()
            return req.id

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify_all()

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gptcore-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Refuse new requests; with drain finish the accepted ones (else cancel them); join."""
        with self._lock:
            self._closing = True
            if not drain:
                self._cancels.update(r.id for r in list(self._inbox) + list(self._requests.values()))
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def free_blocks(self) -> int:
        return len(self.pool.free)

    def stats(self) -> dict:
        """Queue depth, running requests, KV blocks, tokens/s (read without the lock: a snapshot)."""
        used = self.num_blocks - len(self.pool.free)
        live = sum(s.length for s in list(self._decoding)) + sum(
            r.prefilled for r in list(self._prefilling))
        rate = list(self._rate)
        tps = 0.0
        if len(rate) >= 2 and rate[-1][0] > rate[0][0]:
            tps = sum(n for _, n in rate[1:]) / (rate[-1][0] - rate[0][0])
        return {"waiting": len(self._inbox) + len(self._waiting), "prefilling": len(self._prefilling),
                "running": len({s.req.id for s in list(self._decoding)} | {r.id for r in list(self._prefilling)}),
                "blocks_total": self.num_blocks, "blocks_used": used, "blocks_free": len(self.pool.free),
                "blocks_reserved": self._reserved,
                "kv_utilization": live / (used * self.block_size) if used else 0.0,
                "tokens_per_s": tps, "generated_tokens": self.generated_tokens, "steps": self.steps,
                "decode_mode": self.graph_note, "prefill_mode": self.runner.prefill_note}

    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._prefilling or self._decoding or self._cancels
                    or self._launched is not None)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[dict]]:
        """Offline: run prompts to completion in this thread (engine not started); per prompt, per
        choice: {"tokens", "text", "finish_reason", "logprobs"}."""
        if self._thread is not None:
            raise RuntimeError("Engine.generate runs the engine in the calling thread; it is started already")
        results: dict[int, dict[int, dict]] = {}

        def collect(ev: Event):
            if ev.index < 0:
                return
            r = results.setdefault(ev.request_id, {}).setdefault(
                ev.index, {"tokens": [], "text": "", "finish_reason": None, "logprobs": []})
            r["tokens"] += ev.tokens
            r["text"] += ev.text
            r["logprobs"] += ev.logprobs
            if ev.finish_reason:
                r["finish_reason"] = ev.finish_reason

        ids = [self.submit(p, params, collect) for p in prompts]
        while self.has_work():
            self.step()
        return [[results[i][j] for j in sorted(results[i])] for i in ids]

    # ---- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.has_work() and not self._stop:
                    self._lock.wait(0.5)
                if self._stop and not self.has_work():
                    return
            self.step()

    @torch.no_grad()
    def step(self) -> None:
        """One scheduler iteration (see the module doc): launch this step, then read the last."""
        tm, t0 = self.timings, time.perf_counter()
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancels, self._cancels = self._cancels, set()
        for rid in cancels:
            req = self._requests.get(rid) or next((r for r in self._waiting if r.id == rid), None)
            if req is not None:
                self._finish_request(req, "cancelled")
        self._admit()
        self.runner.stage.next_step()
        t1 = time.perf_counter()
        tm["schedule"] += t1 - t0
        # decode first: the device runs it while the host launches the prefill forwards (an
        # eager forward's launches cost the host more than the graph replay costs the device)
        pre: list[tuple[list[Seq], torch.Tensor]] = []     # requests whose prompt completed now
        dec = None
        try:
            dec = self._decode_step()
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the engine
            self._fail(list({s.req.id: s.req for s in self._decoding}.values()), e)
        t2 = time.perf_counter()
        tm["decode"] += t2 - t1
        try:
            pre = self._prefill_step()
        except Exception as e:  # noqa: BLE001
            # the prefilling requests, and any whose prompt completed in this step before the fault
            decoding = {s.req.id for s in self._decoding}
            self._fail([r for r in self._requests.values() if r.seqs and r.id not in decoding], e)
        t3 = time.perf_counter()
        tm["prefill"] += t3 - t2
        launched = None
        ready = ([dec] if dec is not None else []) + pre
        if ready:
            seqs = [s for sq, _ in ready for s in sq]
            try:
                logits = ready[0][1] if len(ready) == 1 else torch.cat([lg for _, lg in ready])
                if any(s.slot < 0 for s in seqs):   # rows of a request ended in this step
                    keep = [b for b, s in enumerate(seqs) if s.slot >= 0]
                    seqs, logits = [seqs[b] for b in keep], logits.index_select(0, self.runner.stage.put(keep))
                launched = self.runner.sample(seqs, logits) if seqs else None
            except Exception as e:  # noqa: BLE001
                self._fail(list({s.req.id: s.req for s in seqs}.values()), e)
        # prefilled requests decode from the next step on (their first token is on the device)
        self._decoding.extend(s for sq, _ in pre for s in sq if s.finish is None and not s.req.done)
        t4 = time.perf_counter()
        tm["sample"] += t4 - t3
        prev, self._launched = self._launched, launched
        produced = 0
        if prev is not None:
            try:
                values = prev.read()                        # the step's one wait on the device
            except Exception as e:  # noqa: BLE001
                self._fail(list({s.req.id: s.req for s in prev.seqs}.values()), e)
                values = None
            t5 = time.perf_counter()
            tm["wait"] += t5 - t4
            if values is not None:
                try:
                    produced = self._accept(prev.seqs, values)
                except Exception as e:  # noqa: BLE001
                    self._fail(list({s.req.id: s.req for s in prev.seqs}.values()), e)
            tm["accept"] += time.perf_counter() - t5
        self.steps += 1
        self.generated_tokens += produced
        self._rate.append((time.perf_counter(), produced))

    def _fail(self, reqs: list[Request], e: Exception) -> None:
        msg = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        for r in reqs:
            self._finish_request(r, "error", error=msg)

    def _admit(self) -> None:
        running = len(self._decoding) + sum(r.params.n for r in self._prefilling)
        while self._waiting:
            req = self._waiting[0]
            if req.reserve > self.num_blocks - self._reserved or running + req.params.n > self.max_batch:
                break
            self._waiting.popleft()
            self._reserved += req.reserve
            self._requests[req.id] = req
            req.seqs = [Seq(req, j, self.device) for j in range(req.params.n)]
            self._prefilling.append(req)
            running += req.params.n

    # ---- prefill -----------------------------------------------------------------------------
    def _prefill_step(self) -> list[tuple[list[Seq], torch.Tensor]]:
        """Forward up to prefill_chunk prompt tokens; returns (choices, logits) of the requests
        whose prompt is now complete (sampled with the decode rows in one pass)."""
        # The oldest unfinished prompt takes as much of the budget as it needs (chunked when it
        # needs more); after it, a prompt joins only whole, so a step has at most one later
        # chunk (which attends to its cache) besides one right-padded forward over first chunks
        # (causal attention over the chunk alone; padding positions write past each row's
        # length, where nothing is read before decode overwrites it): few forwards per step,
        # whose host cost (an eager forward's launches) is what a prefill costs the running streams.
        # With prefill graphs, a first chunk joins the group only while the group still fits a
        # graph bucket (else it waits a step): the group is one replay, never an eager forward.
        budget, plan, n_first, t_first = self.prefill_chunk, [], 0, 0
        for req in self._prefilling:
            if budget <= 0:
                break
            rem = len(req.prompt) - req.prefilled
            if req.done or (plan and rem > budget):
                continue
            T = min(budget, rem)
            if plan and req.prefilled == 0 and not self.runner.prefill_group_ok(n_first + 1, max(t_first, T)):
                continue
            if req.prefilled == 0:
                n_first, t_first = n_first + 1, max(t_first, T)
            budget -= T
            plan.append((req, req.prefilled, T))
        firsts = [x for x in plan if x[1] == 0]
        groups = ([firsts] if firsts else []) + [[x] for x in plan if x[1] != 0]
        done = []
        for group in groups:
            hidden = self.runner.prefill([(req.seqs[0], req.prompt[st:st + T], st, T) for req, st, T in group])
            rows, cols, seqs = [], [], []
            for r, (req, st, T) in enumerate(group):
                req.prefilled = req.seqs[0].length = st + T
                if req.prefilled < len(req.prompt):
                    continue
                self._prefilling.remove(req)
                self.runner.fork(req.seqs[0], req.seqs[1:])    # choices 1..n-1: copies of the prompt
                rows += [r] * len(req.seqs)
                cols += [T - 1] * len(req.seqs)
                seqs += req.seqs
            if seqs:
                done.append((seqs, self.runner.last_logits(hidden, rows, cols)))   # (n, V)
        return done

    # ---- decode ------------------------------------------------------------------------------
    def _decode_step(self) -> Optional[tuple[list[Seq], torch.Tensor]]:
        # a sequence whose last token is still in flight decodes on it (the device has it); one
        # that has every token it may have (max_tokens, counting the in-flight one) does not
        seqs = [s for s in self._decoding
                if s.finish is None and not s.req.done and len(s.tokens) + s.inflight < s.req.params.max_tokens]
        return (seqs, self.runner.decode(seqs)) if seqs else None

    def capture_graphs(self) -> None:
        """Capture the decode graph of every batch bucket and the prefill graph of every (rows,
        tokens) bucket now (on CUDA; else nothing), so no capture happens while requests run."""
        self.runner.capture_graphs()

    @property
    def cuda_graphs(self) -> bool:
        return self.runner.cuda_graphs

    @property
    def graph_note(self) -> str:
        return self.runner.graph_note

    # ---- tokens ------------------------------------------------------------------------------
    def _accept(self, seqs: list[Seq], values: list) -> int:
        """The host's work on one step's tokens: stops, text, events; finish what ended."""
        toks = values[0]
        lps = values[1:] if len(values) > 1 else None
        now = time.perf_counter()
        touched: dict[int, Request] = {}
        n = 0
        eos, tok = self.eos, self.tokenizer
        for b, (s, t) in enumerate(zip(seqs, toks)):
            s.inflight -= 1
            req = s.req
            if s.finish is not None or req.done:
                continue                      # stopped a step ago (or cancelled): a spare token
            p = req.params
            n += 1
            touched[req.id] = req
            if req.first_token_at is None:
                req.first_token_at = now
            if (t == eos and not p.ignore_eos) or (p.stop_token_ids and t in p.stop_token_ids):
                s.finish = "stop"
                continue
            s.tokens.append(t)
            s.pending_tokens.append(t)
            if lps is not None and p.logprobs is not None:
                k = p.logprobs
                s.pending_lp.append(TokenLogprob(t, lps[0][b], list(zip(lps[2][b][:k], lps[1][b][:k]))))
            if tok is not None:
                s.text += s.utf8.decode(tok.decode_single_token_bytes(t))
                if p.stop and s.hit_stop():
                    s.finish, s.cut_by_stop = "stop", True
                    continue
            if len(s.tokens) >= p.max_tokens:
                s.finish = "length"
        for req in touched.values():
            self._emit(req)
        return n

    def _emit(self, req: Request) -> None:
        for s in req.seqs:
            if s.finish_sent or (s.finish is None and not s.pending_tokens):
                continue
            text = s.take_text() if self.tokenizer is not None else ""
            if s.finish is not None:
                s.finish_sent = True
                if s.blocks:
                    self.pool.release(s)
            req.on_event(Event(req.id, s.index, s.pending_tokens, text, s.pending_lp, s.finish,
                               prompt_tokens=len(req.prompt), completion_tokens=len(s.tokens)))
            s.pending_tokens, s.pending_lp = [], []
        if all(s.finish_sent for s in req.seqs):
            self._close(req)

    def _close(self, req: Request) -> None:
        """Last event of a request; its blocks and reservation go back."""
        if req.done:
            return
        req.done = True
        for s in req.seqs:
            if s.blocks:
                self.pool.release(s)
        self._decoding = [s for s in self._decoding if s.req is not req]
        if req in self._prefilling:
            self._prefilling.remove(req)
        if self._requests.pop(req.id, None) is not None:
            self._reserved -= req.reserve
        req.on_event(Event(req.id, -1, [], "", [], None, done=True, prompt_tokens=len(req.prompt),
                           completion_tokens=sum(len(s.tokens) for s in req.seqs)))

    def _finish_request(self, req: Request, reason: str, error: Optional[str] = None) -> None:
        """End every open choice of req with reason (cancel, error) and close it."""
        if req.done:
            return
        if req in self._waiting:
            self._waiting.remove(req)
        for s in req.seqs:
            if not s.finish_sent:
                s.finish, s.finish_sent = reason, True
                if s.blocks:
                    self.pool.release(s)
                req.on_event(Event(req.id, s.index, s.pending_tokens, "", s.pending_lp, reason, error=error,
                                   prompt_tokens=len(req.prompt), completion_tokens=len(s.tokens)))
        if not req.seqs:  # still waiting: one event per choice it would have had
            for j in range(req.params.n):
                req.on_event(Event(req.id, j, [], "", [], reason, error=error, prompt_tokens=len(req.prompt)))
        self._close(req)
