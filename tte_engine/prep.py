"""Preprocessing off the engine's thread: items are prepared (validated, tokenized, images decoded,
resized and cut into patches) in a thread pool while the engine steps the ones already prepared.

PIL's decoders and resampling, numpy and the Rust tokenizer release the GIL, so a few threads
overlap image work with model steps (and with each other). Sequences join the engine in item
order and in fixed waves (items [k*WAVE, (k+1)*WAVE) before the engine's step k, waiting for
them only if they are not ready yet), so a call's batches are the same on every run, whatever the
threads' timing: outputs are bit-for-bit reproducible (tte-embed's resume relies on it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .runner import step_loop_mode
from .sequence import Sequence

PREP_THREADS = min(4, os.cpu_count() or 1)
WAVE = 32  # items that join the engine before each of its steps


def prepare_all(n: int, prepare: Callable[[int], object], threads: int = PREP_THREADS) -> list:
    """[prepare(0), ..., prepare(n-1)] computed in a thread pool; raises the first (by index) exception."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, n))) as pool:
        futures = [pool.submit(prepare, i) for i in range(n)]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()


def run_prepared(engine, n: int, prepare: Callable[[int], Sequence | None], on_done: Callable[[list[Sequence]], None] | None = None,
                 threads: int = PREP_THREADS) -> None:
    """Run items 0..n-1 on an idle `engine`, preparing them in a thread pool meanwhile.

    `prepare(i)` builds item i's Sequence, or returns None for an item that needs no engine work
    (it failed, or a cache answered it: `prepare` records that itself). Items join the engine in
    item order, WAVE of them before each step (more while the engine has nothing to do), and
    `on_done` sees the sequences each step finished. If `prepare` or a step raises, the pending
    preparations are cancelled, every sequence is dropped (the engine stays usable) and the
    exception propagates.
    """
    if n == 0:
        return
    with engine.claim_loop(), ThreadPoolExecutor(max_workers=max(1, min(threads, n)), thread_name_prefix="tte-prep") as pool:
        futures = [pool.submit(prepare, i) for i in range(n)]
        added = steps = 0
        try:
            with step_loop_mode() as callers_mode:
                while added < n or engine.has_unfinished():
                    # this step's wave joins (waiting for it if need be), and more while the engine has nothing to do
                    while added < min(n, (steps + 1) * WAVE) or (added < n and not engine.has_unfinished()):
                        seq = futures[added].result()
                        added += 1
                        if seq is not None:
                            engine.add_request(seq)
                    if engine.has_unfinished():
                        done = engine.step()
                        steps += 1
                        if done and on_done is not None:
                            with callers_mode():
                                on_done(done)
        except BaseException:
            for f in futures:
                f.cancel()
            engine.scheduler.abort_all()
            raise
