"""transformers' Qwen2-VL as the oracle for items with several images and/or a video.

Images go through transformers' own PIL image processor (`pixel_values`, `image_grid_thw`).
Videos use the engine's own patches (`pixel_values_videos`, `video_grid_thw`): transformers'
video processor needs torchvision, which is not installed for the CPU build of torch; the
preprocessing itself is checked separately (tests/test_video.py). Token types follow
transformers' `mm_token_type_ids`: 0 text, 1 image, 2 video.
"""

from __future__ import annotations

import io

import av
import numpy as np
import torch
import torch.nn.functional as F
from oracle import hf_model
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tte_engine.vision import ImageProcessorConfig


def encode_video(frames: np.ndarray, fps: int = 10, codec: str = "mpeg4", fmt: str = "mp4", pix_fmt: str = "yuv420p", faststart: bool = False) -> bytes:
    """Encode uint8 frames [T, H, W, 3] with PyAV (ffv1 / matroska / bgr0 is lossless).

    faststart: an mp4 with its index first (so a truncated file still opens, and its frames run out)."""
    if faststart:  # the muxer rewrites the file to move the index: it needs a real file
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "clip.mp4"
            with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
                _encode_into(container, frames, fps, codec, pix_fmt)
            return path.read_bytes()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        _encode_into(container, frames, fps, codec, pix_fmt)
    return buf.getvalue()


def _encode_into(container, frames: np.ndarray, fps: int, codec: str, pix_fmt: str) -> None:
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = pix_fmt
    if len(frames) == 0:
        container.start_encoding()  # write the header of a clip with no frames
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def random_frames(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random frames (noise compresses badly and makes codecs slow): a moving gradient plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), np.full((h, w), 128.0)], -1)
    out = [(base + 40 * i + rng.normal(0, 20, (h, w, 3))) % 256 for i in range(t)]
    return np.stack(out).astype(np.uint8)


def hf_mm_inputs(path, item, prompt, ids: list[int], image_token_id: int, video_token_id: int) -> dict:
    """pixel_values / image_grid_thw (transformers' processor), pixel_values_videos / video_grid_thw
    (the engine's patches) and mm_token_type_ids for `ids`."""
    kw: dict = {}
    images = ([item["image"]] if item.get("image") is not None else []) + list(item.get("images") or []) if isinstance(item, dict) else []
    if images:
        cfg = ImageProcessorConfig.load(path)
        px = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)(images=images, return_tensors="pt")
        kw.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
    videos = [v for v in prompt.images if v.video]
    if videos:
        kw.update(pixel_values_videos=torch.cat([v.patches for v in videos]), video_grid_thw=torch.tensor([v.grid_thw for v in videos]))
    ids_t = torch.tensor([ids])
    kw["mm_token_type_ids"] = (ids_t == image_token_id).int() + 2 * (ids_t == video_token_id).int()
    return kw


@torch.no_grad()
def hf_generate_mm(path, kw, prompt_ids, *, max_new_tokens, stop_ids, suppress_ids) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = hf_model(path).generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=stop_ids, suppress_tokens=suppress_ids, pad_token_id=stop_ids[-1], **kw,
    )
    return out[0, len(prompt_ids):].tolist()


@torch.no_grad()
def hf_reencode_mm(path, kw, ids) -> torch.Tensor:
    """The naive second pass: last-token hidden state of prompt + trace + suffix, L2-normalized."""
    ids_t = torch.tensor([ids])
    kw = dict(kw, mm_token_type_ids=torch.cat([kw["mm_token_type_ids"], torch.zeros(1, len(ids) - kw["mm_token_type_ids"].shape[1], dtype=torch.int32)], 1))
    out = hf_model(path).model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), **kw)
    return F.normalize(out.last_hidden_state[0, -1].float(), dim=-1)
