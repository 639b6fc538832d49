"""The paged KV cache: one pool of fixed-size blocks, and the bookkeeping of who owns which.

Every sequence owns a block table (list of block ids); token p lives in slot
`table[p // block_size] * block_size + p % block_size` of every layer's cache. A sequence is
admitted only when the pool can cover its worst case (prompt + full trace budget + suffix),
counting what earlier sequences may still claim; blocks are then taken lazily as the sequence
grows. So a running sequence never waits for memory, nothing is preempted, and a batch larger
than the cache simply waits its turn.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import ModelConfig
from .errors import CapacityError
from .host_memory import advise_huge_pages
from .model.qwen2_vl import KVCache

if TYPE_CHECKING:
    from .sequence import Sequence


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, with_hidden: bool) -> int:
    t = cfg.text
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim + (t.hidden_size if with_hidden else 0)
    return per_token * block_size * elem


def allocate_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device, with_hidden: bool) -> KVCache:
    """Caches of `num_blocks` blocks plus one scratch block (id `num_blocks`, never handed out): the
    rows of a padded batch write there and padded block-table entries point there. Nothing is
    zeroed: every read masks the values it did not write (DESIGN §5), so stale blocks are harmless."""
    t = cfg.text
    shape = (t.num_layers, num_blocks + 1, block_size, t.num_kv_heads, t.head_dim)
    hidden = torch.empty(num_blocks + 1, block_size, t.hidden_size, dtype=dtype, device=device) if with_hidden else None
    cache = KVCache(k=torch.empty(shape, dtype=dtype, device=device), v=torch.empty(shape, dtype=dtype, device=device), hidden=hidden)
    for part in (cache.k, cache.v, cache.hidden):
        if part is not None:
            advise_huge_pages(part)  # CPU: fewer page faults as blocks are first written, fewer TLB misses in gathers
    return cache


def cache_budget_bytes(budget: float | int | None, device: torch.device) -> int:
    """Bytes for the KV cache: `budget` in bytes (int), a fraction of free device memory (float <= 1), or the default.

    Call it once the weights are loaded, so "free memory" means what is left for the cache.
    """
    if budget is None:
        budget = 0.8 if device.type == "cuda" else 1 << 30  # CPU: 1 GiB
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"EngineConfig.cache_memory must be bytes (an int > 0) or a fraction of free device memory (a float in "
                         f"(0, 1]), got {budget!r}")
    if isinstance(budget, float) and budget <= 1.0:
        if device.type != "cuda":
            raise CapacityError("a fractional cache_memory is only meaningful on CUDA; give bytes on CPU")
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * budget)
    return int(budget)


def blocks_in(budget_bytes: int, per_block: int) -> int:
    """Blocks a budget holds for sequences, after the one scratch block every cache keeps."""
    num = budget_bytes // per_block - 1
    if num < 1:
        raise CapacityError(f"a KV cache of {budget_bytes} bytes holds no block (one block needs {per_block} bytes, plus one scratch block)")
    return num


class BlockManager:
    """Which blocks are free, who holds which, and the block tables as one array the runner ships.

    Each admitted sequence gets a row of `tables` ([max_num_seqs + 1, max_blocks_per_seq] int32); the
    last row is the padding row, all scratch block. A row changes only when its sequence gains a
    block, and each change is queued in `updates` (flat index, block id) for the runner to apply to
    its device copy, so a step never re-sends whole tables.

    Prefix caching (vLLM's design): a full block of a prompt is keyed by a hash chain over its
    tokens (and, for image and video tokens, the content digest of their image), see
    `Sequence.prompt_block_hashes`. Blocks are reference-counted; a sequence whose prompt starts
    with cached blocks takes them instead of computing them. A block whose last holder finishes
    keeps its content and stays findable, in LRU order, until its memory is needed: free blocks are
    used first, then the least recently released cached block is evicted. Eviction happens before
    admission could fail, so cached blocks never cause an out-of-memory.
    """

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int = 256, max_blocks_per_seq: int = 256,
                 enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: reuse warm blocks first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first
        self.ref_count = [0] * num_blocks
        self.block_hash: dict[int, int] = {}  # block -> the hash it is findable by
        self.cached: dict[int, int] = {}  # hash -> block
        self.reserved = 0  # blocks promised to admitted sequences but not yet taken
        self.scratch_block = num_blocks
        self.padding_row = max_num_seqs
        self.tables = np.full((max_num_seqs + 1, max_blocks_per_seq), self.scratch_block, dtype=np.int32)
        self.free_rows: list[int] = list(range(max_num_seqs - 1, -1, -1))
        self.updates: list[tuple[int, int]] = []
        self.hits = self.queries = 0  # prefix-cache blocks found / looked up (for hit-rate metrics)
        self.pending: list[int] = []  # blocks registered for the step in flight (see `forget_pending`)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return min(self.num_blocks, self.tables.shape[1]) * self.block_size

    @property
    def num_free(self) -> int:
        """Blocks a new sequence could take: free ones and cached ones nobody holds."""
        return len(self.free_blocks) + len(self.evictable)

    def can_admit(self, worst_case_tokens: int) -> bool:
        return bool(self.free_rows) and self.blocks_for(worst_case_tokens) <= self.num_free - self.reserved

    def admit(self, seq: "Sequence", worst_case_tokens: int) -> None:
        """Give `seq` a table row and reserve its worst case (blocks are taken later, by `grow`)."""
        seq.row = self.free_rows.pop()
        seq.reservation = self.blocks_for(worst_case_tokens) - len(seq.block_table)
        self.reserved += seq.reservation

    def _append(self, seq: "Sequence", block: int) -> None:
        col = len(seq.block_table)
        self.tables[seq.row, col] = block
        self.updates.append((seq.row * self.tables.shape[1] + col, block))
        self._hold(seq, block)

    def _hold(self, seq: "Sequence", block: int) -> None:
        """`block` is the next of `seq`'s table (its table arrays written by the caller)."""
        seq.block_table.append(block)
        self.ref_count[block] += 1
        if seq.reservation > 0:  # drawn from what admission promised it
            seq.reservation -= 1
            self.reserved -= 1

    def _take_block(self) -> int:
        if self.free_blocks:
            return self.free_blocks.pop()
        if not self.evictable:
            raise CapacityError("KV cache exhausted despite reservations (a scheduler bug)")
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.block_hash.pop(block)]
        return block

    def grow(self, seq: "Sequence", num_tokens: int) -> None:
        """Extend `seq`'s table with new blocks to cover num_tokens, drawing on its reservation."""
        while len(seq.block_table) * self.block_size < num_tokens:
            self._append(seq, self._take_block())

    def grow_by_one(self, seqs: list["Sequence"]) -> None:
        """Give each of `seqs` one more block, drawing on its reservation: what `grow` does for a
        decode step whose tokens start new blocks, with the table writes in one numpy pass (at
        batch 256, in the step: ~1 instead of ~5 us a sequence)."""
        free, n = self.free_blocks, len(seqs)
        if n > self.num_free:  # before anything changes (reservations make this a scheduler bug)
            raise CapacityError(f"KV cache exhausted despite reservations: {n} blocks wanted, {self.num_free} free (a scheduler bug)")
        take = min(n, len(free))
        blocks = free[len(free) - take :][::-1]  # the blocks `take` pops would give, in that order
        del free[len(free) - take :]
        blocks += [self._take_block() for _ in range(n - take)]  # then cached blocks nobody holds, evicted
        rows = np.fromiter((seq.row for seq in seqs), np.int64, n)
        cols = np.fromiter((len(seq.block_table) for seq in seqs), np.int64, n)
        self.tables[rows, cols] = blocks
        self.updates += zip((rows * self.tables.shape[1] + cols).tolist(), blocks)
        for seq, block in zip(seqs, blocks):
            self._hold(seq, block)

    def reuse_prefix(self, seq: "Sequence", hashes: list[int]) -> int:
        """Give an empty-tabled `seq` the cached blocks its prompt starts with; returns their count."""
        found = 0
        if self.enable_prefix_caching:
            self.queries += len(hashes)
            for h in hashes:
                block = self.cached.get(h)
                if block is None:
                    break
                self.evictable.pop(block, None)  # held again: no longer evictable
                self._append(seq, block)
                found += 1
            self.hits += found
        return found

    def register(self, seq: "Sequence", hashes: list[int], num_tokens: int) -> None:
        """Make `seq`'s full prompt blocks below num_tokens findable (their KV is in the cache by the
        end of the step that computes them, which also serves sequences later in that same step)."""
        if not self.enable_prefix_caching:
            return
        for i in range(seq.num_registered, min(len(hashes), num_tokens // self.block_size)):
            block = seq.block_table[i]
            if hashes[i] not in self.cached and block not in self.block_hash:
                self.pending.append(block)  # first: an interrupt after it leaves nothing findable that a failure forgets not
                self.cached[hashes[i]] = block
                self.block_hash[block] = hashes[i]
            seq.num_registered = i + 1

    def commit(self) -> None:
        """The step in flight ran: what it registered holds what it computed."""
        self.pending.clear()

    def forget_pending(self) -> list[int]:
        """Forget the blocks the step in flight registered: it failed, so their KV may be unwritten.
        Returns those blocks."""
        forgotten = self.pending
        for block in self.pending:
            self._unfind(block)
            if block in self.evictable:
                del self.evictable[block]
                self.free_blocks.append(block)
        self.pending = []
        return forgotten

    def _unfind(self, block: int) -> None:
        """`block` no longer found by the prefix cache, if it was registered (its hash's entry is
        dropped only if it still names this block)."""
        h = self.block_hash.pop(block, None)
        if h is not None and self.cached.get(h) == block:
            del self.cached[h]

    def reclaim(self, live: list["Sequence"]) -> None:
        """After a failed step: the books rebuilt from the sequences that hold blocks (`live`, each
        stage's running ones). A block neither free, evictable nor in a live table (taken by an
        interrupted grow before a table held it) goes back to the free list, unfindable; reference
        counts, free rows and the reservation total are recounted. One pass over the blocks."""
        held = Counter(block for seq in live for block in seq.block_table)
        self.ref_count = [held.get(block, 0) for block in range(self.num_blocks)]
        for block in [b for b in self.evictable if held.get(b)]:
            del self.evictable[block]
        free = set(self.free_blocks)
        for block in range(self.num_blocks):
            if not held.get(block) and block not in free and block not in self.evictable:
                self._unfind(block)
                self.free_blocks.append(block)
        rows = {seq.row for seq in live if seq.row is not None}
        self.free_rows = [row for row in range(self.padding_row - 1, -1, -1) if row not in rows]
        self.reserved = sum(seq.reservation for seq in live)

    def free(self, seq: "Sequence") -> None:
        """Return `seq`'s blocks, row and unused reservation. Cached blocks stay findable (tail blocks
        become evictable first). Its row keeps stale block ids: only positions below a context length
        are ever read, and a new owner overwrites what it uses."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if block in self.block_hash:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table.clear()
        seq.num_registered = 0
        self.reserved -= seq.reservation
        seq.reservation = 0
        if seq.row is not None:
            self.free_rows.append(seq.row)
            seq.row = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody holds (vLLM's reset_prefix_cache); held blocks stay findable."""
        for block in self.evictable:
            del self.cached[self.block_hash.pop(block)]
            self.free_blocks.append(block)
        self.evictable.clear()

    def take_updates(self) -> list[tuple[int, int]]:
        updates, self.updates = self.updates, []
        return updates
