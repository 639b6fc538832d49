"""Fused last-token pooling (+ residual, + RMSNorm) + L2 normalization: Triton against the reference."""

import pytest
import torch

from tte_engine.kernels import pooling

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
SIZES = pytest.mark.parametrize("d", [1000, 1536, 3584])
BATCHES = pytest.mark.parametrize("lens", [[17], [1, 300, 17, 1, 17, 300, 1]], ids=["batch1", "batch7"])


def _packed(lens, d, dtype, device):
    """Random packed hidden states for sequences of `lens` tokens and their int32 cu_seqlens."""
    cu = torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32)
    return torch.randn(int(cu[-1]), d, device=device).to(dtype), cu


@DTYPES
@SIZES
@BATCHES
def test_pool_last_normalize(lens, d, dtype, device, assert_matches):
    hidden, cu = _packed(lens, d, dtype, device)
    out = torch.full((len(lens), d), float("nan"), device=device)
    pooling.pool_last_normalize_triton(hidden, cu, 1e-12, torch.float32, out=out)
    assert_matches(out, pooling.pool_last_normalize_torch(hidden.float(), cu), torch.float32)


@DTYPES
@SIZES
@BATCHES
@pytest.mark.parametrize("with_residual", [False, True], ids=["normed", "residual"])
def test_pool_last_rmsnorm_normalize(lens, d, dtype, with_residual, device, assert_matches):
    hidden, cu = _packed(lens, d, dtype, device)
    residual = torch.randn_like(hidden) if with_residual else None
    weight = torch.randn(d, device=device).to(dtype)
    out = torch.full((len(lens), d), float("nan"), device=device)
    pooling.pool_last_rmsnorm_normalize_triton(hidden, cu, weight, 1e-6, residual, 1e-12, torch.float32, out=out)
    ref = pooling.pool_last_rmsnorm_normalize_torch(
        hidden.float(), cu, weight.float(), 1e-6, None if residual is None else residual.float()
    )
    # in bf16 the RMSNorm output is rounded to bf16 (as in the model), so the unit vector is only that close
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_pool_out_dtype(out_dtype, device, assert_matches):
    hidden, cu = _packed([5, 1, 9], 1000, torch.float32, device)
    out = pooling.pool_last_normalize_triton(hidden, cu, 1e-12, out_dtype)
    assert out.dtype == out_dtype and out.shape == (3, 1000)
    assert_matches(out, pooling.pool_last_normalize_torch(hidden, cu), out_dtype)
