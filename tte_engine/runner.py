"""Runs one scheduler step on one model: packs the step's tokens, runs the forward, and turns the
rows that matter into sampled tokens (thinking sequences) or embeddings (finished sequences).

The runner owns a model and its KV cache; it knows nothing about queues or phases beyond what
a step says. Tensors are built on the CPU and moved once per step.
"""

from __future__ import annotations

import torch

from .model.qwen2_vl import KVCache, Qwen2VL, StepBatch
from .sampling import sample
from .scheduler import Step
from .sequence import Phase, Sequence


class Runner:
    def __init__(self, model: Qwen2VL, cache: KVCache, block_size: int, suppressed_ids: list[int], max_vision_patches: int):
        self.model, self.cache, self.block_size = model, cache, block_size
        self.suppressed_ids = suppressed_ids
        self.max_vision_patches = max_vision_patches
        self.device = model.norm.device

    @torch.inference_mode()
    def run(self, step: Step) -> tuple[dict[int, int], dict[int, torch.Tensor]]:
        """Execute a step; returns ({seq_id: next token}, {seq_id: embedding [D] fp32})."""
        if step.is_prefill:
            self._encode_images([s for s in step.seqs if s.prompt.images and s.image_embeds is None and s.num_computed < s.num_prompt_tokens])
        batch = self._pack(step)
        h, residual = self.model(batch, self.cache)
        ends = torch.tensor(step.num_tokens).cumsum(0) - 1  # last packed row of each sequence
        thinking = [i for i, s in enumerate(step.seqs) if step.completes(i) and s.phase == Phase.THINK]
        pooling = [i for i, s in enumerate(step.seqs) if step.completes(i) and s.phase == Phase.EMBED]
        tokens, embeddings = {}, {}
        if thinking:
            rows = ends[thinking].to(self.device)
            logits = self.model.logits(h[rows], residual[rows])
            seqs = [step.seqs[i] for i in thinking]
            chosen = sample(logits, [s.sampling for s in seqs], [s.generator for s in seqs], self.suppressed_ids)
            tokens = {s.seq_id: t for s, t in zip(seqs, chosen)}
        if pooling:
            seqs = [step.seqs[i] for i in pooling]
            if self.model.head is None:
                rows = ends[pooling].to(self.device)
                unit = torch.arange(len(rows) + 1, dtype=torch.int32, device=self.device)
                pooled = self.model.pool_last_token(h[rows], residual[rows], unit)
            else:
                pooled = self._pool_mhsa(seqs)
            embeddings = {s.seq_id: e for s, e in zip(seqs, pooled.cpu())}
        return tokens, embeddings

    def _encode_images(self, seqs: list[Sequence]) -> None:
        """Run the vision tower over the images of `seqs`, a bounded number of patches per call."""
        pending = [(seq, sum(i.patches.shape[0] for i in seq.prompt.images)) for seq in seqs]
        while pending:
            group, patches = [], 0
            while pending and (not group or patches + pending[0][1] <= self.max_vision_patches):
                seq, count = pending.pop(0)
                group.append(seq)
                patches += count
            images = [img for s in group for img in s.prompt.images]
            pixels = torch.cat([img.patches for img in images]).to(self.device)
            merged = self.model.encode_images(pixels, [img.grid_thw for img in images])
            for seq, part in zip(group, merged.split([sum(i.num_tokens for i in s.prompt.images) for s in group])):
                seq.image_embeds = part

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1 of a sequence with block table `table`."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _pack(self, step: Step) -> StepBatch:
        ids, positions, slots, image_rows = [], [], [], []
        image_token = self.model.cfg.image_token_id
        for seq, n in zip(step.seqs, step.num_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            chunk = seq.token_ids[start:end]
            ids += chunk
            positions.append(seq.positions_for(start, end))
            slots += self._slots(seq.block_table, start, end)
            if step.is_prefill and seq.image_embeds is not None and start < seq.num_prompt_tokens:
                first = seq.token_ids[:start].count(image_token)
                image_rows.append(seq.image_embeds[first : first + chunk.count(image_token)])
        max_blocks = max(len(s.block_table) for s in step.seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in step.seqs]
        pos = torch.cat(positions, dim=1)
        to = dict(device=self.device)
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, **to),
            positions=(pos if step.is_prefill else pos[0]).to(**to),
            slot_mapping=torch.tensor(slots, dtype=torch.long, **to),
            block_tables=torch.tensor(tables, dtype=torch.int32, **to),
            context_lens=torch.tensor([s.num_computed + n for s, n in zip(step.seqs, step.num_tokens)], dtype=torch.int32, **to),
            cu_seqlens_q=torch.tensor([0] + step.num_tokens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(**to),
            is_prefill=step.is_prefill,
            image_embeds=torch.cat(image_rows) if image_rows else None,
            num_layers=self._layers_needed(step),
        )

    def _layers_needed(self, step: Step) -> int | None:
        """With the mhsa head, an all-embed step only needs the layers below the head's source layer."""
        if self.model.head is not None and all(s.phase == Phase.EMBED for s in step.seqs):
            return self.model.head.source_layer
        return None

    def _pool_mhsa(self, seqs: list[Sequence]) -> torch.Tensor:
        """Gather each finished sequence's stored source-layer states and run the head over them."""
        hidden = self.cache.hidden.view(-1, self.cache.hidden.shape[-1])
        rows, positions, lens = [], [], []
        for seq in seqs:
            n = len(seq)
            rows.append(hidden[torch.tensor(self._slots(seq.block_table, 0, n), device=self.device)])
            positions.append(seq.positions_for(0, n))
            lens.append(n)
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        return self.model.pool_mhsa(torch.cat(rows), torch.cat(positions, dim=1).to(self.device), cu.to(self.device))
