"""A sequence: one item's journey through the engine, and everything the scheduler tracks for it.

Phases: WAITING (not admitted to a cache) -> THINK (prompt prefill, then trace decoding) ->
EMBED (the last trace token and the embed suffix prefilled on the same cache, then pooled) ->
FINISHED. `think=False` starts in EMBED. In two-model mode the EMBED phase runs on the
embedder's own cache (stage 1), from scratch, after the reasoner (stage 0) wrote the trace.

Mid-trace, while it decodes, `token_ids`, `trace_ids` and `num_computed` lag behind: the scheduler
records the decode batch's tokens as arrays (`scheduler.DecodeBatch`) and writes them here when it
needs them, when the sequence leaves the batch, or on `Scheduler.flush()`.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from .inputs import Prompt
from .sampling import SamplingParams

_ids = itertools.count()


class Phase(enum.Enum):
    THINK = "think"
    EMBED = "embed"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt: Prompt
    positions: torch.Tensor  # [3, prompt_len] M-RoPE positions of the prompt
    rope_delta: int
    max_trace_tokens: int
    suffix_ids: list[int]  # appended after the trace (think-end is prepended if the trace lacks it)
    think_end_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    think: bool = True
    embed: bool = True  # False: stop after the trace (generate_traces)
    tag: object = None  # caller's handle (batch index, request id)
    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)
    trace_ids: list[int] = field(default_factory=list)
    embed_ids: list[int] = field(default_factory=list)
    phase: Phase = Phase.THINK
    stage: int = 0  # which model's cache the sequence lives in (two-model: 0 reasoner, 1 embedder)
    num_computed: int = 0  # tokens whose KV is in the current stage's cache
    block_table: list[int] = field(default_factory=list)
    row: int | None = None  # this sequence's row of its stage's block-table array (while admitted)
    reservation: int = 0
    num_registered: int = 0  # leading blocks of block_table made findable by prefix caching
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (all stages)
    image_embeds: torch.Tensor | None = None  # vision-tower output of the current stage's model
    image_embeds_offset: int = 0  # placeholder tokens before the first image in image_embeds (cached prefix)
    embedding: torch.Tensor | None = None
    stop_reason: str | None = None
    error: str | None = None  # why its result cannot be used though its work ran (errors.NON_FINITE_EMBEDDING); then no embedding
    seed: int = 0  # what sampling draws its noise from (see sampling.py)
    greedy: bool = True  # sampling.greedy, kept as a plain attribute for the decode hot path
    submitted: bool = False  # handed to a scheduler (a sequence runs once: see Scheduler.add)
    _block_hashes: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)  # prompt_block_hashes, by block size

    def __post_init__(self):
        self.token_ids = list(self.prompt.token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.seed = self.sampling.draw_seed()
        self.greedy = self.sampling.greedy
        if self.prompt.given_trace_ids is not None:
            self.trace_ids = list(self.prompt.given_trace_ids)
            self.token_ids += self.trace_ids
            self.start_embed("given")
        elif not self.think or self.max_trace_tokens == 0:
            self.start_embed("no_think" if not self.think else "max_tokens")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def needs_prefill(self) -> bool:
        return self.phase == Phase.EMBED or self.num_computed < self.num_prompt_tokens

    @property
    def generated_trace_tokens(self) -> int:
        return 0 if self.prompt.given_trace_ids is not None else len(self.trace_ids)

    def worst_case_tokens(self, stage_keeps_suffix: bool) -> int:
        """Most tokens this sequence can ever hold in a stage's cache."""
        if self.phase == Phase.EMBED:
            return len(self.token_ids)
        trace = self.max_trace_tokens + len(self.think_end_ids)
        return self.num_prompt_tokens + trace + (len(self.suffix_ids) if stage_keeps_suffix else 0)

    def vision_spans(self, vision_token_ids: tuple[int, ...]) -> list[tuple[int, int]]:
        """[start, end) token ranges of the prompt's images and videos, in order (one run each)."""
        if "_spans" not in self.__dict__:
            ids = np.asarray(self.prompt.token_ids)
            is_vision = np.isin(ids, vision_token_ids)
            edges = np.flatnonzero(np.diff(np.concatenate([[False], is_vision, [False]]).astype(np.int8)))
            self.__dict__["_spans"] = list(zip(edges[::2].tolist(), edges[1::2].tolist()))
        return self.__dict__["_spans"]

    def prompt_block_hashes(self, block_size: int, vision_token_ids: tuple[int, ...]) -> list[int]:
        """Prefix-cache keys of the prompt's full blocks: block i's key chains block i-1's key, its
        token ids and the content digests of the images and videos its tokens belong to, so equal
        token ids of different images never share a block (DESIGN §8)."""
        if block_size not in self._block_hashes:
            spans = self.vision_spans(vision_token_ids)
            digests = [img.digest for img in self.prompt.images]
            ids, hashes, prev = self.prompt.token_ids, [], 0
            for b in range(self.num_prompt_tokens // block_size):
                lo, hi = b * block_size, (b + 1) * block_size
                images = tuple(d for (s, e), d in zip(spans, digests) if s < hi and e > lo)
                prev = hash((prev, tuple(ids[lo:hi]), images))
                hashes.append(prev)
            self._block_hashes[block_size] = hashes
        return self._block_hashes[block_size]

    def append_trace_token(self, token: int) -> None:
        self.trace_ids.append(token)
        self.token_ids.append(token)

    def start_embed(self, reason: str) -> None:
        """The trace is over: append the think-end marker (if the trace did not write it) and the suffix."""
        self.stop_reason = reason
        self.phase = Phase.EMBED
        closed = self.think and self.trace_ids[-len(self.think_end_ids) :] == self.think_end_ids
        self.embed_ids = ([] if closed or not self.think else list(self.think_end_ids)) + list(self.suffix_ids)
        self.token_ids += self.embed_ids
