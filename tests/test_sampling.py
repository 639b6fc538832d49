"""`greedy_tokens` (the CPU two-level argmax) against `torch.argmax`, its reference: the same index
on fresh random logits of odd shapes, ties, NaN and -inf included."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tte_engine import sampling
from tte_engine.sampling import ARGMAX_CHUNK, greedy_tokens


@pytest.fixture
def two_level_always(monkeypatch):
    monkeypatch.setattr(sampling, "ARGMAX_TWO_LEVEL_MIN", 0)  # small shapes take the two-level path too


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture is constant
@given(rows=st.integers(1, 9), chunks=st.integers(1, 13), extra=st.sampled_from([0, 0, 0, 1, 77]),
       levels=st.integers(2, 1000), specials=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["nan", "-inf", "inf"])), max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_greedy_tokens_is_argmax(two_level_always, rows, chunks, extra, levels, specials, seed):
    vocab = chunks * ARGMAX_CHUNK + extra  # extra != 0: not a multiple of the chunk, argmax itself
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (rows, vocab), generator=g).float()  # few levels: many ties
    for where, value in specials:
        logits.view(-1)[where % logits.numel()] = float(value)
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))


def test_greedy_tokens_rows_of_minus_inf_and_the_last_id(two_level_always):
    logits = torch.full((3, 5 * ARGMAX_CHUNK), float("-inf"))
    logits[1, -1] = 0.0  # the very last id
    logits[2, ARGMAX_CHUNK] = logits[2, 3 * ARGMAX_CHUNK - 1] = 1.0  # a tie across chunks: the first wins
    assert greedy_tokens(logits).tolist() == logits.argmax(dim=-1).tolist() == [0, 5 * ARGMAX_CHUNK - 1, ARGMAX_CHUNK]


def test_greedy_tokens_large_vocabulary_uses_two_levels():
    """At Qwen2-VL's vocabulary the default threshold takes the two-level path; still argmax."""
    logits = torch.randn(3, 151936, generator=torch.Generator().manual_seed(0))
    assert logits.numel() >= sampling.ARGMAX_TWO_LEVEL_MIN
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))


def test_engine_traces_do_not_change_with_the_two_level_argmax(make_checkpoint, mixed_items, monkeypatch):
    """The engine's greedy choice through the two-level path (forced for every step here; the test
    checkpoint's 640 ids are 5 chunks) gives the same traces as argmax itself."""
    from tte_engine import Engine

    engine = Engine(make_checkpoint("syncs", think_max_tokens=12, head="last_token"), max_model_len=512)
    assert engine.model_cfg.text.vocab_size % ARGMAX_CHUNK == 0
    monkeypatch.setattr(sampling, "ARGMAX_TWO_LEVEL_MIN", 1 << 62)
    plain = engine.embed(mixed_items[:4], max_trace_tokens=12)
    monkeypatch.setattr(sampling, "ARGMAX_TWO_LEVEL_MIN", 0)
    engine.reset_prefix_cache()  # the same work as the first run, so the same bits
    two_level = engine.embed(mixed_items[:4], max_trace_tokens=12)
    assert two_level.trace_token_ids == plain.trace_token_ids
    assert torch.equal(two_level.embeddings, plain.embeddings)
