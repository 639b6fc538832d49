"""Engine behaviour: stop rules, batch invariance, memory pressure, chunking, bad items, layouts."""

import math
import threading

import pytest
import torch
from oracle import random_image
from oracle import cosine

from tte_engine import Engine, InvalidInputError, Query, SamplingParams
from tte_engine.errors import CheckpointError


@pytest.fixture(scope="module")
def engine(make_checkpoint):
    return Engine(make_checkpoint("engine", think_max_tokens=10))


def test_stop_on_think_end_keeps_suffix_only(boosted_checkpoint, mixed_items):
    eng = Engine(boosted_checkpoint("</think>"))
    res = eng.embed(mixed_items)
    end = eng.prompts.think_end_ids
    stopped = [i for i, r in enumerate(res.stop_reasons) if r == "stop"]
    assert stopped, res.stop_reasons
    for i in stopped:
        assert res.trace_token_ids[i][-len(end):] == end
        assert res.embed_token_ids[i] == eng.prompts.suffix_ids  # think-end is not repeated
        assert len(res.trace_token_ids[i]) <= 12


def test_stop_on_eos_closes_the_think_block(boosted_checkpoint, mixed_items):
    eng = Engine(boosted_checkpoint("<|im_end|>"))
    res = eng.embed(mixed_items)
    eos = eng.tokenizer.convert_tokens_to_ids("<|im_end|>")
    stopped = [i for i, r in enumerate(res.stop_reasons) if r == "stop"]
    assert stopped
    for i in stopped:
        assert res.trace_token_ids[i][-1] == eos
        assert res.embed_token_ids[i] == eng.prompts.think_end_ids + eng.prompts.suffix_ids


def test_max_tokens_and_vision_tokens_never_generated(engine, mixed_items):
    res = engine.embed(mixed_items, max_trace_tokens=7)
    for i, ids in enumerate(res.trace_token_ids):
        assert len(ids) <= 7
        assert not set(ids) & set(engine.prompts.suppressed_ids)
        if res.stop_reasons[i] == "max_tokens":
            assert len(ids) == 7 and res.embed_token_ids[i] == engine.prompts.think_end_ids + engine.prompts.suffix_ids
    zero = engine.embed(mixed_items[:2], max_trace_tokens=0)
    assert zero.trace_token_ids == [[], []]
    assert zero.embed_token_ids[0] == engine.prompts.think_end_ids + engine.prompts.suffix_ids
    # the steps ran inside one inference mode (Engine.run enters it once); what comes back is an
    # ordinary tensor, and the caller's own code is not left in inference mode
    assert not res.embeddings.is_inference() and not torch.is_inference_mode_enabled()
    res.embeddings.mul_(2)


@pytest.mark.parametrize("errors", ["raise", "return"])  # two loops: Engine.run and the prep loop
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_a_progress_callback_runs_in_the_callers_mode(engine, mixed_items, errors, mode):
    """The engine steps inside one inference mode, but a user's progress callback gets the
    caller's own autograd mode back: the tensors it makes are ordinary ones outside inference mode."""
    seen = []

    def progress(n):
        made = torch.zeros(2)
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), made.is_inference()))
        if not made.is_inference():
            made.add_(1)  # an inference tensor would refuse this outside inference mode

    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with context():
        engine.embed(mixed_items[:3], max_trace_tokens=3, progress=progress, errors=errors)
    inference = mode == "inference"
    assert seen and set(seen) == {(inference, mode == "grad", inference)}


@pytest.mark.parametrize("row", ["nan", "overflow", "boosted"])
def test_a_suppressed_id_is_never_chosen_whatever_its_logit(make_checkpoint, tmp_path, mixed_items, row):
    """The LM head rows of every suppressed id made NaN, huge (logits overflow to +-inf) or merely
    favoured: no trace holds a suppressed id, greedy or sampled, eager or on the graph path (an
    additive -inf would give NaN for the first two, and argmax takes NaN as the largest)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tte_engine import SamplingParams

    src = make_checkpoint("parity", head="last_token", think_max_tokens=12)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    suppressed = Engine(src).prompts.suppressed_ids
    weights = load_file(str(dst / "model.safetensors"))
    head = weights["lm_head.weight"]
    for tid in suppressed:
        head[tid] = float("nan") if row == "nan" else head[tid].sign() * 3e38 if row == "overflow" else head[tid] * 1e4
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for graphs in (False, True):
        engine = Engine(dst, cuda_graphs=graphs, max_model_len=512)
        for sampling in (None, SamplingParams(temperature=0.8, top_p=0.9, seed=5), SamplingParams(temperature=1.0, seed=2)):
            res = engine.embed(mixed_items, max_trace_tokens=6, sampling=sampling)
            assert all(len(ids) > 0 and not set(ids) & set(suppressed) for ids in res.trace_token_ids), (graphs, sampling)


def test_batch_invariance(engine, mixed_items):
    batch = mixed_items + mixed_items[:2]  # 8 items
    together = engine.embed(batch)
    for i in (0, 1, 2, 4):
        alone = engine.embed([batch[i]])
        assert alone.trace_token_ids[0] == together.trace_token_ids[i]
        assert cosine(alone.embeddings[0], together.embeddings[i]) >= 0.99999
    assert cosine(together.embeddings[6], together.embeddings[0]) >= 0.99999  # duplicates agree


def test_small_cache_and_small_steps_give_the_same_results(make_checkpoint, engine, mixed_items):
    reference = engine.embed(mixed_items)
    path = make_checkpoint("engine", think_max_tokens=10)
    tight = Engine(path, cache_memory=9 * 40960, max_num_batched_tokens=16, max_num_seqs=3)
    assert tight.stages[0].blocks.num_blocks == 8  # room for ~1.5 sequences at a time (+ the scratch block)
    res = tight.embed(mixed_items)
    assert res.trace_token_ids == reference.trace_token_ids
    for i in range(len(mixed_items)):
        assert cosine(res.embeddings[i], reference.embeddings[i]) >= 0.99999
    assert tight.stages[0].blocks.num_free == 8 and tight.stages[0].blocks.reserved == 0  # all freed


def test_item_larger_than_the_cache_fails_alone(make_checkpoint, mixed_items):
    eng = Engine(make_checkpoint("engine", think_max_tokens=10), cache_memory=5 * 40960)
    res = eng.embed(["tiny", mixed_items[3]], errors="return", max_trace_tokens=4)
    assert res.errors[0] is None and "cache" in res.errors[1]


def test_bad_items_raise_before_any_model_work(engine):
    with pytest.raises(InvalidInputError) as exc:
        engine.embed(["fine", {"image": b"definitely not a png"}])
    assert exc.value.index == 1 and "image" in str(exc.value)
    with pytest.raises(InvalidInputError, match="item 0: empty"):
        engine.embed(["   "])
    with pytest.raises(InvalidInputError, match="no image file"):
        engine.embed([{"text": "x", "image": "/nonexistent/cat.png"}])
    with pytest.raises(InvalidInputError, match="unknown field"):
        engine.embed([{"txt": "typo"}])
    with pytest.raises(InvalidInputError, match="reserved vision token"):
        engine.embed(["sneaky <|image_pad|> token"])
    assert not engine.has_unfinished()


def test_bad_items_return_error_rows_and_the_rest_completes(make_checkpoint, engine, mixed_items):
    short = Engine(make_checkpoint("engine", think_max_tokens=10), max_model_len=96)
    good = [mixed_items[0], mixed_items[1]]
    items = [good[0], {"image": b"\x89PNG broken"}, "", "word " * 200, good[1], 42]
    res = short.embed(items, errors="return")
    assert [e is None for e in res.errors] == [True, False, False, False, True, False]
    assert "image" in res.errors[1] and "empty" in res.errors[2] and "exceeds the model limit" in res.errors[3]
    assert "expected a str" in res.errors[5]
    assert all(math.isnan(v) for v in res.embeddings[1].tolist())
    clean = engine.embed(good)
    assert cosine(res.embeddings[0], clean.embeddings[0]) >= 0.99999
    assert cosine(res.embeddings[4], clean.embeddings[1]) >= 0.99999


def test_query_forms_are_equivalent(engine):
    img = random_image(64, 64, 5)
    a = engine.embed([Query(text="hello", image=img), {"text": "hello", "image": img}])
    assert a.prompt_token_ids[0] == a.prompt_token_ids[1] and a.trace_token_ids[0] == a.trace_token_ids[1]
    assert cosine(a.embeddings[0], a.embeddings[1]) >= 0.99999


def test_instructions_change_the_prompt(engine):
    default = engine.embed(["hello"], think=False)
    named = engine.embed(["hello"], think=False, instruction="retrieval")
    literal = engine.embed(["hello"], think=False, instruction=engine.tte.instructions["retrieval"])
    assert default.prompt_token_ids != named.prompt_token_ids
    assert named.prompt_token_ids == literal.prompt_token_ids


def test_a_misspelled_instruction_name_is_used_as_text_with_one_warning(engine):
    """`instruction="retreival"` was embedded with that one word as its instruction, silently; it
    still is (any text is an instruction), with one warning naming the close name. A Python warning,
    not a log record: a new user found the record unseen (the library's logger has a NullHandler)."""
    import warnings

    typo = "retreival"
    engine.prompts._warned.discard(typo)  # (the engine is the module's: once per engine and text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = engine.embed(["hello", {"text": "bye", "instruction": typo}], think=False, instruction=typo)
        engine.embed(["hello"], think=False, instruction=typo)
        engine.embed(["hello"], think=False, instruction="retrieval")
        engine.embed(["hello"], think=False, instruction="Find the answer to the question.")
    warned = [str(w.message) for w in caught if "not a named instruction" in str(w.message)]
    assert len(warned) == 1 and "did you mean 'retrieval'" in warned[0] and caught[0].category is UserWarning
    assert first.errors == [None, None]
    assert typo in engine.prompts.decode(first.prompt_token_ids[0])


def test_both_weight_layouts_and_shards_load_identically(make_checkpoint, mixed_items):
    hub = Engine(make_checkpoint("layout", seed=11, think_max_tokens=6)).embed(mixed_items)
    v5 = Engine(make_checkpoint("layout", seed=11, layout="transformers5", shards=3, think_max_tokens=6)).embed(mixed_items)
    assert hub.trace_token_ids == v5.trace_token_ids
    assert torch.equal(hub.embeddings, v5.embeddings)


def test_bfloat16_is_close_to_float32(make_checkpoint, mixed_items):
    path = make_checkpoint("engine", think_max_tokens=10)
    f32 = Engine(path).embed(mixed_items, think=False)
    b16 = Engine(path, dtype="bfloat16")
    res = b16.embed(mixed_items, think=False)
    for i in range(len(mixed_items)):
        assert cosine(res.embeddings[i], f32.embeddings[i]) >= 0.99
    alone = b16.embed([mixed_items[1]], think=False)
    assert cosine(alone.embeddings[0], res.embeddings[1]) >= 0.999


def test_seeded_sampling_is_batch_invariant(engine, mixed_items):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    batch = engine.embed(mixed_items[:3], sampling=params)
    alone = engine.embed([mixed_items[2]], sampling=params)
    assert alone.trace_token_ids[0] == batch.trace_token_ids[2]
    greedy = engine.embed(mixed_items[:3])
    assert greedy.trace_token_ids != batch.trace_token_ids


@pytest.mark.parametrize("graphs", [False, True])
def test_each_seed_draws_its_own_trace_in_any_batch(make_checkpoint, mixed_items, graphs):
    """Requests with different seeds and settings in one batch: every row (not only the first)
    draws what it draws alone, and the same again with the batch reversed; on the plain eager path
    and on the graph path's code (padded buckets). A mutant giving every row row 0's seed passed
    every other sampling test."""
    engine = Engine(make_checkpoint("engine", think_max_tokens=10), cuda_graphs=graphs)
    settings = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.9, top_p=0.8, seed=2**40 + 3),
                SamplingParams(temperature=1.2, top_k=5, seed=99), SamplingParams(temperature=1.0, seed=8)]
    items = [mixed_items[i % len(mixed_items)] for i in range(len(settings))]

    def traces(order):
        seqs = {i: engine.make_sequence(items[i], i, sampling=settings[i]) for i in order}
        engine.run(list(seqs.values()))
        return [seqs[i].trace_ids for i in sorted(seqs)]

    alone = [traces([i])[0] for i in range(len(settings))]
    assert traces(range(len(settings))) == alone == traces(reversed(range(len(settings))))
    assert len({tuple(t) for t in alone}) == len(alone) and all(len(t) > 2 for t in alone)


def test_a_sampled_trace_does_not_depend_on_whether_its_batch_filters(engine, mixed_items):
    """A step whose requests set neither top-k nor top-p samples without sorting the vocabulary; one
    where any request sets them sorts for all. A temperature-only request draws the same trace either
    way: alone, and beside requests with top_p and top_k (ids chosen in vocabulary order both ways)."""
    plain = SamplingParams(temperature=1.3, seed=11)
    alone = engine.make_sequence(mixed_items[0], 0, sampling=plain)
    engine.run([alone])
    together = [engine.make_sequence(mixed_items[0], 0, sampling=plain),
                engine.make_sequence(mixed_items[1], 1, sampling=SamplingParams(temperature=0.9, top_p=0.5, seed=2)),
                engine.make_sequence(mixed_items[3], 3, sampling=SamplingParams(temperature=0.9, top_k=3, seed=4))]
    engine.run(together)
    assert together[0].trace_ids == alone.trace_ids and len(alone.trace_ids) > 2


def test_generate_traces_matches_embed(engine, mixed_items):
    assert engine.generate_traces(mixed_items) == engine.embed(mixed_items).traces


def test_usage_counts(engine, mixed_items):
    res = engine.embed(mixed_items)
    u = res.usage
    assert u["prompt_tokens"] == sum(map(len, res.prompt_token_ids))
    assert u["trace_tokens"] == sum(map(len, res.trace_token_ids))
    assert u["embed_tokens"] == sum(map(len, res.embed_token_ids))
    assert u["image_tokens"] > 0


def test_checkpoint_errors_are_specific(tmp_path, make_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        Engine("no-such-alias")
    with pytest.raises(CheckpointError, match="no config.json"):
        Engine(tmp_path)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(make_checkpoint("engine", think_max_tokens=10), bad)
    (bad / "tte_config.json").write_text('{"format_version": 99}')
    with pytest.raises(CheckpointError, match="format_version 99"):
        Engine(bad)
    (bad / "tte_config.json").unlink()
    (bad / "embedding_head.safetensors").unlink()
    eng = Engine(bad)  # no tte_config.json: a last-token unified model with defaults
    assert eng.tte.head.type == "last_token"
    from safetensors.torch import load_file, save_file

    weights = load_file(str(bad / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing: layers.1.qkv_proj.weight"):
        Engine(bad)


def test_tiny_random_alias_builds_once(_isolated_tte_home):
    eng = Engine("tiny-random")
    assert eng.checkpoint == _isolated_tte_home / "models" / "tiny-random"
    res = eng.embed(["a cat", {"image": random_image(40, 70, 9)}])
    assert res.embeddings.shape == (2, eng.embedding_dim) and res.errors == [None, None]


def test_a_random_checkpoint_built_with_stop_false_equals_never_stop(tmp_path):
    """build_random_checkpoint(stop=False) writes once what never_stop writes over (the GPU check's 2B checkpoint)."""
    from safetensors.torch import load_file

    from tte_engine.random_checkpoint import SPECS, build_random_checkpoint, never_stop

    spec = SPECS["tiny-random"]
    plain = load_file(build_random_checkpoint(tmp_path / "twice", spec) / "model.safetensors")
    twice = load_file(never_stop(tmp_path / "twice") / "model.safetensors")
    once = load_file(build_random_checkpoint(tmp_path / "once", spec, stop=False) / "model.safetensors")
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    assert not torch.equal(once["lm_head.weight"], plain["lm_head.weight"])  # some rows were zeroed


def test_supplied_trace_skips_generation(engine, mixed_items):
    generated = engine.embed(mixed_items[:3])
    given = [dict(item, trace=generated.trace_token_ids[i]) if isinstance(item, dict) else {"text": item, "trace": generated.trace_token_ids[i]}
             for i, item in enumerate(mixed_items[:3])]
    res = engine.embed(given)
    assert res.usage["trace_tokens"] == 0 and res.usage["given_trace_tokens"] == generated.usage["trace_tokens"]
    assert res.trace_token_ids == generated.trace_token_ids and res.stop_reasons == ["given"] * 3
    for i in range(3):
        assert cosine(res.embeddings[i], generated.embeddings[i]) >= 0.99999
    as_text = engine.embed([{"text": "a cat", "trace": "It is a small animal."}])
    assert as_text.traces[0] == "It is a small animal."
    with pytest.raises(InvalidInputError, match="think=False"):
        engine.embed([{"text": "a cat", "trace": "x"}], think=False)


def test_fingerprint_tells_checkpoints_apart(make_checkpoint):
    from tte_engine.checkpoint import fingerprint

    a, b = make_checkpoint("layout", seed=11, think_max_tokens=6), make_checkpoint("fp", seed=12, think_max_tokens=6)
    assert fingerprint(a) == fingerprint(a) != fingerprint(b)


def test_engine_recovers_after_an_error_mid_run(engine, mixed_items, monkeypatch):
    runner = engine.stages[0].runner
    calls = {"n": 0}
    real_run = runner.run

    def failing_run(step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return real_run(step)

    monkeypatch.setattr(runner, "run", failing_run)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.embed(mixed_items)
    monkeypatch.undo()
    assert not engine.has_unfinished() and engine.stages[0].blocks.reserved == 0
    assert engine.stages[0].blocks.num_free == engine.stages[0].blocks.num_blocks
    assert engine.embed(mixed_items[:2]).errors == [None, None]


def test_a_sequence_runs_once(engine, mixed_items):
    """The same Sequence twice in one run, or again after it finished, is refused (found by a review:
    it raised "a scheduler bug" from deep inside a step); the engine stays usable."""
    seq = engine.make_sequence(mixed_items[0], 0)
    with pytest.raises(ValueError, match="given twice or was already submitted"):
        engine.run([seq, seq])
    assert not engine.has_unfinished() and engine.stages[0].blocks.num_free == engine.stages[0].blocks.num_blocks
    done = engine.make_sequence(mixed_items[0], 0)
    engine.run([done])
    assert done.embedding is not None
    with pytest.raises(ValueError, match="given twice or was already submitted"):
        engine.run([seq, done])
    engine.run([seq])  # refused before anything was queued: still new
    assert seq.embedding is not None
    with pytest.raises(ValueError, match="already submitted"):
        engine.add_request(done)
    assert engine.embed(mixed_items[:1]).errors == [None]


def test_triton_kernels_drive_the_engine_like_the_references(make_checkpoint, mixed_items):
    """The whole engine on the Triton kernels (interpreted on CPU) against the PyTorch references."""
    pytest.importorskip("triton")
    path = make_checkpoint("engine", think_max_tokens=10)
    items = mixed_items[:3]
    ref = Engine(path, impl="torch").embed(items, max_trace_tokens=3)
    res = Engine(path, impl="triton").embed(items, max_trace_tokens=3)
    # the CUDA-graph path's code too: full-width block tables and the split count fixed per bucket
    # (the PyTorch reference ignores splits; the kernel cuts each context into that many parts)
    graph_path = Engine(path, impl="triton", cuda_graphs=True, max_model_len=512).embed(items, max_trace_tokens=3)
    for got in (res, graph_path):
        assert got.trace_token_ids == ref.trace_token_ids
        for i in range(len(items)):
            assert cosine(got.embeddings[i], ref.embeddings[i]) >= 0.99999
    # sampled traces too (the Gumbel-max kernel; its logs may round differently in the last bit, which
    # changes a draw only at a near-tie: not at these few tokens)
    sampled = SamplingParams(temperature=0.9, seed=3)
    ref = Engine(path, impl="torch").embed(items, max_trace_tokens=3, sampling=sampled)
    assert Engine(path, impl="triton").embed(items, max_trace_tokens=3, sampling=sampled).trace_token_ids == ref.trace_token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_matches_cpu(make_checkpoint, mixed_items):
    """On a GPU: the Triton path in fp32 reproduces the CPU references; bf16 stays close. Small CUDA
    engines (a few graph buckets, a small cache): the GPU check runs this among 8 xdist workers, in 80 s."""
    path = make_checkpoint("engine", think_max_tokens=10)
    small = {"device": "cuda", "max_num_seqs": 8, "cache_memory": 256 << 20}
    cpu = Engine(path).embed(mixed_items)
    gpu = Engine(path, dtype="float32", **small).embed(mixed_items)
    assert gpu.trace_token_ids == cpu.trace_token_ids
    for i in range(len(mixed_items)):
        assert cosine(gpu.embeddings[i], cpu.embeddings[i]) >= 0.99999
    plain_cpu = Engine(path).embed(mixed_items, think=False)
    plain_bf16 = Engine(path, dtype="bfloat16", **small).embed(mixed_items, think=False)
    for i in range(len(mixed_items)):
        assert cosine(plain_bf16.embeddings[i], plain_cpu.embeddings[i]) >= 0.99


@pytest.mark.parametrize("knob,value", [("max_num_seqs", 0), ("max_num_batched_tokens", 0), ("block_size", 0), ("max_num_seqs", -3),
                                        ("max_model_len", 0), ("cuda_graphs", "yes"), ("enable_prefix_caching", 1)])
def test_unworkable_knobs_are_refused_by_name(make_checkpoint, knob, value):
    """A zero batch size used to be accepted and then hang every embed(); now it is refused up front."""
    with pytest.raises(ValueError, match=f"EngineConfig.{knob} must be"):
        Engine(make_checkpoint("engine", think_max_tokens=10), **{knob: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_so(make_checkpoint):
    with pytest.raises(ValueError, match="sees no CUDA device"):
        Engine(make_checkpoint("engine", think_max_tokens=10), device="cuda")


# 1e39: past fp32's largest, so inf on the device, where logits / inf gave NaN (a trace of one suppressed token; found by a review)
@pytest.mark.parametrize("field,value", [("temperature", -1), ("temperature", 1e39), ("top_p", 0), ("top_p", 2), ("top_k", -5), ("seed", "x"),
                                         ("seed", 1.5)])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_never_stop_checkpoints_run_every_trace_to_its_budget(make_checkpoint, tmp_path, mixed_items, tied):
    """`never_stop` (fixed work for benchmarks and the GPU check, whose 2B spec ties its embeddings)."""
    import shutil

    from tte_engine.random_checkpoint import never_stop

    path = never_stop(shutil.copytree(make_checkpoint("parity", head="last_token", tie_word_embeddings=tied, think_max_tokens=12), tmp_path / "c"))
    res = Engine(path).embed(mixed_items, max_trace_tokens=12)
    assert res.stop_reasons == ["max_tokens"] * len(mixed_items)


def test_engine_repr_says_what_it_serves(make_checkpoint):
    """A notebook or a log shows the engine's checkpoint and main settings, not an object address."""
    path = make_checkpoint("engine", think_max_tokens=10)
    text = repr(Engine(path, max_num_seqs=8))
    assert text.startswith(f"Engine({str(path)!r}") and " at 0x" not in text
    assert "device=cpu" in text and "dtype=float32" in text and "max_num_seqs=8" in text and "cuda_graphs=off" in text


@pytest.mark.parametrize("errors", ["raise", "return"])
def test_two_threads_never_step_one_engine_at_once(make_checkpoint, mixed_items, errors):
    """Two threads calling embed on one engine: one runs, the other gets RuntimeError, and the
    engine's results stay right (both used to pass the idle check before either queued a request,
    then stepped the same batch together: an IndexError in one, a TypeError in the other, and a
    prefix cache holding wrong KV, so every later call returned other vectors without an error).
    Each thread's first `add_request` waits until the other has either reached its own or ended:
    the old check-then-act window, held open."""
    engine = Engine(make_checkpoint("engine", think_max_tokens=10), enable_prefix_caching=True)
    items = [mixed_items[0], mixed_items[3]]
    baseline = engine.embed(items)
    engine.reset_prefix_cache()
    cond, arrived, ended = threading.Condition(), set(), []
    real_add = engine.add_request

    def add_request(seq):
        with cond:
            if threading.get_ident() not in arrived:
                arrived.add(threading.get_ident())
                cond.notify_all()
                assert cond.wait_for(lambda: len(arrived) == 2 or ended, timeout=60)
        return real_add(seq)

    engine.add_request = add_request
    outcomes = []

    def call():
        try:
            outcomes.append(engine.embed(items, errors=errors))
        except Exception as exc:  # noqa: BLE001 - what each thread got is the test's subject
            outcomes.append(exc)
        finally:
            with cond:
                ended.append(threading.get_ident())
                cond.notify_all()

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    del engine.add_request
    busy = [o for o in outcomes if isinstance(o, RuntimeError)]
    done = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(busy) == 1 and len(done) == 1, outcomes
    assert "already running" in str(busy[0])
    for result in (done[0], engine.embed(items)):  # (within the contract: a cached prefix was computed in another batch)
        assert result.trace_token_ids == baseline.trace_token_ids
        assert all(cosine(result.embeddings[i], baseline.embeddings[i]) >= 0.99999 for i in range(len(items)))


def test_another_thread_cannot_step_an_engine_inside_embed(make_checkpoint, mixed_items):
    """While embed runs its loop, `step()`, `embed()` and `generate_traces()` from another thread
    are refused (the loop's thread may call back into none of them either: see the progress test)."""
    engine = Engine(make_checkpoint("engine", think_max_tokens=10))
    seen = []

    def from_another_thread(done):
        def attempt():
            for call in (engine.step, lambda: engine.embed(["x"]), lambda: engine.generate_traces(["x"])):
                try:
                    call()
                    seen.append("ran")
                except RuntimeError as exc:
                    seen.append(str(exc))

        t = threading.Thread(target=attempt)
        t.start()
        t.join()

    result = engine.embed(mixed_items[:2], progress=from_another_thread)
    assert seen and all("already running" in s for s in seen), seen
    assert result.errors == [None, None] and engine.embed(mixed_items[:2]).trace_token_ids == result.trace_token_ids


def test_a_non_finite_embedding_is_that_items_error(make_checkpoint, mixed_items, monkeypatch, tmp_path):
    """A NaN or inf embedding (broken weights, a 16-bit overflow) is never handed out as a result:
    the item fails alone (errors="return": a NaN row and a reason; "raise": ModelOutputError naming
    it), and tte-embed's cache keeps nothing of it; the other items are what they are alone."""
    from tte_engine import runner as runner_module
    from tte_engine.errors import NON_FINITE_EMBEDDING, ModelOutputError
    from tte_engine.result_cache import embed_items

    engine = Engine(make_checkpoint("engine", think_max_tokens=10))
    items = mixed_items[:3]
    baseline = engine.embed(items)
    real_run = runner_module.Runner.run

    def run(self, step):  # item 1's pooled vector comes out NaN, or inf
        tokens, embeddings = real_run(self, step)
        for j, i in enumerate(step.pool_idx):
            if step.seqs[i].tag == 1:
                embeddings[j, 0] = math.inf if embeddings[j, 1] > 0 else math.nan
        return tokens, embeddings

    monkeypatch.setattr(runner_module.Runner, "run", run)
    res = engine.embed(items, errors="return")
    assert res.errors == [None, NON_FINITE_EMBEDDING, None] and res.stop_reasons[1] is None
    assert torch.isnan(res.embeddings[1]).all()
    for i in (0, 2):
        assert res.trace_token_ids[i] == baseline.trace_token_ids[i] and cosine(res.embeddings[i], baseline.embeddings[i]) >= 0.99999
    with pytest.raises(ModelOutputError, match="item 1: the model produced a non-finite embedding"):
        engine.embed(items)
    results = embed_items(engine, items)  # tte-embed's and tte-serve's path
    assert [r.error for r in results] == [None, NON_FINITE_EMBEDDING, None] and results[1].embedding is None
    assert (results[1].trace_ids, results[1].stop_reason, results[1].trace_tokens) == ([], None, 0)  # a failed row, as embed's
    assert engine.embed(items[:1]).errors == [None]  # and the engine goes on


def test_non_finite_logits_fail_that_item_never_a_garbage_trace(make_checkpoint, mixed_items, monkeypatch):
    """Non-finite next-token logits (NaN weights, a 16-bit overflow) once gave a trace of garbage ids
    (argmax takes NaN as the largest) and, with a head reading a layer below the NaN, a finite
    embedding of it: silent garbage. A row whose largest logit is not finite now gets NO_TOKEN from
    the step, checked beside the choice, and that item fails alone with a reason; the rest of its
    batch decodes on, token for token as before. Here one token's embedding row is NaN, a token
    only item `k`'s trace holds (at position 2 or later, so it is met in a pure decode step):
    its next step's logits are NaN."""
    import torch.nn as nn

    from tte_engine import scheduler as scheduler_module
    from tte_engine.errors import NON_FINITE_LOGITS, ModelOutputError

    ckpt = make_checkpoint("engine", think_max_tokens=10)
    items = mixed_items
    baseline = Engine(ckpt).embed(items)
    engine = Engine(ckpt, enable_prefix_caching=False)

    def ids_of(i):
        return set(baseline.prompt_token_ids[i]) | set(baseline.trace_token_ids[i])

    found = next(((k, at, t) for k in range(len(items)) for at, t in enumerate(baseline.trace_token_ids[k][:-1]) if at >= 2
                  and all(t not in ids_of(i) for i in range(len(items)) if i != k) and t not in baseline.prompt_token_ids[k]
                  and t not in baseline.trace_token_ids[k][:at]), None)
    assert found is not None, "no token only one trace holds: change the items"
    k, at, token = found
    model = engine.stages[0].runner.model
    weight = model.embed_tokens.weight.detach().clone()  # its own copy (the LM head may share the original)
    weight[token] = math.nan
    model.embed_tokens.weight = nn.Parameter(weight, requires_grad=False)

    for set_lookup_rows in (32, 0):  # the decode step's stop tokens looked up in a set (up to 32 rows), or in a table
        monkeypatch.setattr(scheduler_module, "_SET_LOOKUP_ROWS", set_lookup_rows)
        res = engine.embed(items, errors="return")
        assert res.errors == [NON_FINITE_LOGITS if i == k else None for i in range(len(items))]
        assert res.trace_token_ids[k] == [] and torch.isnan(res.embeddings[k]).all() and res.stop_reasons[k] is None
        for i in set(range(len(items))) - {k}:
            assert res.trace_token_ids[i] == baseline.trace_token_ids[i]
            assert cosine(res.embeddings[i], baseline.embeddings[i]) >= 0.99999
    with pytest.raises(ModelOutputError, match=f"item {k}: the model produced non-finite next-token logits"):
        engine.embed(items)
    with pytest.raises(ModelOutputError, match="item 0: the model produced non-finite"):
        engine.generate_traces([items[k]])
    assert engine.embed(items[:k] + items[k + 1 :]).errors == [None] * (len(items) - 1)  # the engine goes on

    # a token only one prompt holds: that prompt's prefill gives NaN logits, its first trace token is NO_TOKEN
    model.embed_tokens.weight = nn.Parameter(baseline_weight := model.embed_tokens.weight.detach().clone(), requires_grad=False)
    j, token = next((j, t) for j in range(len(items)) for t in baseline.prompt_token_ids[j]
                    if all(t not in ids_of(i) for i in range(len(items)) if i != j))
    baseline_weight[token] = math.nan
    res = engine.embed(items, errors="return")
    assert res.errors == [NON_FINITE_LOGITS if i == j else None for i in range(len(items))]
    assert all(res.trace_token_ids[i] == baseline.trace_token_ids[i] for i in range(len(items)) if i != j)


@pytest.mark.parametrize("cache_memory", [float("nan"), "1GB", 0, -5, True, float("inf")])
def test_an_unusable_cache_memory_is_refused_by_name(make_checkpoint, cache_memory):
    with pytest.raises(ValueError, match="EngineConfig.cache_memory must be"):
        Engine(make_checkpoint("engine", think_max_tokens=10), cache_memory=cache_memory)


def test_a_cache_that_holds_no_item_is_refused_at_start(make_checkpoint, caplog):
    """A KV cache smaller than the shortest item used to start an engine on which every item then
    failed alone; one smaller than max_model_len starts, with a warning (vLLM refuses it)."""
    from tte_engine.cache import bytes_per_block
    from tte_engine.errors import CapacityError

    path = make_checkpoint("engine", think_max_tokens=10)
    probe = Engine(path)
    per_block = bytes_per_block(probe.model_cfg, 16, probe.dtype, probe.stages[0].runner.model.head is not None)
    need = -(-probe._shortest_item_tokens // 16)
    with pytest.raises(CapacityError, match="fewer than the shortest item's"):
        Engine(path, cache_memory=need * per_block)  # one block of it is the scratch block
    with pytest.warns(RuntimeWarning, match="fewer than max_model_len"):
        small = Engine(path, cache_memory=(need + 1) * per_block)
    assert small.embed(["a"], think=False, instruction="", errors="return").errors == [None]
