"""Rotary position embedding for a packed batch, with Qwen2-VL's multimodal (M-RoPE) variant.

Qwen2-VL gives every token three position ids (temporal, height, width). The head dimension's
rotary frequencies are split into three sections (`mrope_section`, e.g. [16, 24, 24] for
head_dim 128); section s rotates by position axis s. Text tokens have equal ids on all axes, so
decode steps can pass 1-D positions and skip the axis lookup.

`cos_sin` is a table [max_position, head_dim] in fp32: columns [:half] hold cos(pos * inv_freq),
[half:] hold sin(pos * inv_freq). Building it once with torch keeps both implementations on the
exact angles Hugging Face computes. q and k are rotated in place (rotate-half convention).

Cost per token: reads and writes (H + KVH) * head_dim * b bytes plus the table rows; memory-bound.

The Triton kernel runs one program per token: it gathers the token's cos/sin (per frequency,
from the position axis of its M-RoPE section) once, then rotates every q and k head with it.
q and k may be strided views (e.g. slices of a fused qkv projection); only they are written.
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, next_pow2, use_triton


def rotary_cos_sin(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """The [max_position, head_dim] fp32 table both implementations read."""
    pos = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def rotary_angles(positions: torch.Tensor, cos_sin: torch.Tensor, mrope_section) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [T, 1, head_dim // 2] fp32, for positions [T] or [3, T] (M-RoPE).

    Every layer of a step rotates by the same angles, so a caller gathers them once per step and
    hands them to `rotate_half_` in each layer."""
    half = cos_sin.shape[-1] // 2
    if positions.dim() == 1:
        rows = cos_sin[positions.long()][:, None, :]
        return rows[..., :half], rows[..., half:]
    axis = torch.repeat_interleave(
        torch.arange(len(mrope_section), device=positions.device),
        torch.tensor(list(mrope_section), device=positions.device),
    )  # [half]: which position axis drives each frequency
    pos = positions.long()[axis].T  # [T, half]
    col = torch.arange(half, device=positions.device)
    return cos_sin[pos, col][:, None, :], cos_sin[pos, col + half][:, None, :]


def rotate_half_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, hd] in place by angles [T, 1, hd // 2] (rotate-half convention, fp32 math).

    The same arithmetic as transformers' `x * cos + rotate_half(x) * sin` (with cos, sin repeated
    over both halves), rounded once to x's dtype: x1' = x1 c - x2 s (= x1 c + (-x2) s exactly),
    x2' = x2 c + x1 s. x may be a strided view (q and k of a fused projection, rotated together)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x1c, x1s, x2s, x2c = x1 * cos, x1 * sin, x2 * sin, x2 * cos
    torch.sub(x1c, x2s, out=x1)
    torch.add(x2c, x1s, out=x2)
    return x


def apply_mrope_torch(q, k, positions, cos_sin, mrope_section):
    cos, sin = rotary_angles(positions, cos_sin, mrope_section)
    rotate_half_(q, cos, sin)
    rotate_half_(k, cos, sin)
    return q, k


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(
        X, t, stride_t, stride_h, stride_d, num_heads, cos, sin,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        """Rotate all heads of token t of X in place (rotate-half: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s])."""
        h = tl.arange(0, BLOCK_H)[:, None]
        j = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (h < num_heads) & (j < HALF)
        p1 = X + t * stride_t + h * stride_h + j * stride_d
        p2 = p1 + HALF * stride_d
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * cos + (-x2) * sin).to(X.dtype.element_ty), mask=mask)
        tl.store(p2, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)

    @triton.jit
    def _mrope_kernel(
        Q, K, POS, CS,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
        stride_pa, stride_pt, stride_cs,
        num_q_heads, num_k_heads, section0, section1,
        IS_MROPE: tl.constexpr, HALF: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr,
    ):
        """One token: gather cos/sin for its positions, rotate its q and k heads in place.

        Bytes: 2*(H + KVH)*hd*b (read and write) + hd*4 of table + 3 position ids.
        Flops: ~3 per element of q and k.
        """
        t = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)
        j_mask = j < HALF
        if IS_MROPE:
            # frequency j rotates by position axis 0, 1 or 2 according to the section it falls in
            axis = (j >= section0).to(tl.int32) + (j >= section0 + section1).to(tl.int32)
            pos = tl.load(POS + axis * stride_pa + t * stride_pt, mask=j_mask, other=0)
        else:
            pos = tl.load(POS + t * stride_pt)
        row = CS + pos.to(tl.int64) * stride_cs
        cos = tl.load(row + j, mask=j_mask, other=0.0)[None, :]
        sin = tl.load(row + HALF + j, mask=j_mask, other=0.0)[None, :]
        _rotate_heads(Q, t, stride_qt, stride_qh, stride_qd, num_q_heads, cos, sin, HALF, BLOCK_QH, BLOCK_HALF)
        _rotate_heads(K, t, stride_kt, stride_kh, stride_kd, num_k_heads, cos, sin, HALF, BLOCK_KH, BLOCK_HALF)


def apply_mrope_triton(q, k, positions, cos_sin, mrope_section):
    half = cos_sin.shape[-1] // 2
    cos_sin = cos_sin.contiguous()
    is_mrope = positions.dim() == 2
    if is_mrope and sum(mrope_section) != half:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must add up to head_dim // 2 = {half}")
    section0, section1 = (mrope_section[0], mrope_section[1]) if is_mrope else (0, 0)
    _mrope_kernel[(q.shape[0],)](
        q, k, positions, cos_sin,
        *q.stride(), *k.stride(),
        positions.stride(0) if is_mrope else 0, positions.stride(-1), cos_sin.stride(0),
        q.shape[1], k.shape[1], section0, section1,
        IS_MROPE=is_mrope, HALF=half,
        BLOCK_HALF=next_pow2(half), BLOCK_QH=next_pow2(q.shape[1]), BLOCK_KH=next_pow2(k.shape[1]),
    )
    return q, k


def apply_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    mrope_section: tuple[int, int, int] | list[int],
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, hd] and k [T, KVH, hd] in place; positions are [3, T] (M-RoPE) or [T] (1-D)."""
    if use_triton(impl, q):
        return apply_mrope_triton(q, k, positions, cos_sin, mrope_section)
    return apply_mrope_torch(q, k, positions, cos_sin, mrope_section)
