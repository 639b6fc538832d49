"""Preprocessing off the engine's thread (issue 9, item 4): items are prepared in a thread pool while
the engine steps the ones already prepared; a bad image still fails alone, with its index."""

import threading

import pytest
import torch
from oracle import random_image

import tte_engine.inputs as inputs_module
import tte_engine.prep as prep
from tte_engine import Engine
from tte_engine.errors import InvalidInputError
from tte_engine.result_cache import embed_items


@pytest.fixture(scope="module")
def engine(make_checkpoint):
    return Engine(make_checkpoint("contract", think_max_tokens=4))


def _items():
    return [{"text": f"picture {i}", "image": random_image(40 + 8 * i, 56, i)} for i in range(5)]


@pytest.mark.parametrize("path", ["embed", "embed_items"])
def test_images_are_prepared_off_the_calling_thread_while_the_engine_steps(engine, monkeypatch, path):
    stepped, threads, waited = threading.Event(), set(), []
    real_step, real_pre = engine.step, inputs_module.preprocess_image

    def step():
        stepped.set()
        return real_step()

    def preprocess(image, *a, **k):
        threads.add(threading.current_thread().name)
        if image.size[1] == 40 + 8 * 4:  # the last item waits until the engine has run a step on the others
            waited.append(stepped.wait(60))  # False: no engine step ran while an item was still being prepared
        return real_pre(image, *a, **k)

    monkeypatch.setattr(engine, "step", step)
    monkeypatch.setattr(prep, "WAVE", 2)  # two items join before each step: the last one after two steps
    monkeypatch.setattr(inputs_module, "preprocess_image", preprocess)
    items = _items()
    if path == "embed":
        got = engine.embed(items, errors="return").embeddings
    else:
        got = torch.stack([torch.from_numpy(r.embedding) for r in embed_items(engine, items)])
    monkeypatch.undo()
    assert waited == [True] and threading.current_thread().name not in threads
    want = engine.embed(items).embeddings
    assert float(torch.cosine_similarity(got, want).min()) >= 0.99999


def test_a_bad_image_fails_alone_with_its_index(engine, monkeypatch):
    items = _items()
    items[2] = {"text": "broken", "image": b"\x89PNG\r\n\x1a\n not really"}
    res = engine.embed(items, errors="return")
    assert [e is None for e in res.errors] == [True, True, False, True, True] and res.errors[2].startswith("image: cannot decode image")
    steps = []
    monkeypatch.setattr(engine, "step", lambda: steps.append(1))
    with pytest.raises(InvalidInputError) as caught:
        engine.embed(items)
    assert caught.value.index == 2 and caught.value.field == "image" and steps == []  # errors="raise": no model work
    assert not engine.has_unfinished()
