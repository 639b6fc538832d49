"""The FastAPI app: OpenAI-compatible `/v1/embeddings`, `/v1/models`, `/health`, `/metrics`.

A request is validated and tokenized in a small thread pool (images are decoded there too, and
the cache consulted), its sequences go to the one engine loop thread, and the handler awaits
them; so concurrent requests share the engine's continuous batch. Errors use OpenAI's body,
`{"error": {"message", "type", "param", "code"}}`, naming the bad field or item.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
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

from ..errors import InvalidInputError
from ..result_cache import EngineCache, ItemResult, Plan, ResultCache, finish_item, plan_item, usage
from .loop import EngineFailure, EngineLoop, QueueFull, ShuttingDown
from .metrics import Metrics
from .protocol import EmbeddingRequest, RequestError, request_items

logger = logging.getLogger("tte_engine")


@dataclass
class ServerSettings:
    model_name: str | None = None  # the name /v1/models and responses report (default: the checkpoint directory's name)
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    max_queue: int = 1024  # items waiting beyond the engine's batch before requests get 429
    max_body_bytes: int = 32 << 20  # larger bodies get 413
    local_files_root: Path | None = None  # image paths allowed under this directory; None: data: URLs only
    prep_threads: int = 4  # threads that validate, tokenize and decode images
    think: bool | None = None  # default for requests that do not say; None: think when the checkpoint has a trace budget


def _error_body(status: int, message: str, param: str | None = None, type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def _error(status: int, message: str, param: str | None = None, type: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param, type), status_code=status, headers=headers)


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
            if s.settings.api_key and path.startswith("/v1/") and not self._authorized(headers):
                response = _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", type="authentication_error",
                                  headers={"WWW-Authenticate": "Bearer"})
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
        self.think = settings.think if settings.think is not None else engine.tte.think.max_tokens > 0
        self.metrics = Metrics()
        self.cache = EngineCache(cache, engine) if cache is not None else None
        self.max_items = engine.config.max_num_seqs + settings.max_queue
        self.loop = EngineLoop(engine, max_items=self.max_items, metrics=self.metrics)
        self.prep = ThreadPoolExecutor(max_workers=settings.prep_threads, thread_name_prefix="tte-prep")
        self.created = int(time.time())
        self.stopped = False

    def plan(self, req: EmbeddingRequest, items: list, field: str, think: bool) -> list[Plan]:
        start = time.perf_counter()
        plans = []
        for i, item in enumerate(items):
            try:
                plans.append(plan_item(self.engine, item, i, cache=self.cache, think=think, max_trace_tokens=req.max_trace_tokens, instruction=req.instruction))
            except InvalidInputError as exc:
                raise RequestError(400, exc.reason, f"input[{i}]" if field == "input" else "messages") from exc
        self.metrics.latency.labels("validate").observe(time.perf_counter() - start)
        return plans

    def respond(self, plans: list[Plan], seqs: dict[int, object], req: EmbeddingRequest) -> bytes:
        """The response body (built off the event loop: large batches take a while to serialize)."""
        results, texts = self.finish(plans, seqs, req.return_trace)
        data = []
        for i, r in enumerate(results):
            vec = np.asarray(r.embedding, dtype="<f4")
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
        return _error(exc.status, exc.message, exc.param, exc.type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = errors[0].get("ctx", {}).get("error", "invalid JSON")
            return _error(400, f"the body is not valid JSON: {detail}")
        # a value that fits no member of a union fails once per member: report the deepest (most specific) path
        errors = sorted(errors, key=lambda e: -len(_field_path(e["loc"])))
        param = _field_path(errors[0]["loc"]) if errors else None
        messages = [f"{_field_path(e['loc']) or 'body'}: {e['msg']}" for e in errors[:3]]
        return _error(422, "; ".join(messages) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""), param)

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

    @app.get("/v1/models")
    async def models():
        card = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "tte_engine",
                "embedding_dim": engine.embedding_dim, "think": server.think, "max_trace_tokens": engine.tte.think.max_tokens,
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        items, field = request_items(req, settings.local_files_root)
        if req.dimensions is not None and req.dimensions != engine.embedding_dim:
            raise RequestError(400, f"this model's embeddings have {engine.embedding_dim} dimensions; got dimensions={req.dimensions}", "dimensions")
        if len(items) > server.max_items:
            raise RequestError(422, f"{len(items)} items in one request; this server takes at most {server.max_items}", field)
        think = server.think if req.think is None else req.think
        aio = asyncio.get_running_loop()
        plans = await aio.run_in_executor(server.prep, server.plan, req, items, field, think)
        runnable = [p for p in plans if p.seq is not None]
        try:
            futures = server.loop.submit([p.seq for p in runnable]) if runnable else []
        except QueueFull as exc:
            raise RequestError(429, f"the server is busy: {exc}; retry later", type="rate_limit_error", headers={"Retry-After": "1"}) from exc
        except ShuttingDown as exc:
            raise RequestError(503, str(exc) or "the server is shutting down", type="server_error") from exc
        work = asyncio.gather(*futures)
        gone = asyncio.ensure_future(_disconnected(request))
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
            raise RequestError(500, str(exc), type="server_error") from exc
        seqs = {p.index: s for p, s in zip(runnable, done)}
        body = await aio.run_in_executor(server.prep, server.respond, plans, seqs, req)
        return Response(body, media_type="application/json")

    return app


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
