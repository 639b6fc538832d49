"""Fused last-token pooling + L2 normalization: the embedding's final step.

A TTE embedding is the hidden state of each sequence's last token, L2-normalized in fp32.
`pool_last_normalize` gathers row `cu_seqlens[b+1] - 1` of a packed [T, D] batch, and writes
normalize(row) in one pass. `pool_last_rmsnorm_normalize` applies the backbone's final RMSNorm
(optionally after adding the residual stream) to those rows only, so the embed phase never
materializes a normed copy of the whole batch.

Cost per sequence: reads D*b (twice D*b with a residual) + D*w, writes D*4 bytes; memory-bound.

The Triton kernel runs one program per sequence: gather the last row, (add the residual),
(RMSNorm), sum of squares, scale, store. All math is fp32; values are rounded to the input
dtype only where the reference rounds (the residual sum and the RMSNorm output), so the
embedding does not depend on which implementation produced it.
"""

from __future__ import annotations

import torch

from ._dispatch import HAS_TRITON, next_pow2, row_warps, tl_dtype, use_triton
from .norms import rms_norm_torch


def _last_rows(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return x[cu_seqlens[1:].long() - 1]


def _l2_normalize(rows: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    rows = rows.float()
    return (rows / rows.norm(dim=-1, keepdim=True).clamp_min(eps)).to(out_dtype)


def pool_last_normalize_torch(hidden, cu_seqlens, eps=1e-12, out_dtype=torch.float32):
    return _l2_normalize(_last_rows(hidden, cu_seqlens), eps, out_dtype)


def pool_last_rmsnorm_normalize_torch(
    hidden, cu_seqlens, weight, rms_eps=1e-6, residual=None, eps=1e-12, out_dtype=torch.float32
):
    rows = _last_rows(hidden, cu_seqlens)
    if residual is not None:
        rows = rows + _last_rows(residual, cu_seqlens)
    return _l2_normalize(rms_norm_torch(rows, weight, rms_eps), eps, out_dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pool_kernel(
        H, R, W, CU, OUT,
        stride_h, stride_r, stride_out,
        D, rms_eps, eps,
        HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
        ROW_DTYPE: tl.constexpr, NORMED_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One sequence: out = normalize([rms_norm](hidden[last] [+ residual[last]])).

        Bytes: D*b read (+ D*b residual, + D*w weight), D*o written. Flops: ~3*D for the L2
        norm, ~4*D more for the RMSNorm. ROW_DTYPE / NORMED_DTYPE are the dtypes the reference
        holds the summed row and the RMSNorm output in.
        """
        b = tl.program_id(0)
        row = (tl.load(CU + b + 1) - 1).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x + r).to(ROW_DTYPE).to(tl.float32)
        if HAS_NORM:
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + rms_eps)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            x = ((x * rstd).to(ROW_DTYPE).to(tl.float32) * w).to(NORMED_DTYPE).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=0))
        tl.store(OUT + b * stride_out + cols, (x / tl.maximum(norm, eps)).to(OUT.dtype.element_ty), mask=mask)


def _launch_pool(hidden, cu_seqlens, weight, rms_eps, residual, eps, out_dtype, out):
    d = hidden.shape[-1]
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    row_dtype = hidden.dtype
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        row_dtype = torch.promote_types(row_dtype, residual.dtype)
    normed_dtype = row_dtype if weight is None else torch.promote_types(row_dtype, weight.dtype)
    if out is None:
        out = torch.empty(cu_seqlens.shape[0] - 1, d, dtype=out_dtype, device=hidden.device)
    r = hidden if residual is None else residual  # unused by the kernel without a residual
    w = hidden if weight is None else weight.contiguous()  # likewise without the RMSNorm
    block = next_pow2(d)
    _pool_kernel[(out.shape[0],)](
        hidden, r, w, cu_seqlens, out,
        hidden.stride(0), r.stride(0), out.stride(0),
        d, rms_eps, eps,
        HAS_RESIDUAL=residual is not None, HAS_NORM=weight is not None,
        ROW_DTYPE=tl_dtype(row_dtype), NORMED_DTYPE=tl_dtype(normed_dtype), BLOCK_D=block,
        num_warps=row_warps(block),
    )
    return out


def pool_last_normalize_triton(hidden, cu_seqlens, eps, out_dtype, out=None):
    """Triton pool_last_normalize; `out` ([B, D], unit column stride) is an optional output."""
    return _launch_pool(hidden, cu_seqlens, None, 0.0, None, eps, out_dtype, out)


def pool_last_rmsnorm_normalize_triton(hidden, cu_seqlens, weight, rms_eps, residual, eps, out_dtype, out=None):
    """Triton pool_last_rmsnorm_normalize; `out` as in pool_last_normalize_triton."""
    return _launch_pool(hidden, cu_seqlens, weight, rms_eps, residual, eps, out_dtype, out)


def pool_last_normalize(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    eps: float = 1e-12,
    out_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
) -> torch.Tensor:
    """[T, D] packed hidden states, int32 cu_seqlens [B+1] -> [B, D] L2-normalized last rows."""
    if use_triton(impl, hidden):
        return pool_last_normalize_triton(hidden, cu_seqlens, eps, out_dtype)
    return pool_last_normalize_torch(hidden, cu_seqlens, eps, out_dtype)


def pool_last_rmsnorm_normalize(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    weight: torch.Tensor,
    *,
    rms_eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    eps: float = 1e-12,
    out_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
) -> torch.Tensor:
    """normalize(rms_norm(hidden[last] (+ residual[last]), weight)) per sequence -> [B, D]."""
    if use_triton(impl, hidden):
        return pool_last_rmsnorm_normalize_triton(hidden, cu_seqlens, weight, rms_eps, residual, eps, out_dtype)
    return pool_last_rmsnorm_normalize_torch(hidden, cu_seqlens, weight, rms_eps, residual, eps, out_dtype)
