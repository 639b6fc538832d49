"""Rotary positions: Qwen2-VL's M-RoPE position ids for a prompt, and the vision tower's 2-D angles.

Prompt positions follow transformers' `get_rope_index` for Qwen2-VL (5.17): text tokens count up
on all three axes; an image's or video's tokens get (t, h, w) = (start + frame, start + row,
start + col) over its merged grid (a frame here is a temporal patch: 2 video frames), and the text
after it resumes at start + max(rows, cols). Every later token (trace, suffix) sits at
`index + rope_delta` on all three axes, where rope_delta = max position + 1 - prompt length.

Qwen2-VL's temporal axis steps by 1 per temporal patch: `second_per_grid_ts` and
`tokens_per_second` belong to Qwen2.5-VL and are not used. Note: transformers 4.x (and Qwen's
original code) resumed text after a vision block at its max position + 1, i.e. start +
max(frames, rows, cols); 5.x resumes at start + max(rows, cols). The two differ only for a video
with more temporal patches than merged rows and columns; we follow the pinned oracle (5.17).
"""

from __future__ import annotations

import torch


def prompt_positions(
    token_ids: list[int], grids: list[tuple[int, int, int]], vision_token_ids: int | tuple[int, ...], merge_size: int
) -> tuple[torch.Tensor, int]:
    """([3, len(token_ids)] int64 positions, rope_delta) for one prompt.

    `vision_token_ids`: the placeholder token id(s) (image pad, video pad); each maximal run of them
    is one image or video, and `grids` lists their (t, h, w) patch grids in prompt order.
    """
    ids = torch.tensor(token_ids, dtype=torch.long)
    vision = torch.tensor([vision_token_ids] if isinstance(vision_token_ids, int) else list(vision_token_ids), dtype=torch.long)
    is_image = torch.isin(ids, vision)
    pos = torch.empty(3, len(token_ids), dtype=torch.long)
    cursor, i, n, grid_iter = 0, 0, len(token_ids), iter(grids)
    while i < n:
        if is_image[i]:
            t, h, w = next(grid_iter)
            gh, gw = h // merge_size, w // merge_size
            count = t * gh * gw
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            pos[:, i : i + count] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + cursor
            cursor += max(gh, gw)
            i += count
        else:
            j = i
            while j < n and not is_image[j]:
                j += 1
            pos[:, i:j] = torch.arange(cursor, cursor + j - i)
            cursor += j - i
            i = j
    rope_delta = int(pos.max()) + 1 - n if n else 0
    return pos, rope_delta


def text_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def vision_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of the vision tower's axial rotary: head_dim / 4 of them, shared by the row and column axes
    (each axis rotates half the head, so they are the 1-D rotary's over head_dim / 2)."""
    return text_inv_freq(head_dim // 2, theta)


def vision_position_ids(grids: list[tuple[int, int, int]], merge_size: int) -> torch.Tensor:
    """(row, col) [num_patches, 2] int64 of packed patches (every frame of every grid, in order).

    Patches are laid out block-major over merge windows, so the (row, col) ids are permuted the
    same way the preprocessing permuted the pixels.
    """
    rows = []
    for t, h, w in grids:
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        hh = hh.reshape(shape).transpose(1, 2).flatten()
        ww = ww.reshape(shape).transpose(1, 2).flatten()
        rows.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(rows)


def vision_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for (row, col) ids [N, 2]: angles [:head_dim/4] follow the row, [head_dim/4:head_dim/2] the
    column, and the second half repeats the first (rotate-half pairs)."""
    ids = position_ids.float()
    freqs = torch.cat([ids[:, :1] * inv_freq, ids[:, 1:] * inv_freq], dim=-1)  # [N, head_dim/2]
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()


def vision_cos_sin(grids: list[tuple[int, int, int]], head_dim: int, theta: float, merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_patches, head_dim] for the vision tower's axial (h, w) rotary over packed patches."""
    return vision_angles(vision_position_ids(grids, merge_size), vision_inv_freq(head_dim, theta))
