"""Several images in one item: each in its own vision block, in the order given, exact against
transformers' Qwen2-VL (its PIL image processor, get_rope_index, generate and a full forward)."""

import pytest
import torch
from oracle import cosine, hf_model, random_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tte_engine import Engine
from tte_engine.errors import InvalidInputError
from tte_engine.inputs import as_query
from tte_engine.model.rope import prompt_positions

COS = 0.99999


@pytest.fixture(scope="module")
def two_images():
    return [random_image(60, 90, 1), random_image(130, 50, 2)]


@pytest.fixture(scope="module")
def engine_and_path(make_checkpoint):
    path = make_checkpoint("parity", head="last_token", think_max_tokens=12)
    return Engine(path), path


def _hf_kwargs(path, eng, images, ids):
    from tte_engine.vision import ImageProcessorConfig

    cfg = ImageProcessorConfig.load(path)
    px = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)(images=images, return_tensors="pt")
    ids_t = torch.tensor([ids])
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "pixel_values": px["pixel_values"],
            "image_grid_thw": px["image_grid_thw"], "mm_token_type_ids": (ids_t == eng.model_cfg.image_token_id).int()}


def test_prompt_layout_and_positions(engine_and_path, two_images):
    eng, path = engine_and_path
    cfg = eng.model_cfg
    prompt = eng.prompts.build(as_query({"text": "compare", "images": two_images}, 0), 0, think=True)
    assert [i.grid_thw for i in prompt.images] == [(1, 4, 6), (1, 10, 4)]
    ids = prompt.token_ids
    # two vision blocks in the order given, each start/pads/end, before the text
    starts = [j for j, t in enumerate(ids) if t == cfg.vision_start_token_id]
    assert len(starts) == 2 and ids[starts[0] + 1 : starts[0] + 7] == [cfg.image_token_id] * 6
    assert ids[starts[0] + 7] == cfg.vision_end_token_id and ids[starts[1] + 1 : starts[1] + 11] == [cfg.image_token_id] * 10
    # the same layout as transformers' processor recipe: the chat template's two image parts, expanded
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": eng.tte.instructions["default"] + "\ncompare"}]
    rendered = eng.prompts.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    parts = rendered.split("<|image_pad|>")
    rendered = parts[0] + "<|image_pad|>" * 6 + parts[1] + "<|image_pad|>" * 10 + parts[2]
    assert ids == eng.prompts.tokenizer(rendered, add_special_tokens=False).input_ids + eng.prompts.think_start_ids
    pos, delta = prompt_positions(ids, [i.grid_thw for i in prompt.images], (cfg.image_token_id, cfg.video_token_id), 2)
    kw = _hf_kwargs(path, eng, two_images, ids)
    ref, ref_delta = hf_model(path).model.get_rope_index(kw["input_ids"], mm_token_type_ids=kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"])
    assert torch.equal(pos, ref[:, 0]) and delta == int(ref_delta)


@torch.no_grad()
def test_two_images_and_text_match_transformers(engine_and_path, two_images):
    """Greedy trace identical to generate(), embedding cosine >= 0.99999 against the naive re-encode;
    `image` + `images` is the same item as `images` listing both; the order of the images matters."""
    eng, path = engine_and_path
    items = [
        {"text": "Compare the two pictures.", "images": two_images},
        {"text": "Compare the two pictures.", "image": two_images[0], "images": two_images[1:]},
        {"text": "Compare the two pictures.", "images": two_images[::-1]},
        {"images": two_images + [random_image(40, 40, 3)]},
    ]
    res = eng.embed(items)
    assert res.errors == [None] * len(items)
    stop = eng.prompts.think_end_ids + eng.prompts.eos_ids
    model = hf_model(path)
    for i, item in enumerate(items):
        images = ([item["image"]] if "image" in item else []) + list(item["images"])
        kw = _hf_kwargs(path, eng, images, res.prompt_token_ids[i])
        out = model.generate(**kw, max_new_tokens=12, do_sample=False, eos_token_id=stop, suppress_tokens=eng.prompts.suppressed_ids, pad_token_id=stop[-1])
        assert res.trace_token_ids[i] == out[0, len(res.prompt_token_ids[i]):].tolist(), f"item {i}"
        full = res.prompt_token_ids[i] + res.trace_token_ids[i] + res.embed_token_ids[i]
        ref = model.model(**_hf_kwargs(path, eng, images, full)).last_hidden_state[0, -1]
        assert cosine(res.embeddings[i], ref) >= COS, f"item {i}"
    assert res.prompt_token_ids[0] == res.prompt_token_ids[1] and cosine(res.embeddings[0], res.embeddings[1]) >= COS
    assert res.prompt_token_ids[0] != res.prompt_token_ids[2]


def test_bad_images_name_their_position(engine_and_path, two_images):
    eng, _ = engine_and_path
    with pytest.raises(InvalidInputError, match=r"item 1: images\[1\]: ") as err:
        eng.embed(["fine", {"images": [two_images[0], b"not an image"]}], think=False)
    assert err.value.index == 1 and err.value.field == "images[1]"
    with pytest.raises(InvalidInputError, match="images must be a list"):
        eng.embed([{"images": two_images[0]}], think=False)
    with pytest.raises(InvalidInputError, match="empty item"):
        eng.embed([{"images": []}], think=False)


def test_images_past_the_model_limit_stop_preprocessing_there(make_checkpoint, monkeypatch):
    """Each image and video was fully preprocessed and kept before the prompt's length was checked:
    one item of a thousand videos held gigabytes and could take the whole process down. The item's
    error now names the first image that takes it past the limit, and later ones are never read."""
    from tte_engine import inputs

    eng = Engine(make_checkpoint("parity", head="last_token", think_max_tokens=12), max_model_len=256)
    calls = []
    real = inputs.preprocess_image
    monkeypatch.setattr(inputs, "preprocess_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    image = random_image(56, 56, 3)  # 4 vision tokens
    with pytest.raises(InvalidInputError, match=r"images\[\d+\]: the item's images and videos up to this one take") as info:
        eng.make_sequence({"text": "many", "images": [image] * 1000})
    assert info.value.field.startswith("images[") and len(calls) < 100
    assert eng.embed([{"images": [image] * 3}]).embeddings.shape[0] == 1  # a few still fit
