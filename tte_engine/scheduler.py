"""Continuous batching: which sequences run in the next step, and what their results do to them.

Each step is one forward of one model: either a prefill step (new prompts, chunks of long
prompts, embed suffixes: up to `max_num_batched_tokens` tokens) or a decode step (one token for
every thinking sequence). Prefill work goes first so the decode batch stays full; in two-model
mode the embedder's work goes before the reasoner's, since it finishes requests and frees
memory. Sequences are admitted in arrival order while their worst case fits the cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .cache import BlockManager
from .sampling import ends_with_stop
from .sequence import Phase, Sequence


@dataclass
class Step:
    stage: int
    is_prefill: bool
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens of each sequence computed in this step

    def completes(self, i: int) -> bool:
        """Whether sequence i reaches the end of its known tokens in this step (so it has an output)."""
        seq = self.seqs[i]
        return seq.num_computed + self.num_tokens[i] == len(seq)


class Scheduler:
    def __init__(
        self,
        block_managers: list[BlockManager],
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        stop_sequences: list[list[int]],
    ):
        self.blocks = block_managers
        self.two_model = len(block_managers) == 2
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.stop_sequences = stop_sequences
        self.waiting: list[deque[Sequence]] = [deque() for _ in block_managers]
        self.running: list[list[Sequence]] = [[] for _ in block_managers]

    def add(self, seq: Sequence) -> None:
        seq.stage = 1 if self.two_model and seq.phase == Phase.EMBED else 0
        self.waiting[seq.stage].append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Drop a sequence wherever it is, freeing its cache blocks; False if it was not here."""
        for stage in range(len(self.blocks)):
            if seq in self.running[stage]:
                self._finish(seq, stage)
            elif seq in self.waiting[stage]:
                self.waiting[stage].remove(seq)
                seq.phase = Phase.FINISHED
            else:
                continue
            seq.stop_reason = "aborted"
            return True
        return False

    def has_work(self) -> bool:
        return any(self.waiting) or any(self.running)

    def fits_ever(self, seq: Sequence) -> int | None:
        """None if the sequence can run once the caches are empty, else the tokens it would need."""
        for stage, bm in enumerate(self.blocks):
            need = self._worst_case(seq, stage)
            if need and bm.blocks_for(need) > bm.num_blocks:
                return need
        return None

    def _worst_case(self, seq: Sequence, stage: int) -> int:
        if not self.two_model:
            return seq.worst_case_tokens(stage_keeps_suffix=True)
        if stage == 0:
            return 0 if seq.phase == Phase.EMBED else seq.worst_case_tokens(stage_keeps_suffix=False)
        return seq.worst_case_tokens(stage_keeps_suffix=True)  # embedder: prompt + trace + suffix

    def _admit(self, stage: int) -> None:
        bm, waiting, running = self.blocks[stage], self.waiting[stage], self.running[stage]
        while waiting and len(running) < self.max_num_seqs:
            seq = waiting[0]
            need = self._worst_case(seq, stage)
            if not bm.can_admit(need):
                break
            waiting.popleft()
            seq.reservation = bm.admit(seq.block_table, need)
            running.append(seq)

    def schedule(self) -> Step | None:
        stages = range(len(self.blocks) - 1, -1, -1)
        for stage in stages:
            self._admit(stage)
        for stage in stages:
            seqs, counts, budget = [], [], self.max_num_batched_tokens
            for seq in self.running[stage]:
                if budget == 0:
                    break
                if seq.needs_prefill:
                    n = min(seq.num_pending, budget)
                    seqs.append(seq)
                    counts.append(n)
                    budget -= n
            if seqs:
                return self._prepare(Step(stage, True, seqs, counts))
        decoding = [s for s in self.running[0] if s.phase == Phase.THINK][: self.max_num_seqs]
        if decoding:
            return self._prepare(Step(0, False, decoding, [1] * len(decoding)))
        return None

    def _prepare(self, step: Step) -> Step:
        bm = self.blocks[step.stage]
        for seq, n in zip(step.seqs, step.num_tokens):
            seq.reservation = bm.grow(seq.block_table, seq.num_computed + n, seq.reservation)
        return step

    def update(self, step: Step, tokens: dict[int, int], embeddings: dict[int, torch.Tensor]) -> list[Sequence]:
        """Apply a step's results (sampled tokens, pooled embeddings by seq_id); returns the finished."""
        finished = []
        for seq, n in zip(step.seqs, step.num_tokens):
            seq.num_computed += n
            if seq.seq_id in embeddings:
                seq.embedding = embeddings[seq.seq_id]
                finished.append(self._finish(seq, step.stage))
            elif seq.seq_id in tokens:
                seq.append_trace_token(tokens[seq.seq_id])
                reason = self._trace_stop(seq)
                if reason is None:
                    continue
                if not seq.embed:
                    seq.stop_reason = reason
                    finished.append(self._finish(seq, step.stage))
                    continue
                seq.start_embed(reason)
                if self.two_model:  # the embedder re-reads query + trace in its own cache
                    self._release(seq, 0)
                    seq.stage, seq.num_computed, seq.image_embeds = 1, 0, None
                    self.waiting[1].append(seq)
        return finished

    def abort_all(self) -> list[Sequence]:
        """Drop every queued and running sequence, returning their blocks; returns what was dropped."""
        dropped = [s for q in self.waiting for s in q] + [s for r in self.running for s in r]
        for seq in dropped:
            self.abort(seq)
        return dropped

    def _trace_stop(self, seq: Sequence) -> str | None:
        if ends_with_stop(seq.trace_ids, self.stop_sequences):
            return "stop"
        if len(seq.trace_ids) >= seq.max_trace_tokens:
            return "max_tokens"
        return None

    def _release(self, seq: Sequence, stage: int) -> None:
        self.running[stage].remove(seq)
        self.blocks[stage].free(seq.block_table, seq.reservation)
        seq.reservation = 0

    def _finish(self, seq: Sequence, stage: int) -> Sequence:
        self._release(seq, stage)
        seq.phase = Phase.FINISHED
        seq.image_embeds = None
        return seq
