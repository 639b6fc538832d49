"""The correctness oracle: Hugging Face transformers' Qwen2-VL on the same weights.

`hf_generate` is the reference trace (greedy `generate()` with our stop ids and suppressed
vision tokens); `hf_reencode` is the naive pipeline's second pass (a full forward over
prompt + trace + suffix) and its last-token embedding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tte_engine.vision import ImageProcessorConfig

_MODELS = {}


def hf_model(path) -> Qwen2VLForConditionalGeneration:
    key = str(path)
    if key not in _MODELS:
        model, info = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        _MODELS[key] = model.eval()
    return _MODELS[key]


def hf_image_inputs(item, path, ids: list[int], image_token_id: int) -> dict:
    """pixel_values / image_grid_thw from transformers' own PIL image processor."""
    image = item.get("image") if isinstance(item, dict) else None
    if image is None:
        return {}
    cfg = ImageProcessorConfig.load(path)
    proc = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    px = proc(images=[image], return_tensors="pt")
    ids_t = torch.tensor([ids])
    return {"pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"], "mm_token_type_ids": (ids_t == image_token_id).int()}


@torch.no_grad()
def hf_generate(path, item, prompt_ids, *, max_new_tokens, stop_ids, suppress_ids, image_token_id) -> list[int]:
    model = hf_model(path)
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_ids,
        suppress_tokens=suppress_ids,
        pad_token_id=stop_ids[-1],
        **hf_image_inputs(item, path, prompt_ids, image_token_id),
    )
    return out[0, len(prompt_ids) :].tolist()


@torch.no_grad()
def hf_forward(path, item, ids, image_token_id, output_hidden_states=False):
    model = hf_model(path)
    ids_t = torch.tensor([ids])
    return model.model(
        input_ids=ids_t,
        attention_mask=torch.ones_like(ids_t),
        output_hidden_states=output_hidden_states,
        **hf_image_inputs(item, path, ids, image_token_id),
    )


def hf_reencode(path, item, ids, image_token_id) -> torch.Tensor:
    """Naive second pass: last token of the final normed hidden state, L2-normalized."""
    return F.normalize(hf_forward(path, item, ids, image_token_id).last_hidden_state[0, -1].float(), dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def random_image(h: int, w: int, seed: int) -> Image.Image:
    """A seeded noise image (shared by test modules; conftest modules cannot be imported by name)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
