"""Scale-out with Ray Data (the `[ray]` extra): embed a Dataset on a pool of engine workers.

    import ray
    from tte_engine.distributed import embed_dataset

    ds = ray.data.read_parquet("s3://bucket/corpus/")            # columns: text, image (bytes/path/data: URL), instruction
    # optional: images_column= (a list per row), video_column= (video bytes/path, or a list of frames)
    out = embed_dataset(ds, "/models/tte-2b", batch_size=128, num_workers=8, num_gpus_per_worker=1)
    out.write_parquet("s3://bucket/corpus-embeddings/")           # + embedding, trace, trace_tokens, stop_reason, error

Each worker is a Ray actor that loads the engine once (`map_batches` with a callable class) and
hands every batch it receives to that engine's continuous batch. On a GPU cluster give each
worker one GPU (`num_gpus_per_worker=1`, `device` then defaults to "cuda"); on CPU it runs with
`num_gpus_per_worker=0`. Rows keep their other columns; failed rows get a NaN embedding and an
`error`, the rest of the batch completes.

The request is checked against the running cluster before anything is scheduled (workers that
could never be placed, or that leave no CPU for Ray Data's read tasks, would wait forever), and
the named columns against the dataset's schema. Output rows are NOT in input order (workers
finish batches in any order): keep an id column and join on it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("tte_engine")


class EmbedWorker:
    """One Ray actor: loads the engine once, embeds each batch (a dict of numpy columns)."""

    def __init__(self, checkpoint: str, *, engine_kwargs: dict, think: bool, max_trace_tokens: int | None, instruction: str | None,
                 columns: dict[str, str], return_trace: bool, cache: str | None):
        from .engine import Engine
        from .result_cache import EngineCache, ResultCache

        from .errors import CacheError

        self.engine = Engine(checkpoint, **engine_kwargs)
        self.cache = None
        if cache:
            try:
                self.cache = EngineCache(ResultCache(cache), self.engine)
            except CacheError as exc:  # an actor that failed here would be restarted into the same error
                logger.warning("%s; this worker runs without the cache", exc)
        self.settings = dict(think=think, max_trace_tokens=max_trace_tokens, instruction=instruction)
        self.columns, self.return_trace = columns, return_trace

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .result_cache import ItemResult, embed_items

        items = _batch_items(batch, self.columns)
        refused = {i: _misread_image(item.get("image")) for i, item in enumerate(items)}
        refused = {i: why for i, why in refused.items() if why}
        done = iter(embed_items(self.engine, [it for i, it in enumerate(items) if i not in refused], cache=self.cache, **self.settings))
        results = [ItemResult(None, [], None, 0, 0, 0, error=refused[i]) if i in refused else next(done) for i in range(len(items))]
        dim = self.engine.embedding_dim
        out = dict(batch)
        out["embedding"] = np.stack([r.embedding if r.embedding is not None else np.full(dim, np.nan, np.float32) for r in results]) \
            if results else np.zeros((0, dim), np.float32)
        if self.return_trace:
            out["trace"] = np.array([self.engine.prompts.decode(r.trace_ids) for r in results], dtype=object)
        out["trace_tokens"] = np.array([len(r.trace_ids) for r in results], dtype=np.int64)
        out["stop_reason"] = np.array([r.stop_reason for r in results], dtype=object)
        out["error"] = np.array([r.error for r in results], dtype=object)
        return out


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00")


def _misread_image(value: Any) -> str | None:
    """Why image bytes cannot be right, when they read as a path or URL: a column of paths in one
    Parquet file and of bytes in another is read with the first file's type (paths become bytes)."""
    if not isinstance(value, bytes) or value.startswith(_IMAGE_MAGIC) or len(value) > 4096:
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.isprintable() and (text.startswith(("data:", "http://", "https://", "file:", "/", "./", "~")) or os.sep in text or "." in text[-6:]):
        return ("image: the image column holds bytes that read as a path or URL, not image data; its type differs between the "
                "input files (bytes in some, strings in others): store one type in every file")
    return None


def _batch_items(batch: dict[str, np.ndarray], columns: dict[str, str]) -> list[Any]:
    n = len(next(iter(batch.values()))) if batch else 0
    items = []
    for i in range(n):
        item = {}
        for field, column in columns.items():
            if column is not None and column in batch:
                value = batch[column][i]
                if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):  # a null (all-null columns come as NaN)
                    continue
                if isinstance(value, np.ndarray) and value.dtype == object:  # a nested list column
                    value = value.tolist()
                item[field] = value.item() if isinstance(value, np.generic) else value
        items.append(item)
    return items


def embed_dataset(
    ds,
    checkpoint: str | Path,
    *,
    batch_size: int = 64,
    num_workers: int = 1,
    num_gpus_per_worker: float = 0,
    num_cpus_per_worker: float | None = None,
    think: bool = True,
    max_trace_tokens: int | None = None,
    instruction: str | None = None,
    return_trace: bool = True,
    text_column: str | None = "text",
    image_column: str | None = "image",
    instruction_column: str | None = "instruction",
    images_column: str | None = None,
    video_column: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache: str | Path | None = None,
    engine_kwargs: dict | None = None,
):
    """Add `embedding` (float32 [D] per row), `trace`, `trace_tokens`, `stop_reason` and `error` columns to `ds`.

    Rows are read from `text_column`, `image_column` (bytes, a path, a data: URL or a uint8 array)
    and `instruction_column` (each value optional per row). `text_column` and `image_column` must
    exist unless set to None (a dataset without images: `image_column=None`); `instruction_column`
    is used when present (a name other than the default must exist); `images_column` (a list of
    images per row) and `video_column` are read when named. `num_cpus_per_worker` None:
    each worker takes at most one CPU and one CPU (or half the cluster's) stays free for the
    read tasks. `cache` is a SQLite path each worker opens (share it only between workers on one
    machine: SQLite over a network filesystem is unsafe).

    The output's row order is not the input's: keep an id column and join on it.
    Raises ValueError, before anything runs, for a missing column or a request the cluster
    cannot place (naming what to change).
    """
    import ray.data

    if num_workers < 1 or batch_size < 1:
        raise ValueError("num_workers and batch_size must be >= 1")
    _check_columns(ds, {"text_column": text_column, "image_column": image_column, "images_column": images_column,
                        "video_column": video_column}, instruction_column)
    num_cpus_per_worker = _worker_cpus(num_workers, num_cpus_per_worker, num_gpus_per_worker)
    kwargs = dict(engine_kwargs or {})
    kwargs.setdefault("device", device or ("cuda" if num_gpus_per_worker > 0 else "cpu"))
    kwargs.setdefault("dtype", dtype)
    return ds.map_batches(
        EmbedWorker,
        fn_constructor_kwargs=dict(
            checkpoint=str(checkpoint), engine_kwargs=kwargs, think=think, max_trace_tokens=max_trace_tokens, instruction=instruction,
            columns={"text": text_column, "image": image_column, "images": images_column, "video": video_column,
                     "instruction": instruction_column},
            return_trace=return_trace, cache=str(cache) if cache else None,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=num_gpus_per_worker,
        num_cpus=num_cpus_per_worker,
    )


def _check_columns(ds, required: dict[str, str | None], instruction_column: str | None) -> None:
    schema = ds.schema()
    found = list(schema.names) if schema is not None else []
    wanted = {k: v for k, v in required.items() if v is not None}
    if instruction_column not in (None, "instruction"):
        wanted["instruction_column"] = instruction_column
    missing = [f"{k}={v!r}" for k, v in wanted.items() if v not in found]
    if missing:
        raise ValueError(f"the dataset has no column for {', '.join(missing)}; its columns are {found} "
                         "(name the right column, or pass None for one the dataset does not have)")
    if not wanted.keys() - {"instruction_column"}:
        raise ValueError("text_column and image_column are both None (and no images or video column): nothing to embed")


def _worker_cpus(num_workers: int, num_cpus: float | None, num_gpus: float) -> float:
    """CPUs per worker, checked against the running cluster (started as Ray Data would, if need be)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    if num_gpus * num_workers > gpus:
        raise ValueError(f"{num_workers} worker(s) x {num_gpus:g} GPU need {num_gpus * num_workers:g} GPU(s) but the cluster has {gpus:g}: "
                         "lower num_workers or num_gpus_per_worker (0 runs the workers on CPU)")
    spare = min(1.0, cpus / 2)  # Ray Data's read tasks need CPU too: actors holding every CPU deadlock at 0 rows
    if num_cpus is None:
        return min(1.0, (cpus - spare) / num_workers)
    if num_cpus * num_workers > cpus - spare:
        raise ValueError(f"{num_workers} worker(s) x {num_cpus:g} CPU leave less than {spare:g} of the cluster's {cpus:g} CPU(s) for Ray "
                         f"Data's read tasks, which would then wait forever: lower num_workers, or set num_cpus_per_worker <= "
                         f"{(cpus - spare) / num_workers:g} (or leave it None)")
    return num_cpus
