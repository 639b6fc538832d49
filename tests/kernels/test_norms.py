"""RMSNorm and fused add + RMSNorm: Triton against the PyTorch reference."""

import pytest
import torch

from tte_engine.kernels import norms

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
SIZES = pytest.mark.parametrize("d", [1000, 1536, 3584])
ROWS = pytest.mark.parametrize("rows", [1, 17, 300])


@DTYPES
@SIZES
@ROWS
def test_rms_norm(rows, d, dtype, device, assert_matches):
    x = torch.randn(rows, d, device=device).to(dtype)
    weight = torch.randn(d, device=device).to(dtype)
    out = torch.full_like(x, float("nan"))
    norms.rms_norm_triton(x, weight, 1e-6, out=out)
    assert_matches(out, norms.rms_norm_torch(x.float(), weight.float(), 1e-6), dtype)


@DTYPES
@SIZES
@ROWS
def test_add_rms_norm(rows, d, dtype, device, assert_matches):
    x = torch.randn(rows, d, device=device).to(dtype)
    residual = torch.randn(rows, d, device=device).to(dtype)
    weight = torch.randn(d, device=device).to(dtype)
    out, new_residual = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    norms.add_rms_norm_triton(x, residual, weight, 1e-6, out=out, residual_out=new_residual)
    ref_out, ref_residual = norms.add_rms_norm_torch(x.float(), residual.float(), weight.float(), 1e-6)
    assert_matches(new_residual, ref_residual, dtype)
    assert_matches(out, ref_out, dtype)


def test_rms_norm_of_strided_rows(device, assert_matches):
    """A [B, S, D] slice of a wider tensor (rows not packed) is read in place and gives a new tensor."""
    x = torch.randn(2, 5, 2 * 1000, device=device)[..., :1000]
    weight = torch.randn(1000, device=device)
    out = norms.rms_norm_triton(x, weight, 1e-6)
    assert out.shape == x.shape
    assert_matches(out, norms.rms_norm_torch(x, weight, 1e-6), torch.float32)


@pytest.mark.parametrize("rows,d", [(1, 64), (7, 33), (129, 384)])
def test_rms_norm_reference_fast_path_is_bit_exact(rows, d):
    """The fp32 reference calls F.rms_norm (one op); it must equal Qwen2's spelled-out RMSNorm bit for bit."""
    x, w = torch.randn(rows, d) * 3, torch.randn(d)
    spelled = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(norms.rms_norm_torch(x, w, 1e-6), spelled)
