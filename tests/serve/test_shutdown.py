"""`tte-serve` as a process: SIGTERM stops accepting, lets the in-flight request finish, and exits 0."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tte_engine.random_checkpoint import never_stop

from .conftest import free_port

TRACE = 1000  # every trace runs all of it (stop tokens never win): the request stays in flight for seconds


@pytest.fixture
def endless_checkpoint(serve_checkpoint, tmp_path):
    return never_stop(shutil.copytree(serve_checkpoint, tmp_path / "endless"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_finishes_in_flight_requests_then_exits(endless_checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tte_engine.serve.main", "--checkpoint", str(endless_checkpoint), "--port", str(port), "--device", "cpu",
         "--log-level", "warning", "--max-trace-tokens", str(TRACE)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "tte-serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

        result = {}

        def long_request():
            body = {"input": [f"in flight {i}" for i in range(8)], "max_trace_tokens": TRACE}
            result["r"] = httpx.post(url + "/v1/embeddings", json=body, timeout=120)

        t = threading.Thread(target=long_request)
        t.start()
        while "tte_running_items 8.0" not in httpx.get(url + "/metrics", timeout=5).text:  # the engine is working on it
            assert t.is_alive()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        refused = False
        while not refused and t.is_alive():  # the listener closes at once
            try:
                httpx.get(url + "/health", timeout=2)
                time.sleep(0.02)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                # refused; or, under load, accepted by the closing listener's backlog and then reset
                # or dropped unanswered (seen once with the machine's two cores busy): closed either way
                refused = True
        assert refused and t.is_alive(), "the listener should close while the request is still running"
        t.join(120)
        assert result["r"].status_code == 200 and len(result["r"].json()["data"]) == 8, result["r"].text[:500]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
