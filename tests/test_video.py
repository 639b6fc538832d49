"""Video items: frame sampling (qwen-vl-utils' conventions), preprocessing (transformers' Qwen2-VL
video processor), M-RoPE's temporal axis (transformers' get_rope_index), parity of traces and
embeddings with transformers' Qwen2-VL, and clean per-item failures. Test clips are encoded here
with PyAV; nothing is downloaded."""

import io
import threading

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")  # the optional `video` extra

from mm_oracle import encode_video, hf_generate_mm, hf_mm_inputs, hf_reencode_mm, random_frames  # noqa: E402
from oracle import cosine, hf_model, random_image  # noqa: E402
from PIL import Image  # noqa: E402

from tte_engine import Engine  # noqa: E402
from tte_engine import video as video_mod  # noqa: E402
from tte_engine.errors import Cancelled, InvalidInputError  # noqa: E402
from tte_engine.inputs import as_query  # noqa: E402
from tte_engine.model.rope import prompt_positions  # noqa: E402
from tte_engine.video import (  # noqa: E402
    VideoError, VideoOptions, frame_size, num_sampled_frames, preprocess_frames, preprocess_video, sample_indices,
)
from tte_engine.vision import ImageProcessorConfig  # noqa: E402

COS = 0.99999
CFG = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
SMALL = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 4}  # 2x2 merged tokens per temporal patch: fast on CPU


@pytest.fixture(scope="module")
def clip():
    return random_frames(16, 48, 64, seed=3)


@pytest.fixture(scope="module")
def clip_mp4(clip):
    return encode_video(clip)


def test_frame_counts_follow_qwen_vl_utils():
    opts = VideoOptions()
    assert num_sampled_frames(300, 30.0, opts) == 20  # 10 s at 2 fps
    assert num_sampled_frames(50, 25.0, opts) == 4  # 2 s -> 4 frames, the minimum
    assert num_sampled_frames(3, 30.0, opts) == 2  # capped by the clip, floored to even
    assert num_sampled_frames(100_000, 30.0, opts) == 768  # max_frames
    assert num_sampled_frames(301, 30.0, VideoOptions(fps=1.0)) == 10
    assert num_sampled_frames(16, None, VideoOptions.mmeb_v2()) == 8  # MMEB-V2: 8 uniform frames, fps not needed
    assert num_sampled_frames(16, 30.0, VideoOptions(num_frames=7)) == 8  # rounded to a multiple of 2
    with pytest.raises(VideoError, match="from a clip of 1 frame"):
        num_sampled_frames(1, 30.0, opts)
    with pytest.raises(VideoError, match="from a clip of 5"):
        num_sampled_frames(5, 30.0, VideoOptions.mmeb_v2())
    with pytest.raises(VideoError, match="frame rate is unknown"):
        num_sampled_frames(16, None, opts)
    assert sample_indices(16, 8) == [0, 2, 4, 6, 9, 11, 13, 15]
    assert sample_indices(4, 4) == [0, 1, 2, 3]


def test_pixel_budgets():
    opts = VideoOptions()
    assert frame_size(360, 640, 8, CFG, opts) == (364, 644)  # sides rounded to multiples of 28; no budget binds
    h, w = frame_size(1080, 1920, 8, CFG, opts)
    assert h * w <= 768 * 28 * 28 and h % 28 == w % 28 == 0
    h, w = frame_size(1080, 1920, 768, CFG, opts)  # the total budget binds: 90316800 / 768 * 2 pixels a frame
    assert h * w <= opts.total_pixels / 768 * 2
    assert frame_size(20, 30, 8, CFG, opts)[0] * frame_size(20, 30, 8, CFG, opts)[1] >= opts.min_pixels
    assert VideoOptions().updated({"num_frames": 8}) == VideoOptions.mmeb_v2()
    for bad in ({"fps": -1}, {"num_frames": 0}, {"frames": 8}, {"max_pixels": "big"}, {"fps": float("nan")}):
        with pytest.raises(VideoError):
            VideoOptions().updated(bad)


def test_patches_match_the_image_layout_for_a_still_clip():
    """Two copies of one frame at a size that needs no resize give the image processor's patches
    (transformers' PIL image processor): same grid, same per-patch layout (C, T, P, P)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = np.asarray(random_image(56, 84, 4))
    ours = preprocess_frames([frame, frame], CFG, VideoOptions(min_pixels=56 * 56, max_pixels=56 * 84))
    ref = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 84)(images=[Image.fromarray(frame)], return_tensors="pt")
    assert ours.grid_thw == tuple(ref["image_grid_thw"][0].tolist()) == (1, 4, 6)
    assert ours.video and ours.num_tokens == 6
    # the image path rescales in float64, the video path (like transformers') normalizes with mean*255 in float32
    torch.testing.assert_close(ours.patches, ref["pixel_values"], rtol=0, atol=2e-6)


def test_patches_match_transformers_video_processor(clip):
    """Bit-exact against transformers' Qwen2VLVideoProcessor (needs torchvision, absent from CPU-only installs)."""
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    opts = VideoOptions(min_pixels=56 * 56, max_pixels=28 * 28 * 16)
    ours = preprocess_frames(list(clip), CFG, opts)
    h, w = frame_size(48, 64, 16, CFG, opts)
    proc = Qwen2VLVideoProcessor(min_pixels=opts.min_pixels, max_pixels=h * w, do_sample_frames=False, cap_pixels_per_frame=False)
    ref = proc(videos=[clip], return_tensors="pt")
    assert ours.grid_thw == tuple(ref["video_grid_thw"][0].tolist())
    assert torch.equal(ours.patches, ref["pixel_values_videos"])


def test_resize_is_bicubic_antialiased_uint8(clip):
    """The resize is torch's uint8 bicubic antialiased kernel (what torchvision's resize runs on CPU):
    close to PIL's bicubic, in uint8, and frames are resized independently."""
    opts = VideoOptions(min_pixels=84 * 112, max_pixels=84 * 112)
    out = preprocess_frames(list(clip[:2]), CFG, opts)
    one = preprocess_frames([clip[0], clip[0]], CFG, opts)
    assert frame_size(48, 64, 2, CFG, opts) == (84, 112) and out.grid_thw == (1, 6, 8)
    frames = torch.from_numpy(clip[:1]).permute(0, 3, 1, 2)
    resized = video_mod._resize(frames, (84, 112))
    assert resized.dtype == torch.uint8
    pil = np.asarray(Image.fromarray(clip[0]).resize((112, 84), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(resized[0].permute(1, 2, 0).numpy().astype(int) - pil).mean() < 2.0
    first = out.patches.view(-1, 3, 2, 14 * 14)[:, :, 0]  # temporal slot 0 holds frame 0 in both
    assert torch.equal(first, one.patches.view(-1, 3, 2, 14 * 14)[:, :, 0])
    assert out.patches.shape == (48, 3 * 2 * 14 * 14)


def test_decoded_file_equals_its_sampled_frames(clip):
    """A lossless clip (ffv1) decodes to exactly the frames it was made of; the sampled frames are
    qwen-vl-utils' indices; a container without a frame count (matroska) is counted from packets."""
    data = encode_video(clip, codec="ffv1", fmt="matroska", pix_fmt="bgr0")
    opts = VideoOptions(num_frames=8, **SMALL)
    ours = preprocess_video(data, CFG, opts)
    ref = preprocess_frames([clip[i] for i in sample_indices(16, 8)], CFG, VideoOptions(**SMALL))
    assert ours.grid_thw == ref.grid_thw == (4, 4, 4)
    assert torch.equal(ours.patches, ref.patches) and ours.digest == ref.digest
    # fps sampling: 16 frames at 10 fps = 1.6 s -> 3.2 frames -> the minimum of 4
    assert preprocess_video(data, CFG, VideoOptions(**SMALL)).grid_thw == (2, 4, 4)


def test_video_sources(clip, clip_mp4, tmp_path):
    import base64

    path = tmp_path / "clip.mp4"
    path.write_bytes(clip_mp4)
    opts = VideoOptions(num_frames=4, **SMALL)
    url = "data:video/mp4;base64," + base64.b64encode(clip_mp4).decode()
    digests = {preprocess_video(src, CFG, opts).digest for src in (clip_mp4, str(path), path, url)}
    assert len(digests) == 1
    frames = [Image.fromarray(f) for f in clip[:4]]
    assert preprocess_video(frames, CFG, opts).digest == preprocess_video(clip[:4], CFG, opts).digest


def test_rope_temporal_axis_matches_get_rope_index(make_checkpoint):
    """Image, video and text blocks: positions and rope delta equal transformers' get_rope_index,
    including a video with more temporal patches than merged rows and columns."""
    path = make_checkpoint("parity", head="last_token", think_max_tokens=12)
    hf = hf_model(path)
    cfg = hf.config
    img, vid, s, e = cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    grids = [(1, 4, 6), (4, 4, 4), (2, 6, 4)]
    ids = [1, 2, s] + [img] * 6 + [e, 5, s] + [vid] * 16 + [e, 7, 8, s] + [vid] * 12 + [e, 9]
    ours, delta = prompt_positions(ids, grids, (img, vid), 2)
    ids_t = torch.tensor([ids])
    types = (ids_t == img).int() + 2 * (ids_t == vid).int()
    ref, ref_delta = hf.model.get_rope_index(ids_t, mm_token_type_ids=types, image_grid_thw=torch.tensor(grids[:1]), video_grid_thw=torch.tensor(grids[1:]))
    assert torch.equal(ours, ref[:, 0]) and delta == int(ref_delta)


@pytest.fixture(scope="module")
def video_items(clip, clip_mp4):
    frames = [Image.fromarray(f) for f in random_frames(6, 40, 60, seed=5)]
    return [
        {"video": clip_mp4, "video_options": {"num_frames": 8, **SMALL}},  # video only, decoded (t=4 > merged 2x2)
        {"text": "What happens in this clip?", "video": frames, "video_options": SMALL},  # video + text, frame list
        {"text": "Compare the two pictures.", "images": [random_image(60, 90, 1), random_image(130, 50, 2)]},  # two images + text
        {"text": "a red chair", "image": random_image(50, 70, 6)},  # a plain image item
        "two dogs play with a ball in the park",  # a plain text item
        {"text": "both", "image": random_image(64, 64, 7), "video": clip_mp4, "video_options": {"fps": 5.0, **SMALL}},  # image + video + text
        {"text": "two clips", "videos": [frames[:4], clip_mp4], "video_options": SMALL},  # two videos, in order
    ]


def test_video_traces_and_embeddings_match_transformers(make_checkpoint, video_items):
    """The mixed batch (video only, video + text, two images + text, image, text, image + video, two videos)
    in one engine call: every trace equals transformers' greedy generate() on that item alone,
    every embedding matches the naive re-encode (cosine >= 0.99999, fp32)."""
    path = make_checkpoint("parity", head="last_token", think_max_tokens=12)
    eng = Engine(path)
    res = eng.embed(video_items)
    assert res.errors == [None] * len(video_items)
    cfg = eng.model_cfg
    stop = eng.prompts.think_end_ids + eng.prompts.eos_ids
    for i, item in enumerate(video_items):
        prompt = eng.prompts.build(as_query(item, i), i, think=True)
        assert prompt.token_ids == res.prompt_token_ids[i]
        kw = hf_mm_inputs(path, item, prompt, prompt.token_ids, cfg.image_token_id, cfg.video_token_id)
        ref = hf_generate_mm(path, kw, prompt.token_ids, max_new_tokens=12, stop_ids=stop, suppress_ids=eng.prompts.suppressed_ids)
        assert res.trace_token_ids[i] == ref, f"item {i}"
        full = res.prompt_token_ids[i] + res.trace_token_ids[i] + res.embed_token_ids[i]
        assert cosine(res.embeddings[i], hf_reencode_mm(path, kw, full)) >= COS, f"item {i}"
    ids = res.prompt_token_ids
    assert ids[0].count(cfg.video_token_id) == 4 * 2 * 2 and ids[0].count(cfg.image_token_id) == 0
    assert ids[1].count(cfg.video_token_id) == 3 * 2 * 3  # 6 frames of 40x60 -> 3 temporal patches of 56x84 (2x3 merged)
    assert ids[2].count(cfg.vision_start_token_id) == 2
    alone = eng.embed(video_items[:2], think=False)  # batch composition does not change a video's embedding
    batch = eng.embed(video_items, think=False)
    for i in range(2):
        assert cosine(alone.embeddings[i], batch.embeddings[i]) >= COS


def _bad(eng, item, match, field="video"):
    with pytest.raises(InvalidInputError, match=match) as err:
        eng.embed(["fine", item], think=False)
    assert err.value.index == 1 and err.value.field == field


def test_bad_videos_fail_alone_with_their_reason(make_checkpoint, clip, clip_mp4, monkeypatch):
    eng = Engine(make_checkpoint("parity", head="last_token", think_max_tokens=12))
    _bad(eng, {"video": b"not a video at all"}, "item 1: video: cannot decode video")
    _bad(eng, {"video": clip_mp4[: len(clip_mp4) // 2], "video_options": SMALL}, r"video: cannot decode video \(.*Invalid data")  # the index (at the end) is cut off
    faststart = encode_video(clip, faststart=True)  # the index first: the cut file opens, then its frames run out
    _bad(eng, {"video": faststart[: len(faststart) // 2], "video_options": {"num_frames": 16, **SMALL}}, r"truncated video: decoded \d+ of the 16 frames")
    _bad(eng, {"video": []}, "no frames")
    _bad(eng, {"video": encode_video(clip[:0], codec="ffv1", fmt="matroska", pix_fmt="bgr0")}, "no frames")
    _bad(eng, {"video": encode_video(clip[:0])}, "no video stream")  # mp4 drops a stream without frames
    _bad(eng, {"video": [random_image(40, 40, 1), random_image(40, 48, 2)]}, r"frame 1 is 48x40, frame 0 is 40x40")
    _bad(eng, {"video": clip_mp4, "video_options": {"num_frames": 64}}, "cannot sample 64 frames from a clip of 16")
    _bad(eng, {"video": clip_mp4, "video_options": {"fps": 0}}, "video_options: video option fps must be a positive number", "video_options")
    # a request may lower its cost, never raise it past the caps (client-chosen cost)
    _bad(eng, {"video": clip_mp4, "video_options": {"max_frames": 100000}}, "video option max_frames=100000 exceeds the limit of 768", "video_options")
    _bad(eng, {"video": clip_mp4, "video_options": {"total_pixels": 10**12}}, "video option total_pixels=1000000000000 exceeds the limit", "video_options")
    _bad(eng, {"videos": [clip_mp4, b"junk"], "video_options": SMALL}, r"item 1: videos\[1\]: cannot decode", "videos[1]")
    _bad(eng, {"video": 12}, "unsupported video type int")
    _bad(eng, {"video": "/nonexistent/clip.mp4"}, "no video file")
    # limits are checked before decoding
    monkeypatch.setattr(video_mod, "MAX_VIDEO_BYTES", 1000)
    _bad(eng, {"video": clip_mp4}, "exceeds the 1000 byte limit")
    monkeypatch.undo()
    monkeypatch.setattr(video_mod, "MAX_VIDEO_FRAMES", 10)
    _bad(eng, {"video": clip_mp4}, "video of 16 frames exceeds the 10 frame limit")
    monkeypatch.undo()
    monkeypatch.setattr(video_mod, "MAX_VIDEO_FRAME_PIXELS", 1000)
    _bad(eng, {"video": clip_mp4}, "64x48 exceed the 1000 pixel decode limit")
    monkeypatch.undo()
    res = eng.embed(["fine", {"video": b"junk"}, {"video": clip_mp4, "video_options": SMALL}], think=False, errors="return")
    assert res.errors[0] is None and res.errors[2] is None and "cannot decode video" in res.errors[1]
    assert torch.isnan(res.embeddings[1]).all() and not torch.isnan(res.embeddings[2]).any()


def test_mmeb_v2_default_is_one_setting_away(make_checkpoint, clip_mp4):
    eng = Engine(make_checkpoint("parity", head="last_token", think_max_tokens=12))
    eng.prompts.video_options = VideoOptions.mmeb_v2().updated(SMALL)
    res = eng.embed([{"video": clip_mp4}], think=False)
    assert res.prompt_token_ids[0].count(eng.model_cfg.video_token_id) == 4 * 2 * 2  # 8 frames -> 4 temporal patches
    assert res.usage["video_tokens"] == 4 * 2 * 2 and res.usage["image_tokens"] == 0


def test_without_pyav_frames_still_work(monkeypatch, clip):
    import builtins

    real = builtins.__import__

    def no_av(name, *a, **k):
        if name == "av":
            raise ImportError("no av")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_av)
    assert preprocess_video(list(clip[:4]), CFG, VideoOptions(**SMALL)).grid_thw == (2, 4, 4)
    with pytest.raises(VideoError, match=r"pip install av \(the \[video\] extra\)"):
        preprocess_video(io.BytesIO(b"x").getvalue(), CFG, VideoOptions())


def test_entry_points_carry_videos_and_images(tmp_path, clip_mp4, make_checkpoint):
    """tte-serve's messages (`image_url` x2 + vLLM's `video_url`) and input items, tte-embed's JSONL
    (`images`, `video`, paths relative to the file) and embed_dataset's columns all become the
    same engine item, and embed to the same vector."""
    import base64
    import json

    pytest.importorskip("fastapi")
    from tte_engine.cli import read_items
    from tte_engine.distributed import _batch_items
    from tte_engine.serve.protocol import EmbeddingRequest, request_items

    imgs = [random_image(60, 90, 1), random_image(40, 40, 2)]
    for k, img in enumerate(imgs):
        img.save(tmp_path / f"img{k}.png")
    (tmp_path / "clip.mp4").write_bytes(clip_mp4)
    urls = ["data:image/png;base64," + base64.b64encode((tmp_path / f"img{k}.png").read_bytes()).decode() for k in range(2)]
    video_url = "data:video/mp4;base64," + base64.b64encode(clip_mp4).decode()
    opts = {"num_frames": 4, **SMALL}

    parts = [{"type": "image_url", "image_url": {"url": urls[0]}}, {"type": "text", "text": "what is shown?"},
             {"type": "video_url", "video_url": {"url": video_url}}, {"type": "image_url", "image_url": urls[1]}]
    (served,), (params,) = request_items(EmbeddingRequest(messages=[{"role": "user", "content": parts}], video_options=opts), None)
    assert served == {"text": "what is shown?", "images": urls, "videos": [video_url], "video_options": opts}
    assert params["images[1]"] == "messages[0].content[3]" and params["videos[0]"] == "messages[0].content[2]"
    (posted,), _ = request_items(EmbeddingRequest(input=[{"text": "what is shown?", "images": urls, "video": video_url, "video_options": opts}]), None)

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "what is shown?", "images": ["img0.png", "img1.png"], "video": "clip.mp4", "video_options": opts}) + "\n")
    (line,), *_ = read_items(corpus)
    assert line["images"] == [str(tmp_path / "img0.png"), str(tmp_path / "img1.png")] and line["video"] == str(tmp_path / "clip.mp4")

    batch = {"text": np.array(["what is shown?"], dtype=object), "imgs": np.array([np.array(urls, dtype=object)], dtype=object),
             "clip": np.array([clip_mp4], dtype=object)}
    (row,) = _batch_items(batch, {"text": "text", "images": "imgs", "video": "clip", "instruction": None})
    assert row["images"] == urls and row["video"] == clip_mp4

    eng = Engine(make_checkpoint("parity", head="last_token", think_max_tokens=12))
    res = eng.embed([served, posted, line, dict(row, video_options=opts)], think=False)
    assert res.errors == [None] * 4 and len(set(map(tuple, res.prompt_token_ids))) == 1
    for i in range(1, 4):
        assert cosine(res.embeddings[0], res.embeddings[i]) >= COS


def test_playlists_that_read_other_files_are_refused(clip_mp4, tmp_path, monkeypatch):
    """FFmpeg probes the format from content: an ffconcat playlist, even inside a data: URL, made the
    decoder read the files it names (relative to the server's working directory for bytes). A video
    must be one file; the real clip beside the playlist still decodes."""
    import base64

    (tmp_path / "seg.mp4").write_bytes(clip_mp4)
    playlist = b"ffconcat version 1.0\nfile seg.mp4\n"
    (tmp_path / "list.ffconcat").write_bytes(playlist)
    monkeypatch.chdir(tmp_path)
    cfg = ImageProcessorConfig(min_pixels=SMALL["min_pixels"], max_pixels=SMALL["max_pixels"])
    sdp = b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 47000 RTP/AVP 96\na=rtpmap:96 H264/90000\n"
    for source in (str(tmp_path / "list.ffconcat"), playlist, "data:text/plain;base64," + base64.b64encode(playlist).decode(),
                   sdp):  # an SDP file opened UDP sockets and waited ~10 s before it was refused
        with pytest.raises(VideoError, match="not a video in a format decoded here") as refused:
            preprocess_video(source, cfg, VideoOptions.mmeb_v2())
        assert str(tmp_path) not in str(refused.value)  # a server's messages never show its directories
    assert preprocess_video(str(tmp_path / "seg.mp4"), cfg, VideoOptions.mmeb_v2()).video


def test_a_clip_is_refused_before_decoding_when_it_cannot_fit(clip_mp4, monkeypatch):
    """Tokens, pixels to decode and frame size are known from the container before any frame is
    decoded; a clip that passes a limit used to be decoded whole first (~1 GB for a long clip)."""
    cfg = ImageProcessorConfig(min_pixels=SMALL["min_pixels"], max_pixels=SMALL["max_pixels"])
    opts = VideoOptions(**SMALL)
    resized = []
    real = video_mod._resize
    monkeypatch.setattr(video_mod, "_resize", lambda *a: resized.append(1) or real(*a))
    whole = preprocess_video(clip_mp4, cfg, opts)
    resized.clear()
    with pytest.raises(VideoError, match=f"would take {whole.num_tokens} tokens, more than the {whole.num_tokens - 1}"):
        preprocess_video(clip_mp4, cfg, opts, max_tokens=whole.num_tokens - 1)
    with pytest.raises(VideoError, match="exceed the 100 pixel decode limit"):
        preprocess_video(clip_mp4, cfg, opts, max_frame_pixels=100)
    monkeypatch.setattr(video_mod, "MAX_VIDEO_DECODE_PIXELS", 48 * 64 * 4)
    with pytest.raises(VideoError, match="pixel limit per clip"):
        preprocess_video(clip_mp4, cfg, opts)
    assert resized == []
    monkeypatch.undo()
    assert preprocess_video(clip_mp4, cfg, opts, max_tokens=whole.num_tokens).num_tokens == whole.num_tokens


def test_a_decode_stops_at_the_next_frame_once_its_requester_is_gone(clip_mp4, monkeypatch):
    """Under `stop_decoding_when(event)` a clip being decoded stops at its next frame once the event
    is set (a server's client left), raising Cancelled rather than an item error; outside the
    block the event is not consulted."""
    event, resized = threading.Event(), []
    real = video_mod._resize

    def resize(frames, size):  # the client leaves while the first sampled frame is resized
        resized.append(1)
        event.set()
        return real(frames, size)

    monkeypatch.setattr(video_mod, "_resize", resize)
    with video_mod.stop_decoding_when(event), pytest.raises(Cancelled):
        preprocess_video(clip_mp4, CFG, VideoOptions(num_frames=8))
    assert len(resized) == 1  # of the 8 frames it would have kept
    assert preprocess_video(clip_mp4, CFG, VideoOptions(num_frames=8)).grid_thw[0] == 4  # the same event, outside the block
