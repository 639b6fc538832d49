"""RMSNorm and fused residual-add + RMSNorm.

Semantics follow Qwen2's RMSNorm: the statistics are taken in fp32, the normalized value is cast
back to the input dtype, then scaled by the weight. The fused op writes the new residual
(`x + residual`, input dtype) and the normed output in one pass, so a decoder layer never reads
its residual stream twice.

Cost (per row of D elements, input dtype b bytes): rms_norm reads D*b + D*w and writes D*b;
add_rms_norm reads 2*D*b, writes 2*D*b. ~4 flops per element. Memory-bound.

The Triton kernel runs one program per row with the whole row in registers, computes in fp32
and rounds to the input dtype exactly where the reference does (the residual sum, the normed
value, the weighted output), so the two differ only by fp32 rounding before those casts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import HAS_TRITON, next_pow2, row_warps, tl_dtype, use_triton


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.jit.is_tracing():
        # one dispatched op; the same arithmetic as below, bit for bit (checked in tests/kernels);
        # ONNX opset 18 has no rms_norm, so an export (a trace) records the spelled-out form
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual
    return rms_norm_torch(new_residual, weight, eps), new_residual


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(
        X, R, W, Y, R_OUT,
        stride_x, stride_r, stride_y, stride_ro,
        D, eps,
        HAS_RESIDUAL: tl.constexpr, NORM_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One row: (x [+ residual] -> R_OUT), rmsnorm -> Y.

        Bytes: D*b read (+ D*b residual read and D*b residual write) + D*w weight + D*b out.
        Flops: ~4*D (square, sum, scale, weight). NORM_DTYPE is the dtype of the normed input
        (x, or x + residual), which the reference rounds to before applying the weight.
        """
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(NORM_DTYPE)
            tl.store(R_OUT + row * stride_ro + cols, s, mask=mask)
            x = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        normed = (x * rstd).to(NORM_DTYPE).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [N, D] with unit column stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_rms_norm(x, residual, weight, eps, out, residual_out):
    d = x.shape[-1]
    norm_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, norm_dtype), device=x.device)
    x2, y2 = _rows(x), out.view(-1, d)
    if residual is None:
        r2 = ro2 = x2  # unused by the kernel
    else:
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=norm_dtype, device=x.device)
        r2, ro2 = _rows(residual), residual_out.view(-1, d)
    block = next_pow2(d)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight.contiguous(), y2, ro2,
        x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0),
        d, eps,
        HAS_RESIDUAL=residual is not None, NORM_DTYPE=tl_dtype(norm_dtype), BLOCK_D=block,
        num_warps=row_warps(block),
    )
    return out, residual_out


def rms_norm_triton(x, weight, eps, out=None):
    """Triton rms_norm; `out` (contiguous, x's shape) lets a caller or test provide the output."""
    return _launch_rms_norm(x, None, weight, eps, out, None)[0]


def add_rms_norm_triton(x, residual, weight, eps, out=None, residual_out=None):
    """Triton add_rms_norm; `out`/`residual_out` (contiguous, x's shape) are optional outputs."""
    return _launch_rms_norm(x, residual, weight, eps, out, residual_out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dim of `x` ([..., D]); returns a new tensor in x.dtype."""
    if use_triton(impl, x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual)."""
    if use_triton(impl, x):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_torch(x, residual, weight, eps)
