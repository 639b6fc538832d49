"""Serving fixtures: real uvicorn servers on free loopback ports, each in a thread, and helpers."""

import base64
import io
import socket
import threading
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from oracle import random_image  # noqa: E402

from tte_engine import Engine  # noqa: E402
from tte_engine.serve import ServerSettings, create_app  # noqa: E402


def png_bytes(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    random_image(h, w, seed).save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    app: object
    uvicorn: uvicorn.Server
    thread: threading.Thread

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {'name{labels}': value}."""
        text = httpx.get(self.url + "/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


def start_server(engine, settings: ServerSettings | None = None, cache=None) -> RunningServer:
    """Serve `engine` on a free port from a thread (the engine loop then runs in a thread of its own)."""
    app = create_app(engine, settings or ServerSettings(prep_threads=2), cache)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", app, server, thread)


@pytest.fixture(scope="session")
def serve_checkpoint(make_checkpoint):
    """tiny-random with an 8-token trace budget (short traces keep the server tests fast)."""
    return make_checkpoint("serve", think_max_tokens=8)


@pytest.fixture(scope="session")
def reference(serve_checkpoint):
    """An Engine of its own (the servers' engines belong to their loop threads): the expected answers."""
    return Engine(serve_checkpoint)


@pytest.fixture(scope="module")
def client(server):
    """An HTTP client of the module's own `server` fixture."""
    with server.client() as c:
        yield c
