"""Prefix caching (issue 9): content-addressed full blocks, reference counts, LRU eviction.

Results with and without prefix caching are the same (the parity suite also runs both ways); these
tests check what the cache itself promises: equal token ids of different images never share a
block, cached blocks give way before admission fails, a failed step leaves no entry behind, and an
image whose blocks are all cached is not encoded again.
"""

import sys

import numpy as np
import pytest
import torch
from oracle import cosine

from tte_engine import Engine
from tte_engine.cache import bytes_per_block


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint("prefix", head="last_token", think_max_tokens=6)


def _image(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _same(a, b) -> None:
    assert a.trace_token_ids == b.trace_token_ids
    for i in range(len(a.traces)):
        assert cosine(a.embeddings[i], b.embeddings[i]) >= 0.99999


def test_questions_on_one_image_reuse_its_blocks(path):
    items = [{"text": f"question {i}: what is in the picture?", "image": _image(0)} for i in range(8)]
    cached = Engine(path)
    encoded = []
    model = cached.stages[0].runner.model
    real = model.encode_images
    model.encode_images = lambda pixels, grids: encoded.append(len(grids)) or real(pixels, grids)
    res = cached.embed(items)
    _same(res, Engine(path, enable_prefix_caching=False).embed(items))
    # the first item computes the shared prefix (system prompt + image); the other 7 reuse its full blocks
    image_tokens = res.usage["image_tokens"] // len(items)
    assert res.usage["cached_tokens"] >= 7 * (image_tokens // 16) * 16
    assert sum(encoded) == 1  # the vision tower ran for the first item only
    blocks = cached.stages[0].blocks
    assert blocks.hits > 0 and blocks.reserved == 0 and blocks.num_free == blocks.num_blocks


def test_different_images_with_equal_token_counts_never_share_blocks(path):
    a, b = _image(1), _image(2)  # same size: same grid, same number of placeholder tokens
    engine = Engine(path)
    engine.embed([{"text": "describe it", "image": a}])
    res = engine.embed([{"text": "describe it", "image": b}])
    alone = Engine(path, enable_prefix_caching=False).embed([{"text": "describe it", "image": b}])
    _same(res, alone)
    first_image_token = res.prompt_token_ids[0].index(engine.model_cfg.image_token_id)
    assert res.usage["cached_tokens"] <= first_image_token  # only the blocks before the image matched


def test_cached_blocks_are_evicted_before_admission_fails(path):
    """A cache of 12 blocks: after a run leaves cached blocks behind, a batch that needs every block still runs."""
    per_block = bytes_per_block(Engine(path).model_cfg, 16, torch.float32, with_hidden=False)
    engine = Engine(path, cache_memory=13 * per_block, max_num_seqs=2)
    blocks = engine.stages[0].blocks
    assert blocks.num_blocks == 12  # + the scratch block
    engine.embed([{"text": "first", "image": _image(3)}])
    assert blocks.evictable  # cached blocks nobody holds
    items = [{"text": f"other {i}", "image": _image(10 + i)} for i in range(3)]
    worst = blocks.blocks_for(engine.make_sequence(items[0]).worst_case_tokens(stage_keeps_suffix=True))
    assert 2 * worst > len(blocks.free_blocks)  # two running at once need evicted blocks
    res = engine.embed(items, errors="return")
    assert res.errors == [None] * 3
    _same(res, Engine(path, enable_prefix_caching=False).embed(items))
    assert blocks.reserved == 0 and blocks.num_free == 12


def test_a_failed_step_leaves_no_cache_entry(path):
    """Blocks registered for a step that raised may hold unwritten KV: they must not be found later."""
    items = [{"text": f"q{i}", "image": _image(4)} for i in range(3)]
    engine = Engine(path)
    runner = engine.stages[0].runner
    real = runner.run
    runner.run = lambda step: (_ for _ in ()).throw(RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.embed(items)
    runner.run = real
    assert not engine.stages[0].blocks.cached
    _same(engine.embed(items), Engine(path, enable_prefix_caching=False).embed(items))


def _nan_cache(engine) -> None:
    for t in (engine.stages[0].runner.cache.k, engine.stages[0].runner.cache.v):
        t.fill_(float("nan"))  # memory nobody wrote


def test_a_step_that_fails_while_scheduled_leaves_no_cache_entry(path, monkeypatch):
    """Scheduling registers a prompt's blocks before the step is built; a failure after that (here
    while the decoding rows are prepared: Ctrl-C, an out-of-memory) must forget them too, or the
    blocks, freed by the abort that follows, stay findable with KV nobody wrote (until stop 16 the
    next request with that prompt reused them: a NaN embedding)."""
    from tte_engine.scheduler import Scheduler

    prompt = "the same long prompt about cats and dogs and chairs " * 3
    want = Engine(path, enable_prefix_caching=False).embed([prompt], max_trace_tokens=5)
    engine = Engine(path, block_size=4)
    _nan_cache(engine)
    decoding = engine.make_sequence("a decoding request", 0, max_trace_tokens=6)
    engine.add_request(decoding)
    while engine.scheduler._decoding[0] is None:
        engine.step()
    real = Scheduler._prepare_decode
    monkeypatch.setattr(Scheduler, "_prepare_decode",
                        lambda s, step: (_ for _ in ()).throw(MemoryError("while scheduling")) if step.num_decode < len(step.seqs) else real(s, step))
    engine.add_request(engine.make_sequence(prompt, 1, max_trace_tokens=5))
    with pytest.raises(MemoryError):
        engine.step()  # the mixed step that takes the new prompt, its blocks registered
    monkeypatch.setattr(Scheduler, "_prepare_decode", real)
    assert not engine.stages[0].blocks.pending
    engine.scheduler.abort_all()  # what Engine.run and tte-serve do after a failed step
    _same(engine.embed([prompt], max_trace_tokens=5), want)


def test_a_prompt_that_reused_a_failed_steps_blocks_computes_them(path, monkeypatch):
    """Two requests with one prompt in one step: the second reuses the blocks the first registers
    in that step. The step fails; the first is then aborted (its client went away) and the engine
    goes on: the second computes those blocks itself (it used to count them as computed, and read
    KV nobody wrote)."""
    from tte_engine.runner import Runner

    prompt = "the same long prompt about cats and dogs and chairs " * 3
    want = Engine(path, enable_prefix_caching=False).embed([prompt], max_trace_tokens=5)
    engine = Engine(path, block_size=4)
    _nan_cache(engine)
    first, second = engine.make_sequence(prompt, 0, max_trace_tokens=5), engine.make_sequence(prompt, 1, max_trace_tokens=5)
    engine.add_request(first)
    engine.add_request(second)
    real = Runner._run_prefill
    monkeypatch.setattr(Runner, "_run_prefill", lambda runner, step: (_ for _ in ()).throw(RuntimeError("device lost")))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    monkeypatch.setattr(Runner, "_run_prefill", real)
    assert second.block_table[:3] == first.block_table[:3] and second.num_computed == 0 and second.num_cached_tokens == 0
    assert engine.abort(first)
    while engine.has_unfinished():
        engine.step()
    assert second.trace_ids == want.trace_token_ids[0] and cosine(second.embedding, want.embeddings[0]) >= 0.99999
    assert engine.stages[0].blocks.cached  # its blocks registered again, once computed


def test_prefix_caching_off_reuses_nothing(path):
    engine = Engine(path, enable_prefix_caching=False)
    items = [{"text": "same", "image": _image(5)}] * 3
    assert engine.embed(items).usage["cached_tokens"] == 0
    assert not engine.stages[0].blocks.cached and engine.stages[0].blocks.hits == 0


def test_block_hashes_chain_tokens_and_image_digests(path):
    engine = Engine(path)
    seq_a = engine.make_sequence({"text": "x", "image": _image(6)})
    seq_b = engine.make_sequence({"text": "x", "image": _image(7)})
    ids = engine.scheduler.vision_token_ids
    ha, hb = seq_a.prompt_block_hashes(16, ids), seq_b.prompt_block_hashes(16, ids)
    assert seq_a.prompt.token_ids == seq_b.prompt.token_ids and len(ha) == len(hb) > 1
    first_image_block = seq_a.prompt.token_ids.index(engine.model_cfg.image_token_id) // 16
    assert ha[:first_image_block] == hb[:first_image_block]
    assert all(x != y for x, y in zip(ha[first_image_block:], hb[first_image_block:]))  # and every later block, by the chain
    assert torch.equal(seq_a.positions, seq_b.positions)
    # the hashes are kept per block size on the sequence, which stays an ordinary object: dir() (IPython's
    # completion) failed on a sequence that had run, when they were kept under a tuple key of its __dict__
    assert seq_a.prompt_block_hashes(16, ids) is ha and seq_a.prompt_block_hashes(8, ids) != ha
    assert "trace_ids" in dir(seq_a) and "_hashes" not in repr(seq_a)


def test_steps_that_register_blocks_compute_every_layer(make_checkpoint, mixed_items):
    """With the mhsa head a step of only embed-phase sequences may stop below the head's source
    layer, but not when it makes blocks findable: a later prompt that thinks needs every layer's KV."""
    path = make_checkpoint("prefix-mhsa", head="mhsa", head_layers=2, think_max_tokens=6)
    fresh = Engine(path, enable_prefix_caching=False).embed(mixed_items)
    engine = Engine(path)
    engine.embed([{**(item if isinstance(item, dict) else {"text": item}), "trace": "a given trace"} for item in mixed_items])
    assert engine.stages[0].blocks.cached
    again = engine.embed(mixed_items)
    assert again.usage["cached_tokens"] > 0
    _same(again, fresh)


def _count_tower_images(engine: Engine) -> list[int]:
    """Patch the vision tower to record how many images each call encodes."""
    encoded = []
    model = engine.stages[0].runner.model
    real = model.encode_images
    model.encode_images = lambda pixels, grids: encoded.append(len(grids)) or real(pixels, grids)
    return encoded


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_an_image_held_by_many_sequences_is_encoded_once(path, prefix_caching):
    """The cached prefix may end inside an image (without prefix caching: always), so every sequence
    needs the tower's output; it is computed once a step, and kept for later calls only with prefix
    caching on (off, each call does the same work)."""
    items = [{"text": f"question {i}?", "image": _image(5)} for i in range(6)] + [{"text": "other", "image": _image(6)}]
    engine = Engine(path, enable_prefix_caching=prefix_caching)
    encoded = _count_tower_images(engine)
    res = engine.embed(items)
    assert sum(encoded) == 2  # two distinct images
    again = engine.embed(items[::-1])
    if prefix_caching:
        assert sum(encoded) == 2  # kept from the last call
        engine.reset_prefix_cache()
        engine.embed(items[:1])
        assert sum(encoded) == 3  # a reset forgets the kept outputs
    else:
        assert sum(encoded) == 4  # without prefix caching nothing outlives its step
    plain = Engine(path, enable_prefix_caching=False, max_num_seqs=1).embed(items)  # one at a time: nothing shared in a step
    _same(res, plain)
    assert again.trace_token_ids == res.trace_token_ids[::-1]


def test_encoder_cache_drops_least_recently_used_rows():
    from tte_engine.runner import EncoderCache

    cache = EncoderCache(max_tokens=10)
    cache.update({"a": torch.ones(4, 3), "b": torch.ones(4, 3)})
    _ = cache["a"]  # a is now the most recently used
    cache.update({"c": torch.ones(4, 3), "huge": torch.ones(11, 3)})  # huge never fits
    assert "a" in cache and "c" in cache and "b" not in cache and "huge" not in cache and cache.tokens == 8
    big = torch.ones(8, 3)
    cache.update({"view": big[:2]})
    assert cache["view"].untyped_storage().nbytes() == 2 * 3 * 4  # a copy, not a view pinning `big`


@pytest.mark.parametrize("first", ["no_trace", "no_think"])
def test_prompt_blocks_written_by_an_early_exit_step_hold_every_layer(make_checkpoint, first):
    """With the mhsa head, an all-embed step may stop below the head's source layer, but not while
    it writes a prompt block prefix caching will share: a block filled over two chunks is made
    findable by the second one, and a later thinking request that reuses it needs every layer of
    both chunks' tokens. (Found by an adversarial review: the reuse gave another trace.)"""
    path = make_checkpoint("prefix-mhsa", head="mhsa", head_layers=2, think_max_tokens=8)
    settings = dict(max_model_len=512, block_size=8, max_num_batched_tokens=4)  # 4-token chunks: blocks span two steps
    item = {"text": "What is shown in this picture?", "image": _image(3, 60, 90)}
    alone = Engine(path, **settings).embed([item], max_trace_tokens=8)
    engine = Engine(path, **settings)
    engine.embed([item], max_trace_tokens=0) if first == "no_trace" else engine.embed([item], think=False)
    again = engine.embed([item], max_trace_tokens=8)
    assert again.usage["cached_tokens"] > 0
    _same(again, alone)


class _InterruptAt:
    """A profile function that raises KeyboardInterrupt at the n-th call event (Python or C) it sees,
    before the step's results are applied (`Scheduler.update`, which `Engine.step` does not undo)."""

    def __init__(self, n: int):
        from tte_engine.scheduler import Scheduler

        self.n, self.seen, self.fired, self.update = n, 0, False, Scheduler.update.__code__

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code is self.update:
            self.n = 0  # the step ran: nothing more to interrupt
        if event in ("call", "c_call") and not self.fired and self.n:
            self.seen += 1
            if self.seen == self.n:
                self.fired = True
                raise KeyboardInterrupt(f"interrupt at call {self.n}")


def _interrupted_run(path, prompts: list[str], n: int, abort_first: bool):
    """Both prompts admitted together; their first step interrupted at call n; then, after aborting
    the first or not, stepped to the end. Returns (the second's result, engine, whether it fired)."""
    engine = Engine(path, block_size=4)
    _nan_cache(engine)
    seqs = [engine.make_sequence(p, i, max_trace_tokens=4) for i, p in enumerate(prompts)]
    for seq in seqs:
        engine.add_request(seq)
    interrupt = _InterruptAt(n)
    sys.setprofile(interrupt)
    try:
        engine.step()
    except KeyboardInterrupt:
        pass
    finally:
        sys.setprofile(None)
    if interrupt.fired and abort_first:
        engine.abort(seqs[0])
    while engine.has_unfinished():
        engine.step()
    return seqs[1], engine, interrupt.fired


@pytest.mark.parametrize("abort_first", [False, True], ids=["retry", "abort-the-other"])
def test_a_step_interrupted_anywhere_is_undone(path, abort_first):
    """Ctrl-C at any point of a step until it ran (here every 23rd call, Python or C, of a prefill
    step whose second prompt reuses blocks the first registers in it): the retried work gives the results of a
    run never interrupted, with the first request aborted or not, no block or row is lost, and the
    prefix cache serves nothing unwritten afterwards. (From a sweep over every call of several kinds
    of step that found sequences lost mid-admission, blocks leaked mid-grow, a block findable before
    it was noted as pending, and a slot moved before its capacity.)"""
    prompts = ["a cat on a red chair near the window", "a cat on a red chair near the door"]
    want = Engine(path, enable_prefix_caching=False).embed(prompts, max_trace_tokens=4)
    fresh = Engine(path, block_size=4).stages[0].blocks
    n = 1
    while True:
        seq, engine, fired = _interrupted_run(path, prompts, n, abort_first)
        assert seq.trace_ids == want.trace_token_ids[1], n
        assert cosine(seq.embedding, want.embeddings[1]) >= 0.99999, n
        blocks = engine.stages[0].blocks
        assert (blocks.num_free, blocks.reserved, sorted(blocks.free_rows)) == (fresh.num_free, 0, sorted(fresh.free_rows)), n
        _same(engine.embed(prompts, max_trace_tokens=4), want)  # what the prefix cache kept is what was computed
        if not fired:
            break
        n += 23
