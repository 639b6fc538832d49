"""The engine loop: one thread owns the Engine (which is not thread-safe) and runs its continuous
batch; HTTP handlers on the event loop hand it validated sequences and await futures.

A sequence submitted while others are mid-trace joins the next step, so concurrent requests share
the batch instead of queueing behind each other. The loop also watches each sequence's progress
to time the queue / think / embed phases and the size of every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass

from ..runner import step_loop_mode
from ..sequence import Phase, Sequence
from .metrics import Metrics

logger = logging.getLogger("tte_engine")


class QueueFull(Exception):
    """More items are in flight than the server accepts; the client should retry later."""


class ShuttingDown(Exception):
    """The loop is stopping (or has died) and takes no new work."""


class EngineFailure(Exception):
    """An engine step that ran this sequence raised (it was dropped), or the loop thread died."""


@dataclass(eq=False)
class _Live:
    seq: Sequence
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float
    thinks: bool  # has a trace to generate (else it starts in the embed phase)
    started: float | None = None
    embedding_since: float | None = None


def _resolve(future: asyncio.Future, value: object, error: BaseException | None) -> None:
    if future.done():  # the handler gave up (client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class EngineLoop:
    def __init__(self, engine, *, max_items: int, metrics: Metrics):
        self.engine = engine
        self._prefix_seen = (0, 0)  # prefix-cache (hits, queries) already counted in the metrics
        self.max_items = max_items  # items accepted and unfinished (running + waiting)
        self.metrics = metrics
        self._cv = threading.Condition()
        self._inbox: list[_Live] = []
        self._aborts: list[Sequence] = []
        self._queued: dict[int, _Live] = {}  # in the engine, not started yet (arrival order)
        self._running: dict[int, _Live] = {}  # started: at most the engine's batch, so scanning it each step is cheap
        self._in_flight = 0
        self._stopping = False
        self._failure: str | None = None  # why the loop thread died, once it has
        self._thread = threading.Thread(target=self._run, name="tte-engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, seqs: list[Sequence]) -> list[asyncio.Future]:
        """Queue sequences for the engine (call from the event loop); one future per sequence."""
        loop = asyncio.get_running_loop()
        with self._cv:
            if self._failure is not None or (self._thread.ident is not None and not self._thread.is_alive()):
                raise ShuttingDown(f"the engine loop is not running ({self._failure or 'it ended'})")
            if self._stopping:
                raise ShuttingDown()
            if self._in_flight + len(seqs) > self.max_items:
                raise QueueFull(f"{self._in_flight} items in flight; this request adds {len(seqs)}, the server takes {self.max_items}")
            now = time.perf_counter()
            live = [_Live(s, loop.create_future(), loop, now, s.phase == Phase.THINK) for s in seqs]
            self._inbox += live
            self._in_flight += len(seqs)
            self.metrics.queue_depth.inc(len(seqs))
            self._cv.notify()
        return [x.future for x in live]

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop sequences whose requests went away (done by the loop thread, which owns the engine)."""
        with self._cv:
            self._aborts += seqs
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is in flight, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop thread
    def _run(self) -> None:
        with contextlib.ExitStack() as held:
            try:  # the engine is this thread's while it serves: another thread's embed() is refused
                held.enter_context(self.engine.claim_loop())
            except RuntimeError as exc:  # busy with another caller's loop: fail our requests, leave its sequences alone
                logger.error("cannot serve: %s", exc)
                self._die(exc, drop_engine_work=False)
                return
            try:
                with step_loop_mode():  # once for the thread, not at every step (see Runner.run)
                    self._serve()
            except BaseException as exc:  # a bug outside the guarded step: nothing may wait forever on a dead thread
                logger.exception("the engine loop failed; failing the requests in flight and refusing new ones")
                self._die(exc)

    def _die(self, exc: BaseException, drop_engine_work: bool = True) -> None:
        """Stop taking work and fail every sequence the loop holds (the inbox, queued and running ones)."""
        reason = f"the engine loop failed: {type(exc).__name__}: {exc}"
        with self._cv:
            self._failure, self._stopping = reason, True
            lost = [*self._inbox, *self._queued.values(), *self._running.values()]
            self._inbox, self._aborts = [], []
            self._queued, self._running = {}, {}
            self._in_flight = 0
        self.metrics.queue_depth.set(0)
        self.metrics.running.set(0)
        try:
            if drop_engine_work:
                self.engine.scheduler.abort_all()  # frees the blocks (an engine shared with others stays usable)
        except Exception:
            logger.exception("could not drop the engine's sequences")
        for x in lost:
            try:
                x.loop.call_soon_threadsafe(_resolve, x.future, None, EngineFailure(reason))
            except RuntimeError:  # that event loop is closed: nobody is waiting
                pass

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._aborts or self._queued or self._running or self._stopping):
                    self._cv.wait()
                if self._stopping and not (self._inbox or self._queued or self._running):
                    return
                new, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for x in new:
                self.engine.add_request(x.seq)
                self._queued[x.seq.seq_id] = x
            for seq in aborts:
                x = self._queued.get(seq.seq_id) or self._running.get(seq.seq_id)
                if x is not None:
                    self.engine.abort(seq)
                    self._retire(x, None, asyncio.CancelledError())
            if not (self._queued or self._running):
                continue
            began = time.perf_counter()
            try:
                done = self.engine.step()
            except Exception as exc:  # a bug or an out-of-memory: fail the step's requests, keep serving
                self._fail_step(exc)
                continue
            self._observe(done, began)

    def _fail_step(self, exc: Exception) -> None:
        """A step raised (the engine undid its half-done work): the sequences it ran are dropped and
        their requests fail; the others go on. A step that names none of them (it failed while
        scheduled, before it had sequences) drops everything in flight, so a fault that repeats
        cannot stall the loop: each failed step drops at least one sequence."""
        ran = {seq.seq_id for seq in self.engine.failed_step_seqs or ()}
        live = [*self._queued.values(), *self._running.values()]
        failed = [x for x in live if x.seq.seq_id in ran]
        if failed:
            for x in failed:
                self.engine.abort(x.seq)
        else:  # no request of ours is named (it failed before it had sequences): drop them all
            failed = live
            self.engine.scheduler.abort_all()
        logger.exception("engine step failed; dropping the %d sequence(s) it ran of %d in flight", len(failed), len(live))
        for x in failed:
            self._retire(x, None, EngineFailure(f"engine step failed: {exc}"))

    def _observe(self, done: list[Sequence], began: float) -> None:
        """Time the phases and count the step's sequences."""
        now, stepped = time.perf_counter(), self.engine.last_step_size
        finished = {s.seq_id for s in done}
        for x in list(self._queued.values()):  # the engine admits in arrival order: stop at the first still waiting
            if x.seq.seq_id not in finished and x.seq.num_computed == 0:
                break
            self._start(x, began)
        for seq_id in finished & self._queued.keys():  # done out of arrival order (two-model mode runs embeds first)
            self._start(self._queued[seq_id], began)
        for x in list(self._running.values()):
            seq = x.seq
            if x.embedding_since is None and seq.phase in (Phase.EMBED, Phase.FINISHED):
                x.embedding_since = now
                if x.thinks:
                    self.metrics.latency.labels("think").observe(now - x.started)
            if seq.seq_id in finished:
                if seq.embed:
                    self.metrics.latency.labels("embed").observe(now - x.embedding_since)
                self._retire(x, seq, None)
        if stepped:
            self.metrics.steps.inc()
            self.metrics.batch_size.observe(stepped)
            self._count_prefix_cache()

    def _count_prefix_cache(self) -> None:
        """Carry the engine's prefix-cache counters (all stages) into the Prometheus metrics."""
        hits = sum(s.blocks.hits for s in self.engine.stages)
        queries = sum(s.blocks.queries for s in self.engine.stages)
        seen_hits, seen_queries = self._prefix_seen
        self.metrics.prefix_cache_hits.inc(hits - seen_hits)
        self.metrics.prefix_cache_queries.inc(queries - seen_queries)
        if queries:
            self.metrics.prefix_cache_hit_rate.set(hits / queries)
        self._prefix_seen = (hits, queries)

    def _start(self, x: _Live, began: float) -> None:
        del self._queued[x.seq.seq_id]
        self._running[x.seq.seq_id] = x
        x.started = began
        self.metrics.queue_depth.dec()
        self.metrics.running.inc()
        self.metrics.latency.labels("queue").observe(began - x.submitted)
        if not x.thinks:
            x.embedding_since = began

    def _retire(self, x: _Live, value: Sequence | None, error: BaseException | None) -> None:
        (self._running if x.started is not None else self._queued).pop(x.seq.seq_id)
        with self._cv:
            self._in_flight -= 1
        if x.started is None:
            self.metrics.queue_depth.dec()
        else:
            self.metrics.running.dec()
        x.loop.call_soon_threadsafe(_resolve, x.future, value, error)
