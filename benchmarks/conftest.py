"""Benchmark fixtures: the models are random (built locally), the inputs synthetic and seeded."""

import numpy as np
import pytest
from PIL import Image

from tte_engine.random_checkpoint import SPECS, build_random_checkpoint


def never_stop(checkpoint):
    """Zero the LM-head rows of the stop tokens, so every trace runs its full budget (fixed work per run)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    weights = load_file(str(checkpoint / "model.safetensors"))
    for token in ("</think>", "<|im_end|>", "<|endoftext|>"):
        weights["lm_head.weight"][tok.convert_tokens_to_ids(token)] = 0
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    return checkpoint


@pytest.fixture(scope="session")
def bench_small(tmp_path_factory):
    """hidden 384, 6 layers, vision depth 4: the CPU benchmark model; traces never stop early."""
    return never_stop(build_random_checkpoint(tmp_path_factory.mktemp("bench-small"), SPECS["bench-small"], seed=0))


def synthetic_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def image_text_items():
    """8 image + text queries, two image sizes, varied text lengths."""
    questions = ["What is in the picture?", "Describe the main object.", "Which animal is this?", "What color is the car?",
                 "Find a caption that describes the photo.", "Is there a person on the left side of the table?",
                 "What does the sign say?", "How many people are in the street?"]
    return [{"text": q, "image": synthetic_image(224 if i % 2 else 160, 224, i)} for i, q in enumerate(questions)]
