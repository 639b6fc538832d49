"""Ray Data: embed_dataset on a local Ray with 2 CPU workers equals Engine.embed on the same rows."""

import os

import numpy as np
import pytest
import torch

from tte_engine import Engine

from .conftest import png_bytes

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TTE_HOME": os.environ["TTE_HOME"]}})
    yield
    ray.shutdown()


def test_embed_dataset_equals_engine_embed(local_ray):
    from tte_engine.distributed import embed_dataset

    reference = Engine("tiny-random")  # builds the alias under TTE_HOME, which the workers share
    rows = [{"id": i, "text": f"row {i}: " + "a cat and a dog " * (i % 3 + 1), "image": None, "instruction": None} for i in range(10)]
    rows[2]["image"] = png_bytes(60, 90, 4)
    rows[5].update(text=None, image=png_bytes(80, 40, 5))
    rows[7]["instruction"] = "retrieval"
    rows[8]["image"] = b"not an image"  # fails alone
    ds = ray.data.from_items(rows)
    out = sorted(embed_dataset(ds, "tiny-random", batch_size=3, num_workers=2).take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in out] == list(range(10))

    items = [{k: v for k, v in (("text", r["text"]), ("image", r["image"]), ("instruction", r["instruction"])) if v is not None} for r in rows]
    good = [i for i in range(10) if i != 8]
    expected = reference.embed([items[i] for i in good])
    got = torch.from_numpy(np.stack([np.asarray(out[i]["embedding"], dtype=np.float32) for i in good]))
    assert float(torch.cosine_similarity(got, expected.embeddings).min()) >= 0.99999
    assert [out[i]["trace"] for i in good] == expected.traces
    assert [out[i]["trace_tokens"] for i in good] == [len(t) for t in expected.trace_token_ids]
    assert "image" in out[8]["error"] and np.isnan(np.asarray(out[8]["embedding"])).all()
    assert all(out[i]["error"] is None for i in good)
