"""Attention over a paged KV cache: the cache write, decode attention and prefill attention.

Cache layout (per layer): `k_cache`, `v_cache` are [num_blocks, block_size, KVH, head_dim].
A sequence owns a list of blocks (its row of `block_tables`, int32 [B, max_blocks]); token at
position p lives in slot `block_tables[b, p // block_size] * block_size + p % block_size`.

- `store_kv` writes the k/v of a packed batch into the slots of `slot_mapping`. Every row is
  written: a row that must not land in a sequence's cache (a padded batch row) is sent to a
  scratch slot its caller owns (the engine keeps one block for that), so no op needs a mask.
- `decode_attention`: one query token per sequence against its `context_lens[b]` cached tokens
  (the new token's k/v already stored). GQA: query head h reads KV head h // (H // KVH).
- `prefill_attention`: the packed queries of each sequence (`cu_seqlens_q`) are its last
  q_len tokens of `context_lens[b]`; causal, so they see the cached prefix plus themselves.
  This one op serves a fresh prompt, a later chunk of a long prompt and the embed suffix
  appended after a trace.

Cost: decode reads context_len * KVH * head_dim * 2 * b bytes per sequence (the KV) and does
~4 * H * head_dim flops per context token; memory-bound. Prefill does ~4 * q_len * ctx * H *
head_dim flops (half of it masked away by causality) and is compute-bound for long prompts.

Triton kernels (online softmax in fp32, exp2 with log2(e) folded into the scale; both read K/V
through the block table in place, token by token, so any block_size works):
- decode is flash-decoding: grid (B, KVH, splits). Each program takes one KV head, all of its
  GQA query heads as the rows of one tl.dot, and a contiguous split of the context; every
  sequence cuts its own context into `splits` equal parts on the device (no host sync, so it
  can be captured in a CUDA graph). A second kernel merges the splits' partial outputs by
  their log-sum-exp. An empty context gives zeros, as SDPA does for a fully masked row.
- prefill is FlashAttention-2 forward over the varlen batch: grid (query tiles, H, B), keys
  from 0 to the tile's last query position, causal mask on absolute positions. It needs the
  longest q_len on the host (one sync) to size its grid.
SDPA is not used by the Triton path. Whether SDPA's flash backend on the packed q/k/v would beat
the paged prefill kernel for a fresh prompt (no cached prefix) is pending a GPU measurement:
benchmarks/gpu_check.py times both kernels against the SDPA-based references.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, interpreting, next_pow2, use_triton


def store_kv_torch(k, v, k_cache, v_cache, slot_mapping):
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype))


def _rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, KVH, hd] at int64 `slots` (flat): [len(slots), KVH * hd], a copy.

    `index_select` on rows measured 3-5x faster than advanced indexing (`cache[slots]`) on CPU
    (torch 2.13, 600-4,000 rows), and as fast as on the [slots, KVH, hd] view, or 2-3x faster where
    freed heap memory goes back to the OS (head_dim 128)."""
    return cache.view(-1, cache.shape[2] * cache.shape[3]).index_select(0, slots)


def _context_slots(block_tables: torch.Tensor, context_lens: torch.Tensor | None, width: int,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cache slot of positions 0 .. width - 1 of each sequence of `block_tables` [B, width] int64,
    which of them lie inside the context [B, width] bool, None when `context_lens` is None).

    A position at or past its sequence's context length (a block's unwritten tail, a padding entry of
    the table) gives the slot of the sequence's position 0 instead: every caller masks its score, but
    the value is still multiplied by that zero, and unwritten cache memory may hold NaN (0 * NaN = NaN).
    Position 0's slot is one the sequence wrote (a padded decode row's is the scratch block's). Zeroing
    a gathered copy instead measured slower on CPU. `context_lens` None: every context is `width` long.
    """
    bsz, blocks = block_tables.shape[0], -(-width // block_size)
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables[:, :blocks].long() * block_size)[:, :, None].add(offsets).view(bsz, blocks * block_size)[:, :width]
    if context_lens is None:
        return slots, None
    valid = torch.arange(width, device=slots.device) < context_lens[:, None]
    return torch.where(valid, slots, slots[:, :1]), valid


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor | None, width: int) -> torch.Tensor:
    """The first `width` cached positions of each sequence of `block_tables`: [B, KVH, width, hd]
    (positions past a context hold position 0's k/v; see `_context_slots`)."""
    slots, _ = _context_slots(block_tables, context_lens, width, cache.shape[1])
    return _rows(cache, slots.reshape(-1)).view(slots.shape[0], width, *cache.shape[2:]).transpose(1, 2)


class DecodePlan(NamedTuple):
    """What `decode_attention_torch` reads, worked out once per step (every layer shares it)."""

    slots: torch.Tensor  # [B * span] int64: the cache slot of each position the span reads (see `_context_slots`)
    mask: torch.Tensor  # [B, 1, 1, span] fp32: additive key mask, 0 or -inf
    nonempty: torch.Tensor | None  # [B, 1, 1] bool: rows with a context (None: every row has one)
    kept: KeptContext | None = None  # a host plan's gathered keys and values, kept from step to step


# A host plan keeps its gathered context (`KeptContext`) from step to step only from this many
# rows (batch x span) up: below, gathering them costs about what copying in the new rows does
# (the micro model's batch-1 decode forward was ~2% slower keeping them; stop 21). And at most
# this many bytes of them per plan (over all layers; past it, a layer gathers at every step as
# before): each layer's kept keys and values are as large as its gather's temporaries, which
# were freed layer by layer. An engine bounds it further by its KV cache (`Runner`: a quarter of
# the cache's bytes), so that a small `cache_memory` is not outgrown by this copy of it.
KEEP_MIN_ROWS = 512
KEPT_CONTEXT_BYTES = 256 << 20


class KeptContext:
    """Each layer's gathered context keys and values (`_rows` of the plan's slots), kept from one
    decode step to the next while the plan's layout stays: a step then copies in each row's new
    key and value (B cache rows per layer and tensor) where it would gather all B x span rows
    again. At batch 64 / 256 of the micro model (spans of ~50-180 positions) the decode forward
    took 0.87 / 0.73-0.78 of the time it took gathering (stop 21, the 2-core Xeon VM, one
    thread). Equal to the gather bit for bit: copies of the same cache rows (positions past a
    context hold position 0's k/v in both, and the cache rows under the plan's positions do not
    change while the batch lives, as `HostDecodePlan` assumes). Layers are told apart by their
    cache's address; at most `max_bytes` are kept (None: KEPT_CONTEXT_BYTES).

    Made by `HostDecodePlan._publish` (a CPU engine) for each new layout; `HostDecodePlan.step`
    sets `new_keys` and `new_slots` at every step that follows on from the last."""

    def __init__(self, slots: torch.Tensor, max_bytes: int | None = None):
        self.slots = slots  # [B * span] int64: the plan's
        self.max_bytes = max_bytes
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bytes = 0  # kept so far
        # this step's new key of each row: its flat position in the span ([B] int64) and its cache slot ([B] int64)
        self.new_keys: torch.Tensor | None = None
        self.new_slots: torch.Tensor | None = None

    def rows(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's context keys and values, [B * span, KVH * hd] each, this step's new ones
        included (the caller stores them in the cache first)."""
        layer = k_cache.data_ptr()
        kept = self.layers.get(layer)
        if kept is not None:
            kept[0].index_copy_(0, self.new_keys, _rows(k_cache, self.new_slots))
            kept[1].index_copy_(0, self.new_keys, _rows(v_cache, self.new_slots))
            return kept
        gathered = _rows(k_cache, self.slots), _rows(v_cache, self.slots)
        size = 2 * gathered[0].nbytes
        if self.bytes + size <= (KEPT_CONTEXT_BYTES if self.max_bytes is None else self.max_bytes):
            self.layers[layer] = gathered
            self.bytes += size
        return gathered


def decode_plan(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> DecodePlan:
    """What `decode_attention_torch` reads, worked out once per step (every layer shares it):
    (cache slots [B * span] int64 (see `_context_slots`), additive key mask [B, 1, 1, span] fp32,
    non-empty rows [B, 1, 1] bool) for span = the table's width in tokens.

    The mask is additive (0 or -inf) because SDPA's CPU kernel would convert a boolean mask in
    every layer; the results are the same bit for bit. Position 0 stays unmasked in an empty
    context (a padded row), whose output is replaced by zeros."""
    slots, valid = _context_slots(block_tables, context_lens, block_tables.shape[1] * block_size, block_size)
    masked = ~valid
    masked[:, 0] = False
    mask = torch.zeros(masked.shape, dtype=torch.float32, device=masked.device).masked_fill_(masked, float("-inf"))
    return DecodePlan(slots.view(-1), mask[:, None, None, :], (context_lens > 0)[:, None, None])


# Steps whose new-key positions `HostDecodePlan` works out at once: a step then takes a row of them
# where until stop 18 it added 1 to every position in place: a numpy ufunc call, ~5 us of a batch-1 decode
# step's ~75 us of host work right after a forward (stop 18, micro model, alternating step by step:
# the host work beside the forward 7-9% less).
KEYS_AHEAD = 16


class HostDecodePlan:
    """`decode_plan` worked out in numpy on the host, for a CPU engine (where its dozen small torch
    ops cost ~40 us a step), and kept up to date over the decode steps of one batch.

    From one step to the next every sequence gains one token, so the plan gains one slot and one
    unmasked key per row: B scattered writes instead of rebuilding all B x span entries (at batch
    256 and ~100 cached tokens, in the step: ~200 -> ~40 us). When the span grows by whole blocks
    the plan gains masked columns (a copy, not a rebuild: the new positions are past every
    context). It is rebuilt when a step does not follow on from the last one it saw (`tick`) and
    when the span shrinks. Every row holds a token (a decoding sequence), so the plan's non-empty
    rows are None: nothing to zero. The tensors it returns share memory with the arrays it
    updates, so a plan is good for its own step only. It assumes the table entries of positions
    already in the plan do not change while the batch lives (blocks are never moved or copied on
    write here)."""

    def __init__(self, max_kept_bytes: int | None = None):
        """`max_kept_bytes`: what its `KeptContext` may hold (None: KEPT_CONTEXT_BYTES)."""
        self.width, self.plan, self.tick = -1, None, None
        self.max_kept_bytes = max_kept_bytes

    def step(self, tables: np.ndarray, rows: np.ndarray, context_lens: np.ndarray, slots: np.ndarray, width: int, block_size: int,
             tick: int) -> DecodePlan:
        """The plan of a step in which row b's context holds context_lens[b] tokens (int64 [B]), the
        last of them new, at cache slot slots[b] (int64 [B]), reading `width` blocks of rows `rows`
        (int64 [B]) of the block-table array `tables` ([max_seqs, max_blocks] int32): equal to
        `decode_plan(tables[rows, :width], context_lens, block_size)` (tested). `tick` (int) counts
        the steps of the batch: the plan is updated in place when it is one more than the last
        step's (every context one longer), and rebuilt otherwise."""
        follows, self.tick = self.plan is not None and tick == self.tick + 1, tick
        if not follows or width < self.width:
            span = width * block_size
            every = (tables[rows, :width].astype(np.int64) * block_size)[:, :, None] + np.arange(block_size)
            every = every.reshape(len(rows), span)  # the slot of each position the span reads
            valid = np.arange(span) < context_lens[:, None]
            self.slots, self.mask = np.where(valid, every, every[:, :1]), np.where(valid, np.float32(0), np.float32(-np.inf))
            self.width = width
            self._publish(context_lens - 1)
            return self.plan
        if width > self.width:  # positions past every context so far: position 0's slot, masked
            extra = (width - self.width) * block_size
            self.slots = np.concatenate([self.slots, np.repeat(self.slots[:, :1], extra, axis=1)], axis=1)
            self.mask = np.concatenate([self.mask, np.full((len(self.mask), extra), -np.inf, dtype=np.float32)], axis=1)
            self.width = width
            self._publish(context_lens - 2)  # the last step's new keys
        if self.taken == KEYS_AHEAD:
            self._plan_keys(self.new_keys)
        self.new_keys = self.keys[self.taken]  # each row's new key: the one after the last step's
        self.taken += 1
        # assignments at flat positions of flat views, from arrays of the same length: numpy's fast
        # path (warm: 0.2 us at batch 1, 1.4 at 256, where two `put`s took 0.5 and 2.5)
        self.flat_slots[self.new_keys] = slots
        self.flat_mask[self.new_keys] = self.zeros
        if self.kept is not None:
            self.kept.new_keys, self.kept.new_slots = torch.from_numpy(self.new_keys), torch.from_numpy(slots)
        return self.plan

    def keep_rows(self, keep: np.ndarray) -> None:
        """Rows of the batch leave: keep the plan of the rows where `keep` (bool [B]) is True, in order."""
        if self.plan is None:
            return
        last = (self.new_keys - self.row_starts)[keep]  # the kept rows' last new key, as a position
        self.slots, self.mask = self.slots[keep], self.mask[keep]
        self._publish(last)

    def _publish(self, last: np.ndarray) -> None:
        """The plan as `decode_attention_torch` takes it: views of the arrays `step` updates. `last`
        (int64 [B]): the position of each row's last new key (the flat positions `step` moves on)."""
        self.row_starts = np.arange(0, self.slots.size, self.slots.shape[1])  # each row's first flat position
        self._plan_keys(self.row_starts + last)
        self.flat_slots, self.flat_mask = self.slots.reshape(-1), self.mask.reshape(-1)  # what `step` writes; the plan reads them
        self.zeros = np.zeros(len(self.mask), dtype=np.float32)  # an unmasked key for every row
        slots = torch.from_numpy(self.flat_slots)
        self.kept = KeptContext(slots, self.max_kept_bytes) if self.slots.size >= KEEP_MIN_ROWS else None
        self.plan = DecodePlan(slots, torch.from_numpy(self.flat_mask).view(self.mask.shape)[:, None, None, :], None, self.kept)

    def _plan_keys(self, last_keys: np.ndarray) -> None:
        """The flat positions of each row's new key in the next KEYS_AHEAD steps ([KEYS_AHEAD, B]
        int64, one further a step) after `last_keys` (int64 [B]), the last step's."""
        self.new_keys, self.keys, self.taken = last_keys, last_keys + np.arange(1, KEYS_AHEAD + 1)[:, None], 0


def decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale, plan: DecodePlan | None = None):
    bsz = q.shape[0]
    block_size, kvh, hd = k_cache.shape[1:]
    slots, mask, nonempty, kept = plan if plan is not None else decode_plan(block_tables, context_lens, block_size)
    k, v = (_rows(k_cache, slots), _rows(v_cache, slots)) if kept is None else kept.rows(k_cache, v_cache)
    k, v = k.view(bsz, -1, kvh, hd).transpose(1, 2), v.view(bsz, -1, kvh, hd).transpose(1, 2)  # [B, KVH, span, hd]
    if k.dtype != q.dtype:  # an fp8 cache
        k, v = k.to(q.dtype), v.to(q.dtype)
    heads, mask = q.shape[1], mask.to(q.dtype)
    # each GQA group's query heads as the rows of one [group, hd] query (see the note below)
    out = F.scaled_dot_product_attention(q.view(bsz, kvh, heads // kvh, hd), k, v, attn_mask=mask, scale=scale).view(bsz, heads, hd)
    return out if nonempty is None else torch.where(nonempty, out, 0)  # an empty context (a padded row) gives zeros


# Decode attention on CPU: SDPA's flash kernel handles one query row per (sequence, head) poorly;
# given each GQA group's query heads as the rows of one query (the same scores, one fused call per
# KV head instead of one per query head; with no GQA, a group of one is the one-row layout) it ran
# 1.3-3x faster at every shape measured (stop 18: a 2-core Xeon VM, torch 2.13, 1 and 2 threads,
# head_dim 16 / 64 / 128, batch 1-256, 128 and 1,024 cached tokens, keys gathered as the engine
# gathers them). On the 2-core EPYC VM of earlier stops it measured 1.7-2.5x at head_dim 128, but
# at 16-64 it was reported no faster and up to 2x slower with 2 threads, so until stop 18 only
# head_dim >= 128 used it; only the test models have head_dim < 128. It is batch-invariant to ~1e-7
# rather than bit for bit (a row padded to a longer span in a batch differs in the last bits from
# the same row alone), inside the parity contract. Plain q @ k^T, softmax, @ v was slower at every
# one of those shapes (2-10x at batch >= 16: the gathered keys are strided).


def varlen_groups(q_lens: list[int], ctxs: list[int], max_padding: float = 0.5) -> list[tuple[list[int], bool]]:
    """Batches of a varlen step's sequences for padded 4-D SDPA calls (a batch dimension is what
    reaches CPU SDPA's fused kernel): [(sequence indices, causal)].

    Fresh prompts (q_len == ctx: plain causal) and continued prefixes (an explicit mask) never
    share a batch. Within each kind, sequences are taken in order of context length and a batch is
    closed when padding would exceed `max_padding` of its real query x key work.
    """
    groups: list[tuple[list[int], bool]] = []
    for causal in (True, False):
        order = sorted((b for b in range(len(q_lens)) if (q_lens[b] == ctxs[b]) == causal), key=lambda b: (ctxs[b], q_lens[b]))
        group: list[int] = []
        real = 0
        for b in order:
            width = ctxs[b]  # the largest context so far (ascending order)
            rows = width if causal else max([q_lens[b]] + [q_lens[g] for g in group])
            work = real + q_lens[b] * ctxs[b]
            if group and (len(group) + 1) * rows * width > (1 + max_padding) * work:
                groups.append((group, causal))
                group, work = [], q_lens[b] * ctxs[b]
            group.append(b)
            real = work
        if group:
            groups.append((group, causal))
    return groups


def prefill_attention_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    """Packed prefill attention through padded 4-D SDPA calls (see `varlen_groups`): [T, H, hd]."""
    out = torch.empty_like(q)
    starts, ctxs = cu_seqlens_q.tolist(), context_lens.tolist()
    q_lens = [e - s for s, e in zip(starts[:-1], starts[1:])]
    dev, heads, hd = q.device, q.shape[1], q.shape[2]
    for group, causal in varlen_groups(q_lens, ctxs):
        width = max(ctxs[b] for b in group)
        rows = width if causal else max(q_lens[b] for b in group)
        idx = torch.tensor(group, device=block_tables.device)
        lens = None if all(ctxs[b] == width for b in group) else context_lens[idx]
        k = _gather_context(k_cache, block_tables[idx], lens, width).to(q.dtype)
        v = _gather_context(v_cache, block_tables[idx], lens, width).to(q.dtype)
        mask = None
        if not causal:  # key j is visible to query row i when j <= ctx - n + i
            qpos = torch.tensor([ctxs[b] - q_lens[b] for b in group], device=dev)[:, None] + torch.arange(rows, device=dev)
            mask = (torch.arange(width, device=dev)[None, None, :] <= qpos[:, :, None])[:, None]
        if len(group) == 1 and q_lens[group[0]] == rows:  # the chunk is the padded layout: no copies
            s, e = starts[group[0]], starts[group[0] + 1]
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)
            continue
        n = torch.tensor([q_lens[b] for b in group])
        # row of each packed query in the padded [G * rows] layout: query i of a chunk of n sits at
        # absolute position ctx - n + i (right-aligned when causal), or at row i (masked)
        first = torch.tensor([g * rows + (ctxs[b] - q_lens[b] if causal else 0) for g, b in enumerate(group)])
        rel = torch.arange(int(n.sum())) - (n.cumsum(0) - n).repeat_interleave(n)
        src = (torch.tensor([starts[b] for b in group]).repeat_interleave(n) + rel).to(dev)
        dst = (first.repeat_interleave(n) + rel).to(dev)
        qp = q.new_zeros(len(group) * rows, heads, hd).index_copy_(0, dst, q.index_select(0, src))
        qp = qp.view(len(group), rows, heads, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
        out.index_copy_(0, src, o.transpose(1, 2).reshape(-1, heads, hd).index_select(0, dst))
    return out


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _store_kv_kernel(
        K, V, KC, VC, SLOTS,
        stride_kt, stride_kh, stride_vt, stride_vh,
        stride_cb, stride_ct, stride_ch,
        num_kv_heads, block_size,
        HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One token: copy its k and v heads into cache slot SLOTS[t].

        Bytes: 2*KVH*hd*b read, 2*KVH*hd*c written. No flops.
        """
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(SLOTS + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < num_kv_heads) & (d < HEAD_DIM)
        dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_ct + h * stride_ch + d
        k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(KC + dst, k.to(KC.dtype.element_ty), mask=mask)
        tl.store(VC + dst, v.to(VC.dtype.element_ty), mask=mask)

    @triton.jit
    def _mm(a, b, FP32: tl.constexpr):
        """a @ b with fp32 accumulation. FP32: IEEE fp32 operands (fp32 inputs, and the interpreter,
        which cannot multiply bf16 blocks); otherwise the tensor cores take a and b as they are."""
        if FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _kv_offsets(BT, pos, valid, kvh, d, block_size, stride_cb, stride_ct, stride_ch):
        """Cache offsets [BLOCK_N, BLOCK_D] of positions `pos` of one sequence, through its block table row."""
        page = tl.load(BT + pos // block_size, mask=valid, other=0).to(tl.int64)
        return (page * stride_cb + (pos % block_size) * stride_ct + kvh * stride_ch)[:, None] + d[None, :]

    @triton.jit
    def _split_len(ctx, num_splits, BLOCK_N: tl.constexpr):
        """Context tokens per split of one sequence: an equal share, in whole key tiles (>= 1 tile)."""
        return tl.maximum(tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N), 1) * BLOCK_N

    @triton.jit
    def _decode_split_kernel(
        Q, KC, VC, BT, CL, MID_O, MID_LSE,
        stride_qb, stride_qh, stride_btb,
        stride_cb, stride_ct, stride_ch,
        qk_scale, num_heads, group, block_size, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """Pass 1: attention of one KV head's query heads over one split of one sequence's context.

        Writes the split's normalized partial output [group, hd] (fp32) and its log2-sum-exp.
        Bytes: 2*split_len*hd*c of K/V + group*hd*(b + 4) ; flops: 4*group*hd per context token.
        """
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(CL + b)
        split_len = _split_len(ctx, num_splits, BLOCK_N)
        start = split * split_len
        if start >= ctx:
            return
        end = tl.minimum(start + split_len, ctx)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kvh * group + g
        g_mask = g < group
        d_mask = d < HEAD_DIM
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        bt = BT + b.to(tl.int64) * stride_btb

        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            offs = _kv_offsets(bt, pos, valid, kvh, d, block_size, stride_cb, stride_ct, stride_ch)
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(KC + offs, mask=kv_mask, other=0.0)
            qk = _mm(q, tl.trans(k), DOT_FP32) * qk_scale
            qk = tl.where(valid[None, :], qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(VC + offs, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_FP32)
            m = m_new

        row = (b * num_heads + heads).to(tl.int64) * num_splits + split  # index into [B, H, S]
        tl.store(MID_LSE + row, m + tl.log2(l), mask=g_mask)
        tl.store(MID_O + row[:, None] * HEAD_DIM + d[None, :], acc / l[:, None],
                 mask=g_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _decode_merge_kernel(
        MID_O, MID_LSE, CL, OUT,
        stride_ob, stride_oh, num_splits, num_heads,
        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Pass 2: merge one (sequence, head)'s split outputs weighted by exp2(lse), BLOCK_C splits at a time.

        Bytes: splits*(hd + 1)*4 read, hd*b written; flops: ~2*hd per split.
        """
        b = tl.program_id(0)
        h = tl.program_id(1)
        ctx = tl.load(CL + b)
        n = tl.cdiv(ctx, _split_len(ctx, num_splits, BLOCK_N))  # the splits pass 1 wrote
        base = (b * num_heads + h).to(tl.int64) * num_splits
        s = tl.arange(0, BLOCK_S)
        lse = tl.load(MID_LSE + base + s, mask=s < n, other=float("-inf"))
        mx = tl.where(n > 0, tl.max(lse, axis=0), 0.0)
        total = tl.sum(tl.exp2(lse - mx), axis=0)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, n, BLOCK_C):
            c = s0 + tl.arange(0, BLOCK_C)
            c_mask = c < n
            w = tl.exp2(tl.load(MID_LSE + base + c, mask=c_mask, other=float("-inf")) - mx)
            o = tl.load(MID_O + (base + c)[:, None] * HEAD_DIM + d[None, :], mask=c_mask[:, None] & d_mask[None, :],
                        other=0.0)
            acc += tl.sum(w[:, None] * o, axis=0)
        out = acc / tl.where(n > 0, total, 1.0)  # an empty context gives zeros
        tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _prefill_kernel(
        Q, KC, VC, BT, CU, CL, OUT,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_btb,
        stride_cb, stride_ct, stride_ch,
        qk_scale, group, block_size,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """One tile of BLOCK_M queries of one head of one sequence, against its cached keys.

        Bytes: BLOCK_M*hd*b of q in and out + 2*(keys visited)*hd*c of K/V; flops: 4*hd per
        (query, visited key) pair, about half of them masked on the diagonal tiles.
        """
        m_blk = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        q_start = tl.load(CU + b)
        q_len = tl.load(CU + b + 1) - q_start
        if m_blk * BLOCK_M >= q_len:
            return
        ctx = tl.load(CL + b)
        kvh = h // group

        offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        q_pos = ctx - q_len + offs_m  # absolute positions of the queries
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        tok = (q_start + offs_m).to(tl.int64)
        q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        bt = BT + b.to(tl.int64) * stride_btb

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        end = tl.minimum(ctx, ctx - q_len + (m_blk + 1) * BLOCK_M)  # past the tile's last query
        for n0 in range(0, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            offs = _kv_offsets(bt, pos, valid, kvh, d, block_size, stride_cb, stride_ct, stride_ch)
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(KC + offs, mask=kv_mask, other=0.0)
            qk = _mm(q, tl.trans(k), DOT_FP32) * qk_scale
            qk = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(VC + offs, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT_FP32)
            m = m_new

        out = (acc / l[:, None]).to(OUT.dtype.element_ty)
        o_ptrs = OUT + tok[:, None] * stride_ot + h * stride_oh + d[None, :]
        tl.store(o_ptrs, out, mask=m_mask[:, None] & d_mask[None, :])


_LOG2E = 1.4426950408889634


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or interpreting()


def _tile_and_warps(dtype: torch.dtype) -> tuple[int, int]:
    """Key tile (also the largest query tile) and warps. fp32 dots run on FMA units rather than
    tensor cores; half the tile over twice the warps keeps them in registers (ptxas: no spills)."""
    return (32, 8) if dtype == torch.float32 else (64, 4)


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; the interpreter pretends to be an H100 (132)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def decode_splits(batch: int, kv_heads: int, span: int, dtype: torch.dtype, device: torch.device) -> int:
    """Splits per sequence for a decode batch whose contexts reach `span` tokens: enough programs for
    two waves over the GPU, but two key tiles or more per split, so a program's fixed cost (q in,
    partial out) stays small next to its K/V stream. (A first guess, to be tuned on a GPU with
    benchmarks/gpu_check.py.)"""
    block_n = _tile_and_warps(dtype)[0]
    want = -(-2 * _num_sms(device) // (batch * kv_heads))
    return max(1, min(want, -(-span // (2 * block_n))))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with unit stride: copy the rare input that is not so."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share one layout with a unit-stride head dim")


def store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    _check_caches(k_cache, v_cache)
    k, v = _unit_last(k), _unit_last(v)
    kvh, hd = k.shape[1], k.shape[2]
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        kvh, k_cache.shape[1],
        HEAD_DIM=hd, BLOCK_H=next_pow2(kvh), BLOCK_D=next_pow2(hd),
    )


def decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, out=None, num_splits=None):
    """Triton decode attention; `out` ([B, H, hd], unit last stride) is an optional output.

    num_splits: splits per sequence (None: sized from the batch and the table's width). A CUDA graph
    fixes it per batch bucket, with the table as wide as the longest allowed context, so one graph
    (grid and scratch included) serves every context length.
    """
    _check_caches(k_cache, v_cache)
    q = _unit_last(q)
    bsz, heads, hd = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = heads // kvh
    block_n, warps = _tile_and_warps(q.dtype)
    splits = num_splits or decode_splits(bsz, kvh, block_tables.shape[1] * block_size, q.dtype, q.device)
    mid_o = torch.empty(bsz, heads, splits, hd, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(bsz, heads, splits, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    block_d = max(16, next_pow2(hd))
    _decode_split_kernel[(bsz, kvh, splits)](
        q, k_cache, v_cache, block_tables, context_lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scale * _LOG2E, heads, group, block_size, splits,
        HEAD_DIM=hd, BLOCK_G=max(16, next_pow2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        DOT_FP32=_dot_fp32(q.dtype), num_warps=warps,
    )
    _decode_merge_kernel[(bsz, heads)](
        mid_o, mid_lse, context_lens, out,
        out.stride(0), out.stride(1), splits, heads,
        HEAD_DIM=hd, BLOCK_N=block_n, BLOCK_S=next_pow2(splits), BLOCK_C=min(16, next_pow2(splits)),
        BLOCK_D=block_d,
    )
    return out


def prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, out=None, max_query_len=None):
    """Triton prefill attention; `out` ([T, H, hd], unit last stride) is an optional output;
    `max_query_len` (>= the most rows of one sequence) sizes the grid without reading cu_seqlens_q back."""
    _check_caches(k_cache, v_cache)
    q = _unit_last(q)
    heads, hd = q.shape[1], q.shape[2]
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    max_q = max_query_len if max_query_len is not None else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())  # else a host sync
    block_n, warps = _tile_and_warps(q.dtype)
    block_m = min(block_n, max(16, next_pow2(max_q)))
    _prefill_kernel[(triton.cdiv(max_q, block_m), heads, block_tables.shape[0])](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scale * _LOG2E, heads // kvh, block_size,
        HEAD_DIM=hd, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(hd)),
        DOT_FP32=_dot_fp32(q.dtype), num_warps=warps,
    )
    return out


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    impl: str = "auto",
) -> None:
    """Write k, v [T, KVH, hd] into the cache slots `slot_mapping` [T] (int64 or int32, each in range)."""
    if use_triton(impl, k):
        return store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    store_kv_torch(k, v, k_cache, v_cache, slot_mapping)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor | None,
    context_lens: torch.Tensor | None,
    scale: float,
    *,
    num_splits: int | None = None,
    plan: DecodePlan | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """q [B, H, hd] (one token per sequence) -> [B, H, hd].

    block_tables [B, W] int32 may be wider than any context; context_lens [B] int32 (0 = a padded
    row, whose output is zeros). num_splits: see `decode_attention_triton` (ignored by the
    reference). plan: `decode_plan(block_tables, context_lens, block_size)`, computed once per
    step by a caller that runs many layers (used by the reference; the kernel needs none). With a
    plan the reference reads neither block_tables nor context_lens (either may be None).
    """
    if use_triton(impl, q):
        return decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=num_splits)
    return decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale, plan)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Packed queries q [T, H, hd] (sequence b = rows cu_seqlens_q[b]:cu_seqlens_q[b+1]) -> [T, H, hd].
    `max_query_len`: an upper bound on any sequence's rows, known on the host (without it the Triton
    path reads cu_seqlens_q back, a device sync per call)."""
    if use_triton(impl, q):
        return prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_query_len=max_query_len)
    return prefill_attention_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)
