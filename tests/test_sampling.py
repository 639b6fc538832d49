"""Choosing trace tokens. `greedy_tokens` (numpy's argmax on CPU) against `torch.argmax`, its
reference: the same index on fresh random logits of odd shapes, ties, NaN and -inf included.
`sample`: its chunked CPU pass against the one-pass reference, the fast path (no top-k / top-p)
against the filtered one, batch invariance, and its distribution (Gumbel-max: frequencies over
many seeds match softmax(logits / T), restricted to top-k / the top-p nucleus)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tte_engine.kernels import sampling as kernel
from tte_engine.kernels.sampling import greedy_ids, gumbel_argmax_torch, gumbel_noise
from tte_engine.sampling import SamplingParams as sampling_params
from tte_engine.sampling import NO_TOKEN, Suppression, _sorted_descending, filter_cutoffs, greedy_tokens, sample


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), vocab=st.integers(1, 1700), levels=st.integers(2, 1000),
       specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["nan", "-inf", "inf"])), max_size=4),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_greedy_tokens_is_argmax(rows, vocab, levels, specials, seed, dtype):
    """In every float dtype the LM head may give (a bf16 model's logits are not copied to fp32 first)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=g).to(dtype)  # few levels: many ties
    for where, value in specials:
        logits.view(-1)[where % logits.numel()] = float(value)
    got = greedy_tokens(logits)
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1))
    if dtype == torch.float64:  # values fp32 cannot tell apart: still told apart
        close = torch.tensor([[1.0, 1.0 + 1e-12, 0.5], [1e39, 2e39, 0.0]], dtype=dtype)
        assert greedy_tokens(close).tolist() == [1, 1]


def test_greedy_tokens_rows_of_minus_inf_the_last_id_and_ties():
    logits = torch.full((4, 640), float("-inf"))
    logits[1, -1] = 0.0  # the very last id
    logits[2, 128] = logits[2, 383] = 1.0  # a tie: the first wins
    logits[3, 7] = logits[3, 9] = float("nan")  # NaN counts as the maximum, the first one
    logits[3, 8] = float("inf")
    assert greedy_tokens(logits).tolist() == logits.argmax(dim=-1).tolist() == [0, 639, 128, 7]


@pytest.mark.parametrize("shape", [(3, 151936), (5, 640)])
def test_greedy_tokens_strided_and_large(shape):
    """Qwen2-VL's vocabulary; and a non-contiguous view of the logits (every other row)."""
    logits = torch.randn(shape[0] * 2, shape[1], generator=torch.Generator().manual_seed(0))[::2]
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))


def _suppressed_reference(logits: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with columns `ids` at -inf, their argmax or NO_TOKEN where the largest is not finite):
    torch's index_fill_ and argmax, on a copy."""
    out = logits.clone().index_fill_(-1, torch.tensor(ids, dtype=torch.int64), float("-inf"))
    best = out.argmax(dim=-1)
    return out, torch.where(torch.isfinite(out.amax(dim=-1)), best, NO_TOKEN)


@pytest.mark.parametrize("dtype,on_device", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_a_row_without_a_finite_largest_logit_gets_no_token(dtype, on_device, monkeypatch):
    """NaN or +inf among a row's logits (broken weights, an overflow), or nothing but -inf: no token
    can be chosen, and the row says so with NO_TOKEN (argmax alone would give the NaN's id, a token
    of garbage); the other rows keep their ids. A NaN in a suppressed column is no harm. Through
    numpy's path (fp32), torch's with ids on the host (bf16 on CPU), and torch's as on a GPU (ids a
    tensor: `greedy_ids` made torch's argmax, as it is there)."""
    from tte_engine import sampling as sampling_module

    if on_device:
        monkeypatch.setattr(sampling_module, "greedy_ids", lambda logits: logits.argmax(dim=-1))
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[3, 9] = float("nan")  # suppressed
    logits[4, :] = float("-inf")
    logits[4, 9] = 1.0  # only a suppressed id is finite: nothing to choose
    want = logits.clone().index_fill_(-1, torch.tensor([9]), float("-inf")).float().argmax(dim=-1).tolist()
    got = torch.as_tensor(Suppression(50, [9], "cpu", dtype).greedy(logits.clone())).tolist()
    assert got == [NO_TOKEN] * 3 + [want[3], NO_TOKEN, want[5]]
    huge = torch.zeros(3, 50, dtype=dtype)  # finite, but the chosen ones' sum overflows fp32 (numpy's check sums them)
    huge[0, 4], huge[1, 8], huge[2, 30] = 3e38, 2e38, -1.0
    with np.errstate(over="ignore"):  # (numpy says its sum overflowed: a RuntimeWarning, then the exact check)
        assert torch.as_tensor(Suppression(50, [9], "cpu", dtype).greedy(huge)).tolist() == [4, 8, 0]


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.integers(1, 40), min_size=1, max_size=4), vocab=st.integers(1, 700),
       suppressed=st.lists(st.integers(-3, 720), max_size=9), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), strided=st.booleans())
def test_suppression_is_index_fill_then_argmax(batches, vocab, suppressed, seed, dtype, strided):
    """`Suppression.greedy` (numpy's put and argmax for fp32 CPU logits, torch's ops otherwise) gives
    the reference's ids and leaves the logits as the reference's fill does: whatever a suppressed
    column held (NaN, +inf, the largest value) is -inf, batch after batch of changing size through
    one object (its flat positions grow), ids outside the vocabulary ignored."""
    g = torch.Generator().manual_seed(seed)
    suppression = Suppression(vocab, suppressed, "cpu", dtype)
    assert suppression.on_numpy == (dtype == torch.float32)
    kept = sorted({i for i in suppressed if 0 <= i < vocab})
    assert suppression.index.tolist() == kept
    for rows in batches:
        logits = torch.randint(0, 50, (rows * (2 if strided else 1), vocab), generator=g).to(dtype)
        logits = logits[::2] if strided else logits
        for i, column in enumerate(kept):  # a suppressed column holding what would otherwise win
            logits[i % rows, column] = (float("nan"), float("inf"), 1e4)[i % 3]
        want_logits, want_ids = _suppressed_reference(logits, kept)
        got = suppression.greedy(logits)
        assert isinstance(got, np.ndarray)  # on CPU, whichever path: what the step reads back
        got = torch.as_tensor(got)
        assert got.dtype == torch.int64 and torch.equal(got, want_ids)
        assert torch.equal(logits, want_logits)  # suppressed in place (what a sampled step samples from)
        again = logits.clone()
        assert suppression.apply_(again) is again and torch.equal(again, want_logits)


def test_suppression_given_other_logits_than_it_was_made_for():
    """The path is chosen when made: logits of another dtype are still suppressed right (fp64 through
    numpy, fp32 through torch) or refused loudly (bf16 has no numpy dtype), never silently wrong."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    logits[:, 7] = float("nan")
    want_logits, want_ids = _suppressed_reference(logits, [7, 9])
    for made_for, raw in ((torch.float32, logits), (torch.bfloat16, logits.float())):
        got = raw.clone()
        assert torch.as_tensor(Suppression(50, [7, 9], "cpu", made_for).greedy(got)).tolist() == want_ids.tolist()
        assert torch.equal(got, want_logits.to(raw.dtype))
    with pytest.raises(TypeError):
        Suppression(50, [7, 9], "cpu", torch.float32).greedy(logits.bfloat16())
    for dtype in (torch.float32, torch.bfloat16):  # logits narrower than a suppressed id: an error on either path, not a write into the next row
        with pytest.raises((ValueError, RuntimeError, IndexError)):
            Suppression(60, [7, 55], "cpu", dtype).greedy(torch.zeros(3, 50, dtype=dtype))


def test_suppression_on_cpu_is_one_numpy_pass():
    """fp32 CPU logits: greedy ids come back as the numpy array the step reads back, and the
    suppression is numpy's (no torch op runs: not even index_fill_)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    suppression = Suppression(640, [3, 600, 639], "cpu")
    logits = torch.randn(7, 640, generator=torch.Generator().manual_seed(2))
    logits[:, 600] = float("inf")
    with Ops() as ops:
        ids = suppression.greedy(logits)
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
    assert ids.tolist() == _suppressed_reference(logits, [3, 600, 639])[1].tolist()
    assert not [op for op in ops.seen if "fill" in op or "argmax" in op], ops.seen


def test_greedy_ids_on_cpu_are_the_numpy_array_the_step_reads_back():
    """A CPU decode step's greedy ids stay numpy (no tensor wrapped and unwrapped); readback hands them on as they are."""
    from tte_engine.runner import readback

    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(1), requires_grad=True)  # grad mode: still readable
    ids = greedy_ids(logits)
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64 and ids.tolist() == logits.argmax(dim=-1).tolist()
    assert readback(ids) is ids
    assert readback(torch.tensor([4, 2])).tolist() == [4, 2]


def test_engine_traces_do_not_change_with_numpy_suppression_and_argmax(make_checkpoint, mixed_items, monkeypatch):
    """The engine's greedy choice through numpy (put and argmax) gives the same traces and embeddings
    as torch's index_fill_ and argmax (put in its place for the first run)."""
    from tte_engine import Engine

    engine = Engine(make_checkpoint("syncs", think_max_tokens=12, head="last_token"), max_model_len=512)
    with monkeypatch.context() as patch:
        patch.setattr(Suppression, "greedy", lambda self, logits, array=None: logits.index_fill_(-1, self.index, float("-inf")).argmax(dim=-1))
        plain = engine.embed(mixed_items[:4], max_trace_tokens=12)
    engine.reset_prefix_cache()  # the same work as the first run, so the same bits
    numpy_argmax = engine.embed(mixed_items[:4], max_trace_tokens=12)
    assert numpy_argmax.trace_token_ids == plain.trace_token_ids
    assert torch.equal(numpy_argmax.embeddings, plain.embeddings)


def _params(rows, temperature=0.7, top_k=0, top_p=1.0, seed=0):
    """sample()'s per-row arguments: rows with seeds seed.. seed + rows - 1, counters 0.. rows - 1."""
    return (torch.full((rows,), float(temperature)), torch.full((rows,), top_k, dtype=torch.int64), torch.full((rows,), float(top_p)),
            torch.arange(seed, seed + rows), torch.arange(rows))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 7), vocab=st.integers(1, 3000), chunk=st.integers(1, 5000), levels=st.integers(2, 50),
       specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["nan", "-inf"])), max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_gumbel_argmax_in_chunks_is_the_one_pass_argmax(rows, vocab, chunk, levels, specials, seed):
    """The CPU pass over the vocabulary in chunks (any chunk size) picks what one argmax over
    logits + noise picks: the first maximum, a NaN first of all."""
    g = torch.Generator().manual_seed(seed)
    scaled = torch.randint(0, levels, (rows, vocab), generator=g).float() / 4  # few levels: ties after the noise are possible
    for where, value in specials:
        scaled.view(-1)[where % scaled.numel()] = float(value)
    seeds, counters = torch.randint(0, 2**31, (rows,), generator=g), torch.randint(0, 10**6, (rows,), generator=g)
    reference = (scaled + gumbel_noise(seeds, counters, torch.arange(vocab)[None, :])).argmax(dim=-1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel, "CPU_NOISE_CHUNK", chunk)
        assert torch.equal(gumbel_argmax_torch(scaled, seeds, counters), reference)


@pytest.mark.parametrize("rows, vocab", [(1, 1), (4, 997), (3, 151936)])
def test_sorted_descending_is_torch_sort(rows, vocab):
    """numpy's sort (the CPU path of top-k / top-p) against torch.sort, its reference: the same
    values in the same order, ties, -inf and inf included."""
    x = torch.randint(-20, 20, (rows, vocab), generator=torch.Generator().manual_seed(vocab)).float() / 3
    x[:, ::11] = float("-inf")
    x[0, -1] = float("inf")
    assert torch.equal(_sorted_descending(x), x.sort(dim=-1, descending=True).values)


@pytest.mark.parametrize("rows, vocab", [(5, 1001), (3, 151936)])
def test_sample_without_filters_skips_the_sort_and_picks_the_same(rows, vocab):
    """A batch without top-k / top-p takes the path without the sort (`filtered=False`); with it
    (as when another request of the batch sets top_p), the rows without filters pick the same."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[:, ::7] = float("-inf")  # suppressed ids
    for temperature in (0.0, 0.3, 1.0, 5.0):
        args = _params(rows, temperature=temperature)
        assert torch.equal(sample(logits, *args, filtered=False), sample(logits, *args, filtered=True))


def test_sample_is_batch_invariant_and_greedy_at_temperature_0():
    """A row's token depends on its own logits, seed and counter only: the same alone, in another
    order, beside other requests; temperature 0 is argmax."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 513, generator=g)
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.0, 1.0])
    top_k, top_p = torch.tensor([0, 0, 5, 0, 3, 40]), torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 0.95])
    seeds, counters = torch.tensor([3, 4, 5, 6, 7, 8]), torch.tensor([0, 1, 2, 3, 4, 5])
    batch = sample(logits, temperature, top_k, top_p, seeds, counters)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    shuffled = sample(logits[order], temperature[order], top_k[order], top_p[order], seeds[order], counters[order])
    assert torch.equal(shuffled, batch[order])
    for i in range(6):
        alone = sample(logits[i : i + 1], temperature[i : i + 1], top_k[i : i + 1], top_p[i : i + 1], seeds[i : i + 1], counters[i : i + 1])
        assert alone.item() == batch[i].item()
    assert batch[0] == logits[0].argmax() and batch[4] == logits[4].argmax()


DRAWS = 20000  # rows of one call, each its own seed: that many independent draws of one distribution


def _frequencies(logits_row: torch.Tensor, **kwargs) -> torch.Tensor:
    args = _params(DRAWS, **kwargs)
    tokens = sample(logits_row.expand(DRAWS, -1).contiguous(), *args, filtered=kwargs.get("top_k", 0) > 0 or kwargs.get("top_p", 1.0) < 1)
    return torch.bincount(tokens, minlength=logits_row.numel()).double() / DRAWS


def test_sample_draws_from_softmax_of_logits_over_temperature():
    """Frequencies over 20,000 seeds match softmax(logits / T) (a 0.02 total-variation bound: ~4x
    the expected sampling error), for temperatures below and above 1, and across counters too."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf"), 1.5])
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(logits.double() / temperature, dim=-1)
        got = _frequencies(logits, temperature=temperature, seed=int(temperature * 1000))
        assert (got - expected).abs().sum() / 2 < 0.02, (temperature, got, expected)
        assert got[5] == 0  # a suppressed id is never drawn


def test_top_k_and_top_p_restrict_the_support_and_renormalize():
    """top-k keeps the k largest logits (ties with the k-th too); top-p the smallest prefix of the
    ranked tokens holding top_p of the probability; within it the draw follows the renormalized softmax."""
    logits = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.0, -1.0])
    probs = torch.softmax(logits.double(), dim=-1)  # 0.63, 0.23, 0.086, 0.086, 0.032, 0.012

    def renormalized(kept):
        p = torch.zeros_like(probs)
        p[kept] = probs[kept] / probs[kept].sum()
        return p

    cases = {(2, 1.0): [0, 1], (3, 1.0): [0, 1, 2, 3], (0, 0.8): [0, 1], (0, 0.9): [0, 1, 2, 3], (0, 0.5): [0], (1, 0.99): [0]}
    for (k, p), kept in cases.items():
        got = _frequencies(logits, temperature=1.0, top_k=k, top_p=p, seed=k * 100 + int(p * 100))
        assert (got - renormalized(kept)).abs().sum() / 2 < 0.02, (k, p, got)


def test_draws_at_successive_counters_are_independent():
    """One seed's draws along a trace (counter 0, 1, 2, ...) follow the distribution too, and do
    not repeat each other: the counter is mixed into the noise of every id."""
    logits = torch.zeros(1, 10)
    rows = 5000
    tokens = sample(logits.expand(rows, -1).contiguous(), torch.ones(rows), torch.zeros(rows, dtype=torch.int64), torch.ones(rows),
                    torch.full((rows,), 42), torch.arange(rows), filtered=False)
    freq = torch.bincount(tokens, minlength=10).double() / rows
    assert (freq - 0.1).abs().sum() / 2 < 0.03
    assert (tokens[1:] == tokens[:-1]).double().mean() < 0.15  # 0.1 expected for independent draws


def test_gumbel_noise_is_finite_and_increasing_over_every_hash_value():
    """The noise of the extreme hash values is finite (with 24 bits in fp32 the largest gave u = 1.0
    and +inf noise: 1 id in 2**24 won whatever its logit, a suppressed one included) and keeps their
    order: strictly where the largest noise values are (there two ids tie only when their hashes do)."""
    x = torch.tensor([0, 1, 2, 2**23, 2**24 - 1, 2**24, 2**31, 2**32 - 3, 2**32 - 2, 2**32 - 1])
    g = kernel.gumbel_from_bits(x)
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and (g[1:] >= g[:-1]).all() and (g[-3:].diff() > 0).all()
    assert -3.2 < g[0] < -3.1 and 22.8 < g[-1] < 23.0


def test_a_near_certain_token_is_drawn_at_the_real_vocabulary():
    """One id 100 logits above the other 151,935: every one of 400 seeds draws it, with and without
    top_k = 1 (the +inf noise of the old 24-bit noise drew another id for ~0.9% of seeds; seed 13 was one)."""
    rows, vocab = 400, 151936
    logits = torch.full((rows, vocab), -50.0)
    logits[:, 0] = 50.0
    for top_k, filtered in ((0, False), (1, True)):
        args = _params(rows, temperature=1.0, top_k=top_k, seed=0)
        assert sample(logits, *args, filtered=filtered).tolist() == [0] * rows


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_broken_rows_do_not_take_the_batch_down(temperature):
    """A row whose logits hold NaN or inf, or are all -inf, gets NO_TOKEN, greedy or sampled under
    top-p; the other rows of the batch draw as they would alone (top-p on a NaN row used to gather
    at index -1: a crash)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    args = _params(4, temperature=temperature, top_p=0.9)
    tokens = sample(logits, *args, filtered=True)
    assert tokens.tolist()[:3] == [NO_TOKEN] * 3
    assert tokens[3] == sample(logits[3:], *(a[3:] for a in args), filtered=True)[0] != NO_TOKEN


def test_top_p_stops_at_the_token_that_reaches_it():
    """probs 0.5, 0.375, 0.125 and top_p 0.5: the first token alone reaches it (as transformers'
    TopPLogitsWarper keeps); a top_p that rounds to 0 in fp32 keeps the largest."""
    scaled = torch.tensor([[math.log(4), math.log(3), 0.0]] * 2)
    cutoffs = filter_cutoffs(scaled, torch.zeros(2, dtype=torch.int64), torch.tensor([0.5, 1e-50]))
    assert cutoffs.tolist() == [pytest.approx(math.log(4))] * 2


def test_tiny_temperature_is_not_floored():
    """A temperature of 1e-30 divides the logits by 1e-30 (until stop 16 it was clamped to 1e-6, which
    turned ids 8e-7 apart into a 31/69 draw): the larger id, every time."""
    logits = torch.tensor([[1.0, 1.0000008]]).expand(200, -1).contiguous()
    assert sample(logits, *_params(200, temperature=1e-30), filtered=False).tolist() == [1] * 200


def test_a_top_k_past_int64_is_refused_when_made():
    with pytest.raises(ValueError, match="top_k"):
        sampling_params(temperature=1.0, top_k=2**63)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(-(2**80), 2**80))
def test_any_integer_seed_is_a_31_bit_stream_key_and_neighbours_do_not_collide(seed):
    """Seeds in [0, 2**31) key the noise as given; any other integer (negative, int64, larger) is
    hashed into that range, deterministically, so 0 and 2**31 or -1 and 2**31 - 1 (equal under a
    31-bit mask, as they were until stop 22) draw different streams."""
    drawn = sampling_params(temperature=1.0, seed=seed).draw_seed()
    assert 0 <= drawn < 2**31 and drawn == sampling_params(temperature=1.0, seed=seed).draw_seed()
    if 0 <= seed < 2**31:
        assert drawn == seed
    for neighbour in (seed + 2**31, seed - 2**31, seed + 2**32):
        assert sampling_params(temperature=1.0, seed=neighbour).draw_seed() != drawn


def test_sampling_options_without_a_temperature_warn_that_they_change_nothing():
    """Our temperature defaults to 0 (greedy), OpenAI's and vLLM's to 1: `SamplingParams(top_p=0.5,
    seed=1)` decodes greedily, and says so once rather than silently."""
    import warnings

    with pytest.warns(UserWarning, match=r"top_p, seed change nothing; set temperature > 0") as caught:
        sampling_params(top_p=0.5, seed=1)
    assert caught[0].filename == __file__  # pointed at the caller's line
    with pytest.warns(UserWarning, match=r"SamplingParams\(top_k=3\)"):
        sampling_params(top_k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampling_params(), sampling_params(temperature=0.7, top_k=3, top_p=0.5, seed=1), sampling_params(temperature=0)
