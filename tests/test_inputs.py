"""Preprocessing, prompts and positions agree with transformers' own processor and rope index."""

import base64
import io
import os

import numpy as np
import pytest
import torch
from oracle import random_image
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tte_engine.model.rope import prompt_positions, vision_cos_sin, vision_inv_freq, vision_position_ids
from tte_engine.vision import ImageError, ImageProcessorConfig, load_image, preprocess_image

CFG = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 16)


@pytest.mark.parametrize(
    "h,w,mode", [(60, 90, "RGB"), (300, 120, "RGBA"), (28, 28, "L"), (1000, 30, "RGB"), (17, 203, "P"), (400, 400, "RGB")]
)
def test_preprocessing_is_bit_exact_with_transformers(h, w, mode):
    rng = np.random.default_rng(h * w)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    ours = preprocess_image(img, CFG)
    ref = Qwen2VLImageProcessorPil(min_pixels=CFG.min_pixels, max_pixels=CFG.max_pixels)(images=[img], return_tensors="pt")
    assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
    assert torch.equal(ours.patches, ref["pixel_values"])
    assert ours.num_tokens == ours.patches.shape[0] // 4


def test_image_sources_decode_the_same(tmp_path):
    img = random_image(50, 70, 3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    sources = [img, buf.getvalue(), str(path), path, url, np.asarray(img)]
    digests = {preprocess_image(s, CFG).digest for s in sources}
    assert len(digests) == 1


@pytest.mark.parametrize(
    "bad,match",
    [
        (b"not an image", "cannot decode"),
        ("/no/such/file.png", "no image file"),
        (np.zeros((4, 4), dtype=np.float32), "uint8"),
        (12345, "unsupported image type"),
        ("data:image/png,rawbytes", "base64"),
        (Image.new("RGB", (1000, 2)), "aspect ratio"),
    ],
)
def test_bad_images_raise_image_error(bad, match):
    with pytest.raises(ImageError, match=match):
        preprocess_image(bad, CFG)


def test_truncated_file_is_an_image_error(tmp_path):
    buf = io.BytesIO()
    random_image(64, 64, 1).save(buf, format="JPEG")
    with pytest.raises(ImageError):
        load_image(buf.getvalue()[:200])


def test_prompt_matches_transformers_processor_recipe(make_checkpoint):
    """Qwen2VLProcessor itself needs torchvision (for its video half), so this follows its recipe:
    render the chat template, repeat each <|image_pad|> grid_h*grid_w/4 times, tokenize."""
    from tte_engine import Engine

    path = make_checkpoint("engine", think_max_tokens=10)
    eng = Engine(path)
    tok = AutoTokenizer.from_pretrained(path)
    img = random_image(90, 140, 4)
    grid = Qwen2VLImageProcessorPil(min_pixels=CFG.min_pixels, max_pixels=CFG.max_pixels)(images=[img])["image_grid_thw"][0]
    text = eng.tte.instructions["default"] + "\nwhat is this?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")
    expanded = rendered.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4))
    ref = tok(expanded, add_special_tokens=False).input_ids
    ours = eng.embed([{"text": "what is this?", "image": img}], think=False).prompt_token_ids[0]
    assert ours == ref
    thinking = eng.embed([{"text": "what is this?", "image": img}], max_trace_tokens=1).prompt_token_ids[0]
    assert thinking == ref + eng.prompts.think_start_ids


def test_positions_match_transformers_rope_index(make_checkpoint):
    path = make_checkpoint("engine", think_max_tokens=10)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(path)
    cfg = hf.config
    grids = [(1, 6, 10), (1, 4, 4)]
    ids = [1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * 15 + [cfg.vision_end_token_id, 5, 6]
    ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id, 7]
    ours, delta = prompt_positions(ids, grids, cfg.image_token_id, 2)
    ids_t = torch.tensor([ids])
    ref, ref_delta = hf.model.get_rope_index(ids_t, mm_token_type_ids=(ids_t == cfg.image_token_id).int(), image_grid_thw=torch.tensor(grids))
    assert torch.equal(ours, ref[:, 0]) and delta == int(ref_delta)
    text_only, d0 = prompt_positions([3, 4, 5], [], cfg.image_token_id, 2)
    assert torch.equal(text_only, torch.arange(3).expand(3, -1)) and d0 == 0


def test_vision_rotary_matches_transformers():
    """The vision tower's (row, col) ids (block-major over merge windows, repeated per frame) and its cos/sin, bit for bit."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding, get_vision_position_ids

    cfg = Qwen2VLVisionConfig(embed_dim=64, num_heads=4, spatial_merge_size=2)
    theta, head_dim = cfg.rope_parameters["rope_theta"], 64 // 4
    rotary = Qwen2VLVisionRotaryEmbedding(cfg)
    grids = [(1, 6, 10), (2, 4, 4), (1, 14, 2)]
    ref_ids = get_vision_position_ids(torch.tensor(grids), 2)
    ids = vision_position_ids(grids, 2)
    assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids)
    assert torch.equal(vision_inv_freq(head_dim, theta), rotary.inv_freq)
    ref_cos, ref_sin = rotary(torch.zeros(1), ref_ids)
    cos, sin = vision_cos_sin(grids, head_dim, theta, 2)
    assert cos.shape == (6 * 10 + 2 * 4 * 4 + 14 * 2, head_dim)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_image_errors():
    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, format="PNG")  # ~100 KB file, 100M pixels
    assert len(buf.getvalue()) < 1 << 20
    with pytest.raises(ImageError, match="decode limit"):
        load_image(buf.getvalue())


def test_an_eps_image_never_reaches_ghostscript(tmp_path, monkeypatch):
    """Pillow hands EPS data to Ghostscript (`gs`, with no timeout) whatever type the client named:
    a PostScript loop would hang a preparation thread. Only formats Pillow decodes itself open."""
    from tte_engine.vision import ImageError, load_image

    calls = tmp_path / "gs_calls"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho called >> {calls}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{} loop\n%%EOF\n"
    with pytest.raises(ImageError, match="cannot decode image"):
        load_image(eps)
    assert not calls.exists()
