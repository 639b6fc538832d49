"""Server and CLI limits: out-of-range options stop tte-serve / tte-embed at start, the server's
--max-trace-tokens caps the budget of requests that give none, and a `messages` content part has
exactly the keys its type allows."""

import math
import shutil

import pytest

from tte_engine import Engine
from tte_engine.cli import main as tte_embed
from tte_engine.random_checkpoint import never_stop
from tte_engine.serve import ServerSettings
from tte_engine.serve.main import build_parser
from tte_engine.serve.main import main as tte_serve

from .conftest import data_url, png_bytes, start_server
from .test_server import _error

# ------------------------------------------------------------------ options refused at parse time
SERVE_REFUSED = [
    (["--max-queue", "-1000"], "argument --max-queue: must be an integer >= 0, got '-1000'"),
    (["--max-queue", "1.5"], "argument --max-queue: must be an integer >= 0"),
    (["--max-body-bytes", "-1"], "argument --max-body-bytes: must be an integer >= 1, got '-1'"),
    (["--max-body-bytes", "0"], "argument --max-body-bytes: must be an integer >= 1, got '0'"),
    (["--max-image-pixels", "0"], "argument --max-image-pixels: must be an integer >= 1"),
    (["--max-image-pixels", "-5"], "argument --max-image-pixels: must be an integer >= 1"),
    (["--max-trace-tokens", "-1"], "argument --max-trace-tokens: must be an integer >= 0, got '-1'"),
    (["--max-trace-tokens", "many"], "argument --max-trace-tokens: must be an integer >= 0"),
    (["--graceful-timeout", "nan"], "argument --graceful-timeout: must be a finite number >= 0, got 'nan'"),
    (["--graceful-timeout", "-1"], "argument --graceful-timeout: must be a finite number >= 0, got '-1'"),
    (["--graceful-timeout", "inf"], "argument --graceful-timeout: must be a finite number >= 0"),
    (["--graceful-timeout", "soon"], "argument --graceful-timeout: must be a finite number >= 0"),
    (["--allow-local-files", ""], "argument --allow-local-files: must be an existing directory"),
    (["--device", "banana"], "argument --device: must be cpu, cuda or cuda:N, got 'banana'"),
    (["--device", "cuda:-1"], "argument --device: must be cpu, cuda or cuda:N"),
    (["--device", "meta"], "argument --device: must be cpu, cuda or cuda:N"),
    (["--device", ""], "argument --device: must be cpu, cuda or cuda:N"),
    (["--port", "-1"], "argument --port: must be a port number, 0-65535"),
    (["--max-batch-size", "-2"], "argument --max-batch-size: must be an integer >= 1"),
    (["--max-media-bytes", "-1"], "argument --max-media-bytes: must be an integer >= 0"),
    (["--max-model-len", "0"], "argument --max-model-len: must be an integer >= 1"),
    (["--prep-threads", "-4"], "argument --prep-threads: must be an integer >= 1"),
    (["--suffix-wait-steps", "-1"], "argument --suffix-wait-steps: must be an integer >= 0"),
]


@pytest.mark.parametrize("flags, message", SERVE_REFUSED, ids=[" ".join(f) for f, _ in SERVE_REFUSED])
def test_tte_serve_refuses_out_of_range_options_at_parse_time(flags, message, capsys, monkeypatch):
    import tte_engine.engine

    monkeypatch.setattr(tte_engine.engine, "Engine", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exit_:
        tte_serve([*flags, "--port", "0"] if "--port" not in flags else flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
    assert "Traceback" not in err


def test_tte_serve_refuses_a_local_files_directory_that_is_not_one(tmp_path, capsys, monkeypatch):
    """--allow-local-files /nonexistent started a server whose every local path was a 400."""
    import tte_engine.engine

    monkeypatch.setattr(tte_engine.engine, "Engine", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "f").write_text("x")
    for path in (tmp_path / "missing", tmp_path / "missing" / "dir", tmp_path / "f"):
        with pytest.raises(SystemExit) as exit_:
            tte_serve(["--allow-local-files", str(path), "--port", "0"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument --allow-local-files: must be an existing directory, got {str(path)!r}" in err, err


def test_tte_serve_keeps_the_values_at_the_edges(tmp_path):
    args = build_parser().parse_args(["--max-queue", "0", "--max-body-bytes", "1", "--max-trace-tokens", "0", "--max-image-pixels", "1",
                                      "--graceful-timeout", "0", "--allow-local-files", str(tmp_path), "--device", "cpu"])
    assert (args.max_queue, args.max_body_bytes, args.max_trace_tokens, args.max_image_pixels) == (0, 1, 0, 1)
    assert args.graceful_timeout == 0.0 and args.device == "cpu"
    assert str(args.allow_local_files) == str(tmp_path.resolve())
    assert str(build_parser().parse_args(["--allow-local-files"]).allow_local_files) == "/"  # no DIR: anywhere
    assert build_parser().parse_args([]).allow_local_files is None
    for device in ("cpu", "cuda", "cuda:0"):  # cuda without a GPU is the engine's error (exit 2), not a parse error
        assert build_parser().parse_args(["--device", device]).device == device
    assert math.isclose(build_parser().parse_args(["--graceful-timeout", "2.5"]).graceful_timeout, 2.5)


EMBED_REFUSED = [
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    (["--batch-size", "-3"], "argument --batch-size: must be an integer >= 1"),
    (["--batch-size", "x"], "argument --batch-size: must be an integer >= 1"),
    (["--device", "banana"], "argument --device: must be cpu, cuda or cuda:N, got 'banana'"),
    (["--device", "cuda:x"], "argument --device: must be cpu, cuda or cuda:N"),
    (["--suffix-wait-steps", "-1"], "argument --suffix-wait-steps: must be an integer >= 0"),
    (["--max-trace-tokens", "-5"], "argument --max-trace-tokens: must be an integer >= 0, got '-5'"),
]


@pytest.mark.parametrize("flags, message", EMBED_REFUSED, ids=[" ".join(f) for f, _ in EMBED_REFUSED])
def test_tte_embed_refuses_out_of_range_options_at_parse_time(flags, message, tmp_path, capsys, monkeypatch):
    import tte_engine.engine

    monkeypatch.setattr(tte_engine.engine, "Engine", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "q.txt").write_text("a\n")
    for argv in ([str(tmp_path / "q.txt"), "--no-cache", *flags], ["--demo", *flags]):
        with pytest.raises(SystemExit) as exit_:
            tte_embed(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err, err
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.txt"]


@pytest.mark.parametrize("field, value", [("max_queue", -1000), ("max_body_bytes", 0), ("max_body_bytes", -1), ("max_image_pixels", 0),
                                          ("max_trace_tokens", -1), ("prep_threads", 0), ("max_media_bytes", -1), ("max_queue", 1.5),
                                          ("max_body_bytes", True), ("limit_mm_per_prompt", {"image": -1})])
def test_server_settings_refuse_limits_that_refuse_everything(field, value):
    with pytest.raises(ValueError, match=f"ServerSettings.{field} must"):
        ServerSettings(**{field: value})


# ------------------------------------------------------------------ the server's trace budget
@pytest.fixture(scope="module")
def endless(serve_checkpoint, tmp_path_factory):
    """serve_checkpoint (budget 8) whose traces never stop early: every trace runs its whole budget.
    Each server gets its own engine (a served engine is its loop thread's alone)."""
    return never_stop(shutil.copytree(serve_checkpoint, tmp_path_factory.mktemp("limits") / "endless"))


@pytest.fixture(scope="module")
def capped(endless):
    s = start_server(Engine(endless), ServerSettings(prep_threads=2, max_trace_tokens=4))
    yield s
    s.stop()


def test_the_server_limit_caps_the_default_trace_budget(capped):
    """--max-trace-tokens 4 on a checkpoint whose budget is 8: a request that says nothing generated 8."""
    with capped.client() as c:
        assert c.get("/v1/models").json()["data"][0]["max_trace_tokens"] == 4
        default = c.post("/v1/embeddings", json={"input": "a cat", "return_trace": True})
        assert default.status_code == 200, default.text
        assert default.json()["usage"]["trace_tokens"] == 4
        explicit = c.post("/v1/embeddings", json={"input": "a cat", "return_trace": True, "max_trace_tokens": 4}).json()
        assert explicit["data"][0]["trace"] == default.json()["data"][0]["trace"]
        assert explicit["usage"]["trace_tokens"] == 4
        assert c.post("/v1/embeddings", json={"input": "a cat", "max_trace_tokens": 2}).json()["usage"]["trace_tokens"] == 2
        _error(c.post("/v1/embeddings", json={"input": "a cat", "max_trace_tokens": 5}), 400, "max_trace_tokens", "limit of 4")
        many = c.post("/v1/embeddings", json={"messages": [{"role": "user", "content": "a cat"}]}).json()
        assert many["usage"]["trace_tokens"] == 4


def test_a_server_limit_above_the_checkpoint_budget_keeps_its_budget_as_default(endless):
    s = start_server(Engine(endless), ServerSettings(prep_threads=2, max_trace_tokens=12))
    try:
        with s.client() as c:
            assert c.post("/v1/embeddings", json={"input": "a cat"}).json()["usage"]["trace_tokens"] == 8
            assert c.post("/v1/embeddings", json={"input": "a cat", "max_trace_tokens": 12}).json()["usage"]["trace_tokens"] == 12
    finally:
        s.stop()


# ------------------------------------------------------------------ messages: content part keys
PNG = data_url(png_bytes(28, 28, 1))


@pytest.mark.parametrize("part, param, message", [
    ({"type": "text", "text": "a", "image_url": {"url": PNG}}, "messages[0].content[0].image_url", "Extra inputs are not permitted"),
    ({"type": "text", "text": "a", "video_url": {"url": PNG}}, "messages[0].content[0].video_url", "Extra inputs are not permitted"),
    ({"type": "text", "text": "a", "image_url": None}, "messages[0].content[0].image_url", "Extra inputs are not permitted"),
    ({"type": "image_url", "image_url": {"url": PNG}, "text": "a"}, "messages[0].content[0].text", "Extra inputs are not permitted"),
    ({"type": "image_url", "image_url": {"url": PNG}, "video_url": {"url": PNG}}, "messages[0].content[0].video_url", "Extra inputs"),
    ({"type": "image_url", "image_url": {"url": PNG, "size": 3}}, "messages[0].content[0].image_url.size", "Extra inputs"),
    ({"type": "video_url", "video_url": {"url": PNG}, "image_url": {"url": PNG}}, "messages[0].content[0].image_url", "Extra inputs"),
    ({"type": "video_url", "video_url": {"url": PNG, "detail": "low"}}, "messages[0].content[0].video_url.detail", "Extra inputs"),
    ({"type": "text", "text": "a", "extra": 1}, "messages[0].content[0].extra", "Extra inputs are not permitted"),
    ({"type": "text"}, "messages[0].content[0].text", "Field required"),
    ({"type": "image_url"}, "messages[0].content[0].image_url", "Field required"),
    ({"type": "text", "text": None}, "messages[0].content[0].text", "valid string"),
    ({"type": "audio", "text": "a"}, "messages[0].content[0]", "type must be one of 'text', 'image_url', 'video_url'"),
    ({"text": "a"}, "messages[0].content[0]", "type must be one of"),
])
def test_a_content_part_has_exactly_the_keys_its_type_allows(capped, part, param, message):
    """A text part with an image_url beside its text was a 200 that counted the text only (the image dropped)."""
    with capped.client() as c:
        _error(c.post("/v1/embeddings", json={"messages": [{"role": "user", "content": [part]}], "think": False}), 422, param, message)


def test_the_part_shapes_openai_and_vllm_send_still_work(capped):
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}},
             {"type": "image_url", "image_url": PNG}]
    with capped.client() as c:
        r = c.post("/v1/embeddings", json={"messages": [{"role": "system", "content": [{"type": "text", "text": "retrieve"}]},
                                                        {"role": "user", "content": parts}], "think": False})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > c.post("/v1/embeddings", json={
            "messages": [{"role": "user", "content": parts[:1]}], "think": False}).json()["usage"]["prompt_tokens"]
        _error(c.post("/v1/embeddings", json={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]}),
               422, "messages[0].content[0]", "needs 'image_url.url'")


def test_a_server_limit_of_zero_makes_no_think_the_default(endless):
    """--max-trace-tokens 0: requests that say nothing embed without a trace, and /v1/models says think=false."""
    s = start_server(Engine(endless), ServerSettings(prep_threads=2, max_trace_tokens=0))
    try:
        with s.client() as c:
            card = c.get("/v1/models").json()["data"][0]
            assert card["max_trace_tokens"] == 0 and card["think"] is False
            assert c.post("/v1/embeddings", json={"input": "a cat"}).json()["usage"]["trace_tokens"] == 0
    finally:
        s.stop()
