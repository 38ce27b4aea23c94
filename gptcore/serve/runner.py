"""The serving engine's model runner: the device side of a step, launched without a host sync.

    runner = ModelRunner(model, block_size=16, num_blocks=1024, max_batch=64, prefill_chunk=512)
    hidden = runner.prefill([(seq, prompt_ids, start, T), ...])   # one forward over the chunks
    logits = runner.decode(seqs)                                  # (B, V), graph replay on CUDA
    launched = runner.sample(seqs, logits)                        # tokens on their way to the host
    tokens, *logprobs = launched.read()                           # later: waits for the copy

It owns the paged KV storage, the block pool and device block table (gptcore.serve.paged), the
pinned stage for host numbers, the per-slot last-token buffer the decode step reads its input
from, the per-slot penalty counts, and the CUDA graphs of the decode buckets. The engine
(gptcore.serve.engine) decides what runs; the runner runs it.
"""
from __future__ import annotations

from typing import Optional

import torch

from gptcore import _ext
from gptcore.captured_step import try_capture
from gptcore.kv_cache import default_attention
from gptcore.serve.paged import BatchView, BlockPool, DecodeGraph, PrefillGraph, Stage
from gptcore.serve.requests import Seq
from gptcore.serve.sampling import pick


class Launched:
    """One step's sampled rows, on their way to the host: (seqs, tokens, logprobs) copies and
    the event after which the host copies are complete (None on the CPU: already there)."""

    def __init__(self, seqs: list[Seq], host: list[torch.Tensor], event):
        self.seqs, self.host, self.event = seqs, host, event

    def read(self) -> list[list]:
        if self.event is not None:
            self.event.synchronize()
        return [h.tolist() for h in self.host]


class ModelRunner:
    def __init__(self, model, *, block_size: int, num_blocks: int, max_batch: int, max_seq_len: int,
                 prefill_chunk: int, cuda_graphs: bool, seed: Optional[int] = None):
        cfg = model.config
        self.model, self.vocab_size = model, cfg.vocab_size
        self.block_size, self.max_batch, self.max_seq_len = block_size, max_batch, max_seq_len
        self.max_blocks = -(-max_seq_len // block_size)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.attention = default_attention(self.device) if model.backend == "triton" else model.backend
        if self.attention == "triton" and model.backend != "triton":
            self.attention = "torch"
        self._ops = _ext.ops()
        H, D, L = cfg.n_heads, cfg.head_dim, cfg.n_layers
        # zeros: masked keys/values are multiplied by 0 and must not be NaN
        self.storage = torch.zeros(L, 2, num_blocks + 1, H, block_size, D, dtype=self.dtype, device=self.device)
        self._offsets = torch.arange(max(max_seq_len, prefill_chunk) + block_size, device=self.device)
        self.pool = BlockPool(num_blocks, block_size, max_batch, self.max_blocks, self.device)
        self.stage = Stage(self.device, max_batch * (prefill_chunk + 8) + 4096, 8 * max_batch + 256)
        # per batch slot, on the device: the last sampled token (the next decode step's input)
        # and, once a penalized request runs, its generated-token counts (max_batch + 1, V)
        self._last_tok = torch.zeros(max_batch + 1, dtype=torch.long, device=self.device)
        self._counts: Optional[torch.Tensor] = None
        self._rng = torch.Generator(device=self.device)
        if seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(seed)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graph_note = "eager" if not self.cuda_graphs else "cuda-graph"
        self._graphs: dict[int, DecodeGraph] = {}
        # Prefill graphs: a group of first chunks (every row starting at position 0) padded to
        # (rows, tokens) buckets, powers of two up to 8 rows and the chunk budget's power of two,
        # at most max(2 * prefill_chunk, 1024) padded tokens. An eager prefill forward costs the
        # host every kernel launch of the model (milliseconds for GPT-2); its replay costs the
        # device only. Later chunks (which gather their cache) and larger groups run eagerly.
        self.prefill_graphs = self.cuda_graphs
        self.prefill_note = "cuda-graph" if self.prefill_graphs else "eager"
        self._pgraphs: dict[tuple[int, int], PrefillGraph] = {}
        self._pf_tokens = max(2 * prefill_chunk, 1024)
        self._pf_T = 1 << max(4, (prefill_chunk - 1).bit_length())
        self._zeros = torch.zeros(8, dtype=torch.long, device=self.device)

    # ---- prefill -----------------------------------------------------------------------------
    def prefill(self, group: list[tuple[Seq, list[int], int, int]]) -> torch.Tensor:
        """One forward over prompt chunks (seq, token ids, start, T), right-padded to the longest;
        every row starts at the same position (0 for a group of first chunks). Returns the final
        hidden states (R, Tm, C)."""
        Tm = max(T for _, _, _, T in group)
        start = group[0][2]
        for seq, _, st, T in group:
            self.pool.grow(seq, st + T)
        self.pool.sync_table(self.stage)
        bucket = self._prefill_bucket(len(group), Tm) if start == 0 and self.prefill_graphs else None
        if bucket is not None:
            return self._prefill_graph(group, *bucket)
        x = self.stage.put([ids + [0] * (Tm - len(ids)) + [st, st + T, seq.slot] for seq, ids, st, T in group])
        ids, write, lengths = x[:, :Tm], x[:, Tm].contiguous(), x[:, Tm + 1].contiguous()
        width = -(-(start + Tm) // self.block_size)
        if len(group) == 1:
            slot = group[0][0].slot
            table = self.pool.table[slot:slot + 1, :width].contiguous()
        else:
            table = self.pool.table[:, :width].index_select(0, x[:, Tm + 2].contiguous())
        return self.model.hidden_states(ids, kv_cache=BatchView(self, table, write, lengths, Tm, start))

    def _prefill_bucket(self, R: int, Tm: int) -> Optional[tuple[int, int]]:
        Rb, Tb = 1 << (R - 1).bit_length(), 1 << max(4, (Tm - 1).bit_length())
        if Rb > 8 or Tb > self._pf_T or Tb > self.max_seq_len or Rb * Tb > self._pf_tokens:
            return None
        return Rb, Tb

    def prefill_group_ok(self, R: int, Tm: int) -> bool:
        """Whether a first-chunk group of R rows, the longest Tm tokens, runs as one graph replay
        (always True without prefill graphs: then any group is one eager forward)."""
        return not self.prefill_graphs or self._prefill_bucket(R, Tm) is not None

    def _prefill_buckets(self):
        for Rb in (1, 2, 4, 8):
            Tb = 16
            while self._prefill_bucket(Rb, Tb) == (Rb, Tb):
                yield Rb, Tb
                Tb *= 2

    def _prefill_graph(self, group, Rb: int, Tb: int) -> torch.Tensor:
        """Replay (capturing first if needed) the (Rb, Tb) prefill graph over a first-chunk group;
        padding rows use the pad slot (all scratch), padding tokens write past each row's length.
        Returns the graph's hidden states (R, Tb, C), valid until the next replay."""
        R = len(group)
        pad = self.pool.pad_slot
        rows = [ids + [0] * (Tb - len(ids)) + [seq.slot] for seq, ids, _, _ in group]
        rows += [[0] * Tb + [pad]] * (Rb - R)
        g = self._pgraphs.get((Rb, Tb))
        if g is None:
            g = PrefillGraph(Rb, Tb, pad, self.device)
        self.stage.put(rows, out=g.inp)
        width = -(-Tb // self.block_size)

        def body():
            table = self.pool.table[:, :width].index_select(0, g.inp[:, Tb].contiguous())
            view = BatchView(self, table, self._zeros[:Rb], None, Tb, 0)
            return self.model.hidden_states(g.inp[:, :Tb], kv_cache=view)          # (Rb, Tb, C)

        if self.device.type != "cuda":
            return body()[:R]       # the padded bucket forward without a graph (tests run it on the CPU)
        if g.step is None:
            g.step, why = try_capture(body)                        # the warm-up makes the same writes
            if g.step is None:  # no prefill graphs: prefill runs eagerly from now on
                self.prefill_graphs, self.prefill_note = False, why
                return body()[:R]
            self._pgraphs[(Rb, Tb)] = g
        return g.step.replay()[:R]

    def last_logits(self, hidden: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
        """LM head over hidden[rows[i], cols[i]]: (len(rows), V), in one matmul."""
        rc = self.stage.put([rows, cols])
        return self.model.lm_head(hidden[rc[0], rc[1]])

    def fork(self, src: Seq, dsts: list[Seq]) -> None:
        """dsts get their own copy of src's blocks (choices 1..n-1 of a prompt)."""
        for s in dsts:
            self.pool.grow(s, src.length)
            s.length = src.length
        if dsts:
            idx = self.stage.put([src.blocks * len(dsts), [b for s in dsts for b in s.blocks]])
            self.storage.index_copy_(2, idx[1], self.storage.index_select(2, idx[0]))

    # ---- decode ------------------------------------------------------------------------------
    def bucket(self, B: int) -> int:
        b = 1
        while b < B:
            b *= 2
        return min(b, self.max_batch) if B <= self.max_batch else B

    def decode(self, seqs: list[Seq]) -> torch.Tensor:
        """One decode forward over seqs, each at its own position, its input token read from the
        device's last-token buffer at its slot; (B, V) logits."""
        B = len(seqs)
        for s in seqs:
            self.pool.grow(s, s.length + 1)
        self.pool.sync_table(self.stage)
        rows = [[s.slot for s in seqs], [s.length for s in seqs]]
        if self.cuda_graphs:
            logits = self._decode_graph(B, rows)
        else:
            inp = self.stage.put(rows)
            width = max(len(s.blocks) for s in seqs)
            table = self.pool.table[:, :width].index_select(0, inp[0])
            tok = self._last_tok.index_select(0, inp[0])
            view = BatchView(self, table, inp[1], inp[1] + 1, 1, -1)
            logits = self.model(tok[:, None], kv_cache=view)[:, -1]     # (B, V)
        for s in seqs:
            s.length += 1
        return logits

    def capture_graphs(self) -> None:
        """Capture the decode graph of every batch bucket and the prefill graph of every
        (rows, tokens) bucket now (on CUDA; else nothing), so no capture happens while requests run."""
        b = 1
        while self.cuda_graphs:
            if b not in self._graphs:
                self._decode_graph(0, [[], []], bucket=b)
            if b >= self.max_batch:
                break
            b = min(2 * b, self.max_batch)
        for Rb, Tb in self._prefill_buckets():
            if not self.prefill_graphs:
                break
            if (Rb, Tb) not in self._pgraphs:
                self._prefill_graph([], Rb, Tb)        # padding rows only: writes go to the scratch block

    def _decode_graph(self, B: int, rows: list[list[int]], bucket: int = 0) -> torch.Tensor:
        Bb = bucket or self.bucket(B)
        g = self._graphs.get(Bb)
        pad = Bb - B
        rows = [rows[0] + [self.pool.pad_slot] * pad, rows[1] + [0] * pad]
        if g is None:
            g = DecodeGraph(Bb, self.pool.pad_slot, self.device)
        self.stage.put(rows, out=g.inp)

        def body():
            slot, write = g.inp[0], g.inp[1]
            view = BatchView(self, self.pool.table.index_select(0, slot), write, write + 1, 1, -1)
            return self.model(self._last_tok.index_select(0, slot)[:, None], kv_cache=view)[:, -1]

        if g.step is None:
            g.step, why = try_capture(body)                        # the warm-up makes the same writes
            if g.step is None:  # no graph: this and later steps run eagerly
                self.cuda_graphs, self.graph_note = False, why
                return body()[:B]
            self._graphs[Bb] = g
        return g.step.replay()[:B]

    # ---- sampling ----------------------------------------------------------------------------
    def sample(self, seqs: list[Seq], logits: torch.Tensor) -> Launched:
        """Pick every row's token on the device, keep it as the slot's next input, count it for
        penalties, and start its copy to the host (read by the next step)."""
        params = [s.req.params for s in seqs]
        slots = self.stage.put([s.slot for s in seqs])
        pen = [b for b, p in enumerate(params) if p.penalized]
        counts = None
        if pen and self._counts is None:
            self._counts = torch.zeros(self.max_batch + 1, self.vocab_size, dtype=torch.float32, device=self.device)
        if self._counts is not None and self.pool.new_slots:
            self._counts.index_fill_(0, self.stage.put(self.pool.new_slots), 0.0)
        self.pool.new_slots = []
        if pen:
            counts = self._counts.index_select(0, slots)
        res = pick(logits, params, [s.rng for s in seqs], counts, self._rng, put=self.stage.put)
        self._last_tok.index_copy_(0, slots, res.tokens)
        if pen:
            pi = self.stage.put(pen)
            self._counts.index_put_((slots[pi], res.tokens[pi]), torch.ones(len(pen), device=self.device),
                                    accumulate=True)
        out = [res.tokens] + ([] if res.logprobs is None else [res.logprobs, res.top_v, res.top_i])
        event = None
        if self.device.type == "cuda":
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in out]
            for h, t in zip(host, out):
                h.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            out = host
        for s in seqs:
            s.inflight += 1
        return Launched(seqs, out, event)
