"""The API contract of tte-serve and tte-embed (issue 10): OpenAI/vLLM conformance, per-item 400s
for whatever is wrong with an item, server-side limits on client-chosen cost, corpus files read
line by line, and a bad cache file reported in one line."""

import asyncio
import json
import logging
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tte_engine import Engine
from tte_engine.cli import main as tte_embed
from tte_engine.cli import read_items
from tte_engine.serve import ServerSettings
from tte_engine.serve.app import HeldMedia
from tte_engine.serve.main import main as tte_serve

from .conftest import data_url, png_bytes, start_server
from .test_server import _error


@pytest.fixture(scope="module")
def server(serve_checkpoint):
    settings = ServerSettings(prep_threads=2, model_aliases=("tte-small",), max_image_pixels=200 * 200)
    s = start_server(Engine(serve_checkpoint), settings)
    yield s
    s.stop()


def post(client, body):
    return client.post("/v1/embeddings", json=body)


def test_model_names_and_retrieve(client, reference):
    name = reference.checkpoint.name
    for model in (name, "tte-small", None):
        assert post(client, {"input": "x", "model": model}).status_code == 200, model
    err = _error(post(client, {"input": "x", "model": "text-embedding-3-small"}), 404, "model", "does not exist", code="model_not_found")
    assert err["type"] == "invalid_request_error"
    card = client.get(f"/v1/models/{name}").json()
    assert card["id"] == name and card["object"] == "model" and card["embedding_dim"] == reference.embedding_dim
    assert client.get("/v1/models/tte-small").json()["id"] == name
    _error(client.get("/v1/models/gpt-4"), 404, "model", code="model_not_found")


def test_token_id_inputs_get_a_400_that_says_what_to_do(client):
    for tokens in ([1, 2, 3], [[1, 2, 3]], ["text", 7]):
        _error(post(client, {"input": tokens}), 400, "input", "check_embedding_ctx_length=False")


def test_vllm_and_tei_fields(client, server, reference, caplog):
    from tte_engine.serve.protocol import EmbeddingRequest

    long_text = " ".join(f"w{i}" for i in range(3000))
    _error(post(client, {"input": long_text}), 400, "input[0]", "exceeds the model limit")
    # TEI's truncate=true is vLLM's truncate_prompt_tokens=-1: as many tokens as fit (planned only: a full-length prefill is slow here)
    fits = reference.make_sequence(long_text, truncate_prompt_tokens=-1).prompt.token_ids
    for extra in ({"truncate": True}, {"truncate_prompt_tokens": -1}):
        req = EmbeddingRequest(input=[long_text], **extra)
        plans = asyncio.run(server.app.state.server.plan(req, [long_text], [{None: "input[0]"}], True, threading.Event(), HeldMedia()))
        assert plans[0].seq.prompt.token_ids == fits, extra
    cut = post(client, {"input": [long_text], "think": False, "truncate_prompt_tokens": 80}).json()
    want = reference.embed([long_text], think=False, truncate_prompt_tokens=80)
    assert cut["usage"]["prompt_tokens"] == len(want.prompt_token_ids[0]) <= 80
    assert np.allclose(cut["data"][0]["embedding"], want.embeddings[0].numpy(), atol=1e-5)
    assert post(client, {"input": "x", "normalize": True}).status_code == 200
    _error(post(client, {"input": "x", "normalize": False}), 400, "normalize", "always L2-normalized")
    with caplog.at_level(logging.WARNING, logger="tte_engine"):
        ok = post(client, {"input": "x", "add_special_tokens": True, "priority": 1})
    assert ok.status_code == 200
    assert any("add_special_tokens, priority" in r.getMessage() for r in caplog.records)


def test_dimensions_truncates_and_renormalizes(client):
    full = np.asarray(post(client, {"input": "matryoshka"}).json()["data"][0]["embedding"], dtype=np.float32)
    for d in (1, 7, full.shape[0]):
        got = np.asarray(post(client, {"input": "matryoshka", "dimensions": d}).json()["data"][0]["embedding"], dtype=np.float32)
        assert got.shape == (d,) and np.allclose(got, full[:d] / np.linalg.norm(full[:d]), atol=1e-6)


def test_strict_types(client):
    for field, value in (("think", "yes"), ("return_trace", 1), ("max_trace_tokens", 2.0), ("max_trace_tokens", "3"),
                         ("dimensions", True), ("model", 5)):
        _error(post(client, {"input": "x", field: value}), 422, field)


def test_a_422_names_the_specific_fault_not_every_union_member(client):
    """An item with an unknown key fails every member of the item union; the message is the key's
    error alone (it used to add "input[0]: Input should be a valid string; ... (and 2 more)")."""
    err = _error(post(client, {"input": [{"txt": "a"}]}), 422, "input[0].txt")
    assert err["message"] == "input[0].txt: Extra inputs are not permitted"
    err = _error(post(client, {"input": ["fine", {"txt": 1, "image": 2}]}), 422)  # two faults in one item: both, nothing else
    assert sorted(err["message"].split("; ")) == ["input[1].image: Input should be a valid string", "input[1].txt: Extra inputs are not permitted"]
    err = _error(post(client, {"input": 5}), 422, "input")  # no member got further: each says why
    assert "valid string" in err["message"] and "valid list" in err["message"]


def test_per_item_failures_are_400s_naming_the_item(client, server):
    raw = '{"input": ["fine", "a \\ud800 b"]}'.encode()  # a lone surrogate, as JSON allows
    _error(client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"}), 400, "input[1]", "not valid Unicode")
    _error(post(client, {"input": ["fine", {"text": "x", "instruction": "y" * 10**6}]}), 400, "input[1].instruction", "characters cannot fit")
    _error(post(client, {"input": ["fine", {"image": "data:image/png;base64,AAAA"}]}), 400, "input[1].image", "not an image, or a format")
    good = data_url(png_bytes(56, 56, 2))
    _error(post(client, {"input": ["fine", {"images": [good, "data:image/png;base64,AAAA"]}]}), 400, "input[1].images[1]", "cannot decode")
    image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what?"}, image_part]}]
    _error(post(client, {"messages": messages}), 400, "messages[0].content[1]", "cannot decode image")
    # a client-chosen cost beyond the server's limits
    _error(post(client, {"input": [{"image": data_url(png_bytes(300, 300, 1))}]}), 400, "input[0].image", "pixel decode limit")
    _error(post(client, {"input": "x", "max_trace_tokens": 9}), 400, "max_trace_tokens", "--max-trace-tokens")
    assert post(client, {"input": "x", "max_trace_tokens": 8}).status_code == 200
    m = server.metrics()
    assert m.get('tte_requests_total{status="500"}', 0) == 0


def test_request_wide_settings_are_blamed_on_their_field_and_echoes_stay_json(client, server):
    """A bad setting every item shares is the request's 400 naming that field, not input[0]'s; an
    error message echoing a lone surrogate (valid JSON, not valid UTF-8) is still a JSON 4xx."""
    _error(post(client, {"input": ["fine", "fine too"], "truncate_prompt_tokens": 0}), 400, "truncate_prompt_tokens", "must be >= 1 or -1")
    raw = '{"input": ["fine"], "instruction": "a \\udc00 b"}'.encode()
    _error(client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"}), 400, "instruction", "not valid Unicode")
    raw = '{"input": ["fine"], "model": "\\udc00"}'.encode()
    err = _error(client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"}), 404, "model", "does not exist", code="model_not_found")
    assert "\udc00" in err["message"]
    _error(client.get("/v1/models/%ED%B0%80"), 404, "model", code="model_not_found")  # the UTF-8 bytes of a surrogate in the path
    # a request-wide field every item took is blamed by its name, and checked even where no item uses it
    _error(post(client, {"input": ["a", "b"], "instruction": "x" * 3_000_000}), 400, "instruction", "cannot fit the model limit")
    _error(post(client, {"input": ["a"], "video_options": {"num_frames": 10**9}}), 400, "video_options", "exceeds the limit")
    _error(post(client, {"input": ["a"], "video_options": {"bogus": 1}}), 400, "video_options", "unknown video option")
    err = client.post("/v1/embeddings", content=b"[1]", headers={"content-type": "application/json"})
    assert err.status_code == 422 and err.json()["error"]["param"] is None  # the body as a whole
    assert server.metrics().get('tte_requests_total{status="500"}', 0) == 0


def test_a_departed_client_stops_validation(server, serve_checkpoint):
    """The prep thread checks, between items, whether the client has left: then nothing more is tokenized."""
    from tte_engine.serve.protocol import EmbeddingRequest

    s = server.app.state.server
    left = threading.Event()
    left.set()
    req = EmbeddingRequest(input=["a", "b"])
    assert asyncio.run(s.plan(req, ["a", "b"], [{None: "input[0]"}, {None: "input[1]"}], True, left, HeldMedia())) is None


def test_concurrent_requests_take_turns_in_the_prep_pool(server, monkeypatch):
    """A request queues at most `prep_threads` items in the prep pool at a time: a one-item request
    arriving behind a 40-item one is prepared after a few of the big one's items, not after all 40
    (before, it waited for every one of them)."""
    from tte_engine.serve import app as app_module
    from tte_engine.serve.protocol import EmbeddingRequest

    s = server.app.state.server
    order, real = [], app_module.plan_item
    monkeypatch.setattr(app_module, "plan_item", lambda engine, item, *a, **kw: order.append(item) or real(engine, item, *a, **kw))
    big, small = [f"big {i}" for i in range(40)], ["small"]

    async def both():
        req = EmbeddingRequest(input=["x"])
        return await asyncio.gather(s.plan(req, big, [{None: f"input[{i}]"} for i in range(40)], False, threading.Event(), HeldMedia()),
                                    s.plan(req, small, [{None: "input[0]"}], False, threading.Event(), HeldMedia()))

    planned_big, planned_small = asyncio.run(both())
    assert len(planned_big) == 40 and len(planned_small) == 1 and sorted(order) == sorted(big + small)
    assert order.index("small") <= s.settings.prep_threads, order


def test_messages_name_no_server_directories(tmp_path, serve_checkpoint):
    root = tmp_path / "allowed-root"
    root.mkdir()
    (root / "cat.png").write_bytes(png_bytes(40, 40, 2))
    srv = start_server(Engine(serve_checkpoint), ServerSettings(prep_threads=1, local_files_root=root.resolve()))
    try:
        with srv.client() as c:
            assert post(c, {"input": [{"image": "cat.png"}]}).status_code == 200  # relative to the allowed directory
            for path in ("../outside.png", str(tmp_path / "x.png"), "missing.png"):
                err = _error(post(c, {"input": [{"image": path}]}), 400, "input[0].image")
                assert str(root) not in err["message"] and str(tmp_path) not in err["message"].replace(path, ""), err
    finally:
        srv.stop()


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)
_item_json = st.one_of(_json, st.fixed_dictionaries({}, optional={k: _json for k in ("text", "image", "images", "instruction", "video_options")}))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
@given(body=st.fixed_dictionaries({"input": st.one_of(_item_json, st.lists(_item_json, min_size=1, max_size=3))},
                                  optional={"think": _json, "dimensions": _json, "model": _json, "max_trace_tokens": _json}))
def test_no_generated_body_gets_a_500(client, body):
    r = client.post("/v1/embeddings", json={**body, "think": body.get("think", False)})
    assert r.status_code in (200, 400, 404, 422), (body, r.text)
    err = r.json().get("error")
    assert (r.status_code == 200) == (err is None)
    if r.status_code == 200:
        assert len(r.json()["data"]) == (len(body["input"]) if isinstance(body["input"], list) else 1)


# ---------------------------------------------------------------------- tte-embed: corpus files
ODD = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r"]


def test_corpus_lines_split_on_newline_only(tmp_path, serve_checkpoint):
    lines = [json.dumps({"id": f"r{i}", "text": f"record{sep}{i} with an odd separator"}, ensure_ascii=False).encode() for i, sep in enumerate(ODD)]
    lines.insert(3, b'{"id": "latin1", "text": "caf\xe9"}')  # not UTF-8: an error row naming its line
    lines += [b'{"id": "surrogate", "text": "a \\ud800 b"}', b'{"id": "int-trace", "text": "hi", "trace": 5}']  # error rows, not a crash
    data = b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\n"
    path = tmp_path / "odd.jsonl"
    path.write_bytes(data)
    items, ids, _ = read_items(path)
    assert len(items) == len(ODD) + 3
    assert ids == ["r0", "r1", "r2", None, *[f"r{i}" for i in range(3, len(ODD))], "surrogate", "int-trace"]
    assert items[0]["text"] == "record\u20280 with an odd separator"  # the BOM is gone, the record whole
    assert tte_embed([str(path), "--checkpoint", str(serve_checkpoint), "--output", str(tmp_path / "out"), "--no-cache", "--no-think"]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().split("\n") if line]
    assert [r["id"] for r in out] == ["r0", "r1", "r2", 3, *[f"r{i}" for i in range(3, len(ODD))], "surrogate", "int-trace"]
    assert [r["error"] for r in out].count(None) == len(ODD) and out[3]["error"] == "line 4: not valid UTF-8"
    assert "not valid Unicode" in out[-2]["error"] and "trace must be" in out[-1]["error"]
    vectors = np.load(tmp_path / "out.npy")
    bad = [3, len(out) - 2, len(out) - 1]
    assert vectors.shape[0] == len(ODD) + 3 and np.isnan(vectors[bad]).all() and np.isfinite(np.delete(vectors, bad, 0)).all()


def test_txt_corpus_with_a_bad_byte(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\xff\n\n" + "three\u2028still three\n".encode())
    items, ids, _ = read_items(path)
    assert items[0] == "one" and items[1].reason == "line 2: not valid UTF-8" and items[2] == "three\u2028still three"
    assert ids == [None, None, None]


def test_a_bad_cache_file_is_one_line_and_exit_2_before_the_model_loads(tmp_path, capsys):
    """The cache is opened before the model: with a checkpoint that does not exist, the error is still
    the cache's (a config error is not reported after minutes of loading a 7B model)."""
    bad = tmp_path / "cache.sqlite"
    bad.write_bytes(b"not a database" * 64)
    corpus = tmp_path / "in.txt"
    corpus.write_text("one\n")
    missing = str(tmp_path / "no-such-checkpoint")
    assert tte_embed([str(corpus), "--checkpoint", missing, "--cache", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tte-embed: error: ") and "not a usable tte_engine cache" in err and "delete it" in err
    assert tte_serve(["--checkpoint", missing, "--cache", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tte-serve: error: ") and "not a usable tte_engine cache" in err


def test_a_taken_port_is_reported_before_the_model_loads(tmp_path, capsys):
    """tte-serve binds its port before it loads the model: a port in use is one line and exit 2 at
    once (uvicorn found it only after the load, and exited 3). The checkpoint here does not exist:
    the port's error comes first."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert tte_serve(["--checkpoint", str(tmp_path / "no-such-checkpoint"), "--host", "127.0.0.1", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err == f"tte-serve: error: cannot listen on 127.0.0.1:{port} (Address already in use)"


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "argument --port: must be a port number, 0-65535, got '99999'"),  # was a traceback (OverflowError)
    (["--port", "http"], "argument --port: must be a port number"),
    (["--limit-mm-per-prompt", "notjson"], "argument --limit-mm-per-prompt: must be JSON"),  # was "invalid loads value"
    (["--max-batch-size", "0"], "argument --max-batch-size: must be an integer >= 1, got '0'"),  # was EngineConfig's field name
    (["--max-model-len", "-3"], "argument --max-model-len: must be an integer >= 1"),
    (["--prep-threads", "0"], "argument --prep-threads: must be an integer >= 1"),
])
def test_serve_flags_out_of_range_are_usage_errors_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        tte_serve(flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_model_length_no_item_fits_stops_tte_serve_at_start(serve_checkpoint, capsys):
    """--max-model-len 10 started a server whose every request got 400."""
    assert tte_serve(["--checkpoint", str(serve_checkpoint), "--max-model-len", "10", "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tte-serve: error: max_model_len 10 holds no item")


def test_without_a_checkpoint_both_clis_warn_that_tiny_random_is_random(tmp_path, monkeypatch, capsys, caplog):
    """A forgotten --checkpoint used to embed a corpus with random weights without a word."""
    import tte_engine.engine
    from tte_engine.errors import TTEError

    loaded = []

    def no_model(checkpoint, **kwargs):  # where the model would load: stop here
        loaded.append(checkpoint)
        raise TTEError("stopped before loading")

    monkeypatch.setattr(tte_engine.engine, "Engine", no_model)
    (tmp_path / "q.txt").write_text("a\n")
    assert tte_embed([str(tmp_path / "q.txt"), "--no-cache"]) == 2
    assert "tte-embed: warning: no --checkpoint given: embedding with tiny-random" in capsys.readouterr().err
    with caplog.at_level("WARNING", logger="tte_engine"):
        assert tte_serve(["--port", "0", "--device", "cpu"]) == 2
    assert "no --checkpoint given: serving tiny-random" in caplog.text
    assert loaded == ["tiny-random", "tiny-random"]
    for argv in ([str(tmp_path / "q.txt"), "--demo"], ["--demo", "--output", str(tmp_path / "out")]):
        with pytest.raises(SystemExit) as exit_:  # --demo with a file: the file was ignored without a word
            tte_embed(argv)
        assert exit_.value.code == 2 and "--demo embeds its own queries and prints them" in capsys.readouterr().err


@pytest.mark.parametrize("limits", ['{"imag": 3}', '{"image": -1}', '{"image": "2"}', '[1]'])
def test_limit_mm_per_prompt_is_checked_at_start(limits, capsys):
    """A misspelled or ill-typed limit used to be accepted silently (no limit at all)."""
    from tte_engine.serve.main import main as serve_main

    assert serve_main(["--limit-mm-per-prompt", limits, "--port", "1"]) == 2
    assert "--limit-mm-per-prompt takes a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_max_media_bytes_is_checked_at_start(value, capsys):
    from tte_engine.serve.main import main as serve_main

    with pytest.raises(SystemExit) as exit_:
        serve_main(["--max-media-bytes", value, "--port", "1"])
    assert exit_.value.code == 2 and "--max-media-bytes: must be an integer >= 0" in capsys.readouterr().err


def test_demo_honours_think_and_trace_flags(capsys):
    from tte_engine.cli import main as embed_main

    assert embed_main(["--demo", "--no-think"]) == 0
    assert "'trace_tokens': 0" in capsys.readouterr().out
    assert embed_main(["--demo", "--max-trace-tokens", "2"]) == 0
    assert "'trace_tokens': 8" in capsys.readouterr().out  # 4 items x 2 tokens


def test_a_broken_json_line_is_named_by_its_line_and_column(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n[1, 2]\n')
    items, *_ = read_items(path)
    assert items[1].reason == "line 2: not valid JSON (Expecting ',' delimiter at column 13)"
    assert items[2].reason == "line 3: each line must be a JSON object"


def test_numbers_json_has_not_make_a_malformed_line(tmp_path):
    """Python's json reads NaN, Infinity and 1e400 (as inf); JSON has no such numbers, and an id read
    so was written back out as invalid JSON (found by a review)."""
    path = tmp_path / "odd.jsonl"
    path.write_text('{"id": NaN, "text": "a"}\n{"id": 1e400, "text": "b"}\n{"id": -Infinity, "text": "c"}\n{"id": 1.5, "text": "d"}\n')
    items, ids, _ = read_items(path)
    assert [getattr(i, "reason", None) for i in items] == ["line 1: NaN is not a JSON number", "line 2: the number 1e400 is out of range",
                                                           "line 3: -Infinity is not a JSON number", None]
    assert ids[3] == 1.5
