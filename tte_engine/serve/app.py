"""The FastAPI app: OpenAI-compatible `/v1/embeddings`, `/v1/models`, `/health`, `/metrics`.

A request is validated and tokenized in a small thread pool (images are decoded there too, and
the cache consulted), its sequences go to the one engine loop thread, and the handler awaits
them; so concurrent requests share the engine's continuous batch. Errors use OpenAI's body,
`{"error": {"message", "type", "param", "code"}}` (`code` a string such as "model_not_found", or
null), naming the bad field or item. A client that leaves stops its work, validation included.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..errors import Cancelled, InvalidInputError
from ..inputs import check_settings
from ..video import VideoError, stop_decoding_when
from ..result_cache import EngineCache, ItemResult, Plan, ResultCache, finish_item, plan_item, usage
from .loop import EngineFailure, EngineLoop, QueueFull, ShuttingDown
from .metrics import Metrics
from .protocol import EmbeddingRequest, RequestError, request_items

OPEN_PATHS = ("/health", "/metrics")  # answered without the API key (probes and scrapers), as vLLM does

logger = logging.getLogger("tte_engine")


@dataclass
class ServerSettings:
    model_name: str | None = None  # the name /v1/models and responses report (default: the checkpoint directory's name)
    api_key: str | None = None  # when set, every path but OPEN_PATHS needs `Authorization: Bearer <key>`
    max_queue: int = 1024  # items waiting beyond the engine's batch before requests get 429
    max_body_bytes: int = 32 << 20  # larger bodies get 413
    local_files_root: Path | None = None  # image paths allowed under this directory; None: data: URLs only
    prep_threads: int = 4  # threads that validate, tokenize and decode images
    think: bool | None = None  # default for requests that do not say; None: think when the default trace budget (the checkpoint's, capped at max_trace_tokens) is > 0
    model_aliases: tuple[str, ...] = ()  # other names `model` may give (the checkpoint's directory name is always one)
    max_trace_tokens: int | None = None  # the largest max_trace_tokens a request may ask for; None: the checkpoint's budget
    max_image_pixels: int = 1 << 25  # larger images are refused before they are decoded (decode time and memory grow with pixels)
    limit_mm_per_prompt: dict[str, int] | None = None  # most images / videos per item (vLLM's name); None: protocol.DEFAULT_MM_LIMITS
    max_media_bytes: int = 4 << 30  # preprocessed images and videos all requests in flight may hold together (MediaBudget)

    def __post_init__(self):
        """Refuse limits that would leave a server refusing every request (ValueError naming the field)."""
        least = {"max_queue": 0, "max_body_bytes": 1, "prep_threads": 1, "max_trace_tokens": 0, "max_image_pixels": 1, "max_media_bytes": 0}
        for name, low in least.items():
            value = getattr(self, name)
            if value is None and name == "max_trace_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ServerSettings.{name} must be an integer >= {low}, got {value!r}")
        limits = self.limit_mm_per_prompt
        if limits is not None and (not isinstance(limits, dict) or
                                   any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in limits.values())):
            raise ValueError(f"ServerSettings.limit_mm_per_prompt must map 'image' / 'video' to integers >= 0, got {limits!r}")


class MediaBudget:
    """The bytes of preprocessed images and videos (their float32 patches) that requests in flight
    hold together, bounded. Without a bound the server's memory grew with items x images x pixels
    until the process died, taking every client with it (160 items of 8 PNGs held 776 MB).

    A request's items count their bytes as they are prepared (`want`): pending bytes. Once it has
    them all, the request takes its whole share at once (`take`) or is refused: 413 as soon as its
    own items pass the bound, 429 (retry later) when others' items hold the room. An item alone over
    the bound is that item's 400. A refused request's remaining items are skipped (as after a bad
    item). The share goes back when the request ends (`give_back`).

    Pending bytes count against the bound too, so requests preparing side by side cannot each
    gather up to the bound (16 at once could hold 16 times it): an item whose bytes would take the
    held and pending total past the bound makes its request a 429 at once, unless the request is
    the oldest one still preparing, which is refused only at `take` (so one of any set of
    competing requests always gets through: none starves the others by holding pending bytes).
    Beyond the bound exist at most the items being prepared at that moment (`--prep-threads`) and
    the oldest request's own pending bytes (at most the bound: past it, it is a 413)."""

    def __init__(self, limit: int, gauge):
        if limit < 0:
            raise ValueError(f"max_media_bytes must be >= 0, got {limit}")
        self.limit, self.used, self.pending, self._gauge, self._lock = limit, 0, 0, gauge, threading.Lock()
        self._preparing: dict[int, HeldMedia] = {}  # requests with pending bytes, oldest first (by id: a dict keeps insertion order)

    def want(self, held: "HeldMedia", nbytes: int, item: str) -> None:
        """Count `nbytes` of `item` (e.g. "input[3]") towards a request's share; raises RequestError
        400 when the item alone passes the bound, 413 when the request's items do, 429 when the room
        is held by others (see above). Each refuses the whole request (`held.refused`)."""
        if nbytes > self.limit:
            held.refused = True
            raise RequestError(400, f"{item}'s images and videos take {nbytes} bytes once preprocessed; this server holds at most "
                                    f"{self.limit} (tte-serve --max-media-bytes)", item)
        with self._lock:
            if held.closed or held.refused or not nbytes:  # the request has ended or will: its items count no more
                return
            if held.wanted + nbytes > self.limit:  # its own items pass the bound: a retry would not help
                held.refused = True
                raise RequestError(413, f"this request's images and videos take more than {self.limit} bytes once preprocessed, the "
                                        "most this server holds (tte-serve --max-media-bytes); send fewer per request", "input")
            oldest = next(iter(self._preparing.values()), held)
            if held is not oldest and self.used + self.pending + nbytes > self.limit:
                held.refused = True
                raise self._busy()
            held.wanted += nbytes
            self.pending += nbytes
            self._preparing.setdefault(id(held), held)

    def over(self, held: "HeldMedia") -> bool:
        """The request is refused already (413, 429, or a bad item): its remaining items are skipped."""
        return held.refused

    def take(self, held: "HeldMedia") -> None:
        """Take a request's whole share (every item counted; `want` refused it already past the bound
        on its own); raises RequestError 429 while others hold the room. A request whose handler
        already returned takes nothing."""
        with self._lock:
            if held.closed:
                return
            if self.used + held.wanted > self.limit:
                raise self._busy()
            self._settle(held)
            held.taken = held.wanted
            self.used += held.taken
            self._gauge.set(self.used)

    def give_back(self, held: "HeldMedia") -> None:
        with self._lock:
            if not held.taken:
                self._settle(held)
            self.used -= held.taken
            held.taken, held.closed = 0, True
            self._gauge.set(self.used)

    def _settle(self, held: "HeldMedia") -> None:
        """The request's pending bytes stop being pending (taken, or given back)."""
        if self._preparing.pop(id(held), None) is not None:
            self.pending -= held.wanted

    def _busy(self) -> "RequestError":
        return RequestError(429, f"the server is busy: images and videos of requests in flight hold {self.used + self.pending} of "
                                 f"{self.limit} bytes; retry later", type="rate_limit_error", headers={"Retry-After": "1"},
                            code="rate_limit_exceeded")


@dataclass(eq=False)
class HeldMedia:
    """One request's share of the MediaBudget."""

    wanted: int = 0  # bytes its items prepared so far
    taken: int = 0  # bytes it holds
    closed: bool = False  # given back: the request has ended
    refused: bool = False  # a 413, 429 or bad item while its items were prepared: the rest are skipped


def media_bytes(plan: Plan) -> int:
    """Bytes of the preprocessed images and videos a plan's sequence holds until its request ends."""
    if plan.seq is None:
        return 0
    return sum(img.patches.numel() * img.patches.element_size() for img in plan.seq.prompt.images)


def _blame(req: EmbeddingRequest, params: dict, field: str | None) -> str:
    """The `param` of an item's error: the item's own field, else a request-wide field every item took
    from the request (a top-level instruction too long for the model), else the item."""
    if field in params:
        return params[field]
    if field in ("instruction", "video_options") and getattr(req, field) is not None:
        return field
    return params[None]


def _truncation(req: EmbeddingRequest) -> int | None:
    """The request's prompt truncation as Engine.make_sequence takes it (vLLM's truncate_prompt_tokens, or TEI's truncate)."""
    return req.truncate_prompt_tokens if req.truncate_prompt_tokens is not None else -1 if req.truncate else None


def _error_body(message: str, param: str | None = None, type: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _ASCIIJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message may echo what a client sent,
    and a lone surrogate (valid in JSON text, not in UTF-8) would fail JSONResponse's encoding."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error(status: int, message: str, param: str | None = None, type: str = "invalid_request_error", headers: dict | None = None,
           code: str | None = None) -> JSONResponse:
    return _ASCIIJSONResponse(_error_body(message, param, type, code), status_code=status, headers=headers)


class _BodyTooLarge(HTTPException):
    """Raised from the body stream once it passes the limit (an HTTPException, so FastAPI lets it through)."""


class _Guard:
    """Outermost ASGI layer: API key, body-size limit, and request metrics (status, latency)."""

    def __init__(self, app, server: _Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s, path, start = self.server, scope["path"], time.perf_counter()
        status = [500]

        async def send_tracking(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            limit = s.settings.max_body_bytes
            if s.settings.api_key and path not in OPEN_PATHS and not self._authorized(headers):
                response = _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", type="authentication_error",
                                  headers={"WWW-Authenticate": "Bearer"}, code="invalid_api_key")
                return await response(scope, receive, send_tracking)
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await _error(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")(scope, receive, send_tracking)
            seen = [0]

            async def receive_limited():
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > limit:
                        raise _BodyTooLarge(413, f"request body exceeds the limit of {limit} bytes")
                return message

            await self.app(scope, receive_limited, send_tracking)
        finally:
            if path == "/v1/embeddings":
                s.metrics.requests.labels(str(status[0])).inc()
                s.metrics.latency.labels("request").observe(time.perf_counter() - start)

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.server.settings.api_key.encode())


class _Server:
    """Everything one app holds: the engine loop, the cache view, the metrics, the prep threads."""

    def __init__(self, engine, settings: ServerSettings, cache: ResultCache | None):
        self.engine, self.settings = engine, settings
        self.model_name = settings.model_name or Path(engine.checkpoint).name
        self.model_names = {self.model_name, Path(engine.checkpoint).name, *settings.model_aliases}
        budget = engine.tte.think.max_tokens
        self.max_trace_tokens = budget if settings.max_trace_tokens is None else settings.max_trace_tokens
        # what a request that gives no max_trace_tokens gets: the checkpoint's budget, never past the server's limit
        self.default_trace_tokens = min(budget, self.max_trace_tokens)
        engine.prompts.max_image_pixels = settings.max_image_pixels
        self.think = settings.think if settings.think is not None else self.default_trace_tokens > 0
        self.metrics = Metrics()
        self.cache = EngineCache(cache, engine) if cache is not None else None
        self.max_items = engine.config.max_num_seqs + settings.max_queue
        self.loop = EngineLoop(engine, max_items=self.max_items, metrics=self.metrics)
        self.prep = ThreadPoolExecutor(max_workers=settings.prep_threads, thread_name_prefix="tte-prep")
        self.media = MediaBudget(settings.max_media_bytes, self.metrics.media_bytes)
        self.created = int(time.time())
        self.stopped = False

    async def plan(self, req: EmbeddingRequest, items: list, params: list[dict], think: bool, left: threading.Event,
                   held: HeldMedia) -> list[Plan] | None:
        """Validate every item and consult the cache, the items spread over the prep threads (so a
        request's images decode in parallel, while the engine loop steps); None once the client has
        `left` (items not started by then are skipped). Each item's preprocessed media go into the
        request's share of the media budget (`held`). Raises RequestError naming the first bad item
        (or the part of `messages` to blame), or a media budget refusal.

        A request has at most `settings.prep_threads` items in the pool's queue at a time, so concurrent
        requests take turns: a one-item request arriving behind a 1,000-item one waits for a few of
        its items, not all of them."""
        start, aio = time.perf_counter(), asyncio.get_running_loop()
        turns = asyncio.Semaphore(self.settings.prep_threads)

        async def one(i: int, item) -> Plan | None:
            async with turns:
                return await aio.run_in_executor(self.prep, self._plan_one, req, item, i, params[i], think, left, held)

        plans = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)), return_exceptions=True)
        for p in plans:
            if isinstance(p, BaseException):
                raise p
        if left.is_set():
            return None
        self.media.take(held)
        self.metrics.latency.labels("validate").observe(time.perf_counter() - start)
        return plans

    def _plan_one(self, req: EmbeddingRequest, item, i: int, params: dict, think: bool, left: threading.Event, held: HeldMedia) -> Plan | None:
        if left.is_set() or self.media.over(held):
            return None
        try:
            with stop_decoding_when(left):  # a video still decoding when the client leaves stops at its next frame
                trace_tokens = self.default_trace_tokens if req.max_trace_tokens is None else req.max_trace_tokens
                plan = plan_item(self.engine, item, i, cache=self.cache, think=think, max_trace_tokens=trace_tokens,
                                 instruction=req.instruction, truncate_prompt_tokens=_truncation(req))
        except Cancelled:
            return None
        except InvalidInputError as exc:
            held.refused = True  # the request fails: its later items are not prepared (earlier ones have started: items start in order)
            param = _blame(req, params, exc.field)
            reason = exc.reason
            if req.messages is not None and exc.field and reason.startswith(exc.field + ":"):  # the item's field is ours, not the client's
                reason = param + reason[len(exc.field):]
            raise RequestError(400, reason, param) from exc
        self.media.want(held, media_bytes(plan), _blame(req, params, None))
        return plan

    def check(self, req: EmbeddingRequest) -> None:
        """The request-wide checks: the model's name, the server's limits, what this model can return,
        the settings every item shares (a bad one is the request's error, named by its field, not
        input[0]'s)."""
        if req.model is not None and req.model not in self.model_names:
            raise RequestError(404, f"The model '{req.model}' does not exist (this server serves '{self.model_name}')", "model",
                               code="model_not_found")
        if req.model_extra:
            logger.warning("ignoring unknown request field(s): %s", ", ".join(sorted(req.model_extra)))
        dim = self.engine.embedding_dim
        if req.dimensions is not None and req.dimensions > dim:
            raise RequestError(400, f"this model's embeddings have {dim} dimensions; got dimensions={req.dimensions}", "dimensions")
        if req.max_trace_tokens is not None and req.max_trace_tokens > self.max_trace_tokens:
            raise RequestError(400, f"max_trace_tokens={req.max_trace_tokens} exceeds this server's limit of {self.max_trace_tokens} "
                                    "(tte-serve --max-trace-tokens)", "max_trace_tokens")
        if req.normalize is False:
            raise RequestError(400, "normalize=false is not supported: this model's embeddings are always L2-normalized", "normalize")
        try:
            check_settings(True, req.max_trace_tokens, req.instruction, None, _truncation(req), None)
            self.engine.prompts.check_instruction(req.instruction)
            self.engine.prompts.video_options.updated(req.video_options)  # checked even when no item has a video
        except InvalidInputError as exc:
            raise RequestError(400, exc.reason, exc.field) from exc
        except VideoError as exc:
            raise RequestError(400, f"video_options: {exc}", "video_options") from exc

    def respond(self, plans: list[Plan], seqs: dict[int, object], req: EmbeddingRequest) -> bytes:
        """The response body (built off the event loop: large batches take a while to serialize)."""
        results, texts = self.finish(plans, seqs, req.return_trace)
        data = []
        for i, r in enumerate(results):
            vec = np.asarray(r.embedding, dtype="<f4")
            if req.dimensions is not None and req.dimensions < vec.shape[0]:  # Matryoshka-style: the first d, re-normalized
                vec = vec[: req.dimensions]
                vec = (vec / np.linalg.norm(vec)).astype("<f4")
            row = {"object": "embedding", "index": i,
                   "embedding": base64.b64encode(vec.tobytes()).decode() if req.encoding_format == "base64" else vec.tolist()}
            if texts is not None:
                row["trace"] = texts[i]
            data.append(row)
        return json.dumps({"object": "list", "data": data, "model": self.model_name, "usage": usage(results)}).encode()

    def finish(self, plans: list[Plan], seqs: dict[int, object], return_trace: bool) -> tuple[list[ItemResult], list[str] | None]:
        """Results in item order; new cache rows written; item and token counters moved."""
        results, traces, embeddings = [], [], []
        for plan in plans:
            if plan.result is not None:
                results.append(plan.result)
                continue
            result, t, e = finish_item(plan, seqs[plan.index])
            results.append(result)
            traces += t
            embeddings += e
        if self.cache is not None:
            self.cache.cache.put(traces, embeddings)
        m = self.metrics
        for r in results:
            m.items.labels({"embedding": "embedding_cache", "trace": "trace_cache"}.get(r.cached, "engine")).inc()
        u = usage(results)
        for phase in ("prompt", "trace", "cached_trace", "embed"):
            m.tokens.labels(phase).inc(u[f"{phase}_tokens"])
        texts = [self.engine.prompts.decode(r.trace_ids) for r in results] if return_trace else None
        return results, texts


def create_app(engine, settings: ServerSettings | None = None, cache: ResultCache | None = None) -> FastAPI:
    """An app serving `engine` (already loaded: /health is 200 as soon as the app runs)."""
    settings = settings or ServerSettings()
    server = _Server(engine, settings, cache)

    @asynccontextmanager
    async def lifespan(app):
        server.loop.start()
        logger.info("serving %s (dim %d, think=%s, batch %d, queue %d)", server.model_name, engine.embedding_dim, server.think,
                    engine.config.max_num_seqs, settings.max_queue)
        yield
        # uvicorn has stopped accepting and waited for in-flight requests; drain the loop and exit
        server.stopped = True
        await asyncio.to_thread(server.loop.stop)
        server.prep.shutdown(wait=True)
        logger.info("engine loop stopped")

    app = FastAPI(title="tte_engine", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_Guard, server=server)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return _error(exc.status, exc.message, exc.param, exc.type, exc.headers, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = errors[0].get("ctx", {}).get("error", "invalid JSON")
            return _error(400, f"the body is not valid JSON: {detail}")
        # a value that fits no member of a union fails once per member: report the deepest (most
        # specific) paths, without the members that failed at a path above them (an item with an
        # unknown key is that key's error, not also "should be a valid string")
        every = [(_field_path(e["loc"]), e["msg"]) for e in errors]
        found = sorted([(path, msg) for path, msg in every if not any(_inside(q, path) for q, _ in every)], key=lambda pm: -len(pm[0]))
        param = (found[0][0] if found else None) or None  # the body as a whole: no param
        messages = [f"{path or 'body'}: {msg}" for path, msg in found[:3]]
        return _error(422, "; ".join(messages) + (f" (and {len(found) - 3} more)" if len(found) > 3 else ""), param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        logger.exception("unhandled error in %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", type="server_error")

    @app.get("/health")
    async def health():
        if server.stopped or not server.loop.alive:
            return _error(503, "shutting down" if server.stopped else "the engine loop is not running", type="server_error")
        return {"status": "ok", "model": server.model_name}

    def card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "tte_engine",
                "embedding_dim": engine.embedding_dim, "think": server.think, "max_trace_tokens": server.max_trace_tokens,
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model not in server.model_names:
            raise RequestError(404, f"The model '{model}' does not exist (this server serves '{server.model_name}')", "model",
                               code="model_not_found")
        return card()

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        server.check(req)
        items, params = request_items(req, settings.local_files_root, settings.limit_mm_per_prompt)
        if len(items) > server.max_items:
            raise RequestError(422, f"{len(items)} items in one request; this server takes at most {server.max_items}", "input")
        think = server.think if req.think is None else req.think
        held = HeldMedia()
        try:
            return await _embed(req, request, items, params, think, held)
        finally:  # the request's sequences are done or dropped: its images and videos go back to the budget
            server.media.give_back(held)

    async def _embed(req: EmbeddingRequest, request: Request, items: list, params: list[dict], think: bool, held: HeldMedia) -> Response:
        aio = asyncio.get_running_loop()
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            left = threading.Event()
            prep = asyncio.ensure_future(server.plan(req, items, params, think, left, held))
            await asyncio.wait([prep, gone], return_when=asyncio.FIRST_COMPLETED)
            if not prep.done():  # the client went away while its items were validated: stop there
                left.set()
                prep.add_done_callback(lambda f: f.cancelled() or f.exception())
                return _error(499, "client closed the request")
            plans = prep.result()
            runnable = [p for p in plans if p.seq is not None]
            try:
                futures = server.loop.submit([p.seq for p in runnable]) if runnable else []
            except QueueFull as exc:
                raise RequestError(429, f"the server is busy: {exc}; retry later", type="rate_limit_error", headers={"Retry-After": "1"},
                                   code="rate_limit_exceeded") from exc
            except ShuttingDown as exc:
                raise RequestError(503, str(exc) or "the server is shutting down", type="server_error") from exc
            work = asyncio.gather(*futures)
            try:
                await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                server.loop.abort([p.seq for p in runnable])
                raise
        finally:
            gone.cancel()
        if not work.done():  # the client went away: free the engine for others
            server.loop.abort([p.seq for p in runnable])
            work.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits for it any more
            work.cancel()
            return _error(499, "client closed the request")
        try:
            done = work.result()
        except EngineFailure as exc:
            server.loop.abort([p.seq for p in runnable])  # its other items (a failed step ran only some) stop too
            raise RequestError(500, str(exc), type="server_error") from exc
        seqs = {p.index: s for p, s in zip(runnable, done)}
        for p in runnable:  # an item the model gave no usable result (a NaN embedding): the server's fault, not the input's
            if seqs[p.index].error is not None:
                where = _blame(req, params[p.index], None)
                raise RequestError(500, f"{where}: {seqs[p.index].error}", where, type="server_error")
        body = await aio.run_in_executor(server.prep, server.respond, plans, seqs, req)
        return Response(body, media_type="application/json")

    return app


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _inside(path: str, outer: str) -> bool:
    """Whether field path `path` (e.g. "input[0].text") lies strictly inside `outer` ("input[0]"; "" = the body)."""
    return path != outer and (not outer or path.startswith(outer + ".") or path.startswith(outer + "["))


def _field_path(loc) -> str:
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) not in _UNION_TAGS and not str(part)[:1].isupper() and "[" not in str(part):  # skip pydantic's union-member tags
            out += f".{part}" if out else str(part)
    return out
