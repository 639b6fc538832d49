"""Embedding heads: how a sequence's hidden states become its embedding.

- `last_token`: the backbone's final RMSNorm at the last token (VLM2Vec convention); done by the
  fused `pool_last_rmsnorm_normalize` kernel straight from the decoder's output.
- `mhsa` (the paper's best unified head): K decoder layers with their own weights, initialized
  from the backbone's last K, that read the residual stream entering backbone layer L-K for
  every position of query + trace + suffix, then a final norm at the last token. The engine
  records that residual stream in the cache while it prefills and decodes, so the head runs
  once per sequence at the end, over stored states, without re-encoding the query.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..config import HeadConfig, TextConfig
from ..kernels.attention import varlen_groups
from .decoder import DecoderLayer, Rotary


def causal_attend_packed(cu_seqlens: list[int]):
    """Dense causal attention inside each packed sequence (the head has no KV cache).

    Sequences are padded into batched 4-D SDPA calls (grouped by length as the paged prefill does:
    a batch dimension is what reaches CPU SDPA's fused kernel). Padding rows sit after each
    sequence's last row, so causality keeps them out of every real row; they are zero and dropped.
    """
    lens = [e - s for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    plans: dict[torch.device, list] = {}

    def plan(device: torch.device) -> list:
        if device not in plans:
            plans[device] = []
            for group, _ in varlen_groups(lens, lens):
                width, n = max(lens[b] for b in group), torch.tensor([lens[b] for b in group])
                rel = torch.arange(int(n.sum())) - (n.cumsum(0) - n).repeat_interleave(n)
                src = torch.tensor([cu_seqlens[b] for b in group]).repeat_interleave(n) + rel
                dst = (torch.arange(len(group)) * width).repeat_interleave(n) + rel
                plans[device].append((len(group), width, src.to(device), dst.to(device)))
        return plans[device]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for count, width, src, dst in plan(q.device):

            def padded(t: torch.Tensor) -> torch.Tensor:
                rows = t.new_zeros(count * width, *t.shape[1:]).index_copy_(0, dst, t[src])
                return rows.view(count, width, *t.shape[1:]).transpose(1, 2)

            o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True, enable_gqa=True)
            out[src] = o.transpose(1, 2).reshape(-1, *q.shape[1:])[dst]
        return out

    return attend


class MHSAHead(nn.Module):
    def __init__(self, text_cfg: TextConfig, head_cfg: HeadConfig):
        super().__init__()
        head_cfg.check_layers(text_cfg.num_layers)
        self.source_layer = head_cfg.source_layer % text_cfg.num_layers  # absolute backbone layer index
        self.eps = text_cfg.rms_norm_eps
        self.layers = nn.ModuleList(DecoderLayer(text_cfg) for _ in range(head_cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(text_cfg.hidden_size))

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, rotary: Rotary, impl: str = "auto"
    ) -> torch.Tensor:
        """Packed source-layer states [T, D] of whole sequences -> normalized embeddings [B, D] fp32."""
        attend = causal_attend_packed(cu_seqlens.tolist())
        h, residual, rope = hidden, None, rotary.at(positions, impl)
        for layer in self.layers:
            h, residual = layer(h, residual, rope, attend, impl)
        return kernels.pool_last_rmsnorm_normalize(h, cu_seqlens, self.norm, rms_eps=self.eps, residual=residual, impl=impl)
