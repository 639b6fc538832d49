"""CUDA graphs of the decode step, one per batch bucket (as nano-vllm and vLLM do).

A decode step of a 2B model is ~450 small kernels; launched one by one from Python they cost
more than the 0.73 ms it takes an H200 to read the weights (DESIGN §6, §8). Replaying a graph
launches them all at once. What makes the step capturable (`Runner.decode_forward`): inputs sit
at fixed addresses (the runner's decode buffer, padded to the bucket), the block table is as wide
as the longest allowed context, decode attention's split count is fixed per bucket, padded rows
write only the scratch slot, and nothing syncs with the host.

Buckets are warmed up eagerly first (so every Triton variant is compiled outside the capture),
then captured largest first into one shared memory pool. If capture fails the engine runs its
decode steps plainly eagerly (the runner drops its `DecodeGraphs`), with one `RuntimeWarning`
saying why (a warning, not a log record: a library user sees it without configuring logging);
`Runner.graphs_eager_reason` keeps the reason. On a CPU engine with `cuda_graphs=True` nothing
is captured: `replay` runs the same padded, fixed-width code eagerly, which is how the test
suite checks the graph path without a GPU.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import torch

from .kernels.attention import decode_splits

if TYPE_CHECKING:
    from .runner import Runner

logger = logging.getLogger("tte_engine")


def capture_refused(device: torch.device) -> str | None:
    """Why decode steps on `device` are not captured (None: they are)."""
    return None if device.type == "cuda" else "not a CUDA device"


class DecodeGraphs:
    def __init__(self, runner: "Runner"):
        self.runner = runner
        self.width = runner.blocks.tables.shape[1]  # block-table columns: the longest allowed context
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        # the LM head's output of every bucket at one address (`LogitsBuffer`): a sampled step samples from it
        runner.logits.reserve(runner.max_rows)
        self.eager_reason: str | None = capture_refused(runner.device)
        self.failed = False  # capture was tried and failed: the runner then runs plain eager steps
        self._fill_padding()
        if self.eager_reason is None:
            self.capture()

    def num_splits(self, bucket: int) -> int:
        """Decode attention's split count for a bucket, sized for the longest allowed context."""
        cfg, r = self.runner.model.cfg.text, self.runner
        return decode_splits(bucket, cfg.num_kv_heads, self.width * r.block_size, r.cache.k.dtype, r.device)

    def _fill_padding(self) -> None:
        """Every row of the decode buffer a padded row, so a warm-up of any bucket touches no real slot."""
        r = self.runner
        views = r.decode_views[r.decode_staging.next_turn()]
        views.buffer[:] = 0
        views.row_fields[:] = r.padding_values
        views.update_index[:], views.update_value[:] = r.noop_update
        r.decode_staging.send(r.decode_size)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, once, at start: the decode buffer then holds only
        padding rows, so neither touches a real cache slot."""
        r = self.runner
        try:
            side = torch.cuda.Stream(r.device)  # warm up on the stream the capture uses (its cuBLAS workspace, ...)
            side.wait_stream(torch.cuda.current_stream(r.device))
            with torch.cuda.stream(side):
                for bucket in reversed(r.buckets):  # compiles every kernel variant outside the capture
                    self._forward(bucket)
            torch.cuda.synchronize(r.device)
            pool = None
            for bucket in reversed(r.buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    outputs = self._forward(bucket)
                pool = graph.pool() if pool is None else pool
                self.graphs[bucket] = (graph, outputs)
            torch.cuda.synchronize(r.device)
            logger.info("captured decode CUDA graphs for batch sizes %s", r.buckets)
        except Exception as exc:  # a capture failure must not take the engine down: run eagerly instead
            self.graphs.clear()
            self.failed = True
            self.eager_reason = f"CUDA graph capture failed ({type(exc).__name__}: {exc})"
            warnings.warn(f"{self.eager_reason}; decode steps run eagerly (EngineConfig(cuda_graphs=False) / --enforce-eager "
                          "skip the capture)", RuntimeWarning, stacklevel=2)

    def _forward(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.runner.decode_forward(bucket, self.width, self.num_splits(bucket))

    def replay(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(greedy tokens [bucket], logits [bucket, V]: static buffers, good until the next replay)
        of the decode step now in the runner's buffer."""
        if bucket in self.graphs:
            graph, outputs = self.graphs[bucket]
            graph.replay()
            return outputs
        return self._forward(bucket)

