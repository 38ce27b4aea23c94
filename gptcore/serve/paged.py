"""The serving engine's device-side batch state: block pool, block table, staging, cache views, graphs.

    pool = BlockPool(num_blocks=1024, block_size=16, max_batch=64, max_blocks=64, device="cuda")
    slot = pool.take_slot(); pool.grow(seq, 40); pool.sync_table(stage); pool.release(seq)
    stage = Stage(device, size=4096); stage.next_step(); x = stage.put([[1, 2], [3, 4]])   # no host sync

Everything here keeps the host free of device synchronisation: the block table lives on the
device and is patched in place from the host's list of changes once per forward; host integers
reach the device through a pinned staging buffer with non-blocking copies (``torch.tensor(list,
device="cuda")`` would synchronise the stream each time).

Cache layout (the extension's paged layout, gptcore.kv_cache): storage (n_layers, 2,
num_blocks + 1, H, block_size, D); the extra last block is the scratch block that padding rows
of a graph bucket write into. The table has max_batch + 1 rows of max_blocks block ids; the last
row (the pad slot) is all scratch.
"""
from __future__ import annotations

from typing import Optional

import torch


class Stage:
    """Host integers or floats -> device tensors through pinned buffers (CUDA) or directly (CPU).

    Two banks of buffers alternate by engine step (``next_step``): the bank a step writes was
    last used two steps before, whose copies the device ran long ago (the engine has read that
    step's tokens since), so waiting for them costs nothing; the bank of the step in flight is
    never touched. Only a step that overflows its bank waits for its own earlier copies.
    """

    def __init__(self, device: torch.device, size: int, fsize: int = 1024):
        self.device = device
        self.cuda = device.type == "cuda"
        sizes = {torch.long: size, torch.float32: fsize}
        self._banks = [{dt: torch.zeros(n, dtype=dt, pin_memory=self.cuda) for dt, n in sizes.items()}
                       for _ in range(2)]
        self._done = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self._dirty = [False, False]
        self._bank = 0
        self._off = dict.fromkeys(sizes, 0)

    def put(self, rows, dtype=torch.long, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        flat = torch.tensor(rows, dtype=dtype)
        if not self.cuda:
            return flat if out is None else out.copy_(flat)
        n, bank = flat.numel(), self._banks[self._bank]
        if self._off[dtype] + n > bank[dtype].numel():
            self._wait(self._bank)                     # this step's own copies so far (rare)
            for dt in self._off:
                self._off[dt] = 0
            if n > bank[dtype].numel():
                bank[dtype] = torch.zeros(2 * n, dtype=dtype, pin_memory=True)
        off = self._off[dtype]
        st = bank[dtype][off:off + n].view_as(flat)
        self._off[dtype] = off + n
        st.copy_(flat)
        if out is None:
            out = torch.empty_like(flat, device=self.device)
        out.copy_(st, non_blocking=True)
        self._done[self._bank].record()
        self._dirty[self._bank] = True
        return out

    def _wait(self, bank: int) -> None:
        if self._dirty[bank]:
            self._done[bank].synchronize()
            self._dirty[bank] = False

    def next_step(self) -> None:
        """Switch to the other bank (its copies are two steps old) for the coming step's puts."""
        self._bank ^= 1
        self._wait(self._bank)
        for dt in self._off:
            self._off[dt] = 0


class BlockPool:
    """KV blocks and batch slots of the running sequences, with the device block table.

    A sequence (anything with ``blocks`` and ``slot``) takes a slot with its first block and
    keeps it until ``release``; ``grow`` takes blocks from the free list as its length needs
    them (admission has reserved them, so the free list never runs dry).
    """

    def __init__(self, num_blocks: int, block_size: int, max_batch: int, max_blocks: int, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch = num_blocks
        self.pad_slot = max_batch
        self.free = list(range(num_blocks - 1, -1, -1))
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self.table = torch.full((max_batch + 1, max_blocks), num_blocks, dtype=torch.int32, device=device)
        self._set: list[tuple[int, int, int]] = []     # (slot, column, block) not yet on the device
        self._clear: list[int] = []                     # slots to reset to scratch first
        self.new_slots: list[int] = []                  # slots taken since the last sync (fresh state)

    def grow(self, seq, length: int) -> None:
        need = -(-length // self.block_size) - len(seq.blocks)
        if need <= 0:
            return
        if seq.slot < 0:
            seq.slot = self.free_slots.pop()            # admission keeps running sequences <= max_batch
            self.new_slots.append(seq.slot)
        for _ in range(need):
            b = self.free.pop()
            self._set.append((seq.slot, len(seq.blocks), b))
            seq.blocks.append(b)

    def release(self, seq) -> None:
        self.free.extend(reversed(seq.blocks))
        seq.blocks = []
        seq.length = 0
        if seq.slot >= 0:
            self._clear.append(seq.slot)
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def sync_table(self, stage: Stage) -> None:
        """Apply the host's block-table changes to the device table (one small copy each)."""
        if self._clear:
            rows = stage.put(self._clear)
            self._clear = []
            self.table.index_fill_(0, rows, self.scratch)
        if self._set:
            upd = stage.put(self._set)
            self._set = []
            self.table[upd[:, 0], upd[:, 1]] = upd[:, 2].to(torch.int32)


class BatchView:
    """The model's cache protocol (gptcore.kv_cache: advance / update and what
    gptcore.ops.cached_decode_attention reads) over some rows of the paged storage.

    table (B, mb) int32 block ids, write (B,) first position each row writes, lengths (B,) keys
    each row attends to after this call; host_start: the (common) first position of a prefill
    group (0: no earlier keys to gather), -1 for decode.
    """

    def __init__(self, engine, table, write, lengths, T: int, host_start: int):
        self.e = engine
        self.max_seq_len = engine.max_seq_len
        self.attention = engine.attention
        self.table, self.write, self.lengths = table, write, lengths
        self.T, self.host_start = T, host_start

    def advance(self, T: int) -> torch.Tensor:
        return self.write[:, None] + self.e._offsets[:T]                # (B, T)

    def update(self, layer: int, k, v):
        self.store(layer, k, v)
        if self.host_start == 0:
            return k, v
        return self.gather(layer, self.host_start + k.shape[2])

    # ---- what the decode attention reads ----------------------------------------------------
    def layer_kv(self, layer: int):
        return self.e.storage[layer, 0], self.e.storage[layer, 1]       # 2 x (num_blocks + 1, H, bs, D)

    def block_rows(self):
        return self.table

    def store(self, layer: int, k, v) -> None:
        kc, vc = self.layer_kv(layer)
        self.e._ops.paged_append(kc, vc, k, v, self.table, self.write, False)

    def gather(self, layer: int, n: int):
        kc, vc = self.layer_kv(layer)
        return (self.e._ops.paged_gather(kc, self.table, self.lengths, n),
                self.e._ops.paged_gather(vc, self.table, self.lengths, n))

    def capacity(self) -> int:
        return self.table.shape[1] * self.e.block_size

    def positions(self, n: int) -> torch.Tensor:
        return self.e._offsets[:n]


class DecodeGraph:
    """One batch bucket's captured decode step. Its only host-written input is ``inp`` (2, B):
    slot and write position per row; the input token of each row is read on the device from the
    engine's last-token buffer at the row's slot (the previous step's sample, never seen by the
    host first), and the block-table rows are gathered from the device table inside the graph."""

    def __init__(self, B: int, pad_slot: int, device):
        self.inp = torch.zeros((2, B), dtype=torch.long, device=device)
        self.inp[0] = pad_slot
        self.step = None        # the CapturedStep; its output: logits (B, V)


class PrefillGraph:
    """One (rows, tokens) bucket's captured prefill forward over first chunks. Its only input is
    ``inp`` (Rb, Tb + 1): each row's token ids (right-padded) and, in the last column, its slot
    (the pad slot for padding rows); every row writes from position 0."""

    def __init__(self, Rb: int, Tb: int, pad_slot: int, device):
        self.inp = torch.zeros((Rb, Tb + 1), dtype=torch.long, device=device)
        self.inp[:, Tb] = pad_slot
        self.step = None        # the CapturedStep; its output: hidden states (Rb, Tb, C)
