"""Gumbel-max sampling (`kernels.sampling`): the Triton kernel against the PyTorch reference on
fresh random logits of odd sizes, with suppressed (-inf) ids and ties.

The noise is the same integers on both sides; its two logs may differ in the last bit (numpy
under the interpreter, the GPU's log compiled), so where the two pick different ids the pick
must be a near-tie: the kernel's id scores within 1e-5 of the reference's maximum."""

import pytest
import torch

from tte_engine.kernels import sampling


@pytest.mark.parametrize("vocab", [1, 7, 2047, 2049, 5003, 151936])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gumbel_argmax(rows, vocab, device):
    g = torch.Generator().manual_seed(rows * 100003 + vocab)
    scaled = (4 * torch.randn(rows, vocab, generator=g)).to(device)
    scaled[:, ::5] = float("-inf")  # suppressed ids
    seeds = torch.randint(0, 2**31, (rows,), generator=g).to(device)
    counters = torch.randint(0, 10**6, (rows,), generator=g).to(device)
    got = sampling.gumbel_argmax_triton(scaled, seeds, counters)
    ref = sampling.gumbel_argmax_torch(scaled, seeds, counters)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    noisy = scaled + sampling.gumbel_noise(seeds, counters, torch.arange(vocab, device=device)[None, :])
    picked, best = noisy.gather(1, got[:, None])[:, 0], noisy.max(dim=-1).values
    torch.testing.assert_close(picked, best, rtol=0, atol=1e-5)
    assert (got == ref).float().mean() >= 0.8 if rows * vocab > 7 else torch.equal(got, ref)


@pytest.mark.parametrize("vocab", [10, 4099])
def test_gumbel_argmax_equal_logits_follow_the_noise(vocab, device):
    """Every logit equal (a flat distribution): the noise alone decides, id by id as the reference."""
    scaled = torch.zeros(16, vocab, device=device)
    seeds, counters = torch.arange(16, device=device) * 7919, torch.arange(16, device=device)
    assert torch.equal(sampling.gumbel_argmax_triton(scaled, seeds, counters), sampling.gumbel_argmax_torch(scaled, seeds, counters))


def test_gumbel_argmax_strided_rows_and_all_suppressed(device):
    """A row view with a stride (every other row of a larger tensor); a row with every id -inf gives id 0, as argmax."""
    scaled = torch.randn(6, 3001, device=device)[::2]
    scaled[1] = float("-inf")
    seeds, counters = torch.arange(3, device=device), torch.zeros(3, dtype=torch.int64, device=device)
    got = sampling.gumbel_argmax_triton(scaled, seeds, counters)
    assert got[1] == 0
    assert torch.equal(got, sampling.gumbel_argmax_torch(scaled.contiguous(), seeds, counters))


def test_gumbel_argmax_dispatch(device):
    scaled = torch.randn(2, 100, device=device)
    seeds, counters = torch.tensor([1, 2], device=device), torch.tensor([0, 5], device=device)
    assert torch.equal(sampling.gumbel_argmax(scaled, seeds, counters, impl="torch"), sampling.gumbel_argmax_torch(scaled, seeds, counters))
    assert torch.equal(sampling.gumbel_argmax(scaled, seeds, counters, impl="triton"), sampling.gumbel_argmax_triton(scaled, seeds, counters))
