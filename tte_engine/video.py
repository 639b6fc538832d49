"""Video loading, frame sampling and Qwen2-VL video preprocessing.

A video is a file (path, raw bytes, `data:` URL) decoded with PyAV (`pip install av`, the
`[video]` extra), a list of frames (anything `load_image` accepts), or a uint8 array
[T, H, W, 3]. Conventions, and where they come from:

- **Frame sampling** is qwen-vl-utils' `fetch_video` (`smart_nframes`): by default `fps` = 2
  frames per second of video, clamped to [min_frames, max_frames] (4, 768) and to the clip's
  length, floored to a multiple of `temporal_patch_size` (2); or a fixed `num_frames` (rounded to
  a multiple of 2). Frame indices are `linspace(0, total - 1, n).round()`. MMEB-V2 represents a
  clip by 8 uniformly sampled frames: `VideoOptions(num_frames=8)` (`VideoOptions.mmeb_v2()`).
  A list of frames is used whole (sampled uniformly when `num_frames` is set or it holds more
  than `max_frames`), as qwen-vl-utils and transformers do.
- **Pixel budgets** are qwen-vl-utils' (and transformers' `cap_pixels_per_frame=True`): each
  frame is resized to a `smart_resize` size with at least `min_pixels` (128*28*28) and at most
  min(`max_pixels` (768*28*28), `total_pixels` / n * 2) pixels (never below 1.05 * min_pixels),
  where `total_pixels` (90% of 128000 tokens' worth) bounds the whole clip.
- **Pixels** follow transformers' `Qwen2VLVideoProcessor` on CPU bit for bit: uint8 bicubic
  antialiased resize (`torch.nn.functional.interpolate`, the kernel torchvision's `resize` calls
  for uint8 CPU tensors), float32 `(x - 255 * mean) / (255 * std)`, the last frame repeated up to
  a multiple of `temporal_patch_size`, and patches laid out (t, h-block, w-block, h, w) with
  C * T * P * P values each, the layout the vision tower expects.

Cost is bounded before the file is decoded: its format (`VIDEO_FORMATS`: single-file containers
only), its size (`MAX_VIDEO_BYTES`), its frame size (`MAX_VIDEO_FRAME_PIXELS`, or a server's lower
image limit; the decoder refuses a larger frame), frame count (`MAX_VIDEO_FRAMES`, read from the
container or counted from packets without decoding), the pixels to decode (`MAX_VIDEO_DECODE_PIXELS`)
and the clip's tokens are checked first, then only frames up to the last sampled one are decoded,
and each kept frame is resized as it arrives. Every failure is a
`VideoError` saying what is wrong (undecodable, truncated, no frames, frames of different sizes).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import hashlib
import io
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Cancelled
from .vision import MAX_DECODE_PIXELS, REMOTE_URL, ImageError, ImageProcessorConfig, ProcessedImage, load_image, not_fetched, smart_resize

# qwen-vl-utils' defaults (vision_process.py): FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES, VIDEO_MIN_PIXELS,
# VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS (90% of a 128000-token context of 28x28 merged patches).
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768
DEFAULT_MIN_PIXELS = 128 * 28 * 28
DEFAULT_MAX_PIXELS = 768 * 28 * 28
DEFAULT_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)

MAX_VIDEO_BYTES = 1 << 30  # largest encoded video accepted (bytes); checked before opening it
MAX_VIDEO_FRAME_PIXELS = MAX_DECODE_PIXELS  # largest decoded frame (width * height); checked from stream metadata
MAX_VIDEO_FRAMES = 200_000  # most frames a clip may declare (about 1.8 h at 30 fps)
MAX_VIDEO_DECODE_PIXELS = 1 << 36  # most pixels decoded for one clip (frames up to the last sampled one x frame size):
# decode time grows with it (~1-1.5 ns a pixel on one core for H.264 and GIF), so this bounds a clip's CPU time to
# ~1-2 min: 9 min of 1080p at 30 fps; a GIF of 8000x8000 frames stops at ~1,000 of them


class VideoError(ValueError):
    """A video cannot be loaded, sampled or preprocessed; the message says why."""


# Hard caps on what a request may ask for (client-chosen cost, issue 10 kind 4): qwen-vl-utils' own
# maxima for frame counts and the clip budget, Qwen2-VL's image maximum per frame.
OPTION_LIMITS = {
    "num_frames": 768, "min_frames": 768, "max_frames": 768,
    "min_pixels": 1280 * 28 * 28, "max_pixels": 1280 * 28 * 28, "total_pixels": 128000 * 28 * 28,
}


@dataclass(frozen=True)
class VideoOptions:
    """How a video is sampled and sized (request fields; defaults are qwen-vl-utils').

    fps: frames sampled per second of video (ignored when `num_frames` is set, and for frame lists).
    num_frames: a fixed number of uniformly sampled frames (rounded to a multiple of 2); MMEB-V2 uses 8.
    min_frames / max_frames: bounds on the fps-derived count (max_frames also caps frame lists).
    min_pixels / max_pixels: per-frame pixel bounds of the resized frames.
    total_pixels: pixel budget of the whole clip; each frame gets at most total_pixels / n * 2.
    """

    fps: float = DEFAULT_FPS
    num_frames: int | None = None
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    total_pixels: int = DEFAULT_TOTAL_PIXELS

    @classmethod
    def mmeb_v2(cls) -> "VideoOptions":
        """MMEB-V2's convention: each clip is 8 uniformly sampled frames."""
        return cls(num_frames=8)

    def updated(self, overrides: "VideoOptions | dict | None") -> "VideoOptions":
        """These options with a request's overrides applied; raises VideoError on unknown or bad values."""
        if overrides is None:
            return self
        if isinstance(overrides, VideoOptions):
            return overrides
        if not isinstance(overrides, dict):
            raise VideoError(f"video_options must be a dict, got {type(overrides).__name__}")
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise VideoError(f"unknown video option(s) {sorted(unknown)}; expected {sorted(known)}")
        out = replace(self, **overrides)
        out.check()
        return out

    def check(self) -> None:
        """Raise VideoError unless every option is a positive number of the right kind."""
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not 0 < self.fps < math.inf:
            raise VideoError(f"video option fps must be a positive number, got {self.fps!r}")
        for name in ("num_frames", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels"):
            value = getattr(self, name)
            if value is None and name == "num_frames":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise VideoError(f"video option {name} must be a positive integer, got {value!r}")
        if self.min_frames > self.max_frames or self.min_pixels > self.max_pixels:
            raise VideoError("video options need min_frames <= max_frames and min_pixels <= max_pixels")
        for name, limit in OPTION_LIMITS.items():  # a request may lower a cost, never raise it past these
            value = getattr(self, name)
            if value is not None and value > limit:
                raise VideoError(f"video option {name}={value} exceeds the limit of {limit}")


def _round_by(n: float, f: int) -> int:
    return round(n / f) * f


def _ceil_by(n: float, f: int) -> int:
    return math.ceil(n / f) * f


def _floor_by(n: float, f: int) -> int:
    return math.floor(n / f) * f


def num_sampled_frames(total: int, video_fps: float | None, opts: VideoOptions, factor: int = 2) -> int:
    """How many frames to sample from a clip of `total` frames at `video_fps` (qwen-vl-utils' `smart_nframes`).

    Returns a multiple of `factor` (the temporal patch size) in [factor, total]; raises VideoError
    when the clip is too short for that, or when fps sampling is asked of a clip of unknown frame rate.
    """
    if opts.num_frames is not None:
        n = _round_by(opts.num_frames, factor)
        if n < factor:
            raise VideoError(f"num_frames={opts.num_frames} rounds to {n} frames: frames are sampled in multiples of {factor} "
                             f"(the temporal patch size), at least {factor}")
    else:
        if not video_fps:
            raise VideoError("the video's frame rate is unknown: set num_frames to sample it")
        min_frames = _ceil_by(opts.min_frames, factor)
        max_frames = _floor_by(min(opts.max_frames, total), factor)
        n = _floor_by(min(max(total / video_fps * opts.fps, min_frames), max_frames, total), factor)
    if not factor <= n <= total:
        raise VideoError(f"cannot sample {max(n, factor)} frames from a clip of {total} frame(s)")
    return n


def sample_indices(total: int, n: int) -> list[int]:
    """`n` frame indices spread uniformly over `total` frames, first and last included (qwen-vl-utils)."""
    return torch.linspace(0, total - 1, n).round().long().tolist()


def frame_size(height: int, width: int, n: int, cfg: ImageProcessorConfig, opts: VideoOptions) -> tuple[int, int]:
    """(height, width) every frame of an n-frame clip is resized to: smart_resize under the per-frame and total budgets."""
    if min(height, width) < 1:
        raise VideoError(f"the video's frames have no pixels ({width}x{height})")
    t = cfg.temporal_patch_size
    max_pixels = max(min(opts.max_pixels, opts.total_pixels / n * t), int(opts.min_pixels * 1.05))
    try:
        return smart_resize(height, width, cfg.patch_size * cfg.merge_size, opts.min_pixels, max_pixels)
    except ImageError as exc:
        raise VideoError(str(exc)) from exc


def _resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> uint8 [T, 3, h, w], bicubic with antialiasing (torchvision's CPU uint8 path)."""
    if tuple(frames.shape[-2:]) == size:
        return frames
    return F.interpolate(frames.contiguous(), size=list(size), mode="bicubic", align_corners=False, antialias=True)


def patchify_frames(frames: torch.Tensor, cfg: ImageProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalize and cut resized uint8 frames [T, 3, H, W] into flat patches, as transformers' Qwen2-VL video processor does.

    Returns (patches [grid_t * grid_h * grid_w, 3 * temporal_patch_size * P * P] float32, (grid_t, grid_h, grid_w)).
    The last frame is repeated up to a multiple of temporal_patch_size. H and W must be multiples of P * merge.
    """
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    # transformers fuses rescale into normalize: mean and std scaled by 1 / rescale_factor in float32
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32) * (1.0 / (1 / 255))
    std = torch.tensor(cfg.image_std, dtype=torch.float32) * (1.0 / (1 / 255))
    x = frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    if pad := -x.shape[0] % tp:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = x.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = x.view(gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p).contiguous(), (gt, gh, gw)


def _processed(frames: torch.Tensor, cfg: ImageProcessorConfig) -> ProcessedImage:
    patches, grid = patchify_frames(frames, cfg)
    # like vision.preprocess_image's digest: the resized pixels with their shape and dtype, the grid and the settings
    header = repr(("video", tuple(frames.shape), str(frames.dtype), grid, cfg)).encode()
    digest = hashlib.blake2b(header + frames.numpy().tobytes(), digest_size=16).hexdigest()
    return ProcessedImage(patches=patches, grid_thw=grid, num_tokens=grid[0] * grid[1] * grid[2] // cfg.merge_size**2, digest=digest, video=True)


def preprocess_frames(frames: Any, cfg: ImageProcessorConfig, opts: VideoOptions, *,
                      max_frame_pixels: int = MAX_VIDEO_FRAME_PIXELS) -> ProcessedImage:
    """A list of frames (each anything `load_image` accepts), or a uint8 array [T, H, W, 3], as one video.

    All frames are used, unless `opts.num_frames` is set or there are more than `opts.max_frames`
    (then frames are sampled uniformly); every frame must have the same size, with pixels (H, W >= 1),
    at most `max_frame_pixels` of them. Raises VideoError.
    """
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise VideoError(f"a video array must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
        frames = list(frames)  # (no frames, or frames with no pixels: refused below, as for a list)
    total = len(frames)
    if total == 0:
        raise VideoError("the video has no frames")
    tp = cfg.temporal_patch_size
    if opts.num_frames is not None:
        keep = sample_indices(total, num_sampled_frames(total, None, opts, tp))
    elif total > opts.max_frames:
        keep = sample_indices(total, max(tp, _floor_by(opts.max_frames, tp)))
    else:
        keep = list(range(total))
    kept: list[torch.Tensor] = []
    first: tuple[int, int] | None = None  # (width, height) of the first kept frame
    for i in keep:  # each frame is resized as it is loaded: memory holds one full-size frame at a time
        try:
            img = load_image(frames[i], max_frame_pixels)
        except ImageError as exc:
            raise VideoError(f"frame {i}: {exc}") from exc
        if min(img.size) < 1:
            raise VideoError(f"frame {i} has no pixels ({img.width}x{img.height})")
        if first is None:
            first = img.size
            size = frame_size(img.height, img.width, _ceil_by(len(keep), tp), cfg, opts)
        elif img.size != first:
            raise VideoError(f"frame {i} is {img.width}x{img.height}, frame {keep[0]} is {first[0]}x{first[1]}: all frames must have one size")
        kept.append(_resize(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None], size))
    return _processed(torch.cat(kept), cfg)


def _open_source(video: Any) -> str | bytes:
    """A file path or the encoded bytes, after the byte-size check."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        data = bytes(video)
    elif isinstance(video, str) and video.startswith("data:"):
        header, _, payload = video.partition(",")
        if ";base64" not in header:
            raise VideoError("data: URLs must be base64-encoded")
        if len(payload) * 3 // 4 > MAX_VIDEO_BYTES:
            raise VideoError(f"video of about {len(payload) * 3 // 4} bytes exceeds the {MAX_VIDEO_BYTES} byte limit")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise VideoError(f"bad base64 in data: URL ({exc})") from exc
    elif isinstance(video, str) and video.startswith(REMOTE_URL):
        raise VideoError(not_fetched(video))
    elif isinstance(video, (str, Path)):
        path = Path(video)
        if not path.is_file():
            raise VideoError(f"no video file at {str(path)!r}")
        if path.stat().st_size > MAX_VIDEO_BYTES:
            raise VideoError(f"video file of {path.stat().st_size} bytes exceeds the {MAX_VIDEO_BYTES} byte limit")
        return str(path)
    else:
        raise VideoError(f"unsupported video type {type(video).__name__}")
    if len(data) > MAX_VIDEO_BYTES:
        raise VideoError(f"video of {len(data)} bytes exceeds the {MAX_VIDEO_BYTES} byte limit")
    if not data:
        raise VideoError("the video is empty (0 bytes)")
    return data


# The FFmpeg demuxers a video may be read with: single-file containers and raw streams. FFmpeg probes
# the format from content, and others open what the input names as it is opened: an ffconcat, HLS or
# DASH playlist other files (from a data: URL, in the server's working directory), an SDP file
# network sockets. FFmpeg's own format_whitelist refuses them before anything is opened.
VIDEO_FORMATS = ("mov", "mp4", "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "ogg", "asf", "nut", "gif", "apng",
                 "h264", "hevc", "mjpeg", "ivf", "m4v", "obu", "av1", "vc1", "yuv4mpegpipe")


def _open(av, source: str | bytes):
    """A PyAV input container; each call reads `source` from its start (a BytesIO over bytes shares them, no copy).
    Only VIDEO_FORMATS open, and no protocol but plain files."""
    options = {"format_whitelist": ",".join(VIDEO_FORMATS), "protocol_whitelist": "file"}
    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else source, mode="r", options=options)
    except av.error.ArgumentError as exc:  # EINVAL: a format outside the list (or no video format at all)
        raise VideoError(f"not a video in a format decoded here ({', '.join(VIDEO_FORMATS)}): {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    """An FFmpeg or OS error without the file name it carries: a server's messages never show its paths."""
    return str(getattr(exc, "strerror", None) or exc) if getattr(exc, "filename", None) else str(exc)


def _import_av():
    try:
        import av
    except ImportError as exc:  # an optional extra
        raise VideoError('decoding video files needs PyAV: pip install av (the [video] extra), or pass a list of frames') from exc
    return av


def decode_video(video: Any, cfg: ImageProcessorConfig, opts: VideoOptions, *, max_frame_pixels: int = MAX_VIDEO_FRAME_PIXELS,
                 max_tokens: int | None = None) -> ProcessedImage:
    """Decode a video file (path, bytes, `data:` URL) with PyAV, sample and preprocess its frames.

    The first video stream is used. Before any frame is decoded: the byte size, the frame size
    (<= `max_frame_pixels`, also enforced by the decoder on every frame), the frame count, the
    pixels to decode (MAX_VIDEO_DECODE_PIXELS) and the clip's tokens (<= `max_tokens`) are checked;
    decoding stops after the last sampled frame. Raises VideoError (or Cancelled: see `stop_decoding_when`).
    """
    source = _open_source(video)  # a missing file or bad data: URL says so, with or without PyAV
    av = _import_av()
    try:
        with _open(av, source) as container:
            if not container.streams.video:
                raise VideoError("the file has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_frame_pixels:
                raise VideoError(f"video frames of {width}x{height} exceed the {max_frame_pixels} pixel decode limit")
            rate = stream.average_rate or stream.guessed_rate
            total = stream.frames or _count_frames(av, source)
            if total > MAX_VIDEO_FRAMES:
                raise VideoError(f"video of {total} frames exceeds the {MAX_VIDEO_FRAMES} frame limit")
            if total == 0 or width * height == 0:
                raise VideoError("the video has no frames")
            n = num_sampled_frames(total, float(rate) if rate else None, opts, cfg.temporal_patch_size)
            wanted = sample_indices(total, n)
            if (wanted[-1] + 1) * width * height > MAX_VIDEO_DECODE_PIXELS:
                raise VideoError(f"decoding {wanted[-1] + 1} frames of {width}x{height} (up to the last sampled one) exceeds "
                                 f"the {MAX_VIDEO_DECODE_PIXELS} pixel limit per clip; pass a shorter or smaller clip")
            size = frame_size(height, width, n, cfg, opts)
            unit = cfg.patch_size * cfg.merge_size
            tokens = -(-n // cfg.temporal_patch_size) * (size[0] // unit) * (size[1] // unit)
            if max_tokens is not None and tokens > max_tokens:
                raise VideoError(f"the clip would take {tokens} tokens, more than the {max_tokens} the model has left for it")
            stream.codec_context.options = {"max_pixels": str(max_frame_pixels)}  # a later frame past the limit is refused, not decoded
            stream.thread_type = "AUTO"
            kept: list[torch.Tensor] = []
            decoded = 0
            for i, frame in enumerate(container.decode(stream)):
                _check_stop()
                decoded = i + 1
                if (frame.width, frame.height) != (width, height):
                    raise VideoError(f"frame {i} is {frame.width}x{frame.height}, the stream declares {width}x{height}")
                if wanted[len(kept)] == i:  # sampled indices are distinct and increasing (n <= total)
                    arr = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None]
                    kept.append(_resize(arr, size))
                if len(kept) == n:
                    break
    except VideoError:
        raise
    except EOFError as exc:  # PyAV's end-of-file error: nothing (more) to read where frames were declared
        raise VideoError(f"the video has no frames or is truncated ({_reason(exc)})") from exc
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"cannot decode video ({_reason(exc)})") from exc
    if len(kept) < n:
        raise VideoError(f"truncated video: decoded {decoded} of the {total} frames it declares")
    return _processed(torch.cat(kept), cfg)


_stop_when: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("tte_video_stop_when", default=None)


@contextlib.contextmanager
def stop_decoding_when(event: threading.Event) -> Iterator[None]:
    """Within this block (in this thread), a video being decoded or counted stops at its next frame
    once `event` is set, raising `Cancelled`. A clip may take a minute of CPU within its pixel
    budget; a server sets `event` when the client that sent it disconnects."""
    token = _stop_when.set(event)
    try:
        yield
    finally:
        _stop_when.reset(token)


def _check_stop() -> None:
    event = _stop_when.get()
    if event is not None and event.is_set():
        raise Cancelled("video decoding stopped: its requester is gone")


def _count_frames(av, source: str | bytes) -> int:
    """Frames of the first video stream, counted from packets (no decoding), for containers that do not say."""
    with _open(av, source) as container:
        stream = container.streams.video[0]
        count = 0
        for packet in container.demux(stream):
            _check_stop()
            if packet.size:
                count += 1
                if count > MAX_VIDEO_FRAMES:
                    break
    return count


def preprocess_video(video: Any, cfg: ImageProcessorConfig, opts: VideoOptions | None = None, *,
                     max_frame_pixels: int = MAX_VIDEO_FRAME_PIXELS, max_tokens: int | None = None) -> ProcessedImage:
    """One video item -> ProcessedImage with `video=True` (patches, grid (t, h, w), placeholder count, digest).

    `video` is a file path, bytes, `data:` URL (decoded with PyAV), a list/tuple of frames, or a
    uint8 array [T, H, W, 3]. A file is refused before decoding when its frames exceed
    `max_frame_pixels` or the clip would take more than `max_tokens` tokens (see `decode_video`).
    Raises VideoError naming what is wrong.
    """
    opts = opts or VideoOptions()
    max_frame_pixels = min(max_frame_pixels, MAX_VIDEO_FRAME_PIXELS)
    if isinstance(video, (list, tuple, np.ndarray)):
        return preprocess_frames(video, cfg, opts, max_frame_pixels=max_frame_pixels)
    return decode_video(video, cfg, opts, max_frame_pixels=max_frame_pixels, max_tokens=max_tokens)
