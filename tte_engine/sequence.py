"""A sequence: one item's journey through the engine, and everything the scheduler tracks for it.

Phases: WAITING (not admitted to a cache) -> THINK (prompt prefill, then trace decoding) ->
EMBED (the last trace token and the embed suffix prefilled on the same cache, then pooled) ->
FINISHED. `think=False` starts in EMBED. In two-model mode the EMBED phase runs on the
embedder's own cache (stage 1), from scratch, after the reasoner (stage 0) wrote the trace.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

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
    reservation: int = 0
    admitted: bool = False
    image_embeds: torch.Tensor | None = None  # vision-tower output of the current stage's model
    embedding: torch.Tensor | None = None
    stop_reason: str | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        self.token_ids = list(self.prompt.token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        if self.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed)
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

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions of tokens start..end-1 (after the prompt: index + rope_delta)."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.positions[:, start:end]
        tail = torch.arange(max(start, p), end) + self.rope_delta
        head = self.positions[:, start:p] if start < p else self.positions[:, :0]
        return torch.cat([head, tail.expand(3, -1)], dim=1)

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
