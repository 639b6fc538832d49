"""Our Qwen2-VL: vision tower + decoder + LM head + embedding head, over packed, paged batches.

`forward` runs the decoder on one scheduler step (a prefill step of several sequences' chunks, or
a decode step of one token per sequence) and returns the final layer's output and residual
stream; the caller decides which rows need logits and which need pooling, so nothing is
computed for the rows in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import kernels
from ..kernels._dispatch import use_triton
from ..kernels.attention import DecodePlan, decode_plan
from ..config import HeadConfig, ModelConfig
from .cpu_linear import linear_into
from .decoder import DecoderLayer, Rotary
from .heads import MHSAHead
from .vision_tower import VisionTower


@dataclass
class StepBatch:
    """Everything one forward needs besides the weights and the cache (built by the runner)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T] (M-RoPE) or [T] (all axes equal)
    slot_mapping: torch.Tensor  # [T] cache slot of each token
    block_tables: torch.Tensor | None  # [B, max_blocks] int32 (None: a pure decode step on the PyTorch path, whose decode_plan says what attention reads)
    context_lens: torch.Tensor  # [B] int32 (int64 beside a decode_plan): tokens in the cache for each sequence after this step
    cu_seqlens_q: torch.Tensor | None  # [B+1] int32: packed rows of each sequence (prefill)
    is_prefill: bool
    image_embeds: torch.Tensor | None = None  # [num_image_and_video_tokens_in_step, D], in token order
    num_layers: int | None = None  # stop early (the mhsa head only needs layers < source_layer)
    num_splits: int | None = None  # decode attention's split count, fixed per CUDA-graph bucket
    num_decode: int = 0  # prefill steps: the first num_decode sequences are decoding (one token each)
    decode_plan: DecodePlan | None = None  # PyTorch path: what attention reads for the decoding rows (else worked out in forward)
    max_query_len: int | None = None  # prefill steps: most packed rows of one sequence (the host knows it: no device sync)
    # Prefill steps: the packed rows whose output is read (each its sequence's last row in the step) and
    # their sequences. The last layer stores every row's k/v but computes only these rows past that.
    out_rows: torch.Tensor | None = None
    out_seqs: torch.Tensor | None = None


@dataclass
class KVCache:
    """Per-layer paged caches [L, num_blocks, block_size, KVH, hd], plus the head's source states."""

    k: torch.Tensor
    v: torch.Tensor
    hidden: torch.Tensor | None = None  # [num_blocks, block_size, D] (mhsa head only)


class Qwen2VL(nn.Module):
    def __init__(self, cfg: ModelConfig, head_cfg: HeadConfig, max_positions: int, impl: str = "auto"):
        super().__init__()
        t = cfg.text
        self.cfg, self.head_cfg, self.impl = cfg, head_cfg, impl
        self.max_positions = max_positions
        self.visual = VisionTower(cfg.vision)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_layers))
        self.norm = nn.Parameter(torch.ones(t.hidden_size))
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if t.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.head = MHSAHead(t, head_cfg) if head_cfg.type == "mhsa" else None
        self.rotary: Rotary | None = None  # built on the final device by `finalize`
        self.scale = t.head_dim**-0.5

    def finalize(self) -> "Qwen2VL":
        """Call once the weights sit on their device: re-ties embeddings, builds the rotary table there."""
        if self.cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(self.cfg.text, self.max_positions, self.norm.device)
        return self.eval().requires_grad_(False)

    @property
    def _layer_list(self) -> list[DecoderLayer]:
        return list(self.layers._modules.values())

    @property
    def head_source_layer(self) -> int | None:
        return None if self.head is None else self.head.source_layer

    def encode_images(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        return self.visual(patches, grids)

    def embed(self, batch: StepBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        if batch.image_embeds is not None and batch.image_embeds.shape[0]:
            mask = (batch.input_ids == self.cfg.image_token_id) | (batch.input_ids == self.cfg.video_token_id)
            x[mask] = batch.image_embeds.to(x.dtype)
        return x

    def forward(self, batch: StepBatch, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder layers; returns (output, residual) of the last layer run, [T, D] each."""
        h, residual = self.embed(batch), None
        capture = self.head_source_layer if cache.hidden is not None else None
        num_layers = len(self.layers) if batch.num_layers is None else batch.num_layers
        last = len(self.layers) - 1 if batch.out_rows is not None else None
        # what every layer shares is worked out once: the rotary angles, the decode attention's reads
        rope = self.rotary.at(batch.positions, self.impl)
        plan, nd = None, batch.num_decode if batch.is_prefill else len(batch.context_lens)  # nd: the decoding rows, first
        if nd and not use_triton(self.impl, h):
            plan = batch.decode_plan if batch.decode_plan is not None else decode_plan(batch.block_tables[:nd], batch.context_lens[:nd], cache.k.shape[2])
        for i, layer in enumerate(self._layer_list[:num_layers]):  # a plain list: slicing a ModuleList costs ~2 us a layer
            if i == capture:
                self._record_head_source(h, residual, batch, cache)
            if i == last:  # only the rows someone reads go past the k/v store
                attend = self._paged_attend_rows(i, batch, cache)
                h, residual = layer(h, residual, rope, attend, self.impl, keep_rows=batch.out_rows)
            else:
                h, residual = layer(h, residual, rope, self._paged_attend(i, batch, cache, plan), self.impl)
        if capture == num_layers:
            self._record_head_source(h, residual, batch, cache)
        return h, residual

    def _paged_attend_rows(self, i: int, batch: StepBatch, cache: KVCache):
        """Store every row's k/v, then attend only for `batch.out_rows`: each is its sequence's last
        position, so this is decode attention over those sequences. The decoding rows of a mixed
        step (the first num_decode out rows: each has an output) read through its decode plan."""
        k_cache, v_cache = cache.k[i], cache.v[i]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kernels.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, impl=self.impl)
            rows, seqs = batch.out_rows, batch.out_seqs
            if rows.numel() == 0:
                return q[:0]
            q = q.index_select(0, rows)
            # the decoding rows are the first out rows, in order: their reads are the step's decode plan
            nd = batch.num_decode if batch.decode_plan is not None else 0
            if nd:
                decoded = kernels.decode_attention(q[:nd], k_cache, v_cache, None, None, self.scale, plan=batch.decode_plan, impl=self.impl)
                if q.shape[0] == nd:
                    return decoded
                q, seqs = q[nd:], seqs[nd:]
            out = kernels.decode_attention(
                q, k_cache, v_cache, batch.block_tables.index_select(0, seqs), batch.context_lens.index_select(0, seqs), self.scale, impl=self.impl,
            )
            return torch.cat([decoded, out]) if nd else out

        return attend

    @staticmethod
    def _record_head_source(h, residual, batch: StepBatch, cache: KVCache) -> None:
        """Store the residual stream the mhsa head will read, in the same slots as the KV (padded
        rows go to the scratch slot, like their KV: no mask, no data-dependent shape)."""
        stream = h if residual is None else h + residual
        cache.hidden.view(-1, cache.hidden.shape[-1]).index_copy_(0, batch.slot_mapping.long(), stream.to(cache.hidden.dtype))

    def _paged_attend(self, i: int, batch: StepBatch, cache: KVCache, plan: DecodePlan | None = None):
        k_cache, v_cache = cache.k[i], cache.v[i]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kernels.store_kv(k, v, k_cache, v_cache, batch.slot_mapping, impl=self.impl)
            if batch.is_prefill:
                nd = batch.num_decode  # a mixed step: decoding rows first, through the decode kernel
                rest = kernels.prefill_attention(
                    q[nd:], k_cache, v_cache, batch.block_tables[nd:], batch.cu_seqlens_q[nd:] - nd, batch.context_lens[nd:],
                    self.scale, max_query_len=batch.max_query_len, impl=self.impl,
                )
                if not nd:
                    return rest
                decoded = kernels.decode_attention(
                    q[:nd], k_cache, v_cache, batch.block_tables[:nd], batch.context_lens[:nd], self.scale, plan=plan, impl=self.impl
                )
                return torch.cat([decoded, rest])
            return kernels.decode_attention(
                q, k_cache, v_cache, batch.block_tables, batch.context_lens, self.scale, num_splits=batch.num_splits, plan=plan, impl=self.impl
            )

        return attend

    def final_norm(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return kernels.add_rms_norm(h, residual, self.norm, self.cfg.text.rms_norm_eps, impl=self.impl)[0]

    def decode_logits(self, batch: StepBatch, cache: KVCache, out: torch.Tensor) -> torch.Tensor:
        """A decode step's forward to its logits: decoder, final norm and LM head, written into
        `out` ([B, V] in the LM head's dtype; returned). Every row of a decode step samples, so
        every row gets logits. What transformers' `forward` computes for the same step."""
        h, residual = self.forward(batch, cache)
        return linear_into(self.lm_head, self.final_norm(h, residual), out)

    def pool_last_token(self, h: torch.Tensor, residual: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The last-token head: final norm at each sequence's last row, L2-normalized, fp32."""
        return kernels.pool_last_rmsnorm_normalize(
            h, cu_seqlens, self.norm, rms_eps=self.cfg.text.rms_norm_eps, residual=residual, impl=self.impl
        )

    def pool_mhsa(self, hidden: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, positions, cu_seqlens, self.rotary, self.impl)
