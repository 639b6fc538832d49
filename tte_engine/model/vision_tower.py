"""Qwen2-VL's vision tower: patch embedding, ViT blocks with 2-D rotary, and the 2x2 patch merger.

Many images run in one call: their patches are packed into one [N, patch_dim] tensor and each
block's attention is restricted to its own image (varlen, non-causal): frames of equal size are
batched into one 4-D SDPA call, one call per distinct frame size. The patch embedding is a
Conv3d whose stride equals its kernel, i.e. a matmul over flattened patches; it is stored as a
linear layer.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VisionConfig
from .rope import vision_cos_sin


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}


def rotate_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary computed in fp32 (as transformers does for the vision tower), cast back."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


FrameGroup = tuple[int, "torch.Tensor | None"]  # (frame length, packed rows of its frames; None: every row, in order)


def frame_groups(seqlens: list[int], device: torch.device | str) -> list[FrameGroup]:
    """Frames of equal length, batched: attention stays inside each frame, and each group is one 4-D
    SDPA call (a batch dimension is what sends CPU SDPA to its fused flash kernel; no mask needed)."""
    if len(set(seqlens)) <= 1:
        return [(seqlens[0], None)] if seqlens else []
    starts: dict[int, list[int]] = {}
    for start, length in zip(itertools.accumulate([0, *seqlens[:-1]]), seqlens):
        starts.setdefault(length, []).append(start)
    return [(n, (torch.tensor(s)[:, None] + torch.arange(n)).flatten().to(device)) for n, s in starts.items()]


def attend_frames(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: list[FrameGroup]) -> torch.Tensor:
    """Non-causal attention within each frame: packed q, k, v [N, H, hd] -> [N, H * hd]."""
    n, heads, hd = q.shape

    def batched(length: int, rows: torch.Tensor | None) -> torch.Tensor:
        qkv = (t if rows is None else t[rows] for t in (q, k, v))
        o = F.scaled_dot_product_attention(*(t.reshape(-1, length, heads, hd).transpose(1, 2) for t in qkv))
        return o.transpose(1, 2).reshape(-1, heads * hd)

    if len(frames) == 1 and frames[0][1] is None:
        return batched(*frames[0])
    out = q.new_empty(n, heads * hd)
    for length, rows in frames:
        out[rows] = batched(length, rows)
    return out


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        e = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(e, eps=1e-6)
        self.norm2 = nn.LayerNorm(e, eps=1e-6)
        self.qkv = nn.Linear(e, 3 * e)
        self.proj = nn.Linear(e, e)
        self.fc1 = nn.Linear(e, int(e * cfg.mlp_ratio))
        self.fc2 = nn.Linear(int(e * cfg.mlp_ratio), e)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frames: list[FrameGroup]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(self.norm1(x)).view(n, 3, self.num_heads, -1).unbind(1)
        q, k = rotate_fp32(q, cos, sin), rotate_fp32(k, cos, sin)
        x = x + self.proj(attend_frames(q, k, v, frames))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        e, m2 = cfg.embed_dim, cfg.spatial_merge_size**2
        self.patch_embed = nn.Linear(cfg.patch_dim, e, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger_norm = nn.LayerNorm(e, eps=1e-6)
        self.merger_fc1 = nn.Linear(e * m2, e * m2)
        self.merger_fc2 = nn.Linear(e * m2, cfg.out_hidden_size)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Packed patches of several images [N, patch_dim] -> merged tokens [N / merge**2, out_hidden]."""
        c = self.cfg
        x = self.patch_embed(patches.to(self.merger_norm.weight.dtype))  # not patch_embed.weight: a packed one densifies on read
        cos, sin = vision_cos_sin(grids, c.head_dim, c.rope_theta, c.spatial_merge_size)
        cos, sin = cos.to(x.device)[:, None], sin.to(x.device)[:, None]
        frames = frame_groups([h * w for t, h, w in grids for _ in range(t)], x.device)  # attention stays inside each frame
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        x = self.merger_norm(x).view(-1, c.embed_dim * c.spatial_merge_size**2)
        return self.merger_fc2(F.gelu(self.merger_fc1(x)))
