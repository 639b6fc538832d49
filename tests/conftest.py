"""Shared fixtures: tiny random Qwen2-VL checkpoints built on the fly (nothing is downloaded)."""

import os

import torch

# Triton kernels run on CPU only in interpreter mode, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
from oracle import random_image  # noqa: E402

from tte_engine.random_checkpoint import SPECS, build_random_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_tte_home(tmp_path_factory):
    """Aliases like tiny-random build into a per-session directory, never the user's cache."""
    home = tmp_path_factory.mktemp("tte_home")
    old = os.environ.get("TTE_HOME")
    os.environ["TTE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TTE_HOME", None)
    else:
        os.environ["TTE_HOME"] = old


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(name, **spec_overrides, seed=, layout=, shards=, mode=, reasoner=) -> path (cached)."""
    built = {}

    def make(name: str = "ckpt", *, seed: int = 0, layout: str = "hub", shards: int = 1, mode: str = "unified", reasoner=None, dtype="float32", **overrides):
        key = (name, seed, layout, shards, mode, str(reasoner), dtype, tuple(sorted(overrides.items())))
        if key not in built:
            spec = replace(SPECS["tiny-random"], **overrides)
            path = tmp_path_factory.mktemp(name)
            built[key] = build_random_checkpoint(path, spec, seed=seed, layout=layout, shards=shards, mode=mode, reasoner=reasoner, dtype=dtype)
        return built[key]

    return make


@pytest.fixture(scope="session")
def mixed_items():
    """Six items: text only (short and long), images of two sizes, image + text, a named instruction."""
    small, tall = random_image(60, 90, 1), random_image(130, 50, 2)
    return [
        "a cat on a chair",
        {"text": "What is shown in this picture?", "image": small},
        {"image": tall},
        "two dogs play with a ball in the park while a man rides a bicycle along the river at sunset",
        {"text": "a red chair", "image": tall, "instruction": "retrieval"},
        {"text": "find the document", "instruction": "Retrieve the document that answers the question."},
    ]


@pytest.fixture(scope="session")
def boosted_checkpoint(make_checkpoint, tmp_path_factory):
    """A checkpoint whose LM head favours one token (so traces stop early on it): (token, factor) -> path."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    built = {}

    def make(token: str, factor: float = 8.0):
        if token not in built:
            src = make_checkpoint("parity", head="last_token", think_max_tokens=12)
            dst = tmp_path_factory.mktemp("boost")
            shutil.copytree(src, dst, dirs_exist_ok=True)
            tid = AutoTokenizer.from_pretrained(dst).convert_tokens_to_ids(token)
            weights = load_file(str(dst / "model.safetensors"))
            weights["lm_head.weight"][tid] *= factor
            save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
            built[token] = dst
        return built[token]

    return make
