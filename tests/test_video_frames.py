"""A video given as frames (a uint8 array [T, H, W, 3] or a list of images) with a bad shape is that
item's VideoError, reported under its field ("video", "videos[k]"), never a stray exception.

A frame array with zero height used to fail with `cannot prepare this item (ZeroDivisionError:
division by zero)` and no field (smart_resize divided by the frame's height)."""

import numpy as np
import pytest
from PIL import Image

from tte_engine import Engine
from tte_engine.errors import InvalidInputError
from tte_engine.video import VideoError, VideoOptions, preprocess_video
from tte_engine.vision import ImageProcessorConfig

BAD_FRAMES = {
    "zero height": (np.zeros((2, 0, 32, 3), np.uint8), "no pixels"),
    "zero width": (np.zeros((2, 32, 0, 3), np.uint8), "no pixels"),
    "zero height and width": (np.zeros((2, 0, 0, 3), np.uint8), "no pixels"),
    "zero frames": (np.zeros((0, 32, 32, 3), np.uint8), "no frames"),
    "zero frames of no pixels": (np.zeros((0, 0, 0, 3), np.uint8), "no frames"),
    "four channels": (np.zeros((2, 32, 32, 4), np.uint8), r"must be uint8 \[T, H, W, 3\]"),
    "one channel": (np.zeros((2, 32, 32, 1), np.uint8), r"must be uint8 \[T, H, W, 3\]"),
    "no channel axis": (np.zeros((2, 32, 32), np.uint8), r"must be uint8 \[T, H, W, 3\]"),
    "five axes": (np.zeros((1, 2, 32, 32, 3), np.uint8), r"must be uint8 \[T, H, W, 3\]"),
    "float32": (np.zeros((2, 32, 32, 3), np.float32), r"must be uint8 \[T, H, W, 3\], got float32"),
    "int64": (np.zeros((2, 32, 32, 3), np.int64), r"must be uint8"),
    "a list of frames of no height": ([np.zeros((0, 32, 3), np.uint8)] * 2, "frame 0 has no pixels"),
    "a list of empty PIL images": ([Image.new("RGB", (0, 32))] * 2, "frame 0 has no pixels"),
    "a list with one empty frame": ([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 0, 3), np.uint8)], "frame 1 has no pixels"),
    "a list of 4-axis frames": ([np.zeros((1, 32, 32, 3), np.uint8)] * 2, "frame 0: numpy images must be"),
    "a list of float frames": ([np.zeros((32, 32, 3), np.float32)] * 2, "frame 0: numpy images must be uint8"),
    "an empty list": ([], "no frames"),
}


@pytest.mark.parametrize("frames, match", BAD_FRAMES.values(), ids=list(BAD_FRAMES))
def test_bad_frame_shapes_are_video_errors(frames, match):
    with pytest.raises(VideoError, match=match):
        preprocess_video(frames, ImageProcessorConfig(), VideoOptions())


@pytest.fixture(scope="module")
def engine(make_checkpoint):
    return Engine(make_checkpoint(), device="cpu")


@pytest.mark.parametrize("frames, match", BAD_FRAMES.values(), ids=list(BAD_FRAMES))
def test_bad_frame_shapes_fail_their_item_under_its_field(engine, frames, match):
    with pytest.raises(InvalidInputError, match=f"item 1: video: .*{match}") as err:
        engine.embed(["fine", {"text": "x", "video": frames}], think=False)
    assert err.value.index == 1 and err.value.field == "video"
    with pytest.raises(InvalidInputError, match=match) as err:
        engine.embed([{"text": "x", "videos": [np.zeros((2, 28, 28, 3), np.uint8), frames]}], think=False)
    assert err.value.field == "videos[1]"


def test_errors_return_reports_the_video_not_a_division_by_zero(engine):
    """The tester's case: errors="return" gave `cannot prepare this item (ZeroDivisionError: ...)`."""
    good = np.zeros((2, 28, 28, 3), np.uint8)
    res = engine.embed(["fine", {"text": "x", "video": np.zeros((2, 0, 32, 3), np.uint8)}, {"text": "x", "video": good}],
                       think=False, errors="return")
    assert res.errors[0] is None and res.errors[2] is None
    assert res.errors[1].startswith("video: ") and "no pixels" in res.errors[1], res.errors[1]
    assert "ZeroDivisionError" not in res.errors[1] and "cannot prepare" not in res.errors[1]


def test_frame_lists_honour_the_frame_pixel_limit():
    """A list of frames is held to the same per-frame pixel limit as a video file."""
    frames = [np.zeros((64, 64, 3), np.uint8)] * 2
    with pytest.raises(VideoError, match="frame 0: image of 64x64 pixels exceeds the 1000 pixel decode limit"):
        preprocess_video(frames, ImageProcessorConfig(), VideoOptions(), max_frame_pixels=1000)
    assert preprocess_video(frames, ImageProcessorConfig(), VideoOptions()).grid_thw[0] == 1
