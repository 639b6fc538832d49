"""Continuous batching: which sequences run in the next step, and what their results do to them.

Each step is one forward of one model. Every thinking sequence whose prompt is done decodes one
token, and the rest of the `max_num_batched_tokens` budget goes to prefill chunks (new prompts,
chunks of long prompts, embed suffixes), so a step may mix both and decoders never wait out a
whole prefill step. A step with no prefill chunk is a pure decode step (the runner's CUDA-graph
path). In two-model mode the embedder's work goes before the reasoner's, since it finishes
requests and frees memory. Sequences are admitted in arrival order while their worst case fits
the cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import BlockManager
from .sequence import Phase, Sequence


class DecodeBatch:
    """The sequences of a run of pure decode steps, with what a step reads of each as int64 arrays.

    Built from the sequences when the set of decoding sequences changes (an admission, a finished
    prompt, an ended trace, an abort), and only then. After that a step moves every
    sequence one token on, so the arrays stay as built and `steps` counts: the runner's step
    inputs, block growth and trace budgets are array arithmetic on them, and the checks that can
    only come due at a known step (a new block, a full trace budget) wait for that step.

    The sampled tokens go into `history`, not into each sequence: while the batch lives, its
    sequences' `token_ids`, `trace_ids` and `num_computed` lag behind, and `flush` brings them up
    to date. The scheduler flushes a sequence before it looks at its trace, and every sequence
    when the batch ends (`Scheduler.flush` for a caller that wants them mid-run)."""

    def __init__(self, seqs: list[Sequence], block_size: int):
        n = len(seqs)
        self.seqs = seqs
        self.steps = 0  # decode steps run on this batch
        self.rows = np.fromiter((s.row for s in seqs), np.int64, n)  # block-table rows
        self.start = np.fromiter((s.num_computed for s in seqs), np.int64, n)  # position of the token its first step computes
        self.rope_deltas = np.fromiter((s.rope_delta for s in seqs), np.int64, n)
        self.last = np.fromiter((s.token_ids[-1] for s in seqs), np.int64, n)  # the token the next step computes
        self.trace_start = np.fromiter((len(s.trace_ids) for s in seqs), np.int64, n)
        self.max_trace = np.fromiter((s.max_trace_tokens for s in seqs), np.int64, n)
        self.capacity = np.fromiter((len(s.block_table) for s in seqs), np.int64, n) * block_size  # tokens their blocks hold
        self.longest = int(self.start.max())
        self.growth_at = 0  # the step at which some sequence's token first needs a new block (0: look now)
        self.budget_at = int((self.max_trace - self.trace_start).min())  # the step after which a trace budget is spent
        self.greedy = all(s.greedy for s in seqs)
        self.sampling: np.ndarray | None = None  # [len(SAMPLING_FIELDS), n]: filled by the runner when not greedy
        self.attention_plan = None  # a CPU runner's decode-attention plan, updated step by step (`HostDecodePlan`)
        self.sample_idx = list(range(n))
        # the tokens of the steps run, one row a step; `flush` writes them into the sequences
        self.history = np.empty((min(max(self.budget_at, 1), 64), n), dtype=np.int64)
        self.flushed = np.zeros(n, dtype=np.int64)  # steps of history already in each sequence

    @property
    def index(self) -> np.ndarray:
        """int64 [B]: the position of the token each sequence computes in the next step."""
        return self.start + self.steps

    @property
    def trace_lens(self) -> np.ndarray:
        """int64 [B]: each sequence's trace tokens so far (the sampling draw's counter)."""
        return self.trace_start + self.steps

    def record(self, tokens: np.ndarray) -> None:
        """One step ran: `tokens` (int64 [B]) are each sequence's new token."""
        if self.steps == self.history.shape[0]:
            self.history = np.concatenate([self.history, np.empty_like(self.history)])
        self.history[self.steps] = tokens
        self.steps += 1
        self.last = tokens

    def flush(self, i: int | None = None) -> None:
        """Write the recorded tokens into sequence `i` (default: every sequence) and count them computed."""
        for k in range(len(self.seqs)) if i is None else (i,):
            done = int(self.flushed[k])
            if done < self.steps:
                seq, new = self.seqs[k], self.history[done : self.steps, k].tolist()
                seq.trace_ids += new
                seq.token_ids += new
                seq.num_computed += len(new)
                self.flushed[k] = self.steps


@dataclass
class Step:
    stage: int
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens of each sequence computed in this step (empty for a pure decode step: one each)
    decode: DecodeBatch | None = None  # a pure decode step (one token per sequence, the graph path): its batch
    num_decode: int = 0  # the first num_decode sequences decode one token each; the rest prefill
    # it writes k/v into prompt blocks that prefix caching makes (now or at a later chunk) findable: a
    # later prompt may need their every layer, so the step must compute every layer
    writes_shared: bool = False
    sample_idx: list[int] = field(default_factory=list)  # seqs that end the step with a new trace token
    pool_idx: list[int] = field(default_factory=list)  # seqs that end the step with their embedding


class Scheduler:
    def __init__(
        self,
        block_managers: list[BlockManager],
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        stop_sequences: list[list[int]],
        vision_token_ids: tuple[int, ...] = (),
        mixed_steps: bool = True,
    ):
        self.blocks = block_managers
        self.mixed_steps = mixed_steps  # False: a step is all prefill or all decode, prefill first (the old policy)
        self.vision_token_ids = vision_token_ids
        self.two_model = len(block_managers) == 2
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.set_stop_sequences(stop_sequences)
        self.waiting: list[deque[Sequence]] = [deque() for _ in block_managers]
        self.running: list[list[Sequence]] = [[] for _ in block_managers]
        # per stage: the last pure decode step's batch, while its set of sequences stays the same
        self._decoding: list[DecodeBatch | None] = [None for _ in block_managers]

    def set_stop_sequences(self, stop_sequences: list[list[int]]) -> None:
        """The token sequences that end a trace (each non-empty)."""
        self.stop_tokens = {s[0] for s in stop_sequences if len(s) == 1}
        self.stop_sequences = [list(s) for s in stop_sequences if len(s) > 1]
        # a decode token that may end a trace: a stop token, or the last token of a stop sequence
        self._may_stop = frozenset(self.stop_tokens | {s[-1] for s in self.stop_sequences})

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
            if need and need > bm.capacity_tokens:
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
            bm.admit(seq, need)
            running.append(seq)
            self._end_batch(stage)

    def schedule(self) -> Step | None:
        for stage in range(len(self.blocks) - 1, -1, -1):
            self._admit(stage)
            batch = self._decoding[stage]
            if batch is not None:  # the same sequences as the last step, all decoding
                return self._prepare_decode(Step(stage, batch.seqs, [], decode=batch))
            decoding, prefilling = [], []  # thinking with the prompt done / everything else
            for seq in self.running[stage]:
                (prefilling if seq.needs_prefill else decoding).append(seq)
            if not self.mixed_steps and prefilling:
                decoding = []  # prefill work waits for nobody: decoders wait for it
            seqs, counts = list(decoding), [1] * len(decoding)
            budget = self.max_num_batched_tokens - len(decoding)
            bm = self.blocks[stage]
            findable = False  # whether the step writes k/v into a prompt block prefix caching does or will share
            for seq in prefilling:
                if budget <= 0:
                    break
                hashes = seq.prompt_block_hashes(bm.block_size, self.vision_token_ids) if bm.enable_prefix_caching else []
                if not seq.block_table:  # its first chunk in this stage: start from the cached prefix
                    self._reuse_prefix(seq, bm, hashes)
                n = min(seq.num_pending, budget)
                # a block filled over two steps is registered by the second: the first must compute every layer too
                findable |= seq.num_computed < len(hashes) * bm.block_size
                # blocks now, and registered now: a sequence later in this same step may reuse them,
                # since every layer stores the step's k/v before any of its attention reads them
                bm.grow(seq, seq.num_computed + n)
                bm.register(seq, hashes, seq.num_computed + n)
                seqs.append(seq)
                counts.append(n)
                budget -= n
            if len(seqs) > len(decoding):
                return self._prepare(Step(stage, seqs, counts, num_decode=len(decoding), writes_shared=findable))
            if decoding:
                batch = self._decoding[stage] = DecodeBatch(decoding, bm.block_size)
                return self._prepare_decode(Step(stage, decoding, [], decode=batch))
        return None

    @staticmethod
    def _reuse_prefix(seq: Sequence, bm: BlockManager, hashes: list[int]) -> None:
        """Take the cached blocks the prompt starts with; at least its last token is still computed."""
        usable = hashes[: (len(seq) - 1) // bm.block_size]
        found = bm.reuse_prefix(seq, usable)
        seq.num_computed = found * bm.block_size
        seq.num_cached_tokens += found * bm.block_size

    def _prepare_decode(self, step: Step) -> Step:
        """A pure decode step: blocks for the sequences whose next token starts a new one; every
        sequence samples its next token."""
        batch, bm = step.decode, self.blocks[step.stage]
        if batch.steps >= batch.growth_at:
            index = batch.index
            for i in np.flatnonzero(index >= batch.capacity).tolist():
                seq = batch.seqs[i]
                bm.grow(seq, int(index[i]) + 1)  # index: the sequence's computed tokens (its own count lags, see DecodeBatch)
                batch.capacity[i] = len(seq.block_table) * bm.block_size
            batch.growth_at = batch.steps + int((batch.capacity - index).min())
        step.sample_idx = batch.sample_idx
        return step

    def _prepare(self, step: Step) -> Step:
        """Give each sequence the blocks its tokens need, and note which rows end with an output."""
        bm, bs = self.blocks[step.stage], self.blocks[step.stage].block_size
        for seq, n in zip(step.seqs, step.num_tokens):
            if seq.num_computed + n > len(seq.block_table) * bs:
                bm.grow(seq, seq.num_computed + n)
        for i, (seq, n) in enumerate(zip(step.seqs, step.num_tokens)):
            if seq.num_computed + n == len(seq):  # reaches its last known token: it has an output
                (step.sample_idx if seq.phase == Phase.THINK else step.pool_idx).append(i)
        return step

    def update(self, step: Step, tokens: np.ndarray, embeddings: torch.Tensor | None) -> list[Sequence]:
        """Apply a step's results: `tokens` (int64 [len(sample_idx)]) for step.sample_idx,
        `embeddings` [len(pool_idx), D] for step.pool_idx; returns the sequences that finished."""
        finished: list[Sequence] = []
        self.blocks[step.stage].commit()
        if step.decode is not None:
            self._update_decode(step, tokens, finished)
            return finished
        self._end_batch(step.stage)  # prompts finished, embed suffixes done: the decoding set changes
        for seq, n in zip(step.seqs, step.num_tokens):
            seq.num_computed += n
        for i, embedding in zip(step.pool_idx, embeddings if embeddings is not None else []):
            seq = step.seqs[i]
            seq.embedding = embedding
            finished.append(self._finish(seq, step.stage))
        for i, token in zip(step.sample_idx, tokens.tolist()):
            seq = step.seqs[i]
            seq.append_trace_token(token)
            self._end_trace(seq, step.stage, finished)
        return finished

    def _update_decode(self, step: Step, tokens: np.ndarray, finished: list[Sequence]) -> None:
        """The hot path: one new token for every sequence of the batch, recorded as one array row.
        Only the sequences whose token may end their trace are looked at (and flushed) one by one."""
        batch = step.decode
        batch.record(tokens)
        may_stop = self._may_stop  # a set lookup per token: faster than np.isin below ~1,000 rows
        ending = [i for i, token in enumerate(tokens.tolist()) if token in may_stop]
        if batch.steps >= batch.budget_at:  # some trace has spent its budget
            ending = sorted({*ending, *np.flatnonzero(batch.trace_lens >= batch.max_trace).tolist()})
        for i in ending:
            batch.flush(i)
            self._end_trace(batch.seqs[i], step.stage, finished)

    def flush(self) -> None:
        """Bring every decoding sequence's tokens up to date (see DecodeBatch); the scheduler does
        this itself wherever it reads them."""
        for batch in self._decoding:
            if batch is not None:
                batch.flush()

    def _end_batch(self, stage: int) -> None:
        """The set of decoding sequences changes: flush the live batch's tokens, and drop it."""
        batch = self._decoding[stage]
        if batch is not None:
            batch.flush()
            self._decoding[stage] = None

    def _end_trace(self, seq: Sequence, stage: int, finished: list[Sequence]) -> None:
        """After a new trace token: if the trace is over, finish it (generate_traces) or start embedding."""
        reason = self._trace_stop(seq, seq.trace_ids[-1])
        if reason is None:
            return
        self._end_batch(stage)
        if not seq.embed:
            seq.stop_reason = reason
            finished.append(self._finish(seq, stage))
            return
        seq.start_embed(reason)
        if self.two_model:  # the embedder re-reads query + trace in its own cache
            self._release(seq, 0)
            seq.stage, seq.num_computed, seq.image_embeds = 1, 0, None
            self.waiting[1].append(seq)

    def abort_all(self) -> list[Sequence]:
        """Drop every queued and running sequence, returning their blocks; returns what was dropped."""
        dropped = [s for q in self.waiting for s in q] + [s for r in self.running for s in r]
        for seq in dropped:
            self.abort(seq)
        return dropped

    def forget_registrations(self, step: Step) -> None:
        """The step raised: the prefix-cache entries it registered may hold unwritten KV; make them unfindable."""
        self.blocks[step.stage].forget_pending()

    def _trace_stop(self, seq: Sequence, token: int) -> str | None:
        trace = seq.trace_ids
        if token in self.stop_tokens or (self.stop_sequences and any(trace[-len(s) :] == s for s in self.stop_sequences)):
            return "stop"
        if len(trace) >= seq.max_trace_tokens:
            return "max_tokens"
        return None

    def _release(self, seq: Sequence, stage: int) -> None:
        self._end_batch(stage)
        self.running[stage].remove(seq)
        self.blocks[stage].free(seq)

    def _finish(self, seq: Sequence, stage: int) -> Sequence:
        self._release(seq, stage)
        seq.phase = Phase.FINISHED
        seq.image_embeds = None
        return seq
