"""The Generator: text generation with gptcore's KV cache: batched prompts of different lengths,
sampling on the device, per-sequence stop tokens, streaming, and a CUDA-graph decode step. One
cohesive class (cache, captured decode and prefill steps, stop flags, stats), hence ~500 lines.

    from gptcore.generate import generate, Generator
    new = generate(model, [[464, 2068, 7586], [40]], max_new_tokens=20, temperature=0)  # greedy
    gen = Generator(model, paged=True)    # keeps its cache and captured graphs between calls
    new = gen.generate(prompts, 64, temperature=0.8, top_k=50, top_p=0.95, seed=0, stop_tokens=[50256])
    gen.stats                             # tokens/s, prefill/decode ms, decode mode (and why), decode step

Both return the new tokens of each prompt (list of lists, a stop token included when hit).

The command line is gptcore.generate.cli (``python -m gptcore.generate --help``).

How a call runs:
  prefill  prompts are right-padded to the longest and run through the model once, writing every
           layer's keys/values into the cache; causal attention keeps each real token blind to the
           padding after it. Each sequence's logits are read at its own last token, and the cache
           is rewound to each prompt's length (``set_lengths``).
  decode   one token per sequence per step: the cache appends it at that sequence's position and
           decode attention reads each sequence's own length. Sampling (temperature, top-k,
           top-p, exponential-race draw from a seeded torch.Generator) runs on the device, so the
           loop never reads the GPU, except every ``check_every`` steps to see whether every
           sequence has hit a stop token (a device-side done flag), and for streaming, which
           copies each step's tokens to pinned memory and hands them over one step late.
  graph    on CUDA the decode step is captured once per (batch, cache, sampling settings) in a
           CUDA graph (gptcore.captured_step) and replayed: a static token buffer in, the next token out. The
           host keeps the cache's shadow counters (``reserve(1)``, which also hands out paged
           blocks) and draws the sampling noise before each replay. Elsewhere (CPU, no cache,
           cuda_graph=False, or a failed capture) the same step runs eagerly and ``stats`` says why.
           With ``compact=True`` eager decoding drops finished sequences from the batch
           (``cache.reorder``) at each check. The prefill is captured too, after its first eager
           run for a (batch, padded prompt length, sampling) shape: a repeated shape replays it
           (``MAX_PREFILL_GRAPHS`` shapes kept). ``stats['prefill_mode']`` says which ran.
  fused    with the triton backend on CUDA (batch <= 64, learned positions, no LoRA) each decode
           step is gptcore.decode_step's fused step: 5 launches per layer + 2, greedy pick fused into
           the LM head (sampling: its logits, then the sampler above); ``stats['decode_step']`` says
           which step ran and, when not fused, why. GPTCORE_FUSED_DECODE=0 turns it off.
  no cache ``use_cache=False`` recomputes the whole (right-padded) sequence for every new token:
           the reference the cached path must match token for token.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch

from gptcore.captured_step import CapturedStep, try_capture
from gptcore.decode_step import fused_decode_step
from gptcore.generate.sampling import Prompts, StreamFn, _as_prompt_lists, _check_sampling, _Request
from gptcore.kv_cache import KVCache, PagedKVCache


# ---- the generator ----------------------------------------------------------------------------
class _Graph:
    """A decode step's static buffers and, once captured, its CapturedStep ``graph`` (fused: the
    fused decode step whose buffers the graph uses, or None and why_unfused says why)."""

    def __init__(self, graph, tok, done, noise):
        self.graph, self.tok, self.done, self.noise = graph, tok, done, noise
        self.fused, self.why_unfused = None, ""


class _Prefill:
    """A captured prefill (its CapturedStep ``graph``, or why there is none) and its static buffers."""

    def __init__(self, padded, last, noise):
        self.padded, self.last, self.noise = padded, last, noise
        self.graph, self.out, self.why, self.arange = None, None, "", None


class Generator:
    """Generation for one model; keeps its KV cache and captured CUDA graphs between calls.

    paged:       use PagedKVCache (block_size tokens per block, num_blocks blocks; default
                 enough for every sequence to reach max_seq_len) instead of the static KVCache
    cuda_graph:  capture the decode step on CUDA (falls back to eager, saying why in stats); the
                 prefill of a shape seen before (batch, prompt length, sampling) is replayed too
    max_seq_len: cache capacity; default: the longest prompt + max_new_tokens rounded up to 64
                 (capped at context_length), so repeated calls of one shape reuse cache and graph
    check_every: decode steps between the host's looks at the device-side done flags
    compact:     in eager decoding, drop finished sequences from the batch at each check (less
                 work per step; low-precision results may differ in the last bits, since the
                 matmuls then see another batch size). CUDA graphs keep the batch fixed.
    """

    MAX_PREFILL_GRAPHS = 4  # captured prefills kept (one per batch x prompt length x sampling), LRU

    def __init__(self, model, *, paged: bool = False, block_size: int = 16, num_blocks: Optional[int] = None,
                 cuda_graph: bool = True, max_seq_len: Optional[int] = None, check_every: int = 16,
                 compact: bool = False):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.model = model
        self.paged, self.block_size, self.num_blocks = paged, block_size, num_blocks
        self.cuda_graph = cuda_graph
        self.max_seq_len = max_seq_len
        self.check_every = check_every
        self.compact = compact
        self.cache: Optional[Union[KVCache, PagedKVCache]] = None
        self._graphs: dict[tuple, _Graph] = {}
        self._prefills: dict[tuple, _Prefill] = {}
        self._prefill_mode = ""
        self._decode_step = ""
        self.stats: dict = {}

    # ---- setup -------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _get_cache(self, batch: int, need: int):
        ctx = self.model.config.context_length
        cap = self.max_seq_len or min(ctx, -(-need // 64) * 64)
        if need > cap:
            raise ValueError(f"generation needs {need} positions but the Generator's max_seq_len is {cap}")
        c = self.cache
        dtype = next(self.model.parameters()).dtype
        if (c is None or c.max_batch_size != batch or c.max_seq_len != cap or c.dtype != dtype
                or c.device != self._device() or c.attention != self.model.backend):
            kw = dict(block_size=self.block_size, num_blocks=self.num_blocks) if self.paged else {}
            cls = PagedKVCache if self.paged else KVCache
            self.cache = cls.for_model(self.model, batch_size=batch, max_seq_len=cap, **kw)
            self._graphs.clear()
            self._prefills.clear()
        self.cache.reset()
        return self.cache

    def _decode_mode(self, use_cache: bool) -> tuple[bool, str]:
        if not use_cache:
            return False, "eager (no cache: every step recomputes the whole sequence)"
        if self._device().type != "cuda":
            return False, f"eager (CUDA graphs need a CUDA device; the model is on {self._device()})"
        if not self.cuda_graph:
            return False, "eager (cuda_graph=False)"
        return True, "cuda-graph"

    # ---- public ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 stop_tokens: Optional[Sequence[int]] = None, seed: Optional[int] = None,
                 use_cache: bool = True, stream: Optional[StreamFn] = None) -> list[list[int]]:
        """New tokens for each prompt (list of lists); see the module doc and ``generate``."""
        model = self.model
        cfg = model.config
        _check_sampling(temperature, top_k, top_p, max_new_tokens)
        prompts = _as_prompt_lists(prompts)
        lens = [len(p) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; give at least one token (e.g. <|endoftext|> = 50256)")
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        longest = max(lens)
        if longest > cfg.context_length:
            raise ValueError(
                f"prompt {lens.index(longest)} has {longest} tokens, more than the model's context_length "
                f"{cfg.context_length}; shorten it (e.g. keep its last {max(1, cfg.context_length - max_new_tokens)} tokens)")
        if longest + max_new_tokens > cfg.context_length:
            raise ValueError(
                f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens} "
                f"positions exceeds the model's context_length {cfg.context_length}; ask for at most "
                f"{cfg.context_length - longest} new tokens or shorten the prompt")
        B, N = len(prompts), max_new_tokens
        if N == 0:
            return [[] for _ in prompts]
        device = self._device()
        rng = torch.Generator(device=device)
        if seed is None:
            rng.seed()
        else:
            rng.manual_seed(seed)
        stops = sorted(set(int(t) for t in stop_tokens or ()))
        graph_ok, mode = self._decode_mode(use_cache)
        was_training = model.training
        model.eval()
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            req = _Request(prompts, N, float(temperature), top_k, top_p, stops, rng, stream)
            if use_cache:
                out, t_prefill, mode = self._run_cached(req, graph_ok, mode)
            else:
                out, t_prefill = self._run_uncached(req)
            host = out.cpu().tolist()  # the one sync at the end
            t1 = time.perf_counter()
        finally:
            model.train(was_training)
        result = []
        stop_set = set(stops)
        for row in host:
            cut = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
            result.append(row[:cut])
        total = t1 - t0
        n_new = sum(len(r) for r in result)
        self.stats = {
            "batch": B, "new_tokens": n_new, "seconds": total, "tokens_per_s": n_new / total if total else None,
            "prefill_ms": (t_prefill - t0) * 1e3, "decode_ms_per_step": (t1 - t_prefill) * 1e3 / max(1, N - 1),
            "decode_mode": mode, "decode_step": self._decode_step if use_cache else "model forward (no cache)",
            "prefill_mode": self._prefill_mode if use_cache else "eager",
            "cache": ("paged" if self.paged else "static") if use_cache else None,
            "kv_bytes_per_token": self.cache.bytes_per_token() if use_cache else None,
        }
        return result

    # ---- cached path -------------------------------------------------------------------------
    def _run_cached(self, req: _Request, graph_ok: bool, mode: str):
        """Prefill, then decode N-1 steps; returns (tokens (B, N) on the device, prefill end time, mode)."""
        model, device = self.model, self._device()
        lens, N, stops = req.lens, req.new_tokens, req.stops
        B, longest = len(lens), max(lens)
        cache = self._get_cache(B, longest + N)
        padded = torch.tensor([p + [0] * (longest - len(p)) for p in req.prompts], dtype=torch.long)
        last = torch.tensor([n - 1 for n in lens], dtype=torch.long)
        padded, last = padded.to(device, non_blocking=True), last.to(device, non_blocking=True)

        # prefill: one forward over the right-padded prompts, logits at each prompt's last token
        V = model.lm_head.weight.shape[0]
        noise = torch.empty((B, V), device=device, dtype=torch.float32) if req.temperature > 0 else None
        first, self._prefill_mode = self._prefill(req, cache, padded, last, noise, graph_ok)   # (B,)
        cache.set_lengths(lens)
        stop_t = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
        key = (B, cache.max_seq_len, req.sampling, tuple(stops))
        state = self._graphs.get(key) if graph_ok else None
        if state is None:
            state = _Graph(None, torch.empty((B, 1), dtype=torch.long, device=device),
                           torch.zeros(B, dtype=torch.bool, device=device), noise)
            # the fused decode step (gptcore.decode_step) lives as long as the graph that uses its buffers
            state.fused, state.why_unfused = fused_decode_step(model, cache)
        self._decode_step = "fused" if state.fused is not None else f"model forward ({state.why_unfused})"
        state.tok.copy_(first[:, None])
        state.done.copy_(_is_stop(first, stop_t) if stop_t is not None else torch.zeros_like(state.done))
        out = torch.empty((B, N), dtype=torch.long, device=device)
        out[:, 0] = first
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_prefill = time.perf_counter()
        streamer = req.streamer(device)
        if streamer:
            streamer.push(list(range(B)), first)

        def step():
            with cache.external_reservation():
                if state.fused is not None and req.temperature == 0:
                    nxt = state.fused.greedy(state.tok, out=state.tok.view(-1))  # writes the token in place
                else:
                    logits = (state.fused.logits(state.tok) if state.fused is not None
                              else model(state.tok, kv_cache=cache)[:, -1])     # (B, V)
                    nxt = req.sample(logits, state.noise, model.ops.token_pick)
                    state.tok.copy_(nxt[:, None])
                if stop_t is not None:
                    state.done.logical_or_(_is_stop(nxt, stop_t))

        rows = list(range(B))               # rows[r] = the prompt that cache row r generates for
        rows_dev = None                     # device copy of rows once compaction reorders them
        for i in range(1, N):
            cache.reserve(1)
            if state.noise is not None:
                state.noise.exponential_(generator=req.rng)
            if graph_ok and state.graph is None:
                state.graph, why = self._capture(cache, state, step)
                if state.graph is None:
                    graph_ok, mode = False, why
                else:
                    self._graphs[key] = state
            if state.graph is not None and graph_ok:
                state.graph.replay()
            else:
                step()
            if rows_dev is None:
                out[:, i] = state.tok[:, 0]
            else:
                out[rows_dev, i] = state.tok[:, 0]
            if streamer:
                streamer.push(rows, state.tok)
            if stop_t is not None and i % self.check_every == 0 and i < N - 1:
                done = state.done.tolist()
                if all(done):
                    break
                if self.compact and not graph_ok and any(done):
                    keep = [r for r, d in enumerate(done) if not d]
                    cache.reorder(keep)
                    keep_dev = torch.tensor(keep, device=device)
                    state = _Graph(None, state.tok[keep_dev].clone(), state.done[keep_dev].clone(),
                                   None if state.noise is None else state.noise[: len(keep)].clone())
                    state.fused, state.why_unfused = fused_decode_step(model, cache)
                    rows = [rows[r] for r in keep]
                    rows_dev = torch.tensor(rows, device=device)
        if streamer:
            streamer.flush()
        return out, t_prefill, mode

    def _prefill(self, req: _Request, cache, padded, last, noise, graph_ok: bool):
        """First token of each prompt (B,) and how the prefill ran. With CUDA graphs on, the first
        prefill of a (batch, prompt length, sampling) shape runs eagerly and is then captured;
        later calls of that shape replay it (static id/index/noise buffers in, token out)."""
        model, B, T = self.model, padded.shape[0], padded.shape[1]
        arange = torch.arange(B, device=padded.device)  # read by the graph: kept alive in its _Prefill

        def run(ids, idx, nz):
            hidden = model.hidden_states(ids, kv_cache=cache)                  # (B, T, C)
            return req.sample(model.lm_head(hidden[arange, idx]), nz, model.ops.token_pick)  # (B,)

        key = (B, T, cache.max_seq_len, req.sampling)
        pre = self._prefills.get(key) if graph_ok else None
        if pre is not None and pre.graph is not None:
            self._prefills[key] = self._prefills.pop(key)  # most recently used last
            cache.reserve(T)
            pre.padded.copy_(padded)
            pre.last.copy_(last)
            if noise is not None:
                pre.noise.exponential_(generator=req.rng)
            return pre.graph.replay(), "cuda-graph"
        if noise is not None:
            noise.exponential_(generator=req.rng)
        first = run(padded, last, noise)
        if not graph_ok:
            return first, "eager"
        if pre is not None:
            return first, pre.why
        pre = _Prefill(padded.clone(), last.clone(), None if noise is None else torch.empty_like(noise))
        pre.arange = arange
        # records only (the eager run above warmed up); a failed capture only means: keep prefilling eagerly
        graph, why = try_capture(lambda: run(pre.padded, pre.last, pre.noise), warmup=False,
                                 context=cache.external_reservation())
        if graph is not None:
            pre.graph, pre.out = graph, graph.out
            mode = "eager (captured for the next call of this shape)"
        else:
            pre = _Prefill(None, None, None)
            pre.why = mode = why
        self._prefills[key] = pre
        while len(self._prefills) > self.MAX_PREFILL_GRAPHS:
            self._prefills.pop(next(iter(self._prefills)))
        return first, mode

    def _capture(self, cache, state: _Graph, step) -> tuple[Optional[CapturedStep], str]:
        """The step captured (or None and why): warmed up once on a side stream (it writes the slot
        the first replay writes again), its effects on the cache lengths, token and done flags undone
        (also when the warm-up fails: the eager fallback must start from the same state)."""
        saved = (cache.save_lengths(), state.tok.clone(), state.done.clone())

        def undo():
            cache.restore_lengths(saved[0])
            state.tok.copy_(saved[1])
            state.done.copy_(saved[2])

        return try_capture(step, undo=undo)

    # ---- beam search -------------------------------------------------------------------------
    @torch.no_grad()
    def beam_search(self, prompt: Sequence[int], max_new_tokens: int, num_beams: int,
                    stop_tokens: Optional[Sequence[int]] = None) -> tuple[list[int], float]:
        """The new tokens of the best beam for one prompt, and its total log-probability.

        Keeps the num_beams highest-scoring continuations (sum of token log-probabilities) at each
        step; each step's survivors are gathered in the cache with its reorder op (a beam kept
        twice gets its own copy of the keys/values). A beam that emits a stop token is finished
        (the stop token counts and is included); the result is the best finished or full-length
        beam. num_beams=1 is greedy decoding.
        """
        model, cfg = self.model, self.model.config
        prompt = [int(t) for t in prompt]
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
        _check_sampling(0.0, None, None, max_new_tokens)
        if not prompt or any(not 0 <= t < cfg.vocab_size for t in prompt):
            raise ValueError(f"beam_search: the prompt must be non-empty token ids in [0, {cfg.vocab_size})")
        if len(prompt) + max_new_tokens > cfg.context_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds the "
                             f"model's context_length {cfg.context_length}")
        if max_new_tokens == 0:
            return [], 0.0
        device = self._device()
        stops = set(int(t) for t in stop_tokens or ())
        cap = min(cfg.context_length, -(-(len(prompt) + max_new_tokens) // 64) * 64)
        cache = KVCache.for_model(model, batch_size=num_beams, max_seq_len=cap)
        cache.reset(batch_size=1)
        was_training = model.training
        model.eval()
        try:
            logits = model(torch.tensor([prompt], device=device), kv_cache=cache)[:, -1]   # (1, V)
            scores = torch.zeros(1, device=device, dtype=torch.float32)                   # (beams,)
            seqs: list[list[int]] = [[]]
            finished: list[tuple[float, list[int]]] = []
            for step in range(max_new_tokens):
                lp = torch.log_softmax(logits.float(), dim=-1) + scores[:, None]         # (beams, V)
                V = lp.shape[-1]
                top_v, top_i = lp.view(-1).topk(min(num_beams + len(stops), lp.numel()))
                beams, toks, new_scores = [], [], []
                for v, i in zip(top_v.tolist(), top_i.tolist()):
                    b, t = divmod(i, V)
                    if t in stops:
                        finished.append((v, seqs[b] + [t]))
                        continue
                    if len(beams) < num_beams:
                        beams.append(b)
                        toks.append(t)
                        new_scores.append(v)
                best_done = max((f[0] for f in finished), default=float("-inf"))
                if not beams or (new_scores and best_done >= new_scores[0]):
                    break   # log-probabilities only fall: no running beam can beat a finished one
                seqs = [seqs[b] + [t] for b, t in zip(beams, toks)]
                scores = torch.tensor(new_scores, device=device, dtype=torch.float32)
                if step == max_new_tokens - 1:
                    break
                cache.reorder(beams)
                logits = model(torch.tensor(toks, device=device)[:, None], kv_cache=cache)[:, -1]
            if len(seqs[0]) == max_new_tokens:   # beams that ran the whole way are hypotheses too
                finished += [(v, q) for v, q in zip(scores.tolist(), seqs)]
        finally:
            model.train(was_training)
        best = max(finished, key=lambda f: f[0])
        return best[1], best[0]

    # ---- uncached path (reference) -----------------------------------------------------------
    def _run_uncached(self, req: _Request):
        """The reference: every step runs the whole right-padded sequence; returns (tokens, prefill end)."""
        model, device = self.model, self._device()
        lens, N, stops = req.lens, req.new_tokens, req.stops
        B, longest = len(lens), max(lens)
        seq = torch.tensor([p + [0] * (longest + N - len(p)) for p in req.prompts], dtype=torch.long).to(device)
        pos = torch.tensor(lens, dtype=torch.long).to(device)       # (B,) next position per sequence
        arange = torch.arange(B, device=device)
        stop_t = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = torch.empty((B, N), dtype=torch.long, device=device)
        noise = None
        streamer = req.streamer(device)
        t_prefill = 0.0
        for i in range(N):
            hidden = model.hidden_states(seq[:, : longest + i])                  # (B, T, C)
            logits = model.lm_head(hidden[arange, pos - 1])                       # (B, V)
            if req.temperature > 0:
                noise = torch.empty_like(logits, dtype=torch.float32).exponential_(generator=req.rng)
            tok = req.sample(logits, noise, model.ops.token_pick)
            seq[arange, pos] = tok
            pos += 1
            out[:, i] = tok
            if i == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t_prefill = time.perf_counter()
            if streamer:
                streamer.push(list(range(B)), tok)
            if stop_t is not None:
                done |= _is_stop(tok, stop_t)
                if i % self.check_every == 0 and bool(done.all()):
                    break
        if streamer:
            streamer.flush()
        return out, t_prefill


def _is_stop(tok: torch.Tensor, stop_t: torch.Tensor) -> torch.Tensor:
    return (tok[:, None] == stop_t[None, :]).any(dim=-1)


def generate(model, idx_or_prompts: Prompts, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             stop_tokens: Optional[Sequence[int]] = None, seed: Optional[int] = None, use_cache: bool = True,
             stream: Optional[StreamFn] = None, paged: bool = False, cuda_graph: bool = True) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt; returns the new tokens of each (list of lists).

    idx_or_prompts: a (B, T) or (T,) tensor of token ids, one list of ids, or a list of lists of
    different lengths (one batch). temperature 0 = greedy; top_k / top_p filter before sampling;
    seed makes sampling reproducible; a sequence stops after emitting any of stop_tokens;
    stream(seq_index, token) is called for every new token as it comes. use_cache=False recomputes
    the whole sequence each step (the reference). For repeated calls keep a ``Generator``.
    """
    gen = Generator(model, paged=paged, cuda_graph=cuda_graph)
    return gen.generate(idx_or_prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        stop_tokens=stop_tokens, seed=seed, use_cache=use_cache, stream=stream)
