"""M-RoPE / 1-D rotary embedding, in place on q and k: Triton against the PyTorch reference."""

import pytest
import torch

from tte_engine.kernels import rotary

HEADS, KV_HEADS, MAX_POSITION = 12, 2, 4096
SECTIONS = {64: (8, 12, 12), 128: (16, 24, 24)}


def _qkv(tokens, head_dim, dtype, device):
    """q and k as views into one fused qkv projection output whose v part is NaN."""
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * head_dim, device=device).to(dtype)
    qkv[:, (HEADS + KV_HEADS) * head_dim :] = float("nan")
    q = qkv[:, : HEADS * head_dim].view(tokens, HEADS, head_dim)
    k = qkv[:, HEADS * head_dim : (HEADS + KV_HEADS) * head_dim].view(tokens, KV_HEADS, head_dim)
    return qkv, q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens", [1, 17, 300])
@pytest.mark.parametrize("mrope", [True, False], ids=["mrope", "1d"])
def test_apply_mrope(tokens, head_dim, dtype, mrope, device, assert_matches):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    cos_sin = rotary.rotary_cos_sin(inv_freq, MAX_POSITION)
    shape = (3, tokens) if mrope else (tokens,)
    positions = torch.randint(1, MAX_POSITION, shape, device=device)  # position 0 would not rotate
    qkv, q, k = _qkv(tokens, head_dim, dtype, device)
    ref_q, ref_k = q.float().clone(), k.float().clone()
    rotary.apply_mrope_torch(ref_q, ref_k, positions, cos_sin, SECTIONS[head_dim])

    rotary.apply_mrope_triton(q, k, positions, cos_sin, SECTIONS[head_dim])
    assert_matches(q, ref_q, dtype)
    assert_matches(k, ref_k, dtype)
    assert qkv[:, (HEADS + KV_HEADS) * head_dim :].isnan().all(), "wrote outside q and k"



@pytest.mark.parametrize("tokens,head_dim", [(1, 64), (13, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_rotation_is_transformers_arithmetic(tokens, head_dim, dtype):
    """rotate_half_ on the joint q|k view equals transformers' `x * cos + rotate_half(x) * sin`
    (fp32 math, one rounding to x's dtype) bit for bit, and never touches v."""
    qkv, q, k = _qkv(tokens, head_dim, dtype, "cpu")
    positions = torch.randint(0, MAX_POSITION, (3, tokens))
    table = rotary.rotary_cos_sin(1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)), MAX_POSITION)
    cos, sin = rotary.rotary_angles(positions, table, SECTIONS[head_dim])
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)

    def hf(x):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * full_cos + torch.cat([-x2, x1], dim=-1) * full_sin).to(x.dtype)

    want_q, want_k = hf(q), hf(k)
    rotary.rotate_half_(qkv.view(tokens, HEADS + 2 * KV_HEADS, head_dim)[:, : HEADS + KV_HEADS], cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert qkv[:, (HEADS + KV_HEADS) * head_dim :].isnan().all()
