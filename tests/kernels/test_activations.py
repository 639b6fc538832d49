"""SwiGLU on a fused [T, 2I] gate/up projection: Triton against the PyTorch reference."""

import pytest
import torch

from tte_engine.kernels import activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inter", [1000, 1536, 3584])
@pytest.mark.parametrize("rows", [1, 17, 300])
def test_swiglu(rows, inter, dtype, device, assert_matches):
    gate_up = (3 * torch.randn(rows, 2 * inter, device=device)).to(dtype)  # reach silu's flat and linear parts
    out = torch.full((rows, inter), float("nan"), device=device, dtype=dtype)
    activations.swiglu_triton(gate_up, out=out)
    assert_matches(out, activations.swiglu_torch(gate_up.float()), dtype)


def test_swiglu_keeps_leading_dims(device, assert_matches):
    gate_up = torch.randn(2, 3, 2 * 1000, device=device)
    out = activations.swiglu_triton(gate_up)
    assert out.shape == (2, 3, 1000)
    assert_matches(out, activations.swiglu_torch(gate_up), torch.float32)
