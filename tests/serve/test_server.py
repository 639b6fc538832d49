"""tte-serve for real: uvicorn on a loopback port, httpx clients, answers checked against Engine.embed."""

import asyncio
import base64
import json
import math
import sqlite3
import threading
import time
from contextlib import closing

import httpx
import numpy as np
import pytest
import torch

from tte_engine import Engine
from tte_engine.result_cache import EngineCache, ResultCache, embed_items
from tte_engine.serve import ServerSettings
from tte_engine.serve.protocol import RequestError, resolve_image

from .conftest import data_url, png_bytes, start_server


def cos(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a, dtype=np.float32)), torch.as_tensor(np.asarray(b, dtype=np.float32))
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def vectors(body) -> list:
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "embedding" for d in body["data"])
    return [d["embedding"] for d in body["data"]]


@pytest.fixture(scope="module")
def server(serve_checkpoint):
    s = start_server(Engine(serve_checkpoint), ServerSettings(prep_threads=2, max_body_bytes=256 << 10, max_trace_tokens=4000))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def images():
    return [png_bytes(60, 90, 1), png_bytes(130, 50, 2), png_bytes(64, 64, 3)]


def test_health_and_models(client, reference):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == reference.checkpoint.name
    assert models["data"][0]["embedding_dim"] == reference.embedding_dim


def test_text_inputs_match_the_engine(client, reference):
    single = client.post("/v1/embeddings", json={"input": "a cat on a chair", "model": reference.checkpoint.name}).json()
    batch = client.post("/v1/embeddings", json={"input": ["a cat on a chair", "two dogs in a park"]}).json()
    expected = reference.embed(["a cat on a chair", "two dogs in a park"])
    assert single["model"] == reference.checkpoint.name and len(single["data"]) == 1
    assert cos(vectors(single)[0], expected.embeddings[0]) >= 0.99999
    for got, want in zip(vectors(batch), expected.embeddings):
        assert cos(got, want) >= 0.99999
    u = batch["usage"]
    assert u["prompt_tokens"] == expected.usage["prompt_tokens"] and u["trace_tokens"] == expected.usage["trace_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["trace_tokens"] + u["embed_tokens"]


def test_image_data_urls_and_a_mixed_batch(client, reference, images):
    body = {"input": ["a red chair", {"text": "What is shown?", "image": data_url(images[0])}, {"image": data_url(images[1])},
                      {"text": "find it", "image": data_url(images[2]), "instruction": "retrieval"}]}
    got = vectors(client.post("/v1/embeddings", json=body).json())
    expected = reference.embed(["a red chair", {"text": "What is shown?", "image": images[0]}, {"image": images[1]},
                                {"text": "find it", "image": images[2], "instruction": "retrieval"}])
    for g, e in zip(got, expected.embeddings):
        assert cos(g, e) >= 0.99999
    assert cos(got[1], got[2]) < 0.999  # distinct inputs, distinct answers


def test_chat_messages(client, reference, images):
    messages = [
        {"role": "system", "content": "Find the matching photo."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[0])}}, {"type": "text", "text": "a small photo"}]},
    ]
    got = vectors(client.post("/v1/embeddings", json={"messages": messages}).json())
    expected = reference.embed([{"text": "a small photo", "image": images[0], "instruction": "Find the matching photo."}])
    assert len(got) == 1 and cos(got[0], expected.embeddings[0]) >= 0.99999


def test_think_on_off_and_return_trace(client, reference):
    items = ["a cat on a chair", "a diagram of a network"]
    on = client.post("/v1/embeddings", json={"input": items, "return_trace": True}).json()
    off = client.post("/v1/embeddings", json={"input": items, "think": False, "return_trace": True}).json()
    short = client.post("/v1/embeddings", json={"input": items, "max_trace_tokens": 3, "return_trace": True}).json()
    plain = client.post("/v1/embeddings", json={"input": items}).json()
    want_on, want_off = reference.embed(items), reference.embed(items, think=False)
    assert [d["trace"] for d in on["data"]] == want_on.traces and all(want_on.traces)
    assert [d["trace"] for d in off["data"]] == ["", ""] and off["usage"]["trace_tokens"] == 0
    assert "trace" not in plain["data"][0]
    assert 0 < short["usage"]["trace_tokens"] <= 6
    for i in range(2):
        assert cos(on["data"][i]["embedding"], want_on.embeddings[i]) >= 0.99999
        assert cos(off["data"][i]["embedding"], want_off.embeddings[i]) >= 0.99999
    assert cos(on["data"][0]["embedding"], off["data"][0]["embedding"]) < 0.9999  # the trace changes the vector


def test_base64_encoding(client):
    body = {"input": ["a cat", "a dog"]}
    floats = client.post("/v1/embeddings", json=body).json()
    packed = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for f, p in zip(vectors(floats), vectors(packed)):
        decoded = np.frombuffer(base64.b64decode(p), dtype="<f4")
        assert np.array_equal(decoded, np.asarray(f, dtype=np.float32))


def _error(response, status: int, param=None, contains: str = "", code=None) -> dict:
    """The response is an OpenAI error body: this status, `param` (when given), `code` a string or null."""
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and contains in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_error_codes_name_the_bad_field_or_item(client, images, tmp_path):
    post = lambda body: client.post("/v1/embeddings", json=body)  # noqa: E731
    # malformed bodies
    _error(client.post("/v1/embeddings", content=b'{"input": "x",', headers={"content-type": "application/json"}), 400, contains="not valid JSON")
    _error(post({"input": 5}), 422, "input")
    _error(post({"input": ["ok", {"txt": "x"}]}), 422, "input[1].txt", "Extra inputs")
    _error(post({"input": "x", "messages": [{"role": "user", "content": "y"}]}), 422, "input", "exactly one")
    _error(post({}), 422, "input", "exactly one")
    _error(post({"input": "x", "max_trace_tokens": -1}), 422, "max_trace_tokens")
    _error(post({"input": "x", "encoding_format": "int8"}), 422, "encoding_format")
    _error(post({"messages": [{"role": "assistant", "content": "x"}]}), 422, "messages[0].role")
    _error(post({"input": "x", "dimensions": 10**6}), 400, "dimensions")
    _error(post({"input": "x", "dimensions": 0}), 422, "dimensions")
    # bad items, named by index
    _error(post({"input": []}), 400, "input", "empty")
    _error(post({"input": ["fine", "   "]}), 400, "input[1]", "empty item")
    _error(post({"input": ["fine", {"image": "data:image/png;base64,AAAA"}]}), 400, "input[1].image", "cannot decode")
    _error(post({"input": ["fine", {"image": "data:image/png;base64,@@notbase64@@"}]}), 400, "input[1].image", "image")
    _error(post({"input": ["fine", "word " * 5000]}), 400, "input[1]", "exceeds the model limit")
    _error(post({"input": [{"image": "https://example.com/cat.png"}]}), 400, "input[0].image", "never fetched")
    (tmp_path / "cat.png").write_bytes(images[0])
    _error(post({"input": [{"image": str(tmp_path / "cat.png")}]}), 400, "input[0].image", "--allow-local-files")
    two = [{"type": "image_url", "image_url": {"url": data_url(images[0])}}, {"type": "image_url", "image_url": {"url": data_url(images[1])}}]
    three = two + [{"type": "image_url", "image_url": data_url(images[2])}] * 7
    _error(post({"messages": [{"role": "user", "content": three}]}), 400, "messages", "9 images in one item; this server takes at most 8")
    _error(post({"input": [{"images": [data_url(images[0])] * 9}]}), 400, "input[0]", "at most 8")
    # oversized bodies: declared length, and a chunked body without one
    big = {"input": "x" * (300 << 10)}
    _error(post(big), 413, contains="exceeds the limit")
    chunks = (part for part in [b'{"input": "', b"y" * (200 << 10), b"y" * (200 << 10), b'"}'])
    _error(client.post("/v1/embeddings", content=chunks, headers={"content-type": "application/json"}), 413, contains="exceeds the limit")
    # the server is unharmed
    assert client.get("/health").status_code == 200
    assert len(post({"input": ["still fine"]}).json()["data"]) == 1


def test_a_bad_request_does_not_disturb_concurrent_good_ones(server, reference):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            good = [c.post("/v1/embeddings", json={"input": f"good item {i}"}) for i in range(4)]
            bad = [c.post("/v1/embeddings", json={"input": ["x", {"image": "data:image/png;base64,AAAA"}]}) for _ in range(2)]
            return await asyncio.gather(*good, *bad)

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 4 + [400] * 2
    expected = reference.embed([f"good item {i}" for i in range(4)])
    for r, e in zip(responses, expected.embeddings):
        assert cos(r.json()["data"][0]["embedding"], e) >= 0.99999


def test_a_request_with_a_bad_item_prepares_no_more_of_its_items(server, images, monkeypatch):
    """After one item's 400 the request's later items are skipped, not prepared (a review found a failed
    request decoding its other images and holding their budget while good requests got 429s). The
    item named is still the first bad one (items start in order)."""
    import tte_engine.serve.app as app_module

    prepared = []
    real = app_module.plan_item

    def counting(engine, item, i, **kw):
        prepared.append(i)
        return real(engine, item, i, **kw)

    monkeypatch.setattr(app_module, "plan_item", counting)
    good = {"image": data_url(images[2])}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        _error(c.post("/v1/embeddings", json={"input": ["x", {"image": "data:image/png;base64,AAAA"}] + [good] * 12}), 400, "input[1].image")
        _error(c.post("/v1/embeddings", json={"input": [{"image": "data:image/png;base64,AAAA"}, good, {"image": "data:image/png;base64,BBBB"}] + [good] * 12}),
               400, "input[0].image")
    assert len(prepared) <= 10, prepared  # of 29 items: those started before the bad one failed (2 prep threads)


def test_32_concurrent_clients_share_the_batch(server, reference):
    rng_items = [f"query number {i}: " + " ".join(["cats", "dogs", "trees", "cars"][j % 4] for j in range(i % 7 + 1)) for i in range(28)]
    imgs = [png_bytes(40 + 10 * k, 60, 100 + k) for k in range(4)]
    items = rng_items + [{"text": f"picture {k}", "image": data_url(b)} for k, b in enumerate(imgs)]
    before = server.metrics()

    async def one(c, item):
        r = await c.post("/v1/embeddings", json={"input": [item]})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["embedding"]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c, it) for it in items))

    got = np.asarray(asyncio.run(run()), dtype=np.float32)
    expected = reference.embed(rng_items + [{"text": f"picture {k}", "image": b} for k, b in enumerate(imgs)])
    for i in range(len(items)):
        assert cos(got[i], expected.embeddings[i]) >= 0.99999, i
    sims = got @ got.T
    assert (sims[~np.eye(len(items), dtype=bool)] < 0.9999).all()  # 32 distinct answers, none crossed over
    after = server.metrics()
    steps = after["tte_batch_size_count"] - before.get("tte_batch_size_count", 0)
    seqs = after["tte_batch_size_sum"] - before.get("tte_batch_size_sum", 0)
    assert seqs / steps > 4, (seqs, steps)  # requests were merged into shared steps, not run one at a time


def test_a_client_that_goes_away_frees_the_engine(server):
    before = server.metrics()
    body = {"input": [f"abandoned {i}" for i in range(4)], "max_trace_tokens": 3000}  # ~10 s of work if it ran to the end
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/embeddings", json=body, timeout=httpx.Timeout(60, read=0.5))
    gave_up = time.monotonic()
    while server.metrics()["tte_running_items"] + server.metrics()["tte_queue_depth"] > 0:
        assert time.monotonic() - gave_up < 3, "the abandoned request kept the engine busy"
        time.sleep(0.02)
    after = server.metrics()
    assert after['tte_requests_total{status="499"}'] - before.get('tte_requests_total{status="499"}', 0) == 1


def test_a_client_that_goes_away_stops_its_video_decoding(server, monkeypatch):
    """A video still being decoded when its client disconnects stops at its next frame (a clip may
    take a minute of CPU within its pixel budget): the prep thread is free again, the request is a
    499, and nothing is reported as the item's error."""
    pytest.importorskip("av")
    from mm_oracle import encode_video, random_frames

    from tte_engine import video as video_mod

    clip = "data:video/mp4;base64," + base64.b64encode(encode_video(random_frames(16, 48, 64, seed=5))).decode()
    started, release, ended, resized = threading.Event(), threading.Event(), [], []
    real_resize, real_decode = video_mod._resize, video_mod.decode_video

    def resize(frames, size):  # the first sampled frame holds the decode until the client has gone
        resized.append(1)
        started.set()
        release.wait(30)
        return real_resize(frames, size)

    def decode(*args, **kwargs):
        try:
            return real_decode(*args, **kwargs)
        except BaseException as exc:
            ended.append(exc)
            raise
        finally:
            ended.append(None)

    monkeypatch.setattr(video_mod, "_resize", resize)
    monkeypatch.setattr(video_mod, "decode_video", decode)
    before = server.metrics()
    body = {"input": [{"text": "a clip", "video": clip, "video_options": {"num_frames": 8, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 4}}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/embeddings", json=body, timeout=httpx.Timeout(60, read=0.5))
    assert started.wait(30)
    deadline = time.monotonic() + 10
    while server.metrics().get('tte_requests_total{status="499"}', 0) == before.get('tte_requests_total{status="499"}', 0):
        assert time.monotonic() < deadline, "the server did not notice the client leave"
        time.sleep(0.02)
    release.set()
    deadline = time.monotonic() + 30
    while not ended:
        assert time.monotonic() < deadline, "the decode did not end"
        time.sleep(0.02)
    assert isinstance(ended[0], video_mod.Cancelled) and len(resized) == 1  # stopped after 1 of its 8 frames


def test_metrics_counters_move(server, client):
    before = server.metrics()
    assert client.post("/v1/embeddings", json={"input": ["metrics one", "metrics two"]}).status_code == 200
    assert client.post("/v1/embeddings", json={"input": ""}).status_code == 400
    after = server.metrics()

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta('tte_requests_total{status="200"}') == 1 and delta('tte_requests_total{status="400"}') == 1
    assert delta('tte_items_total{source="engine"}') == 2
    assert delta('tte_tokens_total{phase="prompt"}') > 0 and delta('tte_tokens_total{phase="trace"}') > 0
    for phase in ("validate", "queue", "think", "embed", "request"):
        assert delta(f'tte_latency_seconds_count{{phase="{phase}"}}') >= 1, phase
    assert after["tte_queue_depth"] == 0 and after["tte_running_items"] == 0
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE tte_latency_seconds histogram" in text and "# TYPE tte_batch_size histogram" in text


def test_prefix_cache_reuse_is_reported(server, client):
    """OpenAI's usage.prompt_tokens_details.cached_tokens and the Prometheus prefix-cache counters."""
    url = "data:image/png;base64," + base64.b64encode(png_bytes(70, 90, 4242)).decode()  # an image no other test sends
    body = {"input": [{"text": "what is this?", "image": url}], "think": False}
    before = server.metrics()
    first = client.post("/v1/embeddings", json=body).json()
    second = client.post("/v1/embeddings", json=body).json()
    after = server.metrics()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert second["data"][0]["embedding"] == pytest.approx(first["data"][0]["embedding"], abs=1e-5)
    assert after["tte_prefix_cache_hits_total"] > before.get("tte_prefix_cache_hits_total", 0)
    assert after["tte_prefix_cache_queries_total"] >= after["tte_prefix_cache_hits_total"]
    assert 0 < after["tte_prefix_cache_hit_rate"] <= 1


def test_auth_queue_limit_cache_and_local_files(serve_checkpoint, reference, images, tmp_path):
    """A second server: API key, a small queue (429), a result cache, and local files under one root."""
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "cat.png").write_bytes(images[0])
    (tmp_path / "outside.png").write_bytes(images[0])
    (tmp_path / "ok" / "link.png").symlink_to(tmp_path / "outside.png")
    settings = ServerSettings(api_key="s3cret", max_queue=2, local_files_root=(tmp_path / "ok").resolve(), prep_threads=2, max_trace_tokens=40)
    cache = ResultCache(tmp_path / "cache.sqlite")
    engine = Engine(serve_checkpoint, max_num_seqs=2)
    steps_allowed = threading.Event()  # the 429 check below holds the engine still, however fast it is
    steps_allowed.set()
    real_step = engine.step
    engine.step = lambda: steps_allowed.wait(60) and real_step()
    srv = start_server(engine, settings, cache)
    try:
        auth = {"Authorization": "Bearer s3cret"}
        with srv.client() as anon, srv.client(headers=auth) as c:
            _error(anon.post("/v1/embeddings", json={"input": "x"}), 401, contains="API key", code="invalid_api_key")
            for path in ("/v1/models", "/docs", "/redoc", "/openapi.json", "/no-such-path"):  # everything but the probes needs the key
                _error(anon.get(path), 401, code="invalid_api_key")
            _error(anon.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
            assert anon.get("/health").status_code == 200 and anon.get("/metrics").status_code == 200  # probes and scrapers need no key
            assert c.get("/openapi.json").status_code == 200

            # the cache: the second identical request generates no trace
            first = c.post("/v1/embeddings", json={"input": ["cache me", "and me"], "return_trace": True}).json()
            second = c.post("/v1/embeddings", json={"input": ["cache me", "and me"], "return_trace": True}).json()
            assert first["usage"]["trace_tokens"] > 0 and first["usage"]["cached_trace_tokens"] == 0
            assert second["usage"]["trace_tokens"] == 0 and second["usage"]["cached_trace_tokens"] == first["usage"]["trace_tokens"]
            assert [d["trace"] for d in second["data"]] == [d["trace"] for d in first["data"]]
            assert vectors(second) == vectors(first)
            assert srv.metrics()['tte_items_total{source="embedding_cache"}'] == 2

            # local files: under the root only
            local = c.post("/v1/embeddings", json={"input": [{"image": str(tmp_path / "ok" / "cat.png")}]})
            assert local.status_code == 200
            assert cos(vectors(local.json())[0], reference.embed([{"image": images[0]}]).embeddings[0]) >= 0.99999
            _error(c.post("/v1/embeddings", json={"input": [{"image": str(tmp_path / "outside.png")}]}), 400, "input[0].image", "must lie under")
            for escape in (str(tmp_path / "ok" / ".." / "outside.png"), str(tmp_path / "ok" / "link.png")):
                _error(c.post("/v1/embeddings", json={"input": [{"image": escape}]}), 400, "input[0].image", "must lie under")
            for unusable in (str(tmp_path / "ok" / "cat\x00.png"), "~no-such-tte-user/cat.png"):  # 400, not a 500
                _error(c.post("/v1/embeddings", json={"input": ["x", {"image": unusable}]}), 400, "input[1].image", "not a usable local image path")

            # 429: 2 running + 2 queued fill the server; one more item is refused until they finish
            busy = {}

            def occupy():
                with srv.client(headers=auth) as busy_client:
                    busy["r"] = busy_client.post("/v1/embeddings", json={"input": [f"busy {i}" for i in range(4)], "max_trace_tokens": 40})

            steps_allowed.clear()
            t = threading.Thread(target=occupy)
            t.start()
            deadline = time.monotonic() + 30
            while srv.metrics().get("tte_queue_depth", 0) + srv.metrics().get("tte_running_items", 0) < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = c.post("/v1/embeddings", json={"input": "one more"})
            _error(refused, 429, contains="busy", code="rate_limit_exceeded")
            assert refused.headers["retry-after"] == "1"
            _error(c.post("/v1/embeddings", json={"input": ["x"] * 5}), 422, "input", "at most 4")
            steps_allowed.set()
            t.join(60)
            assert busy["r"].status_code == 200 and len(busy["r"].json()["data"]) == 4
            assert c.post("/v1/embeddings", json={"input": "one more"}).status_code == 200
    finally:
        steps_allowed.set()
        srv.stop()
        cache.close()


def test_media_budget_counts_what_requests_are_still_preparing():
    """Pending bytes (items prepared, the request not yet holding its share) count against the bound:
    requests preparing side by side used to gather up to the bound each. The oldest request still
    preparing is refused only at `take`, so competing requests never all fail; one that can never
    fit is a 413, not a 429; a request that has ended counts nothing more."""
    from tte_engine.serve.app import HeldMedia, MediaBudget

    class Gauge:
        def set(self, value):
            self.value = value

    budget = MediaBudget(25, Gauge())

    def status(call):
        try:
            call()
        except RequestError as exc:
            return exc.status
        return 200

    a, b = HeldMedia(), HeldMedia()
    budget.want(a, 10, "input[0]")
    budget.want(b, 10, "input[0]")  # 20 of 25
    budget.want(a, 10, "input[1]")  # the oldest: allowed past the bound while it prepares
    assert status(lambda: budget.want(b, 10, "input[1]")) == 429 and budget.over(b)  # its remaining items are skipped
    assert (budget.used, budget.pending) == (0, 30)
    budget.take(a)
    assert (budget.used, budget.pending) == (20, 10)
    budget.give_back(b)
    assert (budget.used, budget.pending) == (20, 0)
    c = HeldMedia()
    budget.want(c, 10, "input[0]")  # the oldest preparing now, refused at take: a holds the room
    assert status(lambda: budget.take(c)) == 429
    budget.give_back(c)
    d, e = HeldMedia(), HeldMedia()
    budget.want(d, 10, "input[0]")
    assert status(lambda: budget.want(e, 10, "input[0]")) == 429  # 20 held + 10 pending + 10 > 25
    budget.give_back(e)
    budget.want(d, 10, "input[1]")
    # 30 of its own: never fits, a 413 at once and its later items skipped (a review found requests
    # past the bound on their own still counting their items until `take`: 6-13x the bound together)
    assert status(lambda: budget.want(d, 10, "input[2]")) == 413 and budget.over(d)
    assert budget.pending == 20
    f = HeldMedia()
    assert status(lambda: budget.want(f, 30, "input[0]")) == 400 and budget.over(f)  # one item over the bound
    budget.give_back(d)
    budget.give_back(a)
    budget.give_back(f)
    budget.want(f, 10, "input[1]")  # an item finishing after its request ended counts nothing
    assert (budget.used, budget.pending) == (0, 0)


def test_media_budget_bounds_what_requests_in_flight_hold(serve_checkpoint, reference, images):
    """--max-media-bytes: the preprocessed images and videos of the requests in flight are bounded.
    An item alone over it is a 400 naming the item, a request whose own items pass it a 413, one
    arriving while others hold it a 429 (Retry-After); what a request held goes back when it ends,
    however it ends (the gauge shows it)."""
    one = sum(i.patches.numel() * i.patches.element_size() for i in reference.make_sequence({"image": images[2]}).prompt.images)
    engine = Engine(serve_checkpoint, max_num_seqs=4)
    steps_allowed = threading.Event()
    steps_allowed.set()
    real_step = engine.step
    engine.step = lambda: steps_allowed.wait(60) and real_step()
    srv = start_server(engine, ServerSettings(prep_threads=2, max_media_bytes=int(2.5 * one)))
    image = data_url(images[2])
    try:
        with srv.client() as c:
            _error(c.post("/v1/embeddings", json={"input": ["x", {"images": [image] * 3}]}), 400, "input[1]", "--max-media-bytes")
            _error(c.post("/v1/embeddings", json={"input": [{"image": image}] * 3}), 413, "input", "send fewer per request")
            assert srv.metrics()["tte_media_bytes"] == 0
            held = {}

            def occupy():
                with srv.client() as busy_client:
                    held["r"] = busy_client.post("/v1/embeddings", json={"input": [{"image": image}, {"text": "a", "image": image}]})

            steps_allowed.clear()  # the engine holds still: the first request's two images stay in flight
            t = threading.Thread(target=occupy)
            t.start()
            deadline = time.monotonic() + 30
            while srv.metrics()["tte_media_bytes"] < 2 * one:
                assert time.monotonic() < deadline and t.is_alive()
                time.sleep(0.01)
            refused = c.post("/v1/embeddings", json={"input": [{"image": image}]})
            _error(refused, 429, contains="busy", code="rate_limit_exceeded")
            assert refused.headers["retry-after"] == "1"
            # what can never succeed says so, whatever others hold: a retry would not help
            _error(c.post("/v1/embeddings", json={"input": [{"image": image}] * 3}), 413, "input", "send fewer per request")
            _error(c.post("/v1/embeddings", json={"input": [{"image": image}, {"image": "data:image/png;base64,AAAA"}]}), 400, "input[1].image")
            assert srv.metrics()["tte_media_bytes"] == 2 * one
            steps_allowed.set()
            t.join(60)
            assert held["r"].status_code == 200 and len(held["r"].json()["data"]) == 2
            assert srv.metrics()["tte_media_bytes"] == 0
            again = c.post("/v1/embeddings", json={"input": [{"image": image}, "text only"]})
            assert again.status_code == 200
            assert cos(vectors(again.json())[0], reference.embed([{"image": images[2]}]).embeddings[0]) >= 0.99999
            assert srv.metrics()["tte_media_bytes"] == 0

            # two requests that each fit, sent together: one share is taken whole, so one of them runs
            for _ in range(3):
                pair = {}

                def send(k):
                    with srv.client() as each:
                        pair[k] = each.post("/v1/embeddings", json={"input": [{"image": image}] * 2}).status_code

                both = [threading.Thread(target=send, args=(k,)) for k in range(2)]
                for x in both:
                    x.start()
                for x in both:
                    x.join(60)
                assert 200 in pair.values() and set(pair.values()) <= {200, 429}, pair
            assert srv.metrics()["tte_media_bytes"] == 0

            steps_allowed.clear()  # a client that leaves while its items wait gives their share back at once
            with httpx.Client(base_url=srv.url, timeout=1) as impatient, pytest.raises(httpx.ReadTimeout):
                impatient.post("/v1/embeddings", json={"input": [{"image": image}] * 2})
            deadline = time.monotonic() + 30
            while srv.metrics()["tte_media_bytes"] != 0:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            steps_allowed.set()
    finally:
        steps_allowed.set()
        srv.stop()


def test_engine_failure_fails_requests_not_the_server(serve_checkpoint, monkeypatch):
    engine = Engine(serve_checkpoint)
    srv = start_server(engine)
    try:
        with srv.client() as c:
            real_step, calls = engine.step, {"n": 0}

            def flaky():
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("simulated device error")
                return real_step()

            monkeypatch.setattr(engine, "step", flaky)
            _error(c.post("/v1/embeddings", json={"input": ["a", "b"]}), 500, contains="simulated device error")
            assert not engine.has_unfinished() and engine.stages[0].blocks.reserved == 0
            ok = c.post("/v1/embeddings", json={"input": ["a", "b"]})
            assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    finally:
        srv.stop()


def test_the_served_engine_refuses_another_threads_embed(serve_checkpoint):
    """The server's loop thread holds its engine while it serves: an embed() from another thread
    on the same engine is refused at once, and the server's requests are untouched (before, that
    embed claimed the idle engine, the server's next steps were refused and its recovery dropped
    the embed's sequences from under it)."""
    engine = Engine(serve_checkpoint)
    srv = start_server(engine)
    try:
        with srv.client() as c:
            assert c.post("/v1/embeddings", json={"input": ["a cat"]}).status_code == 200
            with pytest.raises(RuntimeError, match="already running"):
                engine.embed(["a dog"])
            with pytest.raises(RuntimeError, match="already running"):
                engine.add_request(engine.make_sequence("a dog"))
            ok = c.post("/v1/embeddings", json={"input": ["a cat", "a dog"]})
            assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    finally:
        srv.stop()
    assert engine.embed(["a dog"]).errors == [None]  # stopped: the engine is free again


def test_a_non_finite_embedding_is_a_500_naming_the_item_never_a_nan_body(serve_checkpoint, monkeypatch):
    """A NaN embedding (broken weights) used to be served as a 200 whose body held NaN: not JSON
    that strict parsers read, and garbage to the rest. It is the request's 500 naming the item;
    the server goes on."""
    from tte_engine import runner as runner_module

    engine = Engine(serve_checkpoint)
    srv = start_server(engine)
    real_run = runner_module.Runner.run

    def run(self, step):
        tokens, embeddings = real_run(self, step)
        if embeddings is not None and broken["on"]:
            embeddings[-1, 0] = float("nan")  # the last item pooled in the step
        return tokens, embeddings

    broken = {"on": True}
    monkeypatch.setattr(runner_module.Runner, "run", run)
    try:
        with srv.client() as c:
            _error(c.post("/v1/embeddings", json={"input": ["a cat"]}), 500, param="input[0]", contains="non-finite embedding")
            broken["on"] = False
            ok = c.post("/v1/embeddings", json={"input": ["a cat"]})
            assert ok.status_code == 200 and all(math.isfinite(x) for x in ok.json()["data"][0]["embedding"])
    finally:
        srv.stop()


def test_a_failed_step_fails_only_the_requests_it_ran(serve_checkpoint):
    """A step that raises fails the requests whose sequences it ran (500, the request's other items
    dropped with it); a request waiting for room meanwhile (max_num_seqs 1 here) never ran in it and
    is served. Until stop 16 every request in flight failed."""
    engine = Engine(serve_checkpoint, max_num_seqs=1)
    runner = engine.stages[0].runner
    real_run, long_started, others_waiting, long_steps = runner.run, threading.Event(), threading.Event(), []

    def run(step):
        if any(len(seq.prompt.token_ids) > 100 for seq in step.seqs):  # the long item's steps
            long_steps.append(step)
            if len(long_steps) > 1:  # its second: the others are queued in the loop by then
                raise RuntimeError("simulated device error")
            long_started.set()
            others_waiting.wait(60)
        return real_run(step)

    runner.run = run
    srv = start_server(engine)
    try:
        async def both():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                failing = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": ["word " * 150, "a"]}))
                assert await asyncio.to_thread(long_started.wait, 60)  # the long item is in its first step
                served = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": ["fine"]}))
                deadline = time.monotonic() + 60
                while (await asyncio.to_thread(srv.metrics))["tte_queue_depth"] < 3:  # all three items in: "a" and "fine" wait behind the long one
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                others_waiting.set()
                return await failing, await served

        failed, served = asyncio.run(both())
        _error(failed, 500, contains="simulated device error")
        assert served.status_code == 200 and len(served.json()["data"]) == 1
        deadline = time.monotonic() + 30
        while engine.has_unfinished() or srv.metrics()["tte_running_items"]:  # the failed request's other item, dropped with it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.stages[0].blocks.reserved == 0
    finally:
        others_waiting.set()
        srv.stop()


def test_json_body_is_openai_shaped(client):
    r = client.post("/v1/embeddings", json={"input": "shape"})
    assert r.headers["content-type"] == "application/json"
    body = json.loads(r.text)
    assert set(body) == {"object", "data", "model", "usage"} and set(body["data"][0]) == {"object", "index", "embedding"}
    assert abs(np.linalg.norm(body["data"][0]["embedding"]) - 1) < 1e-5


def test_two_model_checkpoint_serves_concurrent_think_and_no_think(make_checkpoint, tmp_path):
    """Reasoner + embedder: no-think items run on the embedder at once and finish out of arrival order."""
    reasoner = make_checkpoint("reasoner", seed=7, head="last_token", think_max_tokens=8)
    embedder = make_checkpoint("embedder", seed=3, head="last_token", mode="two_model", reasoner=str(reasoner), think_max_tokens=8)
    reference = Engine(embedder)
    cache = ResultCache(tmp_path / "cache.sqlite")
    srv = start_server(Engine(embedder), cache=cache)
    try:
        bodies = [{"input": [f"two model {i}"], "think": i % 2 == 0, "return_trace": True} for i in range(8)]

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                return await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))

        for round_ in range(2):  # the second round is answered from the cache
            responses = asyncio.run(run())
            for i, r in enumerate(responses):
                assert r.status_code == 200, r.text
                want = reference.embed([f"two model {i}"], think=i % 2 == 0)
                assert r.json()["data"][0]["trace"] == want.traces[0]
                assert cos(r.json()["data"][0]["embedding"], want.embeddings[0]) >= 0.99999
                assert r.json()["usage"]["trace_tokens"] == (want.usage["trace_tokens"] if round_ == 0 else 0)
        m = srv.metrics()
        assert m["tte_queue_depth"] == 0 and m["tte_running_items"] == 0
        assert m['tte_items_total{source="embedding_cache"}'] == 8
    finally:
        srv.stop()
        cache.close()


def test_local_image_paths_stay_under_the_root(tmp_path):
    root = tmp_path / "ok"
    root.mkdir()
    (root / "cat.png").write_bytes(b"png")
    (tmp_path / "outside.png").write_bytes(b"png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "up").symlink_to(tmp_path)
    root = root.resolve()
    assert resolve_image(str(root / "cat.png"), "p", root) == str(root / "cat.png")
    assert resolve_image("file://" + str(root / "cat.png"), "p", root) == str(root / "cat.png")
    refused = {
        str(root / ".." / "outside.png"): "must lie under",  # traversal
        str(root / "link.png"): "must lie under",  # a symlink to a file outside
        str(root / "up" / "outside.png"): "must lie under",  # through a symlinked directory
        "/etc/passwd": "must lie under",
        str(root / "cat\x00.png"): "not a usable local image path",  # ValueError: embedded null byte
        "~no-such-tte-user/cat.png": "not a usable local image path",  # RuntimeError: no such home directory
    }
    for url, message in refused.items():
        with pytest.raises(RequestError) as caught:
            resolve_image(url, "input[0].image", root)
        assert caught.value.status == 400 and caught.value.param == "input[0].image" and message in caught.value.message, url


def test_a_dead_engine_loop_fails_requests_instead_of_hanging(serve_checkpoint, monkeypatch):
    """A bug outside the guarded engine step kills the loop thread: the request in flight gets an error, later ones a fast 503."""
    engine = Engine(serve_checkpoint)
    srv = start_server(engine)
    loop = srv.app.state.server.loop
    try:
        with srv.client() as c:
            assert c.post("/v1/embeddings", json={"input": "before"}).status_code == 200

            def broken(done, began):
                raise RuntimeError("simulated bug in the loop")

            monkeypatch.setattr(loop, "_observe", broken)
            _error(c.post("/v1/embeddings", json={"input": ["a", "b"]}, timeout=30), 500, contains="simulated bug in the loop")
            loop._thread.join(10)
            assert not loop.alive
            assert not engine.has_unfinished() and engine.stages[0].blocks.reserved == 0
            start = time.monotonic()
            _error(c.post("/v1/embeddings", json={"input": "after"}, timeout=30), 503, contains="not running")
            assert time.monotonic() - start < 5
            _error(c.get("/health"), 503, contains="not running")
            m = srv.metrics()
            assert m["tte_queue_depth"] == 0 and m["tte_running_items"] == 0
    finally:
        srv.stop()


def test_a_cached_trace_is_reused_by_the_server(serve_checkpoint, reference, tmp_path):
    """A cached trace with no cached embedding: the server generates no trace and answers what Engine.embed does."""
    items = ["a trace cached earlier", {"text": "and one with a picture", "image": data_url(png_bytes(50, 70, 9))}]
    path = tmp_path / "cache.sqlite"
    with closing(ResultCache(path)) as store:
        embed_items(reference, items, cache=EngineCache(store, reference))
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DELETE FROM embeddings")  # keep the traces only
    expected = reference.embed(items)
    with closing(ResultCache(path)) as cache:
        srv = start_server(Engine(serve_checkpoint), cache=cache)
        try:
            with srv.client() as c:
                body = c.post("/v1/embeddings", json={"input": items, "return_trace": True}).json()
            u = body["usage"]
            assert u["trace_tokens"] == 0 and u["cached_trace_tokens"] == expected.usage["trace_tokens"] > 0
            assert u["prompt_tokens"] == expected.usage["prompt_tokens"]
            assert [d["trace"] for d in body["data"]] == expected.traces
            for got, want in zip(vectors(body), expected.embeddings):
                assert cos(got, want) >= 0.99999
            assert srv.metrics()['tte_items_total{source="trace_cache"}'] == 2
            assert cache.counts() == {"traces": 2, "embeddings": 2}  # the new embeddings were cached
        finally:
            srv.stop()


def test_without_the_server_extra_tte_serve_says_what_to_install():
    """The console script imports tte_engine.serve.main: that must not need fastapi before it can say so."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fastapi'] = None\n"
            "from tte_engine.serve.main import main\n"
            "sys.exit(main(['--checkpoint', 'tiny-random']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "tte-serve: error: fastapi is missing; pip install fastapi uvicorn httpx prometheus-client (the [serve] extra: pip install -e '.[serve]' in a checkout)"), proc.stderr
