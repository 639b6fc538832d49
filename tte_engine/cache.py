"""The paged KV cache: one pool of fixed-size blocks, and the bookkeeping of who owns which.

Every sequence owns a block table (list of block ids); token p lives in slot
`table[p // block_size] * block_size + p % block_size` of every layer's cache. A sequence is
admitted only when the pool can cover its worst case (prompt + full trace budget + suffix),
counting what earlier sequences may still claim; blocks are then taken lazily as the sequence
grows. So a running sequence never waits for memory, nothing is preempted, and a batch larger
than the cache simply waits its turn.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import CapacityError
from .model.qwen2_vl import KVCache


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, with_hidden: bool) -> int:
    t = cfg.text
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim + (t.hidden_size if with_hidden else 0)
    return per_token * block_size * elem


def allocate_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device, with_hidden: bool) -> KVCache:
    t = cfg.text
    shape = (t.num_layers, num_blocks, block_size, t.num_kv_heads, t.head_dim)
    hidden = torch.empty(num_blocks, block_size, t.hidden_size, dtype=dtype, device=device) if with_hidden else None
    return KVCache(k=torch.empty(shape, dtype=dtype, device=device), v=torch.empty(shape, dtype=dtype, device=device), hidden=hidden)


def cache_budget_bytes(budget: float | int | None, device: torch.device) -> int:
    """Bytes for the KV cache: `budget` in bytes (int), a fraction of free device memory (float <= 1), or the default.

    Call it once the weights are loaded, so "free memory" means what is left for the cache.
    """
    if budget is None:
        budget = 0.8 if device.type == "cuda" else 1 << 30  # CPU: 1 GiB
    if isinstance(budget, float) and budget <= 1.0:
        if device.type != "cuda":
            raise CapacityError("a fractional cache_memory is only meaningful on CUDA; give bytes on CPU")
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * budget)
    return int(budget)


def blocks_in(budget_bytes: int, per_block: int) -> int:
    num = budget_bytes // per_block
    if num < 1:
        raise CapacityError(f"a KV cache of {budget_bytes} bytes holds no block (one block needs {per_block} bytes)")
    return num


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: reuse warm blocks first
        self.reserved = 0  # blocks promised to admitted sequences but not yet taken

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_admit(self, worst_case_tokens: int) -> bool:
        return self.blocks_for(worst_case_tokens) <= len(self.free_blocks) - self.reserved

    def admit(self, table: list[int], worst_case_tokens: int) -> int:
        """Reserve a sequence's worst case; returns the reservation to hand back to `grow`/`free`."""
        need = self.blocks_for(worst_case_tokens) - len(table)
        self.reserved += need
        return need

    def grow(self, table: list[int], num_tokens: int, reservation: int) -> int:
        """Extend `table` to cover num_tokens; returns the reservation left."""
        while len(table) * self.block_size < num_tokens:
            if not self.free_blocks:
                raise CapacityError("KV cache exhausted despite reservations (a scheduler bug)")
            table.append(self.free_blocks.pop())
            if reservation > 0:
                reservation -= 1
                self.reserved -= 1
        return reservation

    def free(self, table: list[int], reservation: int) -> None:
        self.free_blocks.extend(table)
        table.clear()
        self.reserved -= reservation

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)
