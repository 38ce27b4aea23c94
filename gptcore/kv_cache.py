"""KV caches for generation: a static preallocated cache and a paged (block-table) cache.

    cache = KVCache.for_model(model, batch_size=4, max_seq_len=256)          # static
    cache = PagedKVCache.for_model(model, batch_size=4, max_seq_len=256)     # paged, 16-token blocks
    logits = model(prompt_ids, kv_cache=cache)     # prefill: stores keys/values of every layer
    logits = model(next_ids, kv_cache=cache)       # decode: (B, 1) tokens, attends to the cache

Layouts (stored through gptcore._C's ops; read by gptcore.ops.cached_decode_attention):
    KVCache       storage (n_layers, 2, B, H, max_seq_len, D); layer l's keys are storage[l, 0]
    PagedKVCache  storage (n_layers, 2, num_blocks, H, block_size, D) and a block table
                  (B, max_blocks) int32: token t of sequence b lives in block
                  block_table[b, t // block_size] at slot t % block_size; -1 = no block yet.
                  Blocks come from a free list as sequences grow and return to it when they
                  are truncated, reordered away or reset.

Protocol used by gptcore.model.GPT (each forward, in this order):
    pos = cache.advance(T)                   # (B, T) positions of the new tokens; claims them
    k_all, v_all = cache.update(layer, k, v)  # T > 1: store, return this layer's keys so far
    y = cached_decode_attention(cache, layer, q, k, v)   # T == 1 (gptcore.ops): store, attend over
                                              # each sequence's length
The cache stores and hands out; the attention read lives in the ops layer, which uses
``attention`` (the implementation's name), ``lengths``, ``layer_kv(layer)`` (this layer's storage),
``block_rows()`` (the active rows' block table, None for the static cache), ``store(layer, k, v)``,
``gather(layer, n)`` (keys/values of positions < n, (B, H, n, D) each), ``capacity()`` and
``positions(n)``. gptcore.serve's BatchView speaks the same protocol over the engine's storage.
Each sequence has its own length (``cache.lengths``, a (B,) device tensor), so sequences of a batch
may sit at different positions: prompts of different lengths are prefilled right-padded to one
length (causal attention never lets a real token see the padding after it), then
``set_lengths(prompt_lengths)`` rewinds each sequence to its own end and decoding overwrites the
padding slot by slot (decode attention reads only keys below each sequence's length).
Several tokens per call (update) need every sequence at the same position.

Host-side shadow counters: the cache mirrors every length on the host (python ints), so capacity
checks and block allocation never read the GPU. ``reserve(T)`` validates and allocates from the
shadows and raises before anything changes when a sequence would pass ``max_seq_len`` or the
paged cache runs out of blocks, so the cache stays usable after the error. Inside a CUDA graph the
device part of ``advance`` (lengths += T) is replayed by the GPU while gptcore.generate calls
``reserve(1)`` on the host before each replay (``external_reservation()``), and the extension ops
skip their host-side bounds reads during capture (see csrc/kv_cache_cuda.cu).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterable, Optional, Sequence

import torch

from gptcore import _ext

ATTENTION_IMPLS = ("triton", "torch", "reference")


def default_attention(device: torch.device) -> str:
    """'triton' where the decode kernel can run (CUDA, or the interpreter on CPU), else 'torch'."""
    if importlib.util.find_spec("triton") is None:
        return "torch"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


class _Cache:
    """What the static and the paged cache share: lengths, host shadows, the model protocol."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype, device, attention: str):
        for name, v in (("n_layers", n_layers), ("n_heads", n_heads), ("head_dim", head_dim),
                        ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {v!r}")
        self.n_layers, self.n_heads, self.head_dim = n_layers, n_heads, head_dim
        self.max_batch_size = batch_size
        self.batch_size = batch_size          # active sequences (reorder may shrink it)
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.device = torch.device(device)
        attention = default_attention(self.device) if attention == "auto" else attention
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be 'auto' or one of {ATTENTION_IMPLS}, got {attention!r}")
        self.attention = attention
        self._lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)   # (B,)
        self._write = torch.zeros(batch_size, dtype=torch.long, device=self.device)     # (B,)
        self._offsets = torch.arange(max_seq_len, device=self.device)                   # (max_seq_len,)
        self._host_lengths = [0] * batch_size
        self._host_write = [0] * batch_size
        self._external = False
        self._ops = _ext.ops()

    def _check_reorder_index(self, index: Iterable[int]) -> list[int]:
        """reorder's index as host ints, checked against the active sequences and the cache's rows."""
        index = [int(i) for i in index]
        B = self.batch_size
        if not index or any(not 0 <= i < B for i in index):
            raise ValueError(f"reorder: index must be a non-empty list of sequences in [0, {B}), got {index}")
        if len(index) > self.max_batch_size:
            raise ValueError(f"reorder: {len(index)} sequences exceed the cache's {self.max_batch_size} rows")
        return index

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: Optional[int] = None, dtype=None, device=None,
                  attention: Optional[str] = None, **kwargs):
        """A cache shaped for ``model`` (layers, heads, head_dim, its dtype and device).

        attention: decode-attention implementation; default follows the model's backend
        (triton -> the Triton kernel, torch -> SDPA with a length mask, reference -> masked softmax).
        """
        cfg = model.config
        max_seq_len = cfg.context_length if max_seq_len is None else max_seq_len
        if max_seq_len > cfg.context_length:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context_length {cfg.context_length}")
        p = next(model.parameters())
        return cls(cfg.n_layers, cfg.n_heads, cfg.head_dim, batch_size, max_seq_len,
                   dtype=dtype or p.dtype, device=device or p.device,
                   attention=attention or getattr(getattr(model, "ops", None), "decode_attention", None) or "auto", **kwargs)

    # ---- lengths -----------------------------------------------------------------------------
    @property
    def lengths(self) -> torch.Tensor:
        """(B,) int64 on the cache's device: tokens stored per active sequence."""
        return self._lengths[: self.batch_size]

    def host_lengths(self) -> list[int]:
        return list(self._host_lengths[: self.batch_size])

    def reserve(self, T: int) -> None:
        """Claim T more positions for every active sequence on the host shadows (no GPU read).

        Raises before changing anything if a sequence would pass max_seq_len, if T > 1 while the
        sequences sit at different positions, or (paged) if no blocks are left.
        """
        B = self.batch_size
        if T > 1 and len(set(self._host_lengths[:B])) > 1:
            raise ValueError(
                f"{type(self).__name__}: {T} tokens per sequence with sequences at different positions "
                f"{self._host_lengths[:B]}; multi-token steps need one common position. Prefill prompts of "
                f"different lengths together from an empty cache (right-padded), then decode one token at a time")
        worst = max(self._host_lengths[:B])
        if worst + T > self.max_seq_len:
            b = self._host_lengths[:B].index(worst)
            raise ValueError(
                f"{type(self).__name__} is full: sequence {b} holds {worst} tokens and {T} more need "
                f"{worst + T} positions, but the cache holds max_seq_len={self.max_seq_len} (build it with a "
                f"larger max_seq_len, at most the model's context_length, or generate fewer tokens)")
        self._allocate(T)
        self._host_write[:B] = self._host_lengths[:B]
        self._host_lengths[:B] = [n + T for n in self._host_lengths[:B]]

    @contextlib.contextmanager
    def external_reservation(self):
        """Inside, advance() leaves the host shadows alone: the caller runs reserve() itself
        (as gptcore.generate does before each CUDA-graph replay)."""
        prev, self._external = self._external, True
        try:
            yield self
        finally:
            self._external = prev

    def advance(self, T: int) -> torch.Tensor:
        """Claims the next T positions of every active sequence; returns them, (B, T) int64."""
        if not self._external:
            self.reserve(T)
        B = self.batch_size
        write = self._write[:B]
        write.copy_(self._lengths[:B])
        self._lengths[:B].add_(T)
        return write[:, None] + self._offsets[:T]

    def save_lengths(self) -> torch.Tensor:
        """A copy of the device lengths (to undo a trial step, e.g. a CUDA-graph warm-up)."""
        return self._lengths.clone()

    def restore_lengths(self, saved: torch.Tensor) -> None:
        self._lengths.copy_(saved)

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Rewind each active sequence to lengths[b] tokens (<= what it holds); the rest is dropped."""
        lengths = [int(n) for n in lengths]
        if len(lengths) != self.batch_size:
            raise ValueError(f"set_lengths: got {len(lengths)} lengths for {self.batch_size} sequences")
        for b, (n, have) in enumerate(zip(lengths, self._host_lengths)):
            if not 0 <= n <= have:
                raise ValueError(f"set_lengths: sequence {b} holds {have} tokens, cannot set it to {n}")
        self._release_beyond(lengths)
        self._host_lengths[: self.batch_size] = lengths
        self._lengths[: self.batch_size].copy_(torch.tensor(lengths, dtype=torch.long), non_blocking=True)

    def reset(self, batch_size: Optional[int] = None) -> None:
        """Empty every sequence (and optionally use only the first batch_size rows)."""
        batch_size = self.max_batch_size if batch_size is None else batch_size
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"reset: batch_size must be in [1, {self.max_batch_size}], got {batch_size}")
        self.batch_size = self.max_batch_size
        self._release_beyond([0] * self.max_batch_size)
        self._host_lengths = [0] * self.max_batch_size
        self._host_write = [0] * self.max_batch_size
        self._lengths.zero_()
        self.batch_size = batch_size

    # ---- model protocol ----------------------------------------------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, D) at this step's positions; return the layer's keys and values so far.

        Needs every sequence at the same position (true for a prefill from empty and for a
        uniform batch); prompts of different lengths are prefilled right-padded from position 0.
        """
        T = k.shape[2]
        p = self._host_write[0]  # common to every sequence: reserve() refuses T > 1 otherwise
        self.store(layer, k, v)
        if p == 0:
            return k, v
        return self.gather(layer, p + T)

    def positions(self, n: int) -> torch.Tensor:
        """(n,) int64 0..n-1 on the cache's device (preallocated: no launch per layer)."""
        return self._offsets[:n]

    # ---- accounting --------------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies: keys and values of every layer."""
        return 2 * self.n_layers * self.n_heads * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def bytes_allocated(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def bytes_for_tokens(self) -> int:
        """Bytes holding the keys and values of the tokens stored now."""
        return sum(self._host_lengths[: self.batch_size]) * self.bytes_per_token()

    def unused_fraction(self) -> float:
        """Share of bytes_in_use() not holding a stored token (padding, reserved room)."""
        used = self.bytes_in_use()
        return 1.0 - self.bytes_for_tokens() / used if used else 0.0

    # ---- layout hooks ------------------------------------------------------------------------
    def _allocate(self, T: int) -> None:
        pass

    def _release_beyond(self, lengths: list[int]) -> None:
        pass

    def block_rows(self):
        """The active sequences' block-table rows (B, max_blocks) int32; None: not paged."""
        return None

    # gptcore.decode_step reads the storage through these two names
    def _layer(self, layer: int):
        return self.layer_kv(layer)

    def _block_table(self):
        return self.block_rows()


class KVCache(_Cache):
    """Static cache: storage (n_layers, 2, batch_size, H, max_seq_len, D), preallocated."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device="cpu", attention: str = "auto"):
        super().__init__(n_layers, n_heads, head_dim, batch_size, max_seq_len, dtype, device, attention)
        # zeros, not empty: masked-out keys/values are multiplied by 0, which must not meet a NaN
        self.storage = torch.zeros(n_layers, 2, batch_size, n_heads, max_seq_len, head_dim,
                                   dtype=dtype, device=self.device)

    def bytes_in_use(self) -> int:
        """The whole preallocated buffer: a static cache holds max_seq_len for every sequence."""
        return self.bytes_allocated()

    def capacity(self) -> int:
        return self.max_seq_len

    def layer_kv(self, layer: int):
        B = self.batch_size
        return self.storage[layer, 0, :B], self.storage[layer, 1, :B]  # 2 x (B, H, T_max, D)

    def store(self, layer: int, k, v) -> None:
        kc, vc = self.layer_kv(layer)
        self._ops.kv_append_kv(kc, vc, k, v, self._write[: self.batch_size], False)  # bounds: reserve()

    def gather(self, layer: int, n: int):
        kc, vc = self.layer_kv(layer)
        return kc[:, :, :n], vc[:, :, :n]

    def reorder(self, index: Iterable[int]) -> None:
        """Keep sequences ``index`` (host ints, repeats allowed) as the new rows 0..len(index)-1."""
        index = self._check_reorder_index(index)
        B = self.batch_size
        n = max(self._host_lengths[i] for i in index)
        idx = torch.tensor(index, dtype=torch.long).to(self.device, non_blocking=True)
        L, _, Bmax, H, T, D = self.storage.shape
        self._ops.kv_reorder(self.storage.view(L * 2, Bmax, H, T, D), idx, n)
        self._lengths[: len(index)].copy_(self._lengths[:B].index_select(0, idx))
        self._host_lengths[: len(index)] = [self._host_lengths[i] for i in index]
        self._host_write[: len(index)] = [self._host_write[i] for i in index]
        self.batch_size = len(index)


class PagedKVCache(_Cache):
    """Paged cache: fixed-size blocks handed to sequences from a free list as they grow."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device="cpu", attention: str = "auto",
                 block_size: int = 16, num_blocks: Optional[int] = None):
        super().__init__(n_layers, n_heads, head_dim, batch_size, max_seq_len, dtype, device, attention)
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"PagedKVCache: block_size must be a power of two, got {block_size}")
        self.block_size = block_size
        self.max_blocks = -(-max_seq_len // block_size)     # blocks one sequence can hold
        self.num_blocks = batch_size * self.max_blocks if num_blocks is None else num_blocks
        if self.num_blocks <= 0:
            raise ValueError(f"PagedKVCache: num_blocks must be positive, got {self.num_blocks}")
        self.storage = torch.zeros(n_layers, 2, self.num_blocks, n_heads, block_size, head_dim,
                                   dtype=dtype, device=self.device)
        self.block_table = torch.full((batch_size, self.max_blocks), -1, dtype=torch.int32, device=self.device)
        self._blocks: list[list[int]] = [[] for _ in range(batch_size)]   # host copy of the table
        self._free = list(range(self.num_blocks - 1, -1, -1))              # pop() hands out 0, 1, ...

    def bytes_in_use(self) -> int:
        """Bytes of the blocks held by sequences now."""
        return (self.num_blocks - len(self._free)) * self.block_size * self.bytes_per_token()

    def free_blocks(self) -> int:
        return len(self._free)

    def capacity(self) -> int:
        return self.max_blocks * self.block_size

    def block_rows(self):
        return self.block_table[: self.batch_size]

    def layer_kv(self, layer: int):
        return self.storage[layer, 0], self.storage[layer, 1]  # 2 x (num_blocks, H, block_size, D)

    def store(self, layer: int, k, v) -> None:
        kc, vc = self.layer_kv(layer)
        B = self.batch_size
        self._ops.paged_append(kc, vc, k, v, self.block_table[:B], self._write[:B], False)  # bounds: reserve()

    def gather(self, layer: int, n: int):
        kc, vc = self.layer_kv(layer)
        B = self.batch_size
        table, lengths = self.block_table[:B], self._lengths[:B]
        # bounds: reserve() keeps every length <= n and every block id in the table (no host sync per layer)
        return (self._ops.paged_gather(kc, table, lengths, n, False),
                self._ops.paged_gather(vc, table, lengths, n, False))

    def _sync_table(self) -> None:
        host = torch.full((self.max_batch_size, self.max_blocks), -1, dtype=torch.int32)
        for b, ids in enumerate(self._blocks):
            host[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        self.block_table.copy_(host, non_blocking=True)

    def _allocate(self, T: int) -> None:
        B, bs = self.batch_size, self.block_size
        need = [max(0, -(-(self._host_lengths[b] + T) // bs) - len(self._blocks[b])) for b in range(B)]
        total = sum(need)
        if total == 0:
            return
        if total > len(self._free):
            raise RuntimeError(
                f"PagedKVCache is out of blocks: {T} more tokens for {B} sequences need {total} new blocks of "
                f"{bs} tokens but {len(self._free)} of {self.num_blocks} are free (build it with more "
                f"num_blocks, or run fewer sequences)")
        for b in range(B):
            self._blocks[b].extend(self._free.pop() for _ in range(need[b]))
        self._sync_table()

    def _release_beyond(self, lengths: list[int]) -> None:
        changed = False
        for b, n in enumerate(lengths):
            keep = -(-n // self.block_size)
            if len(self._blocks[b]) > keep:
                self._free.extend(reversed(self._blocks[b][keep:]))
                del self._blocks[b][keep:]
                changed = True
        if changed:
            self._sync_table()

    def reorder(self, index: Iterable[int]) -> None:
        """Keep sequences ``index`` as rows 0..len(index)-1: block-table rows move, nothing is copied,
        except that a sequence taken twice (beam search) gets its own copy of the blocks."""
        index = self._check_reorder_index(index)
        B = self.batch_size
        kept = set(index)
        dropped = [b for b in range(B) if b not in kept]
        fork_need = sum(len(self._blocks[i]) for i in index) - sum(len(self._blocks[i]) for i in kept)
        freed = sum(len(self._blocks[b]) for b in dropped)
        if fork_need > len(self._free) + freed:
            raise RuntimeError(f"PagedKVCache.reorder: copying repeated sequences needs {fork_need} blocks, "
                               f"{len(self._free) + freed} would be free")
        old = self._blocks
        new_rows: list[list[int]] = []
        seen: set[int] = set()
        src, dst = [], []
        for b in dropped:
            self._free.extend(reversed(old[b]))
        for i in index:
            if i not in seen:
                seen.add(i)
                new_rows.append(old[i])
            else:
                ids = [self._free.pop() for _ in old[i]]
                src += old[i]
                dst += ids
                new_rows.append(ids)
        if src:
            s = torch.tensor(src, device=self.device)
            d = torch.tensor(dst, device=self.device)
            self.storage.index_copy_(2, d, self.storage.index_select(2, s))
        self._blocks = new_rows + [[] for _ in range(self.max_batch_size - len(index))]
        idx = torch.tensor(index, dtype=torch.long).to(self.device, non_blocking=True)
        self._lengths[: len(index)].copy_(self._lengths[:B].index_select(0, idx))
        self._host_lengths = [self._host_lengths[i] for i in index] + [0] * (self.max_batch_size - len(index))
        self._host_write = [self._host_write[i] for i in index] + [0] * (self.max_batch_size - len(index))
        self.batch_size = len(index)
        self._sync_table()
