"""Runs one scheduler step on one model: builds the step's inputs, runs the forward, and turns the
rows that matter into sampled tokens (thinking sequences) or embeddings (finished sequences).

The runner owns a model, its KV cache and the device copy of its block tables; it knows nothing
about queues or phases beyond what a step says. Step inputs are integer arrays built in one
numpy pass and sent with one copy (`step_inputs.py`). A pure decode step touches the host once,
reading back the sampled tokens; it runs from a CUDA graph per batch bucket when graphs are on
(`cuda_graphs.py`), and on CPU the same padded static-buffer code runs eagerly.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict

import numpy as np
import torch

from .cache import BlockManager
from .kernels._dispatch import use_triton
from .kernels.attention import KEPT_CONTEXT_BYTES, DecodePlan, HostDecodePlan
from .model.cpu_linear import linear_dtype, linear_into
from .model.qwen2_vl import KVCache, Qwen2VL, StepBatch
from .sampling import Suppression, sample
from .scheduler import DecodeBatch, Step
from .sequence import Phase, Sequence
from .step_inputs import DECODE_FIELDS, SAMPLING_FIELDS, DecodeLayout, DecodeViews, StagingBuffer, bits_float, float_bits, pack


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Decode batch sizes a graph is captured for: 1, 2, 4, 8, then every 16 up to max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16)) + [max_num_seqs]
    return sorted(set(sizes))


@contextlib.contextmanager
def step_loop_mode():
    """Inference mode for a loop of engine steps, entered once (`Runner.run` then skips its own
    guard at every step); yields `callers_mode`, a function whose context gives code called back
    from inside the loop (a user's progress callback) the caller's own autograd mode, so the
    tensors it makes are ordinary ones, as they were outside the loop."""
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def callers_mode() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if not inference:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.set_grad_enabled(grad))
        return stack

    with torch.inference_mode():
        yield callers_mode


def readback(tokens: torch.Tensor | np.ndarray) -> np.ndarray:
    """The one device-to-host transfer of a decode step: the sampled token ids (int64); a CPU
    engine's greedy ids are a numpy array already (`Suppression.greedy`)."""
    return tokens if isinstance(tokens, np.ndarray) else tokens.cpu().numpy()


class Runner:
    def __init__(
        self,
        model: Qwen2VL,
        cache: KVCache,
        blocks: BlockManager,
        suppressed_ids: list[int],
        max_vision_patches: int,
        *,
        cuda_graphs: bool = False,
        encoder_cache_tokens: int = 0,
    ):
        self.model, self.cache, self.blocks = model, cache, blocks
        self.block_size = blocks.block_size
        self.max_vision_patches = max_vision_patches
        self.device = model.norm.device
        self.suppression = Suppression(model.cfg.text.vocab_size, suppressed_ids, self.device, linear_dtype(model.lm_head))
        self.logits = LogitsBuffer(blocks.padding_row, model.lm_head.out_features, linear_dtype(model.lm_head), self.device,
                                   numpy_view=self.suppression.on_numpy)  # a numpy view where suppression works in numpy
        self.tables = torch.from_numpy(blocks.tables).to(self.device)  # device copy, updated incrementally
        # a CPU engine's "device copy" is the host's array: eager decode steps have no updates to apply
        self.tables_are_host = self.tables.data_ptr() == blocks.tables.ctypes.data
        # a CPU engine on the PyTorch path works out decode attention's reads in numpy (`HostDecodePlan`)
        self.plan_on_host = self.device.type == "cpu" and not use_triton(model.impl, self.tables)
        # what such a plan may keep of its gathered context (`KeptContext`): a quarter of the KV cache at most
        self.kept_context_bytes = min(KEPT_CONTEXT_BYTES, (cache.k.nbytes + cache.v.nbytes) // 4)
        self.max_rows = blocks.padding_row  # = max_num_seqs
        self.buckets = graph_buckets(self.max_rows)
        self.layout = DecodeLayout(self.max_rows)
        self.decode_size = self.layout.size
        self.decode_staging = StagingBuffer(self.decode_size, self.device)
        self.decode_views = [self.layout.views(host) for host in self.decode_staging.host_arrays]  # per host buffer (never regrown)
        self._decode_inputs: dict[int, dict[str, torch.Tensor]] = {}  # views of its device buffer, per batch size
        self.prefill_staging = StagingBuffer(1 << 14, self.device)
        self.padding_slot = blocks.scratch_block * self.block_size
        # a padded decode row, per ROW_FIELDS: token 0 at position 0, k/v to the scratch slot, empty context, padding table row
        self.padding_values = np.array([0, 0, self.padding_slot, 0, self.max_rows], dtype=np.int64)[:, None]
        # a no-op block-table update (index, value): the padding row's first entry rewritten with the scratch block
        self.noop_update = (self.max_rows * blocks.tables.shape[1], blocks.scratch_block)
        self.vision_ids = (model.cfg.image_token_id, model.cfg.video_token_id)
        self.encoder_cache = EncoderCache(max_tokens=encoder_cache_tokens)  # 0: nothing kept past its step
        self.graphs = None
        self.graphs_eager_reason: str | None = None  # why decode steps are not replayed from CUDA graphs (None: they are, or graphs are off)
        if cuda_graphs:
            from .cuda_graphs import DecodeGraphs

            graphs = DecodeGraphs(self)
            self.graphs_eager_reason = graphs.eager_reason
            self.graphs = None if graphs.failed else graphs  # a failed capture: plain eager steps (it has warned why)

    # ------------------------------------------------------------------ entry
    def run(self, step: Step) -> tuple[np.ndarray, torch.Tensor | None]:
        """Execute a step; returns (tokens int64 [len(sample_idx)], embeddings [len(pool_idx), D] fp32 on CPU)."""
        # inference mode (~70 us a step faster in the micro benchmark's forward than grad mode): the
        # engine's loops (`Engine.embed`, tte-serve's) enter it once (`step_loop_mode`); a step called
        # outside one enters it here, through the guard `torch.inference_mode` itself uses (its Python
        # wrapper costs 2-4x more)
        if not torch.is_inference_mode_enabled():
            with torch._C._InferenceMode(True):
                return self.run(step)
        if step.pure_decode:
            return self._run_decode(step.decode), None
        return self._run_prefill(step)

    # ------------------------------------------------------------------ decode
    def _run_decode(self, decode: DecodeBatch) -> np.ndarray:
        batch = len(decode.seqs)
        bucket = self.bucket_for(batch) if self.graphs is not None else batch
        views = self.decode_views[self.decode_staging.next_turn()]
        updates = self._fill_decode(views, decode, bucket)
        self.decode_staging.send(self.decode_size)
        if self.graphs is not None:
            greedy, logits = self.graphs.replay(bucket)
        else:
            plan = self._decode_plan(decode) if self.plan_on_host else None
            greedy, logits = self.decode_forward(batch, self._decode_width(decode), None, updates, plan)
        tokens = greedy if bucket == batch else greedy[:batch]
        if not decode.greedy:
            tokens = sample(logits[:batch].float(), *_sampling_params(self.decode_inputs(batch).__getitem__), filtered=_filters(decode.sampling),
                            impl=self.model.impl, greedy=torch.as_tensor(tokens))
        return readback(tokens)

    def bucket_for(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _fill_decode(self, views: DecodeViews, decode: DecodeBatch, bucket: int) -> bool:
        """Write a decode batch into the fixed layout of a host buffer (`views`), padded to `bucket`
        rows; returns whether there is a block-table update.

        Padded rows read the padding table row (all scratch block) with context 0 and write their
        k/v to the scratch slot: they touch no sequence's cache.
        """
        n = len(decode.seqs)
        ints = views.row_fields  # one row per field
        ints[:, :n] = decode.inputs  # kept by the batch step to step (past the prompt, every M-RoPE axis is index + delta)
        if bucket > n:
            ints[:, n:bucket] = self.padding_values
        updates = self._fill_updates(views, bucket)
        if not decode.greedy:
            for name, values in zip(SAMPLING_FIELDS, self._decode_sampling(decode)):
                views.buffer[self.layout.field(name, n)] = values
        return updates

    def _decode_sampling(self, decode: DecodeBatch) -> np.ndarray:
        """The decoding sequences' sampling fields [len(SAMPLING_FIELDS), B] (int64), this step's counters included."""
        if decode.sampling is None:  # per-sequence constants, gathered once per batch
            decode.sampling = np.zeros((len(SAMPLING_FIELDS), len(decode.seqs)), dtype=np.int64)
            self._fill_sampling(decode.seqs, *decode.sampling)
        decode.sampling[SAMPLING_FIELDS.index("counters")] = decode.trace_lens  # the draw's position in the trace moves on
        return decode.sampling

    def _decode_plan(self, decode: DecodeBatch) -> DecodePlan:
        """A CPU engine's decode-attention plan for the decoding rows of this step (`HostDecodePlan`)."""
        if decode.attention_plan is None:
            decode.attention_plan = HostDecodePlan(self.kept_context_bytes)
        return decode.attention_plan.step(self.blocks.tables, decode.rows, decode.context_lens, decode.slot_mapping, self._decode_width(decode),
                                          self.block_size, decode.steps_run)

    def _decode_width(self, decode: DecodeBatch) -> int:
        """Blocks holding the longest context of the decoding sequences after this step."""
        return (decode.longest + decode.steps) // self.block_size + 1

    def _slots(self, rows: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Cache slots (int64) of token positions `index` of the sequences holding table `rows`."""
        bs = self.block_size
        return self.blocks.tables[rows, index // bs].astype(np.int64) * bs + index % bs

    def _fill_updates(self, views: DecodeViews, count: int) -> bool:
        """Block-table changes since the last step, into the decode layout's update fields of a
        host buffer (`views`), padded to `count` with no-op rewrites of the padding row; False when
        there is nothing to apply (an eager step without new blocks, or on a CPU engine, whose
        block tables are one array)."""
        updates = self.blocks.take_updates()
        if self.graphs is None and (not updates or self.tables_are_host):
            # an eager step skips the table update when there is none, or when the "device copy" is the host's
            # array, which has them already (at batch 64 and 256, host work beside the forward 0.97-0.98)
            return False
        if len(updates) > count:  # more than a block a row: left by a step that failed after its blocks were taken
            self._apply_updates(updates)  # (only then), applied here, outside the step's fixed layout
            updates = []
        index, value = views.update_index, views.update_value
        if updates:
            index[: len(updates)], value[: len(updates)] = np.asarray(updates, dtype=np.int64).T
        index[len(updates) : count], value[len(updates) : count] = self.noop_update
        return bool(updates)

    def _apply_updates(self, updates: list[tuple[int, int]]) -> None:
        """Apply block-table updates (flat index, block id) to the device copy now, with their own
        host-to-device copy."""
        self._update_tables(*torch.as_tensor(np.asarray(updates, dtype=np.int64).T, device=self.device))

    def resync_tables(self) -> None:
        """After a failed step: the device copy of the block tables set to the host's whole, and the
        pending updates dropped (a step that took them may have failed before applying them). On a
        CPU engine the two are one array: nothing to do."""
        self.blocks.take_updates()
        if not self.tables_are_host:
            self.tables.copy_(torch.from_numpy(self.blocks.tables))

    def _update_tables(self, index: torch.Tensor, value: torch.Tensor) -> None:
        """Block-table entries (flat `index`, int64 [k]) of the device copy set to block ids `value` (int64 [k])."""
        self.tables.view(-1).index_copy_(0, index, value.to(torch.int32))

    @staticmethod
    def _fill_sampling(seqs: list[Sequence], seeds, counters, top_k, temperature_bits, top_p_bits) -> None:
        """Write the sampling fields (SAMPLING_FIELDS order) of `seqs` into the given int64 arrays."""
        n = len(seqs)
        seeds[:n] = np.fromiter((s.seed for s in seqs), np.int64, n)
        counters[:n] = np.fromiter((len(s.trace_ids) for s in seqs), np.int64, n)
        top_k[:n] = np.fromiter((s.sampling.top_k for s in seqs), np.int64, n)
        temperature_bits[:n] = float_bits(np.fromiter((s.sampling.temperature for s in seqs), np.float32, n))
        top_p_bits[:n] = float_bits(np.fromiter((s.sampling.top_p for s in seqs), np.float32, n))

    def decode_inputs(self, batch: int) -> dict[str, torch.Tensor]:
        """The first `batch` entries of each decode field (DECODE_FIELDS) in the device buffer, by
        name: views made once per batch size (the buffer never moves)."""
        views = self._decode_inputs.get(batch)
        if views is None:
            buf = self.decode_staging.device_buffer
            views = self._decode_inputs[batch] = {name: buf[self.layout.field(name, batch)] for name in DECODE_FIELDS}
        return views

    def decode_forward(self, batch: int, width: int, num_splits: int | None, updates: bool = True,
                       plan: DecodePlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step on the device, reading the first `batch` rows of the decode buffer:
        block-table updates, embedding, layers (with the mhsa source recording), final norm, LM
        head, suppression and argmax. Returns (greedy tokens [batch] int64: on a CPU engine a numpy
        array, see `Suppression.greedy`; suppressed logits [batch, V] in the LM head's dtype, the
        first rows of `self.logits`, good until the next decode step: what a sampled step samples
        from, in fp32). Static
        shapes and no host sync: this is what a CUDA graph captures (with `updates` True; an eager
        step without new blocks skips that op). `plan`: decode attention's reads, worked out on the
        host (CPU engines; see `HostDecodePlan`)."""
        view = self.decode_inputs(batch)
        if updates:
            self._update_tables(view["update_index"], view["update_value"])
        if plan is None:
            tables, context_lens = self.tables.index_select(0, view["table_rows"])[:, :width], view["context_lens"].to(torch.int32)
        else:  # attention reads what the plan says: neither table rows nor int32 lengths (two ops fewer)
            tables, context_lens = None, view["context_lens"]
        step = StepBatch(input_ids=view["input_ids"], positions=view["positions"], slot_mapping=view["slot_mapping"], block_tables=tables,
                         context_lens=context_lens, cu_seqlens_q=None, is_prefill=False, num_splits=num_splits, decode_plan=plan)
        logits, array = self.logits.rows(batch)
        self.model.decode_logits(step, self.cache, logits)  # not through Module.__call__: no hooks here, ~3 us less a step on CPU
        return self.suppression.greedy(logits, array), logits

    # ------------------------------------------------------------------ prefill (and mixed) steps
    def _run_prefill(self, step: Step) -> tuple[list[int], torch.Tensor | None]:
        """A step with prefill chunks, after the decoding rows (if any): those come from the decode
        batch's arrays (their sequences lag, see DecodeBatch), the chunks from their sequences."""
        seqs, nd, decode = step.seqs, step.num_decode, step.decode
        chunks = seqs[nd:]
        self._encode_images([s for s in chunks if s.prompt.images and s.image_embeds is None and s.num_computed < s.num_prompt_tokens])
        n, bs = len(seqs), self.block_size
        counts = np.asarray(step.num_tokens, dtype=np.int64)
        starts = np.fromiter((s.num_computed for s in chunks), np.int64, n - nd)
        rows = np.fromiter((s.row for s in chunks), np.int64, n - nd)
        deltas = np.fromiter((s.rope_delta for s in chunks), np.int64, n - nd)
        ids = np.fromiter(itertools.chain.from_iterable(s.token_ids[a : a + c] for s, a, c in zip(chunks, starts.tolist(), step.num_tokens[nd:])),
                          np.int64, int(counts[nd:].sum()))
        if decode is not None:  # one row each, first
            starts, rows, deltas = np.concatenate([decode.index, starts]), np.concatenate([decode.rows, rows]), np.concatenate([decode.rope_deltas, deltas])
            ids = np.concatenate([decode.last, ids])
        cu, seg, index = _packed(starts, counts)
        positions = self._positions(chunks, starts[nd:], counts[nd:], index, seg, deltas, first_row=nd)
        slots = self._slots(rows[seg], index)
        # the rows read after the forward: the last layer computes only these (see StepBatch.out_rows)
        out_idx = sorted(step.sample_idx + step.pool_idx)
        out_rows, out_seqs = (cu[1:] - 1)[out_idx], np.asarray(out_idx, dtype=np.int64)
        sample_rows = np.searchsorted(out_seqs, step.sample_idx).astype(np.int64)
        pool_rows = np.searchsorted(out_seqs, step.pool_idx).astype(np.int64)
        updates = np.asarray(self.blocks.take_updates(), dtype=np.int64).reshape(-1, 2).T
        sampled = [seqs[i] for i in step.sample_idx[nd:]]  # the chunks that sample (the decoding rows all do, first)
        sampling = not all(s.greedy for s in sampled) or (decode is not None and not decode.greedy)
        params = np.zeros((len(SAMPLING_FIELDS), len(step.sample_idx)), dtype=np.int64)
        if sampling:
            if decode is not None:
                params[:, :nd] = self._decode_sampling(decode)
            self._fill_sampling(sampled, *params[:, nd:])
        arrays = [ids, positions, slots, starts + counts, rows, cu, sample_rows, pool_rows, updates[0], updates[1], params, out_rows, out_seqs]
        host = self.prefill_staging.host(sum(a.size for a in arrays))
        parts = pack(arrays, host)
        self.prefill_staging.send(parts[-1].stop)
        dev = self.prefill_staging.device_buffer
        d_ids, d_pos, d_slots, d_ctx, d_rows, d_cu, d_sample, d_pool, d_uidx, d_uval, d_params, d_out_rows, d_out_seqs = (dev[p] for p in parts)
        num_layers = self.layers_needed(step)
        if updates.shape[1]:
            self._update_tables(d_uidx, d_uval)
        width = int((starts + counts).max() - 1) // bs + 1
        plan = None
        if nd and self.plan_on_host:  # the decoding rows' reads
            plan = self._decode_plan(decode)
        batch = StepBatch(
            input_ids=d_ids,
            positions=d_pos.view(3, -1),
            slot_mapping=d_slots,
            block_tables=self.tables.index_select(0, d_rows)[:, :width],
            context_lens=d_ctx.to(torch.int32),
            cu_seqlens_q=d_cu.to(torch.int32),
            is_prefill=True,
            image_embeds=self._image_rows(chunks, starts[nd:], step.num_tokens[nd:]),
            num_layers=num_layers,
            num_decode=nd,
            decode_plan=plan,
            max_query_len=int(counts.max()),
            out_rows=d_out_rows if num_layers is None else None,  # an early stop (mhsa) reads no row of h
            out_seqs=d_out_seqs,
        )
        h, residual = self.model(batch, self.cache)
        tokens = np.zeros(0, dtype=np.int64)
        if step.sample_idx:
            logits = linear_into(self.model.lm_head, self.model.final_norm(h[d_sample], residual[d_sample]))
            if sampling:
                by_name = dict(zip(SAMPLING_FIELDS, d_params.view(len(SAMPLING_FIELDS), -1)))
                chosen = sample(self.suppression.apply_(logits).float(), *_sampling_params(by_name.__getitem__), filtered=_filters(params),
                                impl=self.model.impl)
            else:
                chosen = self.suppression.greedy(logits)
            tokens = readback(chosen)
        embeddings = None
        if step.pool_idx:
            if self.model.head is None:
                unit = torch.arange(len(step.pool_idx) + 1, dtype=torch.int32, device=self.device)
                embeddings = self.model.pool_last_token(h[d_pool], residual[d_pool], unit).cpu()
            else:
                embeddings = self._pool_mhsa([seqs[i] for i in step.pool_idx]).cpu()
        return tokens, embeddings

    @staticmethod
    def _positions(seqs: list[Sequence], starts: np.ndarray, counts: np.ndarray, index: np.ndarray, seg: np.ndarray,
                   deltas: np.ndarray | None = None, first_row: int = 0) -> np.ndarray:
        """[3, T] M-RoPE positions of packed rows at `index` of sequences `seg`: index + rope_delta
        (`deltas` [B], default the sequences'), except inside a prompt, where they are the prompt's
        own. `seqs`, `starts`, `counts`: the sequences whose chunks begin at packed row `first_row`
        (rows before it, decoding, are past their prompts)."""
        if deltas is None:
            deltas = np.fromiter((s.rope_delta for s in seqs), np.int64, len(seqs))
        positions = np.broadcast_to(index + deltas[seg], (3, index.size)).copy()
        at = first_row
        for seq, start, count in zip(seqs, starts.tolist(), counts.tolist()):
            prompt_end = min(start + count, seq.num_prompt_tokens)
            if start < prompt_end:
                positions[:, at : at + prompt_end - start] = seq.positions[:, start:prompt_end].numpy()
            at += count
        return positions

    def _image_rows(self, seqs: list[Sequence], starts: np.ndarray, counts: list[int]) -> torch.Tensor | None:
        """Vision-tower outputs for the image and video placeholders of this step, in token order."""
        parts = []
        for seq, start, n in zip(seqs, starts.tolist(), counts):
            if seq.image_embeds is not None and start < seq.num_prompt_tokens:
                spans = seq.vision_spans(self.vision_ids)
                before, through = _vision_tokens_before(spans, start), _vision_tokens_before(spans, start + n)
                parts.append(seq.image_embeds[before - seq.image_embeds_offset : through - seq.image_embeds_offset])
        return torch.cat(parts) if parts else None

    def _encode_images(self, seqs: list[Sequence]) -> None:
        """Run the vision tower over the images of `seqs` that still have tokens to compute (an image
        wholly inside a cached prefix is skipped), a bounded number of patches per call.

        An image is encoded once per step however many sequences hold it (by content digest), and
        with prefix caching on, recent outputs are kept for later steps (`encoder_cache`): sequences
        sharing an image whose cached prefix ends inside it need its tower output for their
        remaining tokens. Without prefix caching nothing computed for one step serves another."""
        wanted: list[tuple[Sequence, list]] = []
        for seq in seqs:
            spans = seq.vision_spans(self.vision_ids)
            keep = [k for k, (_, end) in enumerate(spans) if end > seq.num_computed]
            if keep:
                seq.image_embeds_offset = _vision_tokens_before(spans, spans[keep[0]][0])
                wanted.append((seq, [seq.prompt.images[k] for k in keep]))
        todo = list({img.digest: img for _, images in wanted for img in images if img.digest not in self.encoder_cache}.values())
        fresh = {}
        while todo:
            group, patches = [], 0
            while todo and (not group or patches + todo[0].patches.shape[0] <= self.max_vision_patches):
                group.append(todo.pop(0))
                patches += group[-1].patches.shape[0]
            pixels = torch.cat([img.patches for img in group]).to(self.device)
            merged = self.model.encode_images(pixels, [img.grid_thw for img in group])
            fresh.update(zip((img.digest for img in group), merged.split([img.num_tokens for img in group])))
        for seq, images in wanted:
            seq.image_embeds = torch.cat([fresh[img.digest] if img.digest in fresh else self.encoder_cache[img.digest] for img in images])
        self.encoder_cache.update(fresh)

    def layers_needed(self, step: Step) -> int | None:
        """With the mhsa head, an all-embed step only needs the layers below the head's source layer,
        unless it writes prompt blocks that prefix caching shares: a later prompt may need their every layer."""
        if self.model.head is not None and not step.writes_shared and all(s.phase == Phase.EMBED for s in step.seqs):
            return self.model.head.source_layer
        return None

    def _pool_mhsa(self, seqs: list[Sequence]) -> torch.Tensor:
        """Gather each finished sequence's stored source-layer states and run the head over them."""
        n = len(seqs)
        lens = np.fromiter((len(s) for s in seqs), np.int64, n)
        starts = np.zeros(n, dtype=np.int64)
        cu, seg, index = _packed(starts, lens)
        rows = np.fromiter((s.row for s in seqs), np.int64, n)
        slots = self._slots(rows[seg], index)
        positions = self._positions(seqs, starts, lens, index, seg)
        to = dict(device=self.device)
        hidden = self.cache.hidden.view(-1, self.cache.hidden.shape[-1]).index_select(0, torch.from_numpy(slots).to(**to))
        return self.model.pool_mhsa(hidden, torch.from_numpy(positions).to(**to), torch.from_numpy(cu).to(torch.int32).to(**to))


def _packed(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For sequences contributing counts[b] tokens from position starts[b]: (cu [B+1] row offsets,
    seg [T] each packed row's sequence, index [T] each packed row's position in its sequence)."""
    cu = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=cu[1:])
    seg = np.repeat(np.arange(counts.size), counts)
    return cu, seg, np.arange(cu[-1]) - cu[:-1][seg] + starts[seg]


def _vision_tokens_before(spans: list[tuple[int, int]], position: int) -> int:
    """How many image/video placeholder tokens of a prompt come before `position`."""
    return sum(min(end, position) - start for start, end in spans if start < position)


_NO_TOP_P = int(float_bits(np.ones(1, dtype=np.float32))[0])  # top_p = 1.0's bits


def _filters(params: np.ndarray) -> bool:
    """Whether any row of host sampling fields `params` ([len(SAMPLING_FIELDS), B] int64) sets
    top_k or top_p < 1: only then does `sample` sort the vocabulary."""
    return bool(params[SAMPLING_FIELDS.index("top_k")].any() or (params[SAMPLING_FIELDS.index("top_p_bits")] != _NO_TOP_P).any())


def _sampling_params(field) -> tuple[torch.Tensor, ...]:
    """`sample`'s (temperature, top_k, top_p, seeds, counters) from int64 device fields by name."""
    return bits_float(field("temperature_bits")), field("top_k"), bits_float(field("top_p_bits")), field("seeds"), field("counters")


ENCODER_CACHE_TOKENS = 16384  # vision-tower output tokens kept for reuse (~2 MB a 1k tokens at hidden 512, fp32)


class LogitsBuffer:
    """Where the decode step's LM head writes: one [rows, V] buffer in the LM head's dtype, reused
    step after step, whose first B rows `rows(B)` hands out as a tensor and, with `numpy_view`
    (fp32 on the CPU: where `Suppression` works in numpy), as a numpy array of the same memory,
    both made once per batch size. A step's logits are good until the next decode step.

    It grows to the largest batch asked for (at least doubling, at most `max_rows`); CUDA graphs
    `reserve` all `max_rows` before capture, so every bucket's LM head writes at a fixed address
    (one buffer outside the graphs' pool: 78 MB at 256 rows of Qwen2-VL's 151,936 ids in bf16,
    where each bucket's own would hold ~0.65 GB over the default buckets). Against a fresh tensor
    and its `.numpy()` at every step, the host work beside a batch-1 decode step's forward was
    0.92-0.93 (stop 20, the 2-core Xeon VM, micro model, alternating step by step)."""

    def __init__(self, max_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, *, numpy_view: bool):
        self.max_rows, self.numpy_view = max_rows, numpy_view
        self.buffer = torch.empty(0, vocab, dtype=dtype, device=device)
        self._rows: dict[int, tuple[torch.Tensor, np.ndarray | None]] = {}

    def rows(self, batch: int) -> tuple[torch.Tensor, np.ndarray | None]:
        """(the first `batch` rows [batch, V], the same as a numpy array or None: no `numpy_view`)."""
        got = self._rows.get(batch)
        if got is None:
            if batch > len(self.buffer):
                self.reserve(max(batch, min(2 * len(self.buffer), self.max_rows)))
            view = self.buffer[:batch]
            got = self._rows[batch] = (view, view.numpy() if self.numpy_view else None)
        return got

    def reserve(self, rows: int) -> None:
        """Room for `rows` rows (a larger buffer replaces the old one: views handed out before stay
        on the old memory)."""
        if rows > len(self.buffer):
            self.buffer = self.buffer.new_empty(rows, self.buffer.shape[1])
            self._rows.clear()


class EncoderCache:
    """Vision-tower outputs by image content digest, least recently used dropped first once they
    hold more than `max_tokens` rows."""

    def __init__(self, max_tokens: int):
        self.max_tokens, self.tokens = max_tokens, 0
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __contains__(self, digest: str) -> bool:
        return digest in self._rows

    def __getitem__(self, digest: str) -> torch.Tensor:
        self._rows.move_to_end(digest)
        return self._rows[digest]

    def clear(self) -> None:
        self._rows.clear()
        self.tokens = 0

    def update(self, fresh: dict[str, torch.Tensor]) -> None:
        for digest, rows in fresh.items():
            if digest not in self._rows and rows.shape[0] <= self.max_tokens:
                self._rows[digest] = rows.clone()  # not a view: a kept image must not pin its whole batch's output
                self.tokens += rows.shape[0]
        while self.tokens > self.max_tokens:
            self.tokens -= self._rows.popitem(last=False)[1].shape[0]
