"""The Qwen2 decoder layer over a packed batch, written against `tte_engine.kernels` ops.

A packed batch is every token of the step in one [T, D] tensor, whatever sequence it belongs
to. The layer does not know where its keys and values come from: the caller passes `attend`,
which for the backbone stores k/v in the paged cache and runs paged attention, and for the
`mhsa` head runs dense causal attention over each sequence. The residual stream is carried
separately from the layer output so that the add and the next RMSNorm fuse into one op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .. import kernels
from ..kernels._dispatch import use_triton
from ..kernels.rotary import rotary_angles, rotate_half_
from ..config import TextConfig

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Rope = Callable[[torch.Tensor, int], None]  # rotates a layer's [T, H + KVH, hd] q|k view in place; int: H


class Rotary:
    """The fp32 cos/sin table and M-RoPE sections shared by every layer."""

    def __init__(self, cfg: TextConfig, max_positions: int, device: torch.device | str):
        from .rope import text_inv_freq

        self.section = tuple(cfg.mrope_section)
        self.cos_sin = kernels.rotary_cos_sin(text_inv_freq(cfg.head_dim, cfg.rope_theta).to(device), max_positions)

    def at(self, positions: torch.Tensor, impl: str) -> Rope:
        """The rotation of one step's positions ([T] or [3, T]). On the PyTorch path its angles are
        gathered here, once, instead of in every layer; q and k, adjacent in the fused projection's
        output, are rotated as one tensor."""
        if use_triton(impl, positions):
            return lambda qk, nq: kernels.apply_mrope(qk[:, :nq], qk[:, nq:], positions, self.cos_sin, self.section, impl=impl)
        cos, sin = rotary_angles(positions, self.cos_sin, self.section)
        return lambda qk, nq: rotate_half_(qk, cos, sin)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.eps = cfg.rms_norm_eps
        self.input_norm = nn.Parameter(torch.ones(d))
        self.post_attention_norm = nn.Parameter(torch.ones(d))
        self.qkv_proj = nn.Linear(d, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.gate_up_proj = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope,
        attend: Attend,
        impl: str = "auto",
        keep_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer output, residual stream): their sum is the hidden state after this layer.

        rope: this step's rotation (`Rotary.at`). keep_rows (int64 [R]): return only these rows;
        `attend` then returns attention for them alone (after storing every row's k/v), and the
        rest of the layer runs on R rows instead of T."""
        if residual is None:
            x, residual = kernels.rms_norm(h, self.input_norm, self.eps, impl=impl), h
        else:
            x, residual = kernels.add_rms_norm(h, residual, self.input_norm, self.eps, impl=impl)
        t, nq, nkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(t, nq + 2 * nkv, hd)  # heads: q, then k, then v
        rope(qkv[:, : nq + nkv], nq)  # q and k in place
        out = attend(qkv[:, :nq], qkv[:, nq : nq + nkv], qkv[:, nq + nkv :])
        if keep_rows is not None:
            residual = residual.index_select(0, keep_rows)
        h = self.o_proj(out.reshape(out.shape[0], nq * hd))
        x, residual = kernels.add_rms_norm(h, residual, self.post_attention_norm, self.eps, impl=impl)
        return self.down_proj(kernels.swiglu(self.gate_up_proj(x), impl=impl)), residual
