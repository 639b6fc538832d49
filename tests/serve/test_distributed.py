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


def test_embed_dataset_equals_engine_embed(local_ray, tmp_path):
    """Two workers with default resources on a 2-CPU cluster, reading Parquet (the read tasks need a CPU of their own)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tte_engine.distributed import embed_dataset

    reference = Engine("tiny-random")  # builds the alias under TTE_HOME, which the workers share
    rows = [{"id": i, "text": f"row {i}: " + "a cat and a dog " * (i % 3 + 1), "image": None, "instruction": None} for i in range(10)]
    rows[2]["image"] = png_bytes(60, 90, 4)
    rows[5].update(text=None, image=png_bytes(80, 40, 5))
    rows[7]["instruction"] = "retrieval"
    rows[8]["image"] = b"not an image"  # fails alone
    for part in range(2):
        pq.write_table(pa.Table.from_pylist(rows[part * 5 : part * 5 + 5]), tmp_path / f"part{part}.parquet")
    ds = ray.data.read_parquet(str(tmp_path))
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


def test_settings_the_cluster_cannot_run_are_refused_up_front(local_ray):
    from tte_engine.distributed import embed_dataset

    ds = ray.data.from_items([{"id": 0, "txt": "a misspelled column", "image": None}])
    with pytest.raises(ValueError, match=r"no column for text_column='text'; its columns are \['id', 'txt', 'image'\]"):
        embed_dataset(ds, "tiny-random")
    with pytest.raises(ValueError, match="no column for instruction_column='task'"):
        embed_dataset(ds, "tiny-random", text_column="txt", instruction_column="task")
    embed_dataset(ds, "tiny-random", text_column="txt")  # lazy: builds the plan only
    with pytest.raises(ValueError, match="both None"):
        embed_dataset(ds, "tiny-random", text_column=None, image_column=None)
    with pytest.raises(ValueError, match=r"need 1 GPU\(s\) but the cluster has 0"):
        embed_dataset(ds, "tiny-random", text_column="txt", num_gpus_per_worker=1)
    with pytest.raises(ValueError, match="read tasks, which would then wait forever: lower num_workers, or set num_cpus_per_worker <= 0.5"):
        embed_dataset(ds, "tiny-random", text_column="txt", num_workers=2, num_cpus_per_worker=1)


def test_image_bytes_that_read_as_a_path_are_refused():
    from tte_engine.distributed import _misread_image

    assert _misread_image(png_bytes(20, 20, 1)) is None and _misread_image(b"\x00\x01junk") is None and _misread_image("cat.png") is None
    for path in (b"/data/images/cat.png", b"images/cat.jpg", b"cat.png", b"data:image/png;base64,AAAA"):
        assert "read as a path or URL" in _misread_image(path), path
