"""tte-serve: N concurrent single-item clients vs one client sending the same N items one by one.

Both hit the same running server (bench-small, CPU, 24-token traces that never stop early), so the
ratio is the batching gain of merging concurrent HTTP requests into the engine's continuous batch.
Measured: wall time of the 16 concurrent requests (the benchmark's rounds, median) and of the same
16 sent one after another by one client (ROUNDS rounds, perf_counter, median), after a warm-up of
each whose answers must agree (cosine >= 0.99999; the only failure). The gain is printed beside
both times and stored in `extra_info`; the target (>= 2x) is reported against, never asserted.
"""

import asyncio
import base64
import io
import socket
import statistics
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from tte_engine import Engine  # noqa: E402
from tte_engine.serve import ServerSettings, create_app  # noqa: E402

TRACE_TOKENS = 24
ROUNDS = 3
TARGET_GAIN = 2.0  # reported, not asserted


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server_url(bench_small, engine_options):
    app = create_app(Engine(bench_small, **engine_options), ServerSettings(prep_threads=2))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(60)


def test_bench_serve_concurrent_clients_vs_one_client(benchmark, server_url, image_text_items):
    texts = ["a cat on a red chair", "two dogs play with a ball in the park", "a man rides a bicycle along the river at sunset",
             "a bowl of fruit on a table", "a city street with cars and buses", "a diagram of a neural network",
             "the quick brown fox jumps over the lazy dog", "a table of numbers with a title and a date"]
    items = texts + [{"text": it["text"], "image": _data_url(it["image"])} for it in image_text_items]  # 16 items

    def body(item):
        return {"input": [item], "max_trace_tokens": TRACE_TOKENS}

    def one_client():
        with httpx.Client(base_url=server_url, timeout=300) as c:
            return [c.post("/v1/embeddings", json=body(it)).json()["data"][0]["embedding"] for it in items]

    def concurrent_clients():
        async def run():
            async with httpx.AsyncClient(base_url=server_url, timeout=300, limits=httpx.Limits(max_connections=len(items))) as c:
                responses = await asyncio.gather(*(c.post("/v1/embeddings", json=body(it)) for it in items))
            return [r.json()["data"][0]["embedding"] for r in responses]

        return asyncio.run(run())

    sequential_answers = one_client()  # warm-up, and the answers to check
    concurrent_answers = concurrent_clients()
    for a, b in zip(sequential_answers, concurrent_answers):
        assert float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0)) >= 0.99999

    sequential_times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        one_client()
        sequential_times.append(time.perf_counter() - start)
    benchmark.pedantic(concurrent_clients, rounds=ROUNDS, warmup_rounds=0)
    concurrent_s = benchmark.stats.stats.median
    sequential_s = statistics.median(sequential_times)
    gain = sequential_s / concurrent_s
    benchmark.extra_info.update(sequential_median_s=round(sequential_s, 4), concurrent_median_s=round(concurrent_s, 4),
                                batching_gain=round(gain, 2), target_gain=TARGET_GAIN, meets_target=gain >= TARGET_GAIN, items=len(items), trace_tokens=TRACE_TOKENS, threads=torch.get_num_threads(),
                                sequential_items_per_s=round(len(items) / sequential_s, 2), concurrent_items_per_s=round(len(items) / concurrent_s, 2))
    print(f"\n[serve] {len(items)} items: one client {sequential_s:.3f}s ({len(items) / sequential_s:.1f} items/s) | "
          f"{len(items)} concurrent clients {concurrent_s:.3f}s ({len(items) / concurrent_s:.1f} items/s) | "
          f"batching gain {gain:.2f}x (target >= {TARGET_GAIN}x: {'met' if gain >= TARGET_GAIN else 'NOT met'}; "
          f"{torch.get_num_threads()} threads)")
