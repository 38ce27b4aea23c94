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
  3. prefill: up to ``prefill_chunk`` prompt tokens of the admitted requests, oldest first, in
     chunks (one forward per request chunk, attending to the request's earlier chunks through
     the cache); a request whose prompt is complete samples its first token and joins decoding;
  4. decode: one forward over every decoding sequence, (B, 1) tokens, each at its own position;
     on CUDA replayed from a CUDA graph captured per batch-size bucket (padding rows write into a
     scratch block), elsewhere eager;
  5. each sequence's token is checked against its stop tokens, stop strings and max_tokens; a
     finished request returns its blocks and its reservation in the same step.
So requests join and leave the running batch at every step, and a long prompt is spread over
several steps instead of stalling the running streams.

Queue: at most ``max_queue`` requests wait for admission; ``submit`` beyond that raises
``EngineFull`` (the HTTP layer answers 503), as does a request whose reservation exceeds the
whole cache (``ParamError``, 400). Every request ends with exactly one final event
(finish_reason "stop", "length", "cancelled" or "error"), after which it holds no block:
``free_blocks() == num_blocks`` whenever nothing runs (the tests assert it).

Cache layout (the extension's paged layout, gptcore.kv_cache): storage (n_layers, 2,
num_blocks + 1, H, block_size, D); the extra last block is the scratch block of padding rows.
Each forward gets a ``_BatchView`` over its rows: a block table (B, max_blocks) int32, the
write positions (B,) and lengths (B,), built on the host from the engine's shadow state and
copied in once; it speaks the model's cache protocol (advance / update / decode), so the model
runs unchanged through its public forward.
"""
from __future__ import annotations

import codecs
import itertools
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from gptcore import _ext
from gptcore.kernels.reference import decode_attention_ref
from gptcore.kv_cache import default_attention
from gptcore.serve.sampling import ParamError, SamplingParams, pick


class EngineFull(RuntimeError):
    """The waiting queue is full (or the engine is draining): try again later."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
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


class _Seq:
    """One completion (choice) of a request: its tokens, blocks and text state."""

    def __init__(self, req: "_Request", index: int, device, vocab: int):
        self.req, self.index = req, index
        self.tokens: list[int] = []
        self.blocks: list[int] = []
        self.length = 0                 # tokens stored in the cache
        self.slot = -1                  # its row of the engine's block table (while it holds blocks)
        p = req.params
        self.rng = None
        if p.seed is not None and not p.greedy:
            self.rng = torch.Generator(device=device)
            self.rng.manual_seed(p.seed + index)
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device) if p.penalized else None
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0                   # characters of text already handed out
        self.pending_tokens: list[int] = []
        self.pending_lp: list[TokenLogprob] = []
        self.finish: Optional[str] = None
        self.finish_sent = False
        self.cut_by_stop = False        # the text ends where a stop string began


class _Request:
    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, on_event: EventFn, reserve: int):
        self.id, self.prompt, self.params, self.on_event = rid, prompt, params, on_event
        self.reserve = reserve
        self.prefilled = 0
        self.seqs: list[_Seq] = []
        self.arrival = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.done = False


class _BatchView:
    """The model's cache protocol over some rows of the engine's paged storage (see module doc)."""

    def __init__(self, engine: "Engine", table, write, lengths, T: int, host_start: int):
        self.e = engine
        self.max_seq_len = engine.max_seq_len
        self.table, self.write, self.lengths = table, write, lengths   # (B, mb) int32, (B,), (B,) int64
        self.T, self.host_start = T, host_start

    def advance(self, T: int) -> torch.Tensor:
        return self.write[:, None] + self.e._offsets[:T]                # (B, T)

    def update(self, layer: int, k, v):
        kc, vc = self.e.storage[layer, 0], self.e.storage[layer, 1]
        self.e._ops.paged_append(kc, vc, k, v, self.table, self.write, False)
        if self.host_start == 0:
            return k, v
        n = self.host_start + k.shape[2]
        return (self.e._ops.paged_gather(kc, self.table, self.lengths, n),
                self.e._ops.paged_gather(vc, self.table, self.lengths, n))

    def decode(self, layer: int, q, k, v):
        e = self.e
        kc, vc = e.storage[layer, 0], e.storage[layer, 1]
        if e.attention == "triton":
            from gptcore.kernels.decode_attention import decode_attention

            if k.dtype == kc.dtype:
                return decode_attention(q, kc, vc, self.lengths, block_table=self.table, k_new=k, v_new=v)
        e._ops.paged_append(kc, vc, k, v, self.table, self.write, False)
        if e.attention == "triton":
            from gptcore.kernels.decode_attention import decode_attention

            return decode_attention(q, kc, vc, self.lengths, block_table=self.table)
        if e.attention == "reference":
            return decode_attention_ref(q, kc, vc, self.lengths, block_table=self.table)
        n = self.table.shape[1] * e.block_size
        k_all = e._ops.paged_gather(kc, self.table, self.lengths, n)
        v_all = e._ops.paged_gather(vc, self.table, self.lengths, n)
        mask = e._offsets[:n][None, :] < self.lengths[:, None]
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None, None, :])


class _DecodeGraph:
    """One batch bucket's captured decode step; its only input is ``inp`` (3, B): slot, token,
    write position per row (the block table rows are gathered from the engine's table inside)."""

    def __init__(self, B: int, pad_slot: int, device):
        self.inp = torch.zeros((3, B), dtype=torch.long, device=device)
        self.inp[0] = pad_slot
        self.graph = None
        self.logits = None


class Engine:
    """Continuous-batching generation for one model (see the module doc).

    num_blocks:    KV blocks of block_size tokens (default: enough for max_batch sequences of
                   max_seq_len); max_batch: sequences decoding at once; max_queue: requests
                   waiting for admission before submit refuses; prefill_chunk: prompt tokens
                   prefilled per step (the rest waits for the next steps); cuda_graphs: replay
                   the decode step from graphs captured for batch buckets 1, 2, 4, ... max_batch.
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
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.attention = default_attention(self.device) if model.backend == "triton" else model.backend
        if self.attention == "triton" and model.backend != "triton":
            self.attention = "torch"
        self._ops = _ext.ops()
        H, D, L = cfg.n_heads, cfg.head_dim, cfg.n_layers
        # zeros: masked keys/values are multiplied by 0 and must not be NaN
        self.storage = torch.zeros(L, 2, self.num_blocks + 1, H, block_size, D, dtype=self.dtype, device=self.device)
        self.scratch = self.num_blocks
        self._offsets = torch.arange(max(self.max_seq_len, prefill_chunk) + block_size, device=self.device)
        self._free = list(range(self.num_blocks - 1, -1, -1))
        # The block table of every running sequence, one row per slot, kept on the device and
        # updated in place from the host's changes (new blocks, freed rows) once per forward;
        # the last row is all scratch (padding rows of a graph bucket).
        self._tab = torch.full((max_batch + 1, self.max_blocks), self.num_blocks, dtype=torch.int32,
                               device=self.device)
        self._pad_slot = max_batch
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._tab_set: list[tuple[int, int, int]] = []    # (slot, column, block) not yet on the device
        self._tab_clear: list[int] = []                    # slots to reset to scratch first
        pin = self.device.type == "cuda"
        self._stage = torch.zeros(max(4 * max_batch, 2 * prefill_chunk) + 64, dtype=torch.long, pin_memory=pin)
        self._stage_off = 0
        self._stage_done = torch.cuda.Event() if pin else None
        self._reserved = 0
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._inbox: deque[_Request] = deque()
        self._cancels: set[int] = set()
        self._waiting: deque[_Request] = deque()
        self._prefilling: list[_Request] = []
        self._decoding: list[_Seq] = []
        self._requests: dict[int, _Request] = {}
        self._rng = torch.Generator(device=self.device)
        if seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(seed)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graph_note = "eager" if not self.cuda_graphs else "cuda-graph"
        self._graphs: dict[int, _DecodeGraph] = {}
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self._stop = False
        self.generated_tokens = 0         # output tokens since start (metrics)
        self.steps = 0
        self._rate = deque(maxlen=64)     # (time, tokens) per recent step, for tokens_per_s

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
            req = _Request(next(self._ids), prompt, params, on_event, self.blocks_for(len(prompt), params))
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
        return len(self._free)

    def stats(self) -> dict:
        """Queue depth, running requests, KV blocks, tokens/s (read without the lock: a snapshot)."""
        used = self.num_blocks - len(self._free)
        live = sum(s.length for s in list(self._decoding)) + sum(
            r.prefilled for r in list(self._prefilling))
        rate = list(self._rate)
        tps = 0.0
        if len(rate) >= 2 and rate[-1][0] > rate[0][0]:
            tps = sum(n for _, n in rate[1:]) / (rate[-1][0] - rate[0][0])
        return {"waiting": len(self._inbox) + len(self._waiting),
                "running": len({s.req.id for s in list(self._decoding)} | {r.id for r in list(self._prefilling)}),
                "blocks_total": self.num_blocks, "blocks_used": used, "blocks_free": len(self._free),
                "blocks_reserved": self._reserved,
                "kv_utilization": live / (used * self.block_size) if used else 0.0,
                "tokens_per_s": tps, "generated_tokens": self.generated_tokens, "steps": self.steps,
                "decode_mode": self.graph_note}

    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._prefilling or self._decoding or self._cancels)

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
        """One scheduler iteration (see the module doc)."""
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancels, self._cancels = self._cancels, set()
        for rid in cancels:
            req = self._requests.get(rid) or next((r for r in self._waiting if r.id == rid), None)
            if req is not None:
                self._finish_request(req, "cancelled")
        self._admit()
        self._stage_wait()
        produced = 0
        pre: list[tuple[list[_Seq], torch.Tensor]] = []     # requests whose prompt completed now
        dec = None
        try:
            pre = self._prefill_step()
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the engine
            self._fail(list(self._prefilling), e)
        try:
            dec = self._decode_step()
        except Exception as e:  # noqa: BLE001
            self._fail(list({s.req.id: s.req for s in self._decoding}.values()), e)
        ready = pre + ([dec] if dec is not None else [])
        if ready:
            seqs = [s for sq, _ in ready for s in sq]
            try:
                logits = ready[0][1] if len(ready) == 1 else torch.cat([lg for _, lg in ready])
                produced += self._accept(seqs, logits)      # the step's one host sync
            except Exception as e:  # noqa: BLE001
                self._fail(list({s.req.id: s.req for s in seqs}.values()), e)
            # prefilled requests decode from the next step on
            self._decoding.extend(s for sq, _ in pre for s in sq if s.finish is None and not s.req.done)
        self.steps += 1
        self.generated_tokens += produced
        self._rate.append((time.perf_counter(), produced))

    def _fail(self, reqs: list[_Request], e: Exception) -> None:
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
            req.seqs = [_Seq(req, j, self.device, self.vocab_size) for j in range(req.params.n)]
            self._prefilling.append(req)
            running += req.params.n

    # ---- blocks ------------------------------------------------------------------------------
    def _grow(self, seq: _Seq, length: int) -> None:
        need = -(-length // self.block_size) - len(seq.blocks)
        if need <= 0:
            return
        if seq.slot < 0:
            seq.slot = self._free_slots.pop()     # admission keeps running sequences <= max_batch
        for _ in range(need):
            b = self._free.pop()                  # the reservation guarantees a block is free
            self._tab_set.append((seq.slot, len(seq.blocks), b))
            seq.blocks.append(b)

    def _release(self, seq: _Seq) -> None:
        self._free.extend(reversed(seq.blocks))
        seq.blocks = []
        seq.length = 0
        if seq.slot >= 0:
            self._tab_clear.append(seq.slot)
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def _sync_table(self) -> None:
        """Apply the host's block-table changes to the device table (one small copy each)."""
        if self._tab_clear:
            rows = self._put(self._tab_clear)
            self._tab_clear = []
            self._tab.index_fill_(0, rows, self.scratch)
        if self._tab_set:
            upd = self._put(self._tab_set)
            self._tab_set = []
            self._tab[upd[:, 0], upd[:, 1]] = upd[:, 2].to(torch.int32)

    def _put(self, rows, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Host integers (a list or list of equal rows) -> a device long tensor, through a slice of
        the pinned stage not reused until the step's copies are done (``_stage_wait``)."""
        flat = torch.tensor(rows, dtype=torch.long)
        if self.device.type != "cuda":
            return flat if out is None else out.copy_(flat)
        n = flat.numel()
        if self._stage_off + n > self._stage.numel():
            self._stage_wait()
            if n > self._stage.numel():
                self._stage = torch.zeros(2 * n, dtype=torch.long, pin_memory=True)
        st = self._stage[self._stage_off:self._stage_off + n].view_as(flat)
        self._stage_off += n
        st.copy_(flat)
        if out is None:
            out = torch.empty_like(flat, device=self.device)
        out.copy_(st, non_blocking=True)
        self._stage_done.record()
        return out

    def _stage_wait(self) -> None:
        if self._stage_off and self._stage_done is not None:
            self._stage_done.synchronize()
        self._stage_off = 0

    # ---- prefill -----------------------------------------------------------------------------
    def _prefill_step(self) -> list[tuple[list[_Seq], torch.Tensor]]:
        """Forward up to prefill_chunk prompt tokens; returns (choices, logits) of each request
        whose prompt is now complete (sampled with the decode rows, in the step's one sync)."""
        budget, done, plan = self.prefill_chunk, [], []
        for req in self._prefilling:
            if budget <= 0:
                break
            if req.done:
                continue
            T = min(budget, len(req.prompt) - req.prefilled)
            budget -= T
            plan.append((req, req.prefilled, T))
        # every first chunk of the step in one right-padded forward (causal attention over the
        # chunk alone; padding positions write past each row's length, where nothing is read
        # before decode overwrites it); later chunks, which attend to their cache, one by one
        firsts = [x for x in plan if x[1] == 0]
        groups = ([firsts] if firsts else []) + [[x] for x in plan if x[1] != 0]
        for group in groups:
            Tm = max(T for _, _, T in group)
            start = group[0][1]
            for req, st, T in group:
                self._grow(req.seqs[0], st + T)
            self._sync_table()
            x = self._put([req.prompt[st:st + T] + [0] * (Tm - T) + [st, st + T] for req, st, T in group])
            ids, write, lengths = x[:, :Tm], x[:, Tm].contiguous(), x[:, Tm + 1].contiguous()
            width = -(-(start + Tm) // self.block_size)
            slots = [req.seqs[0].slot for req, _, _ in group]
            if len(group) == 1:
                table = self._tab[slots[0]:slots[0] + 1, :width].contiguous()
            else:
                table = self._tab[:, :width].index_select(0, torch.tensor(slots, device=self.device))
            view = _BatchView(self, table, write, lengths, Tm, start)
            hidden = self.model.hidden_states(ids, kv_cache=view)          # (R, Tm, C)
            for r, (req, st, T) in enumerate(group):
                req.prefilled = req.seqs[0].length = st + T
                if req.prefilled < len(req.prompt):
                    continue
                logits = self.model.lm_head(hidden[r:r + 1, T - 1])        # (1, V)
                self._prefilling.remove(req)
                self._fork(req)
                done.append((req.seqs, logits.expand(len(req.seqs), -1)))
        return done

    def _fork(self, req: _Request) -> None:
        """Choices 1..n-1 get their own copy of choice 0's prompt blocks."""
        src = req.seqs[0]
        for s in req.seqs[1:]:
            self._grow(s, src.length)
            s.length = src.length
        if len(req.seqs) > 1:
            srcs = torch.tensor(src.blocks * (len(req.seqs) - 1), device=self.device)
            dsts = torch.tensor([b for s in req.seqs[1:] for b in s.blocks], device=self.device)
            self.storage.index_copy_(2, dsts, self.storage.index_select(2, srcs))

    # ---- decode ------------------------------------------------------------------------------
    def _bucket(self, B: int) -> int:
        b = 1
        while b < B:
            b *= 2
        return min(b, self.max_batch) if B <= self.max_batch else B

    def _decode_step(self) -> Optional[tuple[list[_Seq], torch.Tensor]]:
        seqs = [s for s in self._decoding if s.finish is None]
        if not seqs:
            return None
        B = len(seqs)
        for s in seqs:
            self._grow(s, s.length + 1)
        self._sync_table()
        rows = [[s.slot for s in seqs], [s.tokens[-1] for s in seqs], [s.length for s in seqs]]
        if self.cuda_graphs:
            logits = self._decode_graph(B, rows)
        else:
            inp = self._put(rows)
            width = max(len(s.blocks) for s in seqs)
            table = self._tab[:, :width].index_select(0, inp[0])
            view = _BatchView(self, table, inp[2], inp[2] + 1, 1, -1)
            logits = self.model(inp[1][:, None], kv_cache=view)[:, -1]     # (B, V)
        for s in seqs:
            s.length += 1
        return seqs, logits

    def capture_graphs(self) -> None:
        """Capture the decode graph of every batch bucket now (on CUDA; else nothing), so no
        capture happens while requests run."""
        if not self.cuda_graphs:
            return
        b = 1
        while self.cuda_graphs:
            if b not in self._graphs:
                self._decode_graph(0, [[], [], []], bucket=b)
            if b >= self.max_batch:
                break
            b = min(2 * b, self.max_batch)

    def _decode_graph(self, B: int, rows: list[list[int]], bucket: int = 0) -> torch.Tensor:
        Bb = bucket or self._bucket(B)
        g = self._graphs.get(Bb)
        pad = Bb - B
        rows = [rows[0] + [self._pad_slot] * pad, rows[1] + [0] * pad, rows[2] + [0] * pad]
        if g is None:
            g = _DecodeGraph(Bb, self._pad_slot, self.device)
        self._put(rows, out=g.inp)

        def body():
            slot, tok, write = g.inp[0], g.inp[1], g.inp[2]
            view = _BatchView(self, self._tab.index_select(0, slot), write, write + 1, 1, -1)
            return self.model(tok[:, None], kv_cache=view)[:, -1]

        if g.graph is None:
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    body()                                                  # warm-up (same writes)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    g.logits = body()
                g.graph = graph
                self._graphs[Bb] = g
            except Exception as e:  # noqa: BLE001 - no graph: this and later steps run eagerly
                torch.cuda.synchronize()
                self.cuda_graphs = False
                self.graph_note = f"eager (CUDA graph capture failed: {type(e).__name__}: {e})"
                return body()[:B]
        g.graph.replay()
        return g.logits[:B]

    # ---- tokens out --------------------------------------------------------------------------
    def _accept(self, seqs: list[_Seq], logits: torch.Tensor) -> int:
        """Sample one token per sequence, update text/stops, emit events, finish what ended."""
        res = pick(logits, [s.req.params for s in seqs], [s.rng for s in seqs], [s.counts for s in seqs], self._rng)
        now = time.perf_counter()
        touched: dict[int, _Request] = {}
        for b, (s, t) in enumerate(zip(seqs, res.tokens)):
            req, p = s.req, s.req.params
            touched[req.id] = req
            if req.first_token_at is None:
                req.first_token_at = now
            if t in p.stop_token_ids or (t == self.eos and not p.ignore_eos):
                s.finish = "stop"
                continue
            s.tokens.append(t)
            if s.counts is not None:
                s.counts[t] += 1
            s.pending_tokens.append(t)
            if res.logprobs is not None and p.logprobs is not None:
                s.pending_lp.append(TokenLogprob(t, res.logprobs[b], res.top[b]))
            if self.tokenizer is not None:
                s.text += s.utf8.decode(self.tokenizer.decode_single_token_bytes(t))
                if p.stop and self._hit_stop(s):
                    s.finish, s.cut_by_stop = "stop", True
                    continue
            if len(s.tokens) >= p.max_tokens:
                s.finish = "length"
        for req in touched.values():
            self._emit(req)
        return len(seqs)

    def _hit_stop(self, s: _Seq) -> bool:
        stops = s.req.params.stop
        longest = max(len(x) for x in stops)
        lo = max(0, s.sent - longest)
        cut = min((i for i in (s.text.find(x, lo) for x in stops) if i >= 0), default=-1)
        if cut >= 0:
            s.text = s.text[:cut]
            return True
        return False

    def _emit(self, req: _Request) -> None:
        for s in req.seqs:
            if s.finish_sent or (s.finish is None and not s.pending_tokens):
                continue
            if s.finish is None:
                end = len(s.text) - self._holdback(s)
            else:
                if not s.cut_by_stop:
                    s.text += s.utf8.decode(b"", final=True)   # an incomplete UTF-8 tail becomes U+FFFD
                end = len(s.text)
            text = s.text[s.sent:end] if end > s.sent else ""
            s.sent = max(s.sent, end)
            if s.finish is not None:
                s.finish_sent = True
                if s.blocks:
                    self._release(s)
            req.on_event(Event(req.id, s.index, s.pending_tokens, text, s.pending_lp, s.finish,
                               prompt_tokens=len(req.prompt), completion_tokens=len(s.tokens)))
            s.pending_tokens, s.pending_lp = [], []
        if all(s.finish_sent for s in req.seqs):
            self._close(req)

    def _holdback(self, s: _Seq) -> int:
        """Characters at the end of the text that may begin a stop string (not handed out yet)."""
        h = 0
        if s.text.endswith("\ufffd"):
            h = 1  # a replacement char may be an incomplete UTF-8 sequence still resolving
        for x in s.req.params.stop:
            for n in range(min(len(x) - 1, len(s.text)), 0, -1):
                if s.text.endswith(x[:n]):
                    h = max(h, n)
                    break
        return h

    def _close(self, req: _Request) -> None:
        """Last event of a request; its blocks and reservation go back."""
        if req.done:
            return
        req.done = True
        for s in req.seqs:
            if s.blocks:
                self._release(s)
        self._decoding = [s for s in self._decoding if s.req is not req]
        if req in self._prefilling:
            self._prefilling.remove(req)
        if self._requests.pop(req.id, None) is not None:
            self._reserved -= req.reserve
        req.on_event(Event(req.id, -1, [], "", [], None, done=True, prompt_tokens=len(req.prompt),
                           completion_tokens=sum(len(s.tokens) for s in req.seqs)))

    def _finish_request(self, req: _Request, reason: str, error: Optional[str] = None) -> None:
        """End every open choice of req with reason (cancel, error) and close it."""
        if req.done:
            return
        if req in self._waiting:
            self._waiting.remove(req)
        for s in req.seqs:
            if not s.finish_sent:
                s.finish, s.finish_sent = reason, True
                if s.blocks:
                    self._release(s)
                req.on_event(Event(req.id, s.index, s.pending_tokens, "", s.pending_lp, reason, error=error,
                                   prompt_tokens=len(req.prompt), completion_tokens=len(s.tokens)))
        if not req.seqs:  # still waiting: one event per choice it would have had
            for j in range(req.params.n):
                req.on_event(Event(req.id, j, [], "", [], reason, error=error, prompt_tokens=len(req.prompt)))
        self._close(req)
