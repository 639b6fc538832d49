"""The per-item input contract of Engine.embed (issue 10): whatever is wrong with one item is that
item's error (a typed, deterministic message), cheap bounds come before expensive work, images are
upright, and cache keys say everything a result depends on."""

import base64
import io
import os
import sqlite3
from contextlib import closing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import random_image
from PIL import Image

from tte_engine import Engine
from tte_engine.errors import CacheError, InvalidInputError, describe
from tte_engine.result_cache import SCHEMA_VERSION, EngineCache, ResultCache, embed_items
from tte_engine.vision import ImageProcessorConfig, load_image, preprocess_image


@pytest.fixture(scope="module")
def engine(make_checkpoint):
    return Engine(make_checkpoint("contract", think_max_tokens=4))


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------- kinds 1, 2: every field typed, every failure per item
BAD_ITEMS = [
    ("a \ud800 b", "text is not valid Unicode"),
    ({"text": "hi", "instruction": "x \udfff"}, "instruction is not valid Unicode"),
    ({"text": "hi", "trace": "\ud83d"}, "trace is not valid Unicode"),
    ({"text": "hi", "trace": 5}, "trace must be a string or a list of int token ids, got int"),
    ({"text": "hi", "trace": b"abc"}, "got bytes"),  # bytes iterate to ints: not token ids
    ({"text": "hi", "trace": {}}, "got dict"),
    ({"text": "hi", "trace": [1, True]}, "got list"),
    ({"text": "hi", "trace": [1.0]}, "got list"),
    ({"text": "hi", "trace": [-1]}, "token ids must lie in"),
    ({1: "x", "text": "hi"}, "unknown field(s) a key of type int"),
    ({"text": "hi", "colour": "red"}, "unknown field(s) 'colour'"),
    ({"text": 5}, "text must be a string, got int"),
    ({"text": b"hi"}, "text must be a string, got bytes"),
    ({"text": "hi", "instruction": ["a"]}, "instruction must be a string, got list"),
    ({"image": 3.5}, "unsupported image type float"),
    ({"image": b"junk"}, "cannot decode image (not an image"),
    ({"image": png(random_image(20, 20, 1))[:60]}, "cannot decode image"),
    ({"image": "data:image/png;base64,\u00e9\u00e9"}, "cannot decode image"),
    ({"text": "   "}, "empty item"),
    (None, "expected a str, dict or Query, got NoneType"),
    ({"text": "hi <|image_pad|>"}, "text contains the reserved vision token"),
    ({"text": "hi", "instruction": "<|image_pad|>"}, "instruction contains the reserved vision token"),
    ({"text": "hi", "video_options": {"num_frames": -1}}, "video_options: "),  # checked without a video too
    ({"video": [np.zeros((56, 56, 3), np.uint8)] * 4, "video_options": {"num_frames": 1}}, "num_frames=1 rounds to 0 frames"),
    ({"text": "hi", "trace": "a <|vision_start|> b"}, "trace contains the reserved vision token"),
]


def test_each_bad_item_is_an_error_row_and_good_neighbours_are_unchanged(engine):
    good = ["a cat on a chair", {"text": "what is this?", "image": random_image(40, 60, 2)}]
    items = [good[0]] + [bad for bad, _ in BAD_ITEMS] + [good[1]]
    res = engine.embed(items, errors="return")
    alone = engine.embed(good)
    assert len(res.errors) == len(items) == res.embeddings.shape[0]
    for (bad, expected), error, row in zip(BAD_ITEMS, res.errors[1:-1], res.embeddings[1:-1]):
        assert error is not None and expected in error, (bad, error)
        assert torch.isnan(row).all()
    assert res.errors[0] is None and res.errors[-1] is None
    assert float(torch.cosine_similarity(res.embeddings[[0, -1]], alone.embeddings).min()) >= 0.99999  # batch invariance
    with pytest.raises(InvalidInputError) as caught:
        engine.embed(["fine", {"text": "hi", "trace": b"abc"}])
    assert caught.value.index == 1 and caught.value.field == "trace"
    with pytest.raises(InvalidInputError) as caught:  # the instruction's fault, not the text's (found by a review)
        engine.embed(["fine", {"text": "hi", "instruction": "<|image_pad|>"}])
    assert caught.value.index == 1 and caught.value.field == "instruction"


def test_a_supplied_trace_holds_no_vision_token_and_no_foreign_id(engine):
    """A vision placeholder in a trace would be taken for an image's row: beside an image in one step
    that crashed the whole batch. Ids go through the same check on every way in (`with_trace` too)."""
    image = {"text": "what is this?", "image": random_image(40, 60, 2)}
    vocab = engine.model_cfg.text.vocab_size
    for trace in ([engine.model_cfg.image_token_id] * 2, [5, engine.model_cfg.video_token_id]):
        res = engine.embed([image, {"text": "a cat", "trace": trace}], errors="return")
        assert res.errors[0] is None and "trace contains the reserved vision token" in res.errors[1], res.errors
    for trace in ([engine.model_cfg.vision_end_token_id], [vocab]):
        with pytest.raises(InvalidInputError) as caught:
            engine.with_trace(engine.make_sequence("a cat", 3), trace, 3)
        assert caught.value.index == 3 and caught.value.field == "trace"


def test_a_foreign_exception_while_preparing_an_item_is_that_items_error(engine, monkeypatch):
    real = engine.prompts.build

    def build(query, index, **kw):
        if query.text == "boom":
            raise RuntimeError(f"tokenizer exploded at {object()!r}")
        return real(query, index, **kw)

    monkeypatch.setattr(engine.prompts, "build", build)
    res = engine.embed(["fine", "boom"], errors="return", think=False)
    assert res.errors[0] is None and res.errors[1] == "cannot prepare this item (RuntimeError: tokenizer exploded at <object>)"


@pytest.mark.parametrize("kw,message", [
    ({"think": "yes"}, "think must be a bool, got str"),
    ({"max_trace_tokens": True}, "max_trace_tokens must be an int, got bool"),
    ({"max_trace_tokens": 2.5}, "max_trace_tokens must be an int, got float"),
    ({"max_trace_tokens": -1}, "max_trace_tokens must be >= 0"),
    ({"instruction": "\ud800"}, "instruction is not valid Unicode"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be >= 1 or -1"),
    ({"instruction": "see <|vision_start|>"}, "instruction contains the reserved vision token"),
    ({"progress": 5}, "progress must be True, False or a callable, got int"),
])
def test_wrong_call_settings_raise_once_even_with_errors_return(engine, kw, message):
    with pytest.raises(InvalidInputError, match=message) as caught:
        engine.embed(["a", "b"], errors="return", **kw)
    assert caught.value.index is None and caught.value.field == next(iter(kw))


def test_an_unknown_errors_mode_is_an_invalid_input_error(engine):
    with pytest.raises(InvalidInputError, match="errors must be 'raise' or 'return', got 'ignore'") as caught:
        engine.embed(["a"], errors="ignore")
    assert caught.value.index is None and caught.value.field == "errors"


# ---------------------------------------------------------------------- kind 3: cheap bounds first
class _Spy:
    """The engine's tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tokenizer):
        self._tok, self.longest = tokenizer, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_oversized_text_is_refused_before_tokenizing_and_positions(engine, monkeypatch):
    import tte_engine.engine as engine_module

    spy = _Spy(engine.prompts.tokenizer)
    monkeypatch.setattr(engine.prompts, "tokenizer", spy)
    positions = []
    real_positions = engine_module.prompt_positions
    monkeypatch.setattr(engine_module, "prompt_positions", lambda *a, **k: positions.append(1) or real_positions(*a, **k))
    cap = engine.max_model_len * engine.prompts.max_token_chars
    res = engine.embed(["word " * (cap // 5 + 1), {"text": "x", "instruction": "y" * (cap + 1)}, {"text": "x", "trace": "z" * (cap + 1)}],
                       errors="return")
    assert [e.split(" of ")[0] for e in res.errors] == ["text", "instruction", "trace"]
    assert spy.longest == 0 and positions == []
    # fits the character bound but not the token limit: tokenized, refused before rotary positions are computed
    res = engine.embed(["word " * engine.max_model_len], errors="return")
    assert "exceeds the model limit" in res.errors[0] and positions == []


def test_truncate_prompt_tokens_cuts_the_end_of_the_text(engine):
    long_text = " ".join(f"w{i}" for i in range(3000))
    cut = engine.embed([long_text], think=False, truncate_prompt_tokens=60)
    ids = cut.prompt_token_ids[0]
    assert cut.errors == [None] and 58 <= len(ids) <= 60
    decoded = engine.prompts.decode(ids)
    kept = decoded[decoded.index("w0 "):].split("\n")[0]
    assert len(kept) > 5 and long_text.startswith(kept)  # the start of the text is kept, the template whole
    assert engine.embed([kept], think=False).prompt_token_ids[0] == ids
    with pytest.raises(InvalidInputError, match="cannot be truncated to 40"):
        engine.embed([{"text": "x y z", "instruction": "a long instruction " * 3}], truncate_prompt_tokens=40)


@given(unit=st.sampled_from(["привет мир ", "😀🎉👍🏽 ", "漢字かな交じり文 ", "ab😀 c漢 d ", "e\u0301\u0327 "]), limit=st.integers(64, 110))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_truncation_cuts_multibyte_text_at_a_character(engine, unit, limit):
    """A text whose characters span several byte-level tokens (Cyrillic, CJK, emoji, combining
    marks) is cut to fit, never refused, and leaves no broken character: the kept text is a prefix
    of the original (found by a bad-input review: the cut used to decode partial tokens to U+FFFD,
    which re-tokenized longer, and truncation failed or left U+FFFD)."""
    text = unit * 200
    seq = engine.make_sequence(text, 0, think=False, truncate_prompt_tokens=limit)
    ids = list(seq.prompt.token_ids)
    assert limit - 4 <= len(ids) <= limit  # an emoji is up to 4 byte-level tokens
    decoded = engine.prompts.tokenizer.decode(ids)  # special tokens kept: the text ends at the turn's <|im_end|>
    assert "\ufffd" not in decoded
    kept = decoded.split(engine.tte.instructions["default"] + "\n", 1)[1].split("<|im_end|>")[0]
    assert kept and text.startswith(kept)


def test_truncate_to_the_model_leaves_room_for_the_trace(make_checkpoint):
    short = Engine(make_checkpoint("contract", think_max_tokens=4), max_model_len=160)
    res = short.embed(["word " * 1000], truncate_prompt_tokens=-1)
    room = 160 - len(short.prompts.think_end_ids) - len(short.prompts.suffix_ids) - 4  # the model, less the stop, suffix and trace budget
    assert res.errors == [None] and room - 2 <= len(res.prompt_token_ids[0]) <= room


def test_truncation_never_refuses_what_fits_untruncated(make_checkpoint):
    """truncate_prompt_tokens only ever cuts the text: an item that fits without it fits with it
    (-1 or N). A supplied trace, list or string, is counted once and kept whole beside the prompt
    (a list was counted twice and refused, a string not at all); one longer than the model is
    refused either way. A trace budget larger than the model (-1 cannot leave room for it) used to
    refuse every item: the text is then cut to the model and the trace gets what is left, as
    without truncation."""
    short = Engine(make_checkpoint("contract", think_max_tokens=4), max_model_len=400)
    text_trace = " ".join(["thought"] * 8)
    for truncate in (None, -1, 390):
        res = short.embed([{"text": "a cat", "trace": [5] * 300}, {"text": "a cat", "trace": text_trace},
                           "word " * 1000 if truncate else "a dog", {"text": "a", "trace": [5] * 500}], errors="return",
                          truncate_prompt_tokens=truncate)
        assert res.errors[:3] == [None] * 3 and res.stop_reasons[:2] == ["given", "given"], (truncate, res.errors)
        assert "trace of 500 tokens exceeds the model limit" in res.errors[3]
        assert len(res.prompt_token_ids[2]) + len(res.trace_token_ids[2]) <= 400
    long_with_trace = {"text": "word " * 1000, "trace": text_trace}
    res = short.embed([long_with_trace], truncate_prompt_tokens=-1, errors="return")
    assert res.errors == [None] and res.trace_token_ids[0][: len(short.prompts.trace_ids(text_trace, 0))] == short.prompts.trace_ids(text_trace, 0)
    strings, real_trace_ids = [], short.prompts.trace_ids
    short.prompts.trace_ids = lambda trace, index: (strings.append(isinstance(trace, str)), real_trace_ids(trace, index))[1]
    short.make_sequence(long_with_trace, truncate_prompt_tokens=-1)
    assert strings.count(True) == 1  # a string trace is tokenized once, however often the prompt is built
    del short.prompts.trace_ids
    tight = Engine(make_checkpoint("contract", think_max_tokens=4), max_model_len=128)
    alone = tight.make_sequence("hi", max_trace_tokens=200)
    for truncate in (-1, 60, 100):
        seq = tight.make_sequence("hi", max_trace_tokens=200, truncate_prompt_tokens=truncate)
        assert (list(seq.prompt.token_ids), seq.max_trace_tokens) == (list(alone.prompt.token_ids), alone.max_trace_tokens), truncate
    res = short.embed(["word " * 1000], max_trace_tokens=10**6, truncate_prompt_tokens=-1, errors="return")
    assert res.errors == [None] and len(res.prompt_token_ids[0]) + len(res.trace_token_ids[0]) <= 400


def test_a_model_length_no_item_fits_is_refused_at_start(make_checkpoint):
    """max_model_len below the shortest prompt used to start an engine on which every item then failed
    alone; the smallest length that holds it starts, and that item embeds."""
    path = make_checkpoint("contract", think_max_tokens=4)
    with pytest.raises(ValueError, match=r"max_model_len 10 holds no item: the shortest prompt \(a one-word text, no instruction"):
        Engine(path, max_model_len=10)
    probe = Engine(path, max_model_len=512)
    need = len(probe.embed(["a"], think=False, instruction="").prompt_token_ids[0]) + len(probe.prompts.think_end_ids) + len(probe.prompts.suffix_ids)
    with pytest.raises(ValueError, match=f"take {need}"):
        Engine(path, max_model_len=need - 1)
    tight = Engine(path, max_model_len=need)
    assert tight.embed(["a"], think=False, instruction="", errors="return").errors == [None]


# ---------------------------------------------------------------------- kind 5: EXIF orientation
UNDO = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_is_applied_for_every_source(engine, orientation, tmp_path):
    upright = random_image(56, 112, 5)  # landscape: a missed rotation changes the grid
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = png(upright.transpose(UNDO[orientation]), exif=exif)  # as a camera stores it
    path = tmp_path / "photo.png"
    path.write_bytes(stored)
    url = "data:image/png;base64," + base64.b64encode(stored).decode()
    for source in (stored, str(path), url, Image.open(io.BytesIO(stored))):
        assert np.array_equal(np.asarray(load_image(source)), np.asarray(upright)), (orientation, type(source))
    res = engine.embed([{"image": stored}, {"image": upright}], think=False)
    assert res.prompt_token_ids[0] == res.prompt_token_ids[1]
    assert float(torch.cosine_similarity(res.embeddings[0], res.embeddings[1], dim=0)) >= 0.99999


def test_jpeg_orientation_matches_transformers_load_image():
    from transformers.image_utils import load_image as hf_load_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    random_image(64, 96, 6).save(buf, format="JPEG", exif=exif, quality=95)
    data = buf.getvalue()
    ref = hf_load_image(base64.b64encode(data).decode())
    ours = load_image(data)
    assert ours.size == ref.size == (64, 96) and np.array_equal(np.asarray(ours), np.asarray(ref))
    cfg = ImageProcessorConfig()
    hf_grid = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)(images=[ref])["image_grid_thw"][0].tolist()
    assert list(preprocess_image(data, cfg).grid_thw) == hf_grid


# ---------------------------------------------------------------------- kind 6: content keys
def test_same_pixel_bytes_in_another_shape_is_another_image(engine, tmp_path):
    wide = np.random.default_rng(0).integers(0, 256, (56, 112, 3), dtype=np.uint8)
    tall = wide.reshape(112, 56, 3)  # the same bytes
    cfg = engine.image_cfg
    assert preprocess_image(wide, cfg).digest != preprocess_image(tall, cfg).digest
    assert preprocess_image(wide, cfg).digest != preprocess_image(wide, ImageProcessorConfig(image_mean=(0.5, 0.5, 0.5))).digest
    with closing(ResultCache(tmp_path / "c.sqlite")) as store:
        cache = EngineCache(store, engine)
        first = embed_items(engine, [{"image": wide}], cache=cache)[0]
        second = embed_items(engine, [{"image": tall}], cache=cache)[0]
    assert first.cached is None and second.cached is None
    expected = engine.embed([{"image": tall}]).embeddings[0]  # (its system-prompt blocks now come from the prefix cache)
    assert float(torch.cosine_similarity(torch.from_numpy(second.embedding), expected, dim=0)) >= 0.99999


def test_entries_of_an_older_cache_schema_are_ignored(tmp_path):
    path = tmp_path / "old.sqlite"
    with closing(ResultCache(path)) as store:
        store.put([("k", [1, 2], "stop")], [("e", np.ones(4, np.float32), [1], None, 1)])
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    with closing(ResultCache(path)) as store:
        assert store.counts() == {"traces": 0, "embeddings": 0} and store.get_trace("k") is None
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0] == str(SCHEMA_VERSION)


# ---------------------------------------------------------------------- kind 8: deterministic messages
def test_error_messages_hold_no_object_reprs(engine):
    junk = [b"junk", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, io.BytesIO(b"x")]
    first = engine.embed([{"image": j} for j in junk], errors="return").errors
    again = engine.embed([{"image": j} for j in junk], errors="return").errors
    assert first == again and all(e and "0x" not in e and " at " not in e for e in first), first
    assert describe(ValueError(f"bad {object()!r} and {hex(id(engine))}")) == "ValueError: bad <object> and <object>"


# ---------------------------------------------------------------------- kind 9: a bad cache file
def test_a_missing_video_file_says_so_without_pyav(monkeypatch):
    """Where the video is (no such file, bad data: URL) is checked before PyAV is needed."""
    from tte_engine import video
    from tte_engine.video import VideoError

    def no_pyav():
        raise VideoError("decoding video files needs PyAV")

    monkeypatch.setattr(video, "_import_av", no_pyav)
    with pytest.raises(VideoError, match="no video file at"):
        video.decode_video("/nonexistent/clip.mp4", None, None)
    with pytest.raises(VideoError, match="needs PyAV"):
        video.decode_video(b"\x1a\x45\xdf\xa3", None, None)


def test_a_file_that_is_not_a_cache_is_a_cache_error(tmp_path):
    path = tmp_path / "broken.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CacheError, match="not a usable tte_engine cache .*delete it"):
        ResultCache(path)
    with closing(ResultCache(tmp_path / "good.sqlite")) as store:
        store.put([(f"k{i}", list(range(40)), None) for i in range(500)], [])
    data = bytearray((tmp_path / "good.sqlite").read_bytes())
    data[4096:-4096] = os.urandom(len(data) - 8192)
    (tmp_path / "good.sqlite").write_bytes(bytes(data))
    with pytest.raises(CacheError, match="malformed"):
        ResultCache(tmp_path / "good.sqlite")


def test_a_cache_that_fails_later_is_skipped_with_a_warning(engine, tmp_path, caplog):
    class Failing:
        def execute(self, *a):
            raise sqlite3.DatabaseError("database disk image is malformed")

    store = ResultCache(tmp_path / "c.sqlite")
    real = store._conn
    store._conn = Failing()
    results = embed_items(engine, ["a cat"], cache=EngineCache(store, engine))
    again = engine.embed(["a cat"]).embeddings[0]  # (its prompt blocks now come from the prefix cache)
    assert results[0].error is None and float(torch.cosine_similarity(torch.from_numpy(results[0].embedding), again, dim=0)) >= 0.99999
    assert sum("continuing without it" in r.message for r in caplog.records) == 1
    real.close()


# ---------------------------------------------------------------------- the rule, as a property
_bad_text = st.one_of(
    st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3).map(lambda s: f"a {s} b"),  # lone surrogates
    st.integers(), st.binary(max_size=8), st.lists(st.integers(), max_size=3), st.just("  \n\t "),
)
_bad_item = st.one_of(
    _bad_text,
    st.builds(lambda t: {"text": t}, _bad_text),
    st.builds(lambda t: {"text": "ok", "instruction": t}, _bad_text.filter(lambda t: not isinstance(t, str) or not t.isspace())),
    st.builds(lambda t: {"text": "ok", "trace": t}, st.one_of(st.binary(max_size=6), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                                                              st.integers(), st.floats(), st.lists(st.booleans(), min_size=1, max_size=3))),
    st.builds(lambda k: {k: "x", "text": "ok"}, st.one_of(st.integers(), st.text(min_size=1, max_size=4).filter(lambda k: k not in
                                                                                                          ("text", "image", "images", "video", "video_options", "instruction", "trace")))),
    st.builds(lambda b: {"image": b}, st.binary(max_size=40)),
    st.none(), st.floats(), st.lists(st.text(max_size=3), max_size=2),
)
_good_item = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "Zs"]), min_size=1, max_size=30).filter(lambda t: t.strip()),
    st.builds(lambda h, w, seed: {"image": random_image(h, w, seed), "text": "x"}, st.integers(8, 40), st.integers(8, 40), st.integers(0, 9)),
)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
@given(items=st.lists(st.tuples(st.booleans(), _bad_item, _good_item).map(lambda t: (t[0], t[1] if t[0] else t[2])), min_size=1, max_size=5))
def test_no_bad_item_escapes_or_gets_a_vector(engine, items):
    anchor = "the anchor item"
    res = engine.embed([anchor] + [it for _, it in items], errors="return", think=False)
    assert len(res.errors) == res.embeddings.shape[0] == len(items) + 1
    assert res.errors[0] is None
    assert float(torch.cosine_similarity(res.embeddings[0], _alone(engine, anchor), dim=0)) >= 0.99999
    for (bad, item), error, row in zip(items, res.errors[1:], res.embeddings[1:]):
        if bad:
            assert error is not None and torch.isnan(row).all(), item
        else:
            assert error is None and torch.isfinite(row).all(), (item, error)


_ALONE = {}


def _alone(engine, item):
    if item not in _ALONE:
        _ALONE[item] = engine.embed([item], think=False).embeddings[0]
    return _ALONE[item]


def test_any_collection_of_items_is_a_batch_and_one_item_is_one(engine):
    want = engine.embed(["a cat", "a dog"], max_trace_tokens=2)
    for batch in (("a cat", "a dog"), (t for t in ["a cat", "a dog"]), iter(["a cat", "a dog"]), np.array(["a cat", "a dog"])):
        got = engine.embed(batch, max_trace_tokens=2)
        assert got.errors == [None, None] and got.trace_token_ids == want.trace_token_ids
    single = engine.embed({"text": "a cat"}, max_trace_tokens=2)
    assert len(single.embeddings) == 1 and single.trace_token_ids[0] == want.trace_token_ids[0]
    assert len(engine.embed("a cat", max_trace_tokens=2).embeddings) == 1


def test_every_error_a_user_catches_is_importable_from_the_package():
    """The README tells users to catch these: `from tte_engine import ModelOutputError` must work
    (it was only in tte_engine.errors). `Cancelled` stays internal: no caller ever sees it."""
    import inspect

    import tte_engine
    from tte_engine import errors

    raised = {name for name, cls in inspect.getmembers(errors, inspect.isclass)
              if issubclass(cls, errors.TTEError) and cls.__module__ == errors.__name__} - {"Cancelled"}
    assert raised <= set(tte_engine.__all__) and all(getattr(tte_engine, name) is getattr(errors, name) for name in raised)
