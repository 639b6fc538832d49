"""`greedy_tokens` (numpy's argmax on CPU) against `torch.argmax`, its reference: the same index
on fresh random logits of odd shapes, ties, NaN and -inf included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tte_engine.sampling import greedy_tokens


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), vocab=st.integers(1, 1700), levels=st.integers(2, 1000),
       specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["nan", "-inf", "inf"])), max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_greedy_tokens_is_argmax(rows, vocab, levels, specials, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=g).float()  # few levels: many ties
    for where, value in specials:
        logits.view(-1)[where % logits.numel()] = float(value)
    got = greedy_tokens(logits)
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1))


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


def test_engine_traces_do_not_change_with_numpy_argmax(make_checkpoint, mixed_items, monkeypatch):
    """The engine's greedy choice through numpy's argmax gives the same traces and embeddings as
    torch's argmax itself (put in its place for the first run)."""
    from tte_engine import Engine, runner

    engine = Engine(make_checkpoint("syncs", think_max_tokens=12, head="last_token"), max_model_len=512)
    with monkeypatch.context() as patch:
        patch.setattr(runner, "greedy_tokens", lambda logits: logits.argmax(dim=-1))
        plain = engine.embed(mixed_items[:4], max_trace_tokens=12)
    engine.reset_prefix_cache()  # the same work as the first run, so the same bits
    numpy_argmax = engine.embed(mixed_items[:4], max_trace_tokens=12)
    assert numpy_argmax.trace_token_ids == plain.trace_token_ids
    assert torch.equal(numpy_argmax.embeddings, plain.embeddings)
