"""Continuous batching: which sequences run in the next step, and what their results do to them.

Each step is one forward of one model. Every thinking sequence whose prompt is done decodes one
token, and the rest of the `max_num_batched_tokens` budget goes to prefill chunks (new prompts,
chunks of long prompts, embed suffixes), so a step may mix both and decoders never wait out a
whole prefill step. A step with no prefill chunk is a pure decode step (the runner's CUDA-graph
path); so that most steps stay pure while traces end at different steps, the embed suffix of an
ended trace may wait up to `suffix_wait_steps` steps to be prefilled with others. In two-model
mode the embedder's work goes before the reasoner's, since it finishes requests and frees memory.
Sequences are admitted in arrival order while their worst case fits the cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import BlockManager
from .errors import NON_FINITE_EMBEDDING, NON_FINITE_LOGITS
from .sampling import NO_TOKEN
from .sequence import Phase, Sequence
from .step_inputs import ROW_FIELDS


# per-row int64 arrays of a DecodeBatch, kept aligned with its `seqs`
_ROW_ARRAYS = ("start", "rope_deltas", "trace_start", "max_trace", "capacity", "flushed", "sampled")
_HISTORY_ROWS = 64  # steps of history first allocated (it doubles), and ...
# ... the most it holds: then every sequence is flushed and the count restarts (at batch 256 a rebase
# costs ~1 ms, and a sequence leaving copies at most this many rows of the others' history)
_REBASE_AT = 256
# EngineConfig.suffix_wait_steps with CUDA graphs: at most 1 step in 9 mixed while traces end every
# step; a suffix done at most 8 decode steps later (~10 ms at batch 256 near an H200's floor)
SUFFIX_WAIT_WITH_GRAPHS = 8
_NON_FINITE = "non_finite_logits"  # `_trace_stop`'s reason for NO_TOKEN (never a stop_reason: the sequence fails)
_SET_LOOKUP_ROWS = 32  # up to this many decoding rows, stop tokens are looked up in a set (in the step: ~7 us less at 1 row than the table)
# Decode steps whose inputs a DecodeBatch works out at once (every step moves position, slot and context
# length on by one): a step then takes the next row, where until stop 19 it added 1 to them in place, a
# numpy ufunc call right after the forward (stop 19, micro model, alternating step by step: the host work
# beside the forward 0.90 / 0.85 at batch 1 / 64 without that add)
STEPS_AHEAD = 16


class DecodeBatch:
    """The decoding sequences of a stage (prompt done, trace under way), with what a step reads of
    each as int64 arrays, kept for as long as the stage has sequences decoding (vLLM's persistent
    batch). A step moves every sequence one token on, so the arrays stay as they are and `steps`
    counts: the runner's step inputs, block growth and trace budgets are array arithmetic on them,
    and the checks that can only come due at a known step (a new block, a full trace budget) wait
    for that step. Sequences join (`add`) when their prompt is done and leave (`remove`) when
    their trace ends or they are aborted; pure decode steps and the decoding rows of mixed steps
    both read the arrays.

    The sampled tokens go into `history`, not into each sequence: while a sequence is in the batch,
    its `token_ids`, `trace_ids` and `num_computed` lag behind, and `flush` brings them up to date.
    The scheduler flushes a sequence before it looks at its trace and when it leaves
    (`Scheduler.flush` for a caller that wants them all mid-run)."""

    def __init__(self, seqs: list[Sequence], block_size: int):
        self.block_size = block_size
        self.seqs: list[Sequence] = []
        self.steps = 0  # decode steps run on this batch (since its last rebase)
        self.steps_run = 0  # decode steps run on this batch since it was made (never rebased)
        for name in _ROW_ARRAYS:
            setattr(self, name, np.zeros(0, dtype=np.int64))
        # the next step's inputs, one row per ROW_FIELDS entry (token, position, slot, context length,
        # table row), one column per sequence: every step moves position, slot and context on by one
        # (worked out STEPS_AHEAD steps at a time, `_set_inputs`), and a sequence's slot jumps only when
        # it gains a block (`gained_blocks`)
        self._set_inputs(np.zeros((len(ROW_FIELDS), 0), dtype=np.int64))
        # the tokens of the steps run, one row a step, one column a sequence; `flush` writes them into the sequences
        self.history = np.empty((_HISTORY_ROWS, 0), dtype=np.int64)
        self.attention_plan = None  # a CPU runner's decode-attention plan, updated step by step (`HostDecodePlan`)
        self.add(seqs)

    def add(self, seqs: list[Sequence]) -> None:
        """Sequences start decoding (up to date, their last token not computed yet)."""
        n, s = len(seqs), self.steps
        # a sequence that joins at step s is given start and trace_start as if it had been here from step 0
        new = {
            "start": np.fromiter((q.num_computed for q in seqs), np.int64, n) - s,  # + steps: the position the next step computes
            "rope_deltas": np.fromiter((q.rope_delta for q in seqs), np.int64, n),
            "trace_start": np.fromiter((len(q.trace_ids) for q in seqs), np.int64, n) - s,
            "max_trace": np.fromiter((q.max_trace_tokens for q in seqs), np.int64, n),
            "capacity": np.fromiter((len(q.block_table) for q in seqs), np.int64, n) * self.block_size,  # tokens their blocks hold
            "flushed": np.full(n, s, dtype=np.int64),  # steps of history already in each sequence
            "sampled": np.fromiter((not q.greedy for q in seqs), np.int64, n),  # 1: not greedy
        }
        for name in _ROW_ARRAYS:
            setattr(self, name, np.concatenate([getattr(self, name), new[name]]))
        index, bs = new["start"] + s, self.block_size
        # a next token that starts a block has no slot yet (-1): the step's block growth gives it one
        slots = np.fromiter((q.block_table[i // bs] * bs + i % bs if i < len(q.block_table) * bs else -1
                             for q, i in zip(seqs, index.tolist())), np.int64, n)
        last = np.fromiter((q.token_ids[-1] for q in seqs), np.int64, n)  # the token the next step computes
        rows = np.fromiter((q.row for q in seqs), np.int64, n)  # block-table rows
        self._set_inputs(np.concatenate([self.inputs, np.stack([last, index + new["rope_deltas"], slots, index + 1, rows])], axis=1))
        self.history = np.concatenate([self.history, np.empty((self.history.shape[0], n), dtype=np.int64)], axis=1)
        self.seqs = self.seqs + list(seqs)
        self.attention_plan = None  # rebuilt for the new rows
        self._changed()

    def remove(self, indices: list[int]) -> None:
        """Sequences `indices` stop decoding; each is flushed first."""
        for i in indices:
            self.flush(i)
        keep = np.ones(len(self.seqs), dtype=bool)
        keep[indices] = False
        for name in _ROW_ARRAYS:
            setattr(self, name, getattr(self, name)[keep])
        self._set_inputs(self.inputs[:, keep])
        history = np.empty((self.history.shape[0], int(keep.sum())), dtype=np.int64)
        history[: self.steps] = self.history[: self.steps, keep]  # the rows written so far, not the whole allocation
        self.history = history
        self.seqs = [q for q, k in zip(self.seqs, keep.tolist()) if k]
        if self.attention_plan is not None:
            self.attention_plan.keep_rows(keep)
        self._changed()

    def _changed(self) -> None:
        """The set of sequences changed: what is derived from all of them is worked out again."""
        n = len(self.seqs)
        self.longest = int(self.start.max()) if n else 0
        self.growth_at = self.steps  # the step at which some sequence's token first needs a new block (now: look)
        self.budget_at = int((self.max_trace - self.trace_start).min()) if n else 0  # the step after which a trace budget is spent
        self.greedy = not self.sampled.any()
        self.sampling: np.ndarray | None = None  # [len(SAMPLING_FIELDS), n]: filled by the runner when not greedy
        self.sample_idx = list(range(n))
        self.pure_step: Step | None = None  # the Step of a pure decode step over these sequences (`Scheduler._pure_decode`)

    @property
    def index(self) -> np.ndarray:
        """int64 [B]: the position of the token each sequence computes in the next step."""
        return self.start + self.steps

    def _set_inputs(self, inputs: np.ndarray) -> None:
        """`inputs` (int64 [len(ROW_FIELDS), B]) become the next step's, and the inputs of the
        STEPS_AHEAD - 1 steps after it are worked out but for their tokens (`record` writes each when
        it is sampled)."""
        self._ahead = np.empty((STEPS_AHEAD, *inputs.shape), dtype=np.int64)
        self._ahead[0] = inputs
        self._views: list[tuple[np.ndarray, ...] | None] = [None] * STEPS_AHEAD
        self._work_ahead()

    def _work_ahead(self) -> None:
        """Rows 1 .. STEPS_AHEAD - 1 of the steps ahead follow on from row 0, which becomes the next step's."""
        first = self._ahead[0]
        self._ahead[1:, 1:4] = first[1:4] + np.arange(1, STEPS_AHEAD)[:, None, None]  # position, slot, context length
        self._ahead[1:, 4] = first[4]  # table rows
        self._take(0)

    def _take(self, k: int) -> None:
        """Row k of the steps ahead becomes the next step's inputs. Its rows are kept as views, made
        once per batch change and row rather than at every read (in a step each costs ~1 us cold)."""
        self._row = k
        views = self._views[k]
        if views is None:
            inputs = self._ahead[k]
            views = self._views[k] = (inputs, inputs[0], inputs[2], inputs[3], inputs[4])
        # `inputs` [len(ROW_FIELDS), B]; the token each sequence computes in the next step (its last sampled
        # one); the cache slot its k/v go to; its context length after the step (index + 1); its block-table row
        self.inputs, self.last, self.slot_mapping, self.context_lens, self.rows = views

    def note_held_blocks(self) -> None:
        """After a failed step: a sequence given a block that `gained_blocks` did not record (an
        interrupt between the two) has it recorded now, so the next step does not grow it again."""
        held = np.fromiter((len(q.block_table) for q in self.seqs), np.int64, len(self.seqs)) * self.block_size
        rows = np.flatnonzero(held > self.capacity)
        if rows.size:
            self.gained_blocks(rows, [self.seqs[i].block_table[-1] for i in rows.tolist()])

    def gained_blocks(self, rows: np.ndarray, blocks: list[int]) -> None:
        """Rows `rows` (int64 [k]) of the batch gained one block each, `blocks` (their ids): their
        next tokens start them."""
        k = self._row  # this step's slots, and those of the steps worked out after it
        self._ahead[k:, 2, rows] = np.asarray(blocks, dtype=np.int64) * self.block_size + np.arange(STEPS_AHEAD - k)[:, None]
        self.capacity[rows] += self.block_size  # second: an interrupt before it leaves both for note_held_blocks

    @property
    def trace_lens(self) -> np.ndarray:
        """int64 [B]: each sequence's trace tokens so far (the sampling draw's counter)."""
        return self.trace_start + self.steps

    def record(self, tokens: np.ndarray) -> None:
        """One step ran: `tokens` (int64 [B]) are each sequence's new token."""
        if self.steps == self.history.shape[0]:
            if self.steps >= _REBASE_AT:
                self._rebase()
            else:
                self.history = np.concatenate([self.history, np.empty_like(self.history)])
        self.history[self.steps] = tokens
        k = self._row + 1  # the next step's row of the steps ahead (position, slot, context length one further)
        if k < STEPS_AHEAD:
            self._take(k)
            self.last[:] = tokens
        else:  # the last row worked out: it moves on by one into row 0, and the next rows follow
            self._ahead[0] = self._ahead[k - 1]
            self._ahead[0, 0] = tokens
            self._ahead[0, 1:4] += 1
            self._work_ahead()
        self.steps += 1
        self.steps_run += 1

    def _rebase(self) -> None:
        """Flush every sequence and count steps from 0 again (a batch may live as long as a server)."""
        self.flush()
        s = self.steps
        self.start += s
        self.trace_start += s
        self.flushed[:] = 0
        self.longest += s
        self.growth_at, self.budget_at = max(self.growth_at - s, 0), self.budget_at - s
        self.steps = 0

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
    decode: DecodeBatch | None = None  # the decoding sequences, the step's first num_decode (None: a prefill-only step)
    num_decode: int = 0  # the first num_decode sequences decode one token each; the rest prefill
    # it writes k/v into prompt blocks that prefix caching makes (now or at a later chunk) findable: a
    # later prompt may need their every layer, so the step must compute every layer
    writes_shared: bool = False
    sample_idx: list[int] = field(default_factory=list)  # seqs that end the step with a new trace token
    pool_idx: list[int] = field(default_factory=list)  # seqs that end the step with their embedding

    @property
    def pure_decode(self) -> bool:
        """One token for each decoding sequence and nothing else (the CUDA-graph path)."""
        return self.decode is not None and self.num_decode == len(self.seqs)


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
        suffix_wait_steps: int = 0,
    ):
        self.blocks = block_managers
        self.mixed_steps = mixed_steps  # False: a step is all prefill or all decode, prefill first (the old policy)
        self.suffix_wait_steps = suffix_wait_steps  # see EngineConfig.suffix_wait_steps
        self.steps_scheduled = 0
        # per stage: the value of steps_scheduled from which the embed suffixes of ended traces are
        # prefilled (None: none waits); until then only a scan for other reasons takes them along
        self._suffix_due: list[int | None] = [None for _ in block_managers]
        self.vision_token_ids = vision_token_ids
        self.two_model = len(block_managers) == 2
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.set_stop_sequences(stop_sequences)
        self.waiting: list[deque[Sequence]] = [deque() for _ in block_managers]
        self.running: list[list[Sequence]] = [[] for _ in block_managers]
        # per stage: the sequences decoding, while there are any (their tokens lag: see DecodeBatch)
        self._decoding: list[DecodeBatch | None] = [None for _ in block_managers]
        # per stage: whether a running sequence may need prefill (set on admission, when a trace ends or
        # its suffix has waited enough, and after a failed step; cleared by a step that takes all the
        # prefill work found), so a pure decode step never walks the running list. Any
        # new way for a running sequence to need prefill must set it, or that sequence waits for the next admission or trace end.
        self._maybe_prefill: list[bool] = [False for _ in block_managers]

    def set_stop_sequences(self, stop_sequences: list[list[int]]) -> None:
        """The token sequences that end a trace (each non-empty)."""
        self.stop_tokens = {s[0] for s in stop_sequences if len(s) == 1}
        self.stop_sequences = [list(s) for s in stop_sequences if len(s) > 1]
        # a decode token that may end a trace: a stop token, the last token of a stop sequence, or
        # NO_TOKEN (a row with non-finite logits). Also as a lookup table (bool [largest such id + 2];
        # ids past the largest read the last entry, False), so a large step's tokens are checked in one
        # gather; `take` clips NO_TOKEN to token 0's entry, set too (token 0 is then looked at one by
        # one, and ends nothing it did not)
        self._may_stop = frozenset(self.stop_tokens | {s[-1] for s in self.stop_sequences} | {NO_TOKEN})
        self._may_stop_table = np.zeros(max(self._may_stop) + 2, dtype=bool)
        self._may_stop_table[[max(t, 0) for t in self._may_stop]] = True

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises ValueError for one handed to a scheduler before (running,
        finished or aborted): its state is that run's, and a second entry would share its blocks."""
        if seq.submitted:
            raise ValueError(f"sequence {seq.seq_id} was already submitted (a Sequence runs once; make a new one with "
                             "Engine.make_sequence)")
        seq.submitted = True
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
            bm.admit(seq, need)  # in this order: an interrupt anywhere leaves it in a queue (see step_failed)
            running.append(seq)
            waiting.popleft()
            self._maybe_prefill[stage] = True

    def schedule(self) -> Step | None:
        try:
            step = self._schedule()
        except BaseException:  # what it was taking is still to do: the next step looks for it again
            self._maybe_prefill = [True for _ in self._maybe_prefill]
            raise
        self.steps_scheduled += step is not None
        return step

    def _schedule(self) -> Step | None:
        for stage in range(len(self.blocks) - 1, -1, -1):
            self._admit(stage)
            running, bm = self.running[stage], self.blocks[stage]
            batch = self._decoding[stage]
            due = self._suffix_due[stage]
            if due is not None and self.steps_scheduled >= due:  # waited enough (with nothing decoding, the scan below runs anyway)
                self._maybe_prefill[stage] = True
            prefilling: list[Sequence] = []  # in running order: prompts, chunks of long prompts, embed suffixes
            if self._maybe_prefill[stage] or batch is None:  # (nothing decoding: a scan costs no decode step anything)
                prefilling = [seq for seq in running if seq.needs_prefill]
                self._maybe_prefill[stage] = bool(prefilling)
                self._suffix_due[stage] = None  # the waiting suffixes are among them
            if batch is None and len(prefilling) < len(running):  # sequences decoding since the batch was last empty
                batch = self._decoding[stage] = DecodeBatch([seq for seq in running if not seq.needs_prefill], bm.block_size)
            if not prefilling:
                if batch is None:
                    continue
                return self._pure_decode(stage, batch)
            decode = batch if self.mixed_steps else None  # without mixed steps prefill work waits for nobody: decoders wait
            seqs = list(decode.seqs) if decode is not None else []
            nd = len(seqs)
            counts, budget = [1] * nd, self.max_num_batched_tokens - nd
            findable = False  # whether the step writes k/v into a prompt block prefix caching does or will share
            left = False  # prefill work this step cannot take: the next step scans again
            for seq in prefilling:
                if budget <= 0:
                    left = True
                    break
                hashes = seq.prompt_block_hashes(bm.block_size, self.vision_token_ids) if bm.enable_prefix_caching else []
                if not seq.block_table:  # its first chunk in this stage: start from the cached prefix
                    self._reuse_prefix(seq, bm, hashes)
                n = min(seq.num_pending, budget)
                left |= n < seq.num_pending
                # a block filled over two steps is registered by the second: the first must compute every layer too
                findable |= seq.num_computed < len(hashes) * bm.block_size
                # blocks now, and registered now: a sequence later in this same step may reuse them,
                # since every layer stores the step's k/v before any of its attention reads them
                bm.grow(seq, seq.num_computed + n)
                bm.register(seq, hashes, seq.num_computed + n)
                seqs.append(seq)
                counts.append(n)
                budget -= n
            self._maybe_prefill[stage] = left
            if len(seqs) == nd:  # no room for prefill (the decoding rows fill the token budget)
                if batch is None:
                    continue
                return self._pure_decode(stage, batch)
            step = Step(stage, seqs, counts, decode=decode, num_decode=nd, writes_shared=findable)
            if decode is not None:
                self._prepare_decode(step)
            return self._prepare(step)
        return None

    @staticmethod
    def _reuse_prefix(seq: Sequence, bm: BlockManager, hashes: list[int]) -> None:
        """Take the cached blocks the prompt starts with; at least its last token is still computed."""
        usable = hashes[: (len(seq) - 1) // bm.block_size]
        found = bm.reuse_prefix(seq, usable)
        seq.num_computed = found * bm.block_size
        seq.num_cached_tokens += found * bm.block_size

    def _pure_decode(self, stage: int, batch: DecodeBatch) -> Step:
        """A step of one token for each sequence of `batch`: the same Step object for as long as
        the batch keeps its sequences."""
        if batch.pure_step is None:
            batch.pure_step = Step(stage, batch.seqs, [], decode=batch, num_decode=len(batch.seqs))
        return self._prepare_decode(batch.pure_step)

    def _prepare_decode(self, step: Step) -> Step:
        """The decoding rows of a step: blocks for the sequences whose next token starts a new one;
        every one of them samples its next token."""
        batch, bm = step.decode, self.blocks[step.stage]
        if batch.steps >= batch.growth_at:
            index = batch.index  # the sequences' computed tokens (their own counts lag, see DecodeBatch)
            full = np.flatnonzero(index >= batch.capacity)  # their next token starts a block: one more each
            if (index[full] > batch.capacity[full]).any():  # a step that skipped this check: never (every decode step comes here)
                raise RuntimeError("a decoding sequence is more than one block past its blocks (a scheduler bug)")
            grown = [batch.seqs[i] for i in full.tolist()]
            bm.grow_by_one(grown)
            batch.gained_blocks(full, [seq.block_table[-1] for seq in grown])
            batch.growth_at = batch.steps + int((batch.capacity - index).min())
        step.sample_idx = batch.sample_idx
        return step

    def _prepare(self, step: Step) -> Step:
        """Give each prefilling sequence the blocks its tokens need, and note which rows end with an
        output (every decoding row: the first num_decode)."""
        bm, bs, nd = self.blocks[step.stage], self.blocks[step.stage].block_size, step.num_decode
        for seq, n in zip(step.seqs[nd:], step.num_tokens[nd:]):
            if seq.num_computed + n > len(seq.block_table) * bs:
                bm.grow(seq, seq.num_computed + n)
        step.sample_idx = list(range(nd))
        for i in range(nd, len(step.seqs)):
            seq = step.seqs[i]
            if seq.num_computed + step.num_tokens[i] == len(seq):  # reaches its last known token: it has an output
                (step.sample_idx if seq.phase == Phase.THINK else step.pool_idx).append(i)
        return step

    def update(self, step: Step, tokens: np.ndarray, embeddings: torch.Tensor | None) -> list[Sequence]:
        """Apply a step's results: `tokens` (int64 [len(sample_idx)]) for step.sample_idx (the
        decoding rows first), `embeddings` [len(pool_idx), D] for step.pool_idx; returns the
        sequences that finished."""
        finished: list[Sequence] = []
        self.blocks[step.stage].commit()
        nd = step.num_decode
        if step.decode is not None:
            self._update_decode(step.stage, step.decode, tokens[:nd], finished)
            if step.pure_decode:
                return finished
        for seq, n in zip(step.seqs[nd:], step.num_tokens[nd:]):
            seq.num_computed += n
        finite = torch.isfinite(embeddings).all(dim=-1).tolist() if embeddings is not None else []  # (on the host already)
        for i, embedding, ok in zip(step.pool_idx, embeddings if embeddings is not None else [], finite):
            seq = step.seqs[i]
            if ok:
                seq.embedding = embedding
            else:  # that item's error, never a NaN vector handed out as a result
                seq.error = NON_FINITE_EMBEDDING
            finished.append(self._finish(seq, step.stage))
        joined = []  # prompts done: their first trace token is sampled, the rest is decoded
        for i, token in zip(step.sample_idx[nd:], tokens[nd:].tolist()):
            seq = step.seqs[i]
            seq.append_trace_token(token)
            reason = self._trace_stop(seq, token)
            if reason is None:
                joined.append(seq)
            else:
                self._end_trace(seq, step.stage, reason, finished)
        if joined:
            batch = self._decoding[step.stage]
            if batch is None:
                self._decoding[step.stage] = DecodeBatch(joined, self.blocks[step.stage].block_size)
            else:
                batch.add(joined)
        return finished

    def _update_decode(self, stage: int, batch: DecodeBatch, tokens: np.ndarray, finished: list[Sequence]) -> None:
        """The hot path: one new token for every decoding sequence, recorded as one array row. Only
        the sequences whose token may end their trace are looked at (and flushed) one by one."""
        batch.record(tokens)
        if len(tokens) <= _SET_LOOKUP_ROWS:
            ending = [i for i, token in enumerate(tokens.tolist()) if token in self._may_stop]
        else:
            ending = np.flatnonzero(self._may_stop_table.take(tokens, mode="clip")).tolist()
        if batch.steps >= batch.budget_at:  # some trace has spent its budget
            ending = sorted({*ending, *np.flatnonzero(batch.trace_lens >= batch.max_trace).tolist()})
        stopped = []
        for i in ending:
            batch.flush(i)
            seq = batch.seqs[i]
            reason = self._trace_stop(seq, seq.trace_ids[-1])
            if reason is not None:
                stopped.append((i, seq, reason))
        if stopped:
            self._remove_rows(stage, [i for i, _, _ in stopped])
            for _, seq, reason in stopped:
                self._end_trace(seq, stage, reason, finished)

    def flush(self) -> None:
        """Bring every decoding sequence's tokens up to date (see DecodeBatch); the scheduler does
        this itself wherever it reads them."""
        for batch in self._decoding:
            if batch is not None:
                batch.flush()

    def _leave_batch(self, seq: Sequence, stage: int) -> None:
        """`seq` stops decoding (finished or aborted): flushed, and out of the batch if it was in it."""
        batch = self._decoding[stage]
        if batch is None or seq.phase != Phase.THINK:  # embedding: its trace is over, it left the batch then
            return
        # by identity (list.index would build the message of its ValueError from a sequence's repr)
        i = next((k for k, q in enumerate(batch.seqs) if q is seq), None)
        if i is None:
            return
        self._remove_rows(stage, [i])

    def _remove_rows(self, stage: int, indices: list[int]) -> None:
        """Rows `indices` of the stage's decode batch leave it (flushed); an empty batch is dropped."""
        batch = self._decoding[stage]
        batch.remove(indices)
        if not batch.seqs:
            self._decoding[stage] = None

    def _end_trace(self, seq: Sequence, stage: int, reason: str, finished: list[Sequence]) -> None:
        """The trace is over (`reason`), and `seq` is out of the decode batch: finish it
        (generate_traces) or start embedding; a trace stopped by non-finite logits ends the sequence
        with that error (its NO_TOKEN dropped)."""
        if reason == _NON_FINITE:
            del seq.trace_ids[-1], seq.token_ids[-1]
            seq.error = NON_FINITE_LOGITS
            finished.append(self._finish(seq, stage))
            return
        if not seq.embed:
            seq.stop_reason = reason
            finished.append(self._finish(seq, stage))
            return
        seq.start_embed(reason)
        if self.two_model:  # the embedder re-reads query + trace in its own cache
            self._release(seq, 0)
            seq.stage, seq.num_computed, seq.image_embeds = 1, 0, None
            self.waiting[1].append(seq)
        elif self.suffix_wait_steps:  # its suffix waits for others' (at most suffix_wait_steps steps)
            if self._suffix_due[stage] is None:
                self._suffix_due[stage] = self.steps_scheduled + self.suffix_wait_steps
        else:
            self._maybe_prefill[stage] = True  # its suffix is prefilled next

    def abort_all(self) -> list[Sequence]:
        """Drop every queued and running sequence, returning their blocks; returns what was dropped."""
        self.flush()  # every decoding sequence up to date, and the batches dropped whole (not a sequence at a time)
        self._decoding = [None for _ in self._decoding]
        self._suffix_due = [None for _ in self._suffix_due]
        dropped = [s for q in self.waiting for s in q] + [s for r in self.running for s in r]
        for seq in dropped:
            self.abort(seq)
        return dropped

    def step_failed(self) -> None:
        """A step raised while it was scheduled or run: undo what it left half done. The prefix-cache
        entries it registered may hold unwritten KV: they are made unfindable, and every sequence
        holding one counts its tokens from that block on as not computed again (a prompt that reused
        another's blocks in the same step included: it no longer depends on that one being retried).
        A decode batch records the blocks its sequences were given but it did not note (an
        interrupt between the two). A sequence caught half admitted is in one queue again, and the
        block manager's books are rebuilt from the running sequences (`BlockManager.reclaim`: a
        block taken by an interrupted grow comes back). Its prefill work is still to do: the next
        step looks for it. (An interrupt inside `update`, which applies a step that ran, is not
        undone: `abort_all` then.)"""
        for stage, bm in enumerate(self.blocks):
            waiting, running = self.waiting[stage], self.running[stage]
            for seq in [q for q in waiting if any(q is r for r in running)]:
                waiting.remove(seq)  # admitted: it runs
            for seq in waiting:
                seq.row, seq.reservation = None, 0  # a row given just before the interrupt (reclaim recounts)
            forgotten = set(bm.forget_pending())
            for seq in running if forgotten else ():
                first = next((i for i, block in enumerate(seq.block_table) if block in forgotten), None)
                if first is not None:
                    seq.num_registered = min(seq.num_registered, first)
                    rewound = max(seq.num_computed - first * bm.block_size, 0)
                    seq.num_computed -= rewound
                    seq.num_cached_tokens = max(seq.num_cached_tokens - rewound, 0)  # (tokens a failed step reused)
            if self._decoding[stage] is not None:
                self._decoding[stage].note_held_blocks()
            bm.reclaim(running)
            self._maybe_prefill[stage] = True

    def _trace_stop(self, seq: Sequence, token: int) -> str | None:
        if token == NO_TOKEN:
            return _NON_FINITE
        trace = seq.trace_ids
        if token in self.stop_tokens or (self.stop_sequences and any(trace[-len(s) :] == s for s in self.stop_sequences)):
            return "stop"
        if len(trace) >= seq.max_trace_tokens:
            return "max_tokens"
        return None

    def _release(self, seq: Sequence, stage: int) -> None:
        self._leave_batch(seq, stage)
        self.running[stage].remove(seq)
        self.blocks[stage].free(seq)

    def _finish(self, seq: Sequence, stage: int) -> Sequence:
        self._release(seq, stage)
        seq.phase = Phase.FINISHED
        seq.image_embeds = None
        return seq
