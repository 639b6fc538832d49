"""tte-embed: resumable runs (a killed run resumes to exactly the uninterrupted output), the SQLite
trace/embedding cache (hits generate no trace; a new head re-uses the traces), Parquet output."""

import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tte_engine import Engine, SamplingParams
from tte_engine.cli import main, read_items
from tte_engine.result_cache import EngineCache, ResultCache, embed_items, trace_fingerprint, usage

from .conftest import data_url, png_bytes
from cli_checks import assert_usage_error

BATCH = 2
CLIP_OPTIONS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 4}  # video_options: a few tokens per clip, fast on CPU


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, serve_checkpoint):
    """12 lines: texts, two images (one path, one missing), a malformed line, mixed ids."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "cat.png").write_bytes(png_bytes(60, 90, 7))
    lines = [json.dumps({"id": f"t{i}", "text": f"document {i} about " + "cats and dogs " * (i % 3 + 1)}) for i in range(8)]
    lines.insert(3, json.dumps({"id": "img", "text": "a photo", "image": "cat.png"}))
    lines.insert(6, json.dumps({"id": "missing", "image": "nowhere.png"}))
    lines.insert(9, "{not json")
    lines.append(json.dumps({"text": "no id: the item number is the id", "instruction": "retrieval"}))
    (d / "in.jsonl").write_text("\n".join(lines) + "\n")
    return d / "in.jsonl"


def run(corpus, checkpoint, out, *extra) -> int:
    return main([str(corpus), "--checkpoint", str(checkpoint), "--output", str(out), "--batch-size", str(BATCH), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def uninterrupted(corpus, serve_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    assert run(corpus, serve_checkpoint, d / "out", "--cache", str(d / "cache.sqlite")) == 0
    return d / "out"


def read(prefix):
    return np.load(f"{prefix}.npy"), [json.loads(line) for line in Path(f"{prefix}.jsonl").read_text().splitlines()]


def same_files(a, b) -> bool:
    """Both outputs byte for byte: the records, and the vectors bit for bit."""
    return all(Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes() for ext in (".jsonl", ".npy"))


def test_uninterrupted_output(uninterrupted, corpus, reference):
    vectors, records = read(uninterrupted)
    assert vectors.shape == (12, reference.embedding_dim) and len(records) == 12
    assert [r["index"] for r in records] == list(range(12))
    assert [r["id"] for r in records][:4] == ["t0", "t1", "t2", "img"] and records[-1]["id"] == 11
    failed = [r["id"] for r in records if r["error"]]
    assert failed == ["missing", 9] and np.isnan(vectors[[6, 9]]).all() and not np.isnan(vectors[[0, 3, 11]]).any()
    assert all(r["trace"] and r["trace_tokens"] > 0 for r in records if not r["error"])
    assert not (uninterrupted.parent / "out.parts").exists()  # shards merged and removed
    ref = reference.embed(["document 0 about cats and dogs ", {"text": "a photo", "image": str(corpus.parent / "cat.png")}])
    assert float(torch.cosine_similarity(torch.from_numpy(vectors[[0, 3]]), ref.embeddings).min()) >= 0.99999
    assert records[0]["trace"] == ref.traces[0]


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt])
def test_crash_mid_batch_resumes_to_identical_output(corpus, serve_checkpoint, uninterrupted, tmp_path, monkeypatch, capsys, stop):
    """A crash (an exception: one line and exit 1) or Ctrl-C (one line and exit 130), no traceback, mid-run:
    re-running resumes to the uninterrupted output."""
    real_step, calls = Engine.step, {"n": 0}

    def crashing_step(self):
        calls["n"] += 1
        if calls["n"] == 25:  # inside the third batch
            raise stop("simulated crash")
        return real_step(self)

    monkeypatch.setattr(Engine, "step", crashing_step)
    out = tmp_path / "out"
    if stop is KeyboardInterrupt:
        assert run(corpus, serve_checkpoint, out, "--cache", str(tmp_path / "cache.sqlite")) == 130
        assert capsys.readouterr().err.endswith("tte-embed: interrupted; the batches written are kept: run the same command again to resume\n")
    else:  # a device error: one line and exit 1 (it was a traceback)
        assert run(corpus, serve_checkpoint, out, "--cache", str(tmp_path / "cache.sqlite")) == 1
        assert capsys.readouterr().err.endswith("\ntte-embed: error: RuntimeError: simulated crash; the batches written are kept: "
                                                "run the same command again to resume\n")
    shards = sorted(p.name for p in (tmp_path / "out.parts").glob("0*.jsonl"))
    assert 1 <= len(shards) < 6 and not (tmp_path / "out.npy").exists()  # some batches done, none since the crash
    monkeypatch.setattr(Engine, "step", real_step)
    assert run(corpus, serve_checkpoint, out, "--cache", str(tmp_path / "cache.sqlite")) == 0
    assert same_files(out, uninterrupted)


def test_sigkilled_process_resumes_to_identical_output(corpus, serve_checkpoint, uninterrupted, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache.sqlite"
    cmd = [sys.executable, "-m", "tte_engine.cli", str(corpus), "--checkpoint", str(serve_checkpoint), "--output", str(out),
           "--batch-size", str(BATCH), "--device", "cpu", "--cache", str(cache)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    parts = tmp_path / "out.parts"
    deadline = time.monotonic() + 120
    while not (parts / "000001.jsonl").exists():
        assert proc.poll() is None, "tte-embed ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out.npy").exists()
    done_before = len(list(parts.glob("0*.jsonl")))
    assert done_before < 6
    assert run(corpus, serve_checkpoint, out, "--cache", str(cache)) == 0
    assert same_files(out, uninterrupted)


def test_rerun_embeds_changed_items_again_and_drops_vanished_ids(serve_checkpoint, reference, tmp_path, capsys):
    """Resuming goes by id and content: a .txt file rewritten under the same output (its ids are line
    numbers) gets its own vectors, never the earlier lines'."""
    src, out = tmp_path / "q.txt", tmp_path / "q"
    src.write_text("alpha\nbeta\n")
    assert run(src, serve_checkpoint, out, "--no-cache") == 0
    src.write_text("alpha\ngamma\n")
    assert run(src, serve_checkpoint, out, "--no-cache") == 0
    err = capsys.readouterr().err
    assert "resuming: 1 of 2" in err and "1 item(s) differ from the earlier run's" in err
    vectors, records = read(out)
    want = reference.embed(["alpha", "gamma"])
    assert float(torch.cosine_similarity(torch.from_numpy(vectors), want.embeddings).min()) >= 0.99999
    src.write_text("alpha\n")
    assert run(src, serve_checkpoint, out, "--no-cache") == 0
    assert "1 earlier row(s) whose ids are not in" in capsys.readouterr().err
    assert read(out)[0].shape[0] == 1


def test_rerun_embeds_again_an_item_whose_image_file_or_line_number_changed(serve_checkpoint, tmp_path, capsys):
    """The digest also covers what the line points at (a replaced image file) and a bad line's error
    (which names its line number)."""
    (tmp_path / "pic.png").write_bytes(png_bytes(40, 60, 1))
    src, out = tmp_path / "q.jsonl", tmp_path / "out"
    src.write_text('{"id": "p", "image": "pic.png"}\n{not json\n')
    assert run(src, serve_checkpoint, out, "--no-cache") == 0
    first = read(out)[0][0].copy()
    (tmp_path / "pic.png").write_bytes(png_bytes(40, 60, 2))
    os.utime(tmp_path / "pic.png", ns=(1, 1))  # a replaced file, whatever the clock's resolution
    src.write_text("\n" + src.read_text())  # the bad line is now line 3
    assert run(src, serve_checkpoint, out, "--no-cache") == 0
    assert "2 item(s) differ from the earlier run's" in capsys.readouterr().err
    vectors, records = read(out)
    assert not np.allclose(vectors[0], first) and records[1]["error"].startswith("line 3:")


def write_frames(directory: Path, n: int = 4) -> None:
    """f0.png ... f{n-1}.png: same-size frames, different pixels."""
    directory.mkdir(exist_ok=True)
    for k in range(n):
        (directory / f"f{k}.png").write_bytes(png_bytes(40, 60, k))


def test_frame_lists_are_relative_to_the_input_file_at_any_depth(serve_checkpoint, tmp_path, monkeypatch):
    """`videos` as a list of frame-path lists (and `video` as one list of frames), relative to the .jsonl
    file and run from another directory: every frame is found (a data: URL frame is left as it is), and
    the item is the same item, with the same vector, as with absolute paths."""
    d = tmp_path / "corpus"
    write_frames(d)
    inline = data_url((d / "f3.png").read_bytes())
    rel = {"text": "two clips", "video": ["f0.png", "f1.png"], "videos": [["f2.png", inline], ["f1.png", "f2.png"]], "video_options": CLIP_OPTIONS}
    absolute = dict(rel, video=[str(d / "f0.png"), str(d / "f1.png")],
                    videos=[[str(d / "f2.png"), inline], [str(d / "f1.png"), str(d / "f2.png")]])
    src = d / "in.jsonl"
    src.write_text(json.dumps({"id": "rel", **rel}) + "\n" + json.dumps({"id": "abs", **absolute}) + "\n")
    items, ids, _ = read_items(src)
    assert items == [absolute, absolute] and ids == ["rel", "abs"]
    monkeypatch.chdir(tmp_path)  # not the corpus's directory: a frame left relative is not found
    assert run(Path("corpus") / "in.jsonl", serve_checkpoint, tmp_path / "out", "--no-cache", "--no-think") == 0
    vectors, records = read(tmp_path / "out")
    assert [r["error"] for r in records] == [None, None] and records[0]["prompt_tokens"] == records[1]["prompt_tokens"]
    assert float(torch.cosine_similarity(torch.from_numpy(vectors[:1]), torch.from_numpy(vectors[1:]))) >= 0.99999


def test_rerun_embeds_again_an_item_whose_video_frame_file_changed(serve_checkpoint, tmp_path, monkeypatch, capsys):
    """The digest stamps every frame file a video names, a list of videos' frames included: a frame
    replaced under the same name re-embeds the items that show it, and only those."""
    write_frames(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative frames are found even unresolved: this checks the digest alone
    lines = [{"id": "a", "videos": [["f0.png", "f1.png"]]}, {"id": "b", "videos": [["f2.png", "f3.png"]]}, {"id": "c", "video": ["f1.png", "f3.png"]}]
    src, out = tmp_path / "q.jsonl", tmp_path / "out"
    src.write_text("".join(json.dumps(dict(line, video_options=CLIP_OPTIONS)) + "\n" for line in lines))
    assert run(src, serve_checkpoint, out, "--no-cache", "--no-think") == 0
    first_vectors, first_records = read(out)
    assert [r["error"] for r in first_records] == [None] * 3
    capsys.readouterr()
    (tmp_path / "f1.png").write_bytes(png_bytes(40, 60, 9))
    os.utime(tmp_path / "f1.png", ns=(1, 1))  # a replaced file, whatever the clock's resolution
    assert run(src, serve_checkpoint, out, "--no-cache", "--no-think") == 0
    err = capsys.readouterr().err
    assert "resuming: 1 of 3 item(s) already written; 2 item(s) differ from the earlier run's" in err
    vectors, records = read(out)
    assert records[1] == first_records[1] and np.array_equal(vectors[1], first_vectors[1])  # b is kept as it was
    assert [r["error"] for r in records] == [None] * 3
    for i in (0, 2):
        assert records[i]["input_digest"] != first_records[i]["input_digest"] and not np.allclose(vectors[i], first_vectors[i])


def test_malformed_media_values_are_error_rows(serve_checkpoint, tmp_path):
    """A media value that names no possible file, or nests too deep, fails its own item only; URLs are
    left as they are, at any depth."""
    deep = json.loads("[" * 40 + '"f.png"' + "]" * 40)
    lines = [{"id": "nul", "videos": [["a\x00b.png"]]}, {"id": "surrogate", "video": ["a\ud800.png", "b.png"]}, {"id": "deep", "videos": deep},
             {"id": "url", "videos": [["http://example.com/f.png", "https://example.com/g.png"]]}, {"id": "ok", "text": "fine"}]
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items, *_ = read_items(src)
    assert items[3]["videos"] == lines[3]["videos"] and items[2].reason == "line 3: nested more than 32 levels deep"
    assert run(src, serve_checkpoint, tmp_path / "out", "--no-cache", "--no-think") == 0
    vectors, records = read(tmp_path / "out")
    assert [r["id"] for r in records] == ["nul", "surrogate", 2, "url", "ok"]
    assert all(r["error"] for r in records[:4]) and records[4]["error"] is None
    assert "no image file" in records[0]["error"] and "example.com/f.png" in records[3]["error"]
    assert np.isnan(vectors[:4]).all() and np.isfinite(vectors[4]).all()


def test_rerun_skips_written_ids_and_new_lines_are_added(corpus, serve_checkpoint, uninterrupted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copy(f"{uninterrupted}.npy", f"{out}.npy")
    shutil.copy(f"{uninterrupted}.jsonl", f"{out}.jsonl")
    shutil.copy(f"{uninterrupted}.manifest.json", f"{out}.manifest.json")
    grown = corpus.parent / "grown.jsonl"  # beside the corpus: its image paths name the same files
    grown.write_text(corpus.read_text() + json.dumps({"id": "new", "text": "a new line"}) + "\n")
    assert run(grown, serve_checkpoint, out, "--no-cache") == 0
    assert "resuming: 12 of 13" in capsys.readouterr().err
    vectors, records = read(out)
    old_vectors, old_records = read(uninterrupted)
    assert records[:12] == old_records and np.array_equal(vectors[:12], old_vectors, equal_nan=True)
    assert records[12]["id"] == "new" and records[12]["trace_tokens"] > 0


def test_cache_hits_generate_no_trace(corpus, serve_checkpoint, uninterrupted, tmp_path, capsys):
    cache = uninterrupted.parent / "cache.sqlite"  # filled by the uninterrupted run
    assert run(corpus, serve_checkpoint, tmp_path / "again", "--cache", str(cache)) == 0
    assert "0 trace tokens generated, cache hits: 10 embedding(s)" in capsys.readouterr().err
    vectors, records = read(tmp_path / "again")
    old_vectors, old_records = read(uninterrupted)
    assert np.array_equal(vectors, old_vectors, equal_nan=True)
    assert [r["cached"] for r in records if not r["error"]] == ["embedding"] * 10
    assert [r["trace"] for r in records] == [r["trace"] for r in old_records]
    # the same through the library: usage counts no generated trace tokens
    engine = Engine(serve_checkpoint)
    with closing(ResultCache(cache)) as store:
        results = embed_items(engine, ["document 0 about cats and dogs ", "not cached yet"], cache=EngineCache(store, engine))
    assert [r.cached for r in results] == ["embedding", None]
    assert results[0].trace_tokens == 0 and results[1].trace_tokens > 0
    assert usage(results[:1])["trace_tokens"] == 0 and usage(results[:1])["cached_trace_tokens"] == len(results[0].trace_ids)


def test_a_new_head_reuses_cached_traces(serve_checkpoint, tmp_path, mixed_items, monkeypatch):
    """Same backbone, other embedding-head weights: the embedding misses, the trace hits (no generation)."""
    other = tmp_path / "other_head"
    shutil.copytree(serve_checkpoint, other)
    head = load_file(str(other / "embedding_head.safetensors"))
    save_file({k: v.flip(0).contiguous() if v.dim() > 1 else v for k, v in head.items()}, str(other / "embedding_head.safetensors"))
    a, b = Engine(serve_checkpoint), Engine(other)
    assert a.fingerprint != b.fingerprint and trace_fingerprint(a) == trace_fingerprint(b)
    builds = []
    real_build = b.prompts.build
    monkeypatch.setattr(b.prompts, "build", lambda *args, **kw: builds.append(1) or real_build(*args, **kw))
    with closing(ResultCache(tmp_path / "cache.sqlite")) as store:
        first = embed_items(a, mixed_items, cache=EngineCache(store, a))
        reused = embed_items(b, mixed_items, cache=EngineCache(store, b))
    assert [r.cached for r in reused] == ["trace"] * len(mixed_items) and sum(r.trace_tokens for r in reused) == 0
    assert len(builds) == len(mixed_items)  # a trace hit re-uses the item's prompt: no second image decode or tokenization
    monkeypatch.undo()
    assert [r.trace_ids for r in reused] == [r.trace_ids for r in first]
    assert [r.stop_reason for r in reused] == [r.stop_reason for r in first]
    expected = b.embed(mixed_items)
    got = torch.from_numpy(np.stack([r.embedding for r in reused]))
    assert float(torch.cosine_similarity(got, expected.embeddings).min()) >= 0.99999
    assert float(torch.cosine_similarity(got, torch.from_numpy(np.stack([r.embedding for r in first]))).max()) < 0.999


@pytest.fixture
def store(tmp_path):
    """A fresh cache file, closed after the test."""
    with closing(ResultCache(tmp_path / "cache.sqlite")) as cache:
        yield cache


def test_a_non_finite_cached_embedding_is_a_miss_and_is_dropped(serve_checkpoint, store):
    """A cache written before NaN results became item errors may hold NaN rows: one is never
    served (tte-serve sent it as a 200 with NaN in the body); it is a miss, deleted, and the
    item's fresh result takes its place."""
    engine = Engine(serve_checkpoint)
    view = EngineCache(store, engine)
    embed_items(engine, ["a cat"], cache=view)
    key = store._conn.execute("SELECT key FROM embeddings").fetchone()[0]
    store._conn.execute("UPDATE embeddings SET embedding = ? WHERE key = ?", (np.full(4, np.nan, np.float32).tobytes(), key))
    assert store.get_embedding(key) is None
    assert store._conn.execute("SELECT count(*) FROM embeddings").fetchone()[0] == 0
    again = embed_items(engine, ["a cat"], cache=view)[0]
    assert again.error is None and again.cached != "embedding" and np.isfinite(again.embedding).all()
    assert embed_items(engine, ["a cat"], cache=view)[0].cached == "embedding"


@pytest.fixture(scope="module")
def cache_engine(serve_checkpoint):
    return Engine(serve_checkpoint)


DAMAGED_ITEMS = ["a cat", "two dogs on a sofa"]


def _unit(engine, scale=1.0):
    v = np.random.default_rng(0).standard_normal(engine.embedding_dim).astype(np.float32)
    return (scale * v / np.linalg.norm(v)).astype(np.float32).tobytes()


# (table, column, damaged value): what `UPDATE <table> SET <column> = ?` leaves in a cache file a tester or a bad disk edited
DAMAGE = {
    "text-embedding": ("embeddings", "embedding", lambda e: "oops"),
    "odd-length-embedding": ("embeddings", "embedding", lambda e: b"\x01\x02"),
    "narrow-zero-embedding": ("embeddings", "embedding", lambda e: bytes(64)),  # sqlite zeroblob(64)
    "zero-embedding": ("embeddings", "embedding", lambda e: bytes(4 * e.embedding_dim)),
    "nan-embedding": ("embeddings", "embedding", lambda e: np.full(e.embedding_dim, np.nan, np.float32).tobytes()),
    "unnormalized-embedding": ("embeddings", "embedding", lambda e: _unit(e, 3.0)),
    "integer-embedding": ("embeddings", "embedding", lambda e: 7),
    "text-embedding-trace": ("embeddings", "trace_ids", lambda e: "oops"),
    "odd-length-embedding-trace": ("embeddings", "trace_ids", lambda e: b"\x01\x02\x03"),
    "foreign-id-embedding-trace": ("embeddings", "trace_ids", lambda e: np.array([1, e.model_cfg.text.vocab_size], np.int64).tobytes()),
    "blob-stop-reason": ("embeddings", "stop_reason", lambda e: b"stop"),  # a number would be stored as text (column affinity)
    "text-embed-tokens": ("embeddings", "embed_tokens", lambda e: "many"),
    "text-trace": ("traces", "trace_ids", lambda e: "oops"),
    "odd-length-trace": ("traces", "trace_ids", lambda e: b"\x01\x02"),
    "foreign-id-trace": ("traces", "trace_ids", lambda e: np.array([1, e.model_cfg.text.vocab_size + 5], np.int64).tobytes()),
    "negative-id-trace": ("traces", "trace_ids", lambda e: np.array([-1, 2], np.int64).tobytes()),
    "vision-token-trace": ("traces", "trace_ids", lambda e: np.array([e.model_cfg.image_token_id], np.int64).tobytes()),
    "blob-trace-stop-reason": ("traces", "stop_reason", lambda e: b"stop"),
}


@pytest.mark.parametrize("table, column, value", DAMAGE.values(), ids=DAMAGE.keys())
def test_an_unusable_cache_entry_is_a_logged_miss_and_is_replaced(cache_engine, store, caplog, table, column, value):
    """A cache row the engine could never have written (edited, or damaged on disk) is never
    served nor an item error: each item is computed again, to what a fresh run gives, its row
    is replaced, and the file is named in one warning however many rows are bad."""
    engine = cache_engine
    view = EngineCache(store, engine)
    fresh = embed_items(engine, DAMAGED_ITEMS)
    embed_items(engine, DAMAGED_ITEMS, cache=view)
    if table == "traces":  # the trace layer answers only when the embedding misses
        store._conn.execute("DELETE FROM embeddings")
    assert store._conn.execute(f"UPDATE {table} SET {column} = ?", (value(engine),)).rowcount == len(DAMAGED_ITEMS)
    with caplog.at_level("WARNING", logger="tte_engine"):
        again = embed_items(engine, DAMAGED_ITEMS, cache=view)
    warned = [r.getMessage() for r in caplog.records if r.name == "tte_engine" and r.levelname == "WARNING"]
    assert len(warned) == 1 and str(store.path) in warned[0] and "unusable" in warned[0], warned
    layer = "embedding" if table == "embeddings" else "trace"
    for got, want in zip(again, fresh):
        assert got.error is None and got.cached != layer and got.cached != "embedding"
        assert got.trace_ids == want.trace_ids and got.stop_reason == want.stop_reason
        assert float(np.dot(got.embedding, want.embedding) / np.linalg.norm(got.embedding) / np.linalg.norm(want.embedding)) >= 0.99999
    replaced = embed_items(engine, DAMAGED_ITEMS, cache=view)  # the fresh results took the bad rows' places
    assert [r.cached for r in replaced] == ["embedding"] * len(DAMAGED_ITEMS)
    assert all(np.array_equal(r.embedding, g.embedding) for r, g in zip(replaced, again))


def test_cache_keys_follow_the_settings(serve_checkpoint, store):
    engine = Engine(serve_checkpoint)
    view = EngineCache(store, engine)
    item = "a key test"
    embed_items(engine, [item], cache=view)

    def source(**kw):
        return embed_items(engine, [item], cache=view, **kw)[0].cached

    assert source() == "embedding"
    assert source(think=False) is None and source(think=False) == "embedding"
    assert source(max_trace_tokens=3) is None
    assert source(instruction="retrieval") is None
    assert source(sampling=SamplingParams(temperature=1.0, seed=1)) is None and source(sampling=SamplingParams(temperature=1.0, seed=1)) == "embedding"
    unseeded = SamplingParams(temperature=1.0)
    assert source(sampling=unseeded) is None and source(sampling=unseeded) is None  # not a function of the input: never cached
    assert view.cache.counts() == {"traces": 4, "embeddings": 5}


def test_sampled_cache_keys_follow_the_drawn_seed(serve_checkpoint, store, monkeypatch):
    """A seed outside [0, 2**31) draws with a hash of it (`SamplingParams.draw_seed`; until stop 22
    its low 31 bits): the key follows the seed drawn, so an entry made under the other derivation
    is never served for a trace it did not draw. Seeds in that range key as they are."""
    engine = Engine(serve_checkpoint)
    view = EngineCache(store, engine)
    wide, narrow = SamplingParams(temperature=1.0, seed=2**31 + 5), SamplingParams(temperature=1.0, seed=5)
    before = view.keys(engine.make_sequence("a key test", 0, sampling=wide), wide, None)
    monkeypatch.setattr(SamplingParams, "draw_seed", lambda self: self.seed & (2**31 - 1))  # the old derivation
    assert view.keys(engine.make_sequence("a key test", 0, sampling=wide), wide, None) != before
    assert view.keys(engine.make_sequence("a key test", 0, sampling=wide), wide, None) == view.keys(
        engine.make_sequence("a key test", 0, sampling=narrow), narrow, None)  # both draw with 5: one trace


def test_cache_is_wal_and_shared_between_connections(serve_checkpoint, tmp_path):
    path = tmp_path / "cache.sqlite"
    with closing(ResultCache(path)) as writer, closing(ResultCache(path)) as reader, closing(sqlite3.connect(path)) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        writer.put([("k", [1, 2, 3], "stop")], [("e", np.full(4, 0.5, np.float32), [1, 2, 3], "stop", 1)])
        assert reader.get_trace("k") == ([1, 2, 3], "stop")
        emb, ids, reason, n = reader.get_embedding("e")
        assert emb.tolist() == [0.5] * 4 and ids == [1, 2, 3] and reason == "stop" and n == 1
        writer.put([("k", [9], None)], [])  # entries are immutable: the first write wins
        assert reader.get_trace("k") == ([1, 2, 3], "stop")


def test_parquet_output_matches_npy(corpus, serve_checkpoint, uninterrupted, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    assert run(corpus, serve_checkpoint, tmp_path / "out", "--format", "parquet", "--cache", str(uninterrupted.parent / "cache.sqlite")) == 0
    table = pq.read_table(tmp_path / "out.parquet")
    vectors, records = read(uninterrupted)
    assert table.num_rows == 12 and table.schema.field("embedding").type.list_size == vectors.shape[1]
    got = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(12, -1)
    assert np.array_equal(got, vectors, equal_nan=True)
    assert table.column("trace").to_pylist() == [r["trace"] for r in records]
    assert [json.loads(v) for v in table.column("id").to_pylist()] == [r["id"] for r in records]


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_a_repeated_id_is_that_items_error_row(serve_checkpoint, tmp_path, capsys, fmt):
    """An id that an earlier line has used to stop the whole run before any work: now the repeat
    alone is an error row (NaN vector) naming the first item, the rest are embedded, and the run
    resumes (rows are found by id: only the first of an id is embedded)."""
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": 1, "text": "c"}\n{"text": "d"}\n{"id": 2, "text": "b"}\n')
    out = tmp_path / "out"
    assert run(dup, serve_checkpoint, out, "--no-cache", "--no-think", "--format", fmt) == 0
    assert "2 item(s) repeat an earlier item's id (e.g. the item at index 2 repeats id 1 of index 0)" in capsys.readouterr().err
    if fmt == "npy":
        vectors, records = read(out)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(f"{out}.parquet")
        records = table.drop(["embedding"]).to_pylist()
        vectors = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
        for r in records:
            r["id"] = json.loads(r["id"])
    assert [r["id"] for r in records] == [1, 2, 1, 3, 2]
    assert [r["error"] for r in records] == [None, None, "id 1 repeats the id of the item at index 0: ids must be unique (a run's rows are "
                                             "found by id)", None, "id 2 repeats the id of the item at index 1: ids must be unique (a run's rows "
                                             "are found by id)"]
    assert np.isnan(vectors[[2, 4]]).all() and np.isfinite(vectors[[0, 1, 3]]).all()
    assert [list(r) for r in records[2:3]] == [list(records[0])]  # the same fields, in the same order
    assert run(dup, serve_checkpoint, out, "--no-cache", "--no-think", "--format", fmt) == 0  # resumes: nothing left to embed
    assert "resuming: 3 of 3 item(s) already written; 2 repeated id(s): error rows" in capsys.readouterr().err


def test_conflicts_are_reported(corpus, serve_checkpoint, tmp_path, capsys):
    parts = tmp_path / "half.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"engine": "something else"}))
    assert run(corpus, serve_checkpoint, tmp_path / "half", "--no-cache") == 2
    assert "other settings" in capsys.readouterr().err
    (tmp_path / "outdir").mkdir()
    for directory in (tmp_path / "outdir", Path(".")):  # was written as outdir/..npy, outdir/..jsonl
        with pytest.raises(SystemExit) as exit_:  # refused with the other arguments, before the model loads
            run(corpus, serve_checkpoint, directory, "--no-cache")
        assert exit_.value.code == 2 and "is a directory; give a file prefix" in capsys.readouterr().err
    assert not any((tmp_path / "outdir").iterdir())
    inside = tmp_path / "q.jsonl"
    inside.write_text('{"text": "a"}\n')
    # refused before the model loads (was after: a 7B model's load, then the usage error)
    _usage_error(capsys, [inside, "--checkpoint", tmp_path / "no-model", "--output", tmp_path / "q"], "would overwrite the input")


def test_a_failed_step_leaves_the_engine_usable(serve_checkpoint, mixed_items, store, monkeypatch):
    """One batch's device error raises, writes nothing to the cache, and the next batch runs (a Ray worker lives on)."""
    engine = Engine(serve_checkpoint)
    view = EngineCache(store, engine)
    runner = engine.stages[0].runner
    real_run, calls = runner.run, itertools.count(1)

    def run_failing_on_the_third_step(step):
        if next(calls) == 3:  # mid-batch
            raise RuntimeError("simulated device failure")
        return real_run(step)

    monkeypatch.setattr(runner, "run", run_failing_on_the_third_step)
    with pytest.raises(RuntimeError, match="simulated"):
        embed_items(engine, mixed_items, cache=view)
    assert not engine.has_unfinished() and engine.stages[0].blocks.reserved == 0
    assert engine.stages[0].blocks.num_free == engine.stages[0].blocks.num_blocks
    assert store.counts() == {"traces": 0, "embeddings": 0}  # nothing of the failed batch was cached
    results = embed_items(engine, mixed_items, cache=view)
    assert [r.error for r in results] == [None] * len(mixed_items) and [r.cached for r in results] == [None] * len(mixed_items)
    expected = engine.embed(mixed_items)
    got = torch.from_numpy(np.stack([r.embedding for r in results]))
    assert float(torch.cosine_similarity(got, expected.embeddings).min()) >= 0.99999


def test_a_finished_output_is_taken_over_only_with_the_same_settings(serve_checkpoint, make_checkpoint, reference, tmp_path, capsys):
    """The settings are recorded next to the final files: another --no-think or checkpoint is refused, not mixed in."""
    lines = ["a first line about cats", "a second line about dogs"]
    src, out = tmp_path / "in.txt", tmp_path / "out"
    src.write_text("\n".join(lines) + "\n")
    assert run(src, serve_checkpoint, out, "--no-cache") == 0
    finished = {ext: Path(f"{out}{ext}").read_bytes() for ext in (".npy", ".jsonl")}
    capsys.readouterr()

    # it used to keep the think=True vectors; refused before the model loads (a checkpoint that is none shows it)
    _usage_error(capsys, [src, "--checkpoint", tmp_path / "no-model", "--output", out, "--no-cache", "--no-think"], "other settings (think differs)")
    manifest = Path(f"{out}.manifest.json")
    assert not (tmp_path / "out.parts").exists() and json.loads(manifest.read_text())["think"] is True
    finished[".manifest.json"] = manifest.read_bytes()
    other = make_checkpoint("reasoner", seed=7, head="last_token", think_max_tokens=8)
    assert run(src, other, out, "--no-cache") == 2
    assert "other settings (checkpoint, engine differ)" in capsys.readouterr().err
    assert {ext: Path(f"{out}{ext}").read_bytes() for ext in finished} == finished  # refused runs leave the output as it was
    assert not (tmp_path / "out.parts").exists()

    assert run(src, serve_checkpoint, out, "--no-cache") == 0  # the same settings: nothing left to do
    assert "resuming: 2 of 2" in capsys.readouterr().err
    assert {ext: Path(f"{out}{ext}").read_bytes() for ext in finished} == finished

    assert run(src, serve_checkpoint, out, "--no-cache", "--no-think", "--overwrite") == 0
    vectors, records = read(out)
    assert json.loads(manifest.read_text())["think"] is False and [r["trace_tokens"] for r in records] == [0, 0]
    expected = reference.embed(lines, think=False)
    assert float(torch.cosine_similarity(torch.from_numpy(vectors), expected.embeddings).min()) >= 0.99999

    manifest.unlink()  # finished files that record no settings are not taken over either
    assert run(src, serve_checkpoint, out, "--no-cache", "--no-think") == 2
    assert "no manifest" in capsys.readouterr().err


def test_a_finished_parquet_output_records_its_settings(serve_checkpoint, tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    src, out = tmp_path / "in.txt", tmp_path / "out"
    src.write_text("one line\nanother line\n")
    assert run(src, serve_checkpoint, out, "--no-cache", "--format", "parquet") == 0
    before = Path(f"{out}.parquet").read_bytes()
    capsys.readouterr()
    _usage_error(capsys, [src, "--checkpoint", tmp_path / "no-model", "--output", out, "--no-cache", "--format", "parquet", "--no-think"],
                 "other settings (think differs)")
    assert Path(f"{out}.parquet").read_bytes() == before
    assert json.loads(pq.read_schema(f"{out}.parquet").metadata[b"tte_engine.manifest"])["think"] is True
    assert run(src, serve_checkpoint, out, "--no-cache", "--format", "parquet") == 0
    assert "resuming: 2 of 2" in capsys.readouterr().err


def test_arguments_that_cannot_work_stop_before_any_model_work(tmp_path, monkeypatch, capsys):
    """A file of another kind is not read as text, and Parquet without pyarrow is refused up front."""
    for missing, why in ((tmp_path / "nowhere.txt", "no such file"), (tmp_path, "is a directory")):
        with pytest.raises(SystemExit) as exit_:
            main([str(missing)])
        assert exit_.value.code == 2 and capsys.readouterr().err == f"tte-embed: error: INPUT {missing}: {why}\n"
    (tmp_path / "q.json").write_text('{"text": "a"}\n')
    (tmp_path / "q.txt").write_text("a\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "q.json")])
    assert exit_.value.code == 2 and "expected a .txt file (one text per line) or a .jsonl file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "q.txt"), "--format", "parquet"])
    assert exit_.value.code == 2 and "--format parquet needs pyarrow" in capsys.readouterr().err
    monkeypatch.delitem(sys.modules, "pyarrow")
    # call settings every row would fail on (found by a review: the run went on, wrote error rows and a manifest)
    for flags, message in ((["--max-trace-tokens", "-5"], "argument --max-trace-tokens: must be an integer >= 0, got '-5'"),
                           (["--instruction", "bad \udcff"], "--instruction: instruction is not valid Unicode")):
        with pytest.raises(SystemExit) as exit_:
            main([str(tmp_path / "q.txt"), "--checkpoint", str(tmp_path / "no-model"), *flags])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json", "q.txt"]


def test_an_instruction_with_a_vision_token_stops_before_the_run(serve_checkpoint, tmp_path, capsys):
    (tmp_path / "q.txt").write_text("a\n")
    assert main([str(tmp_path / "q.txt"), "--checkpoint", str(serve_checkpoint), "--instruction", "look: <|image_pad|>", "--no-cache"]) == 2
    assert "instruction contains the reserved vision token '<|image_pad|>'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.txt"]


def test_a_bad_or_id_less_line_among_integer_ids_is_its_own_error_row(serve_checkpoint, tmp_path):
    """A bad line's default id (its item number) was 2, the next line's own id: the whole run was
    refused as a duplicate the user never wrote. It takes "item N" instead, and the run goes on."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"id": 1, "text": "one"}\n{"id": 2, "text": "two"}\n{"id": 3, "text": "thr\n\xff{"text": "x"}\n'
                    b'{"text": "no id"}\n{"id": 0, "text": "zero"}\n')
    assert run(src, serve_checkpoint, tmp_path / "out", "--no-cache", "--no-think") == 0
    _, records = read(tmp_path / "out")
    assert [r["id"] for r in records] == [1, 2, "item 2", 3, 4, 0]  # 3 and 4 are no given id
    assert [r["error"] is None for r in records] == [True, True, False, False, True, True]
    assert run(src, serve_checkpoint, tmp_path / "out", "--no-cache", "--no-think") == 0  # and it resumes
    given = tmp_path / "given.jsonl"  # a file that gives "item 1" itself: the id-less line takes another name, not its row
    given.write_text('{"id": 1, "text": "a"}\n{"text": "b"}\n{"id": "item 1", "text": "c"}\n{"id": "item 3", "text": "d"}\n{"text": "e"}\n')
    assert run(given, serve_checkpoint, tmp_path / "given-out", "--no-cache", "--no-think") == 0
    _, records = read(tmp_path / "given-out")
    assert [r["id"] for r in records] == [1, "item 1'", "item 1", "item 3", 4] and all(r["error"] is None for r in records)


def test_files_at_the_output_that_are_not_a_runs_are_refused_not_replaced(serve_checkpoint, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("one line\n")
    foreign = tmp_path / "a.parts"  # a folder of the user's that happens to sit where the parts would go
    (foreign / "sub").mkdir(parents=True)
    (foreign / "sub" / "precious.txt").write_text("keep me")
    notes = tmp_path / "b.jsonl"  # one of the final files' names, alone
    notes.write_text("my notes\n")
    for prefix, survivor in ((tmp_path / "a", foreign / "sub" / "precious.txt"), (tmp_path / "b", notes)):
        assert run(src, serve_checkpoint, prefix, "--no-cache", "--no-think") == 2
        assert "pass --overwrite" in capsys.readouterr().err and survivor.exists()
    assert (foreign / "sub" / "precious.txt").read_text() == "keep me" and notes.read_text() == "my notes\n"
    assert run(src, serve_checkpoint, tmp_path / "b", "--no-cache", "--no-think", "--overwrite") == 0  # asked for: replaced
    # a run's own parts whose cleanup was cut short (manifest already gone) are still picked up
    assert run(src, serve_checkpoint, tmp_path / "c", "--no-cache", "--no-think") == 0
    leftover = tmp_path / "c.parts"
    leftover.mkdir()
    (leftover / "000000.npy.tmp").write_bytes(b"")
    assert run(src, serve_checkpoint, tmp_path / "c", "--no-cache", "--no-think") == 0 and not leftover.exists()


def test_damaged_outputs_are_refused_before_anything_moves(serve_checkpoint, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("one line\nanother line\n")
    out = tmp_path / "out"
    assert run(src, serve_checkpoint, out, "--no-cache", "--no-think") == 0
    vectors = np.load(f"{out}.npy")
    np.save(f"{out}.npy", vectors[:1])  # one row short of the records
    capsys.readouterr()
    assert run(src, serve_checkpoint, out, "--no-cache", "--no-think") == 2
    assert "damaged" in capsys.readouterr().err and Path(f"{out}.jsonl").exists() and not Path(f"{out}.parts").exists()
    np.save(f"{out}.npy", vectors)
    Path(f"{out}.manifest.json").write_text("[1]")  # JSON, not a manifest
    assert run(src, serve_checkpoint, out, "--no-cache", "--no-think") == 2
    assert "not a tte-embed manifest" in capsys.readouterr().err
    assert run(src, serve_checkpoint, out, "--no-cache", "--no-think", "--overwrite") == 0


def test_resuming_from_another_directory_keeps_every_row(serve_checkpoint, tmp_path, monkeypatch, capsys):
    """Media paths are made absolute when read: the digest of an item with a relative image path
    depended on how the input file was named (and from where), so a resume re-embedded it."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "cat.png").write_bytes(png_bytes(56, 56, 3))
    (d / "in.jsonl").write_text(json.dumps({"id": "img", "image": "cat.png"}) + "\n" + json.dumps({"id": "t", "text": "a"}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert run(Path("corpus") / "in.jsonl", serve_checkpoint, tmp_path / "out", "--no-cache", "--no-think") == 0
    monkeypatch.chdir(d)
    capsys.readouterr()
    assert run(Path("in.jsonl"), serve_checkpoint, tmp_path / "out", "--no-cache", "--no-think") == 0
    assert "resuming: 2 of 2 item(s) already written" in capsys.readouterr().err
    assert run(d / "in.jsonl", serve_checkpoint, tmp_path / "out", "--no-cache", "--no-think") == 0
    assert "differ" not in capsys.readouterr().err


def test_an_empty_input_resumes_as_parquet(serve_checkpoint, tmp_path):
    pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "empty.txt"
    src.write_text("\n")
    for _ in range(3):  # a finished empty Parquet output failed to read back on every second run
        assert run(src, serve_checkpoint, tmp_path / "out", "--no-cache", "--format", "parquet") == 0


def test_engine_flags_reach_the_engine_config_of_both_clis():
    """--enforce-eager, --no-prefix-caching and --suffix-wait-steps mean the same in tte-embed and
    tte-serve; a negative wait is refused by the parser."""
    import argparse

    from tte_engine.cli import add_engine_flags, engine_switches
    from tte_engine.serve.main import build_parser

    embed_parser = argparse.ArgumentParser()
    add_engine_flags(embed_parser)
    flags = ["--enforce-eager", "--no-prefix-caching", "--suffix-wait-steps", "3"]
    want = {"cuda_graphs": False, "enable_prefix_caching": False, "suffix_wait_steps": 3}
    assert engine_switches(embed_parser.parse_args(flags)) == engine_switches(build_parser().parse_args(flags)) == want
    assert engine_switches(build_parser().parse_args([])) == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--suffix-wait-steps", "-1"])


def _usage_error(capsys, argv, *fragments):
    """tte-embed ARGV stops before the model loads: exit 2 and one line (not argparse's usage block) naming what is wrong."""
    assert_usage_error(capsys, main, "tte-embed", argv, *fragments)


def test_paths_that_cannot_be_read_or_written_stop_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """`tte-embed some_dir.jsonl` said "no such file"; an output or cache folder that cannot be made failed after the
    model loaded, with a raw OSError ("[Errno 17] File exists"). Each is one line naming the path, exit 2."""
    import tte_engine.cli as cli

    src, blocker = tmp_path / "in.txt", tmp_path / "a-file"
    src.write_text("a\n")
    blocker.write_text("not a folder")
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "taken.npy").mkdir()
    nowhere = ["--checkpoint", tmp_path / "no-model"]  # a run that got past the checks would fail on the checkpoint instead
    _usage_error(capsys, [tmp_path / "dir.jsonl", *nowhere], f"INPUT {tmp_path / 'dir.jsonl'}: is a directory")
    _usage_error(capsys, ["/dev/null", *nowhere], "INPUT /dev/null: is not a regular file")
    _usage_error(capsys, [src, *nowhere, "--output", blocker / "sub" / "out"], f"--output {blocker / 'sub' / 'out.npy'}: {blocker} is not a directory")
    _usage_error(capsys, [src, *nowhere, "--output", tmp_path / "taken"], f"--output {tmp_path / 'taken.npy'}: is a directory")
    _usage_error(capsys, [src, *nowhere, "--cache", tmp_path], f"--cache {tmp_path}: is a directory")
    # found by an attacker: Path() drops a trailing slash, and `--output new/` wrote new.npy beside the folder
    _usage_error(capsys, [src, *nowhere, "--output", f"{tmp_path / 'new'}/"], "names a folder; give a file prefix in it")
    _usage_error(capsys, [src, *nowhere, "--cache", blocker / "cache.sqlite"], f"{blocker} is not a directory")

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli, "open", denied, raising=False)  # (chmod does not stop root)
    _usage_error(capsys, [src, *nowhere], f"INPUT {src}: permission denied")
    monkeypatch.delattr(cli, "open")
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)
    _usage_error(capsys, [src, *nowhere], f"output {tmp_path / 'in.embeddings.npy'}: cannot write in {tmp_path} (permission denied)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "dir.jsonl", "in.txt", "taken.npy"]


def test_upper_case_extensions_are_read(serve_checkpoint, tmp_path):
    """Found by an attacker: IN.TXT and IN.JSONL were refused ("expected a .txt file, got .TXT")."""
    (tmp_path / "A.TXT").write_text("a cat\n")
    (tmp_path / "B.JSONL").write_text('{"text": "a cat", "id": "x"}\n')
    for name in ("A.TXT", "B.JSONL"):
        assert main([str(tmp_path / name), "--checkpoint", str(serve_checkpoint), "--no-cache", "--no-think"]) == 0
    rows = [json.loads((tmp_path / f"{stem}.embeddings.jsonl").read_text()) for stem in ("A", "B")]
    assert rows[1]["id"] == "x" and rows[0]["error"] is None and rows[1]["error"] is None
    vectors = [np.load(tmp_path / f"{stem}.embeddings.npy") for stem in ("A", "B")]
    np.testing.assert_array_equal(vectors[0], vectors[1])


def test_options_that_cannot_work_together_are_refused(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a\n")
    _usage_error(capsys, [src, "--cache", tmp_path / "c.sqlite", "--no-cache"], "--cache and --no-cache contradict each other")
    for extra in (["--format", "npy"], ["--batch-size", "4"], ["--overwrite"], ["--retry-errors"], ["--cache", tmp_path / "c.sqlite"]):
        _usage_error(capsys, ["--demo", *extra], "--demo embeds its own queries and prints them: it takes no " + extra[0])
    for flag, value in (("--batch-size", "0"), ("--batch-size", "2.5"), ("--max-trace-tokens", "-1"), ("--max-trace-tokens", "1e3"),
                        ("--suffix-wait-steps", "-1")):
        _usage_error(capsys, [src, flag, value], f"argument {flag}: must be an integer >= ", f"got {value!r}")
    _usage_error(capsys, [src, "--checkpoint", ""], "argument --checkpoint: must not be empty")  # was ". is not a checkpoint"
    _usage_error(capsys, [src, "--format", "csv"], "argument --format: invalid choice")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_every_kind_of_bad_line_is_its_own_error_row(tmp_path):
    """JSON that is not an object, invalid JSON, non-UTF-8, NaN, deep nesting: an error row naming its line, never a stopped run."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'[1]\n"text"\nnull\n5\n{"text": NaN}\n{not json\n\xff\n' + b'{"videos": ' + b"[" * 40 + b"]" * 40 + b'}\n{"text": "fine"}\n')
    items, ids, digests = read_items(src)
    assert [getattr(i, "reason", i) for i in items] == [
        "line 1: each line must be a JSON object", "line 2: each line must be a JSON object", "line 3: each line must be a JSON object",
        "line 4: each line must be a JSON object", "line 5: NaN is not a JSON number", "line 6: not valid JSON (Expecting property name "
        "enclosed in double quotes at column 2)", "line 7: not valid UTF-8", "line 8: nested more than 32 levels deep", {"text": "fine"}]
    assert ids == [None] * 9 and len(set(digests)) == 9

