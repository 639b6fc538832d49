"""Scale-out with Ray Data (`pip install tte-engine[ray]`): embed a Dataset on a pool of engine workers.

    import ray
    from tte_engine.distributed import embed_dataset

    ds = ray.data.read_parquet("s3://bucket/corpus/")            # columns: text, image (bytes/path/data: URL), instruction
    out = embed_dataset(ds, "/models/tte-2b", batch_size=128, num_workers=8, num_gpus_per_worker=1)
    out.write_parquet("s3://bucket/corpus-embeddings/")           # + embedding, trace, trace_tokens, stop_reason, error

Each worker is a Ray actor that loads the engine once (`map_batches` with a callable class) and
hands every batch it receives to that engine's continuous batch. On a GPU cluster give each
worker one GPU (`num_gpus_per_worker=1`, `device` then defaults to "cuda"); on CPU it runs with
`num_gpus_per_worker=0`. Rows keep their other columns; failed rows get a NaN embedding and an
`error`, the rest of the batch completes.
"""

from __future__ import annotations

import logging
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

        self.engine = Engine(checkpoint, **engine_kwargs)
        self.cache = EngineCache(ResultCache(cache), self.engine) if cache else None
        self.settings = dict(think=think, max_trace_tokens=max_trace_tokens, instruction=instruction)
        self.columns, self.return_trace = columns, return_trace

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .result_cache import embed_items

        items = _batch_items(batch, self.columns)
        results = embed_items(self.engine, items, cache=self.cache, **self.settings)
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


def _batch_items(batch: dict[str, np.ndarray], columns: dict[str, str]) -> list[Any]:
    n = len(next(iter(batch.values()))) if batch else 0
    items = []
    for i in range(n):
        item = {}
        for field, column in columns.items():
            if column in batch:
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
    num_cpus_per_worker: float = 1,
    think: bool = True,
    max_trace_tokens: int | None = None,
    instruction: str | None = None,
    return_trace: bool = True,
    text_column: str = "text",
    image_column: str = "image",
    instruction_column: str = "instruction",
    device: str | None = None,
    dtype: str = "auto",
    cache: str | Path | None = None,
    engine_kwargs: dict | None = None,
):
    """Add `embedding` (float32 [D] per row), `trace`, `trace_tokens`, `stop_reason` and `error` columns to `ds`.

    Rows are read from `text_column`, `image_column` (bytes, a path, a data: URL or a uint8 array)
    and `instruction_column` (each optional per row). `cache` is a SQLite path each worker opens
    (share it only between workers on one machine: SQLite over a network filesystem is unsafe).
    """
    import ray.data

    if num_workers < 1 or batch_size < 1:
        raise ValueError("num_workers and batch_size must be >= 1")
    kwargs = dict(engine_kwargs or {})
    kwargs.setdefault("device", device or ("cuda" if num_gpus_per_worker > 0 else "cpu"))
    kwargs.setdefault("dtype", dtype)
    return ds.map_batches(
        EmbedWorker,
        fn_constructor_kwargs=dict(
            checkpoint=str(checkpoint), engine_kwargs=kwargs, think=think, max_trace_tokens=max_trace_tokens, instruction=instruction,
            columns={"text": text_column, "image": image_column, "instruction": instruction_column},
            return_trace=return_trace, cache=str(cache) if cache else None,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=num_gpus_per_worker,
        num_cpus=num_cpus_per_worker,
    )
