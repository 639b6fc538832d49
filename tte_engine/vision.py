"""Image loading and Qwen2-VL preprocessing, matching transformers' `Qwen2VLImageProcessorPil`.

Steps (the same arithmetic as transformers, so pixel values agree bit for bit): convert to RGB,
"smart resize" with PIL bicubic so both sides are multiples of patch*merge and the pixel count
lies in [min_pixels, max_pixels], rescale by 1/255 in float64 then cast to float32, normalize
with the CLIP mean/std, and cut into flat patches laid out block-major over merge windows
(the order the vision tower and its 2-D rotary expect). A still image fills both temporal slots.

Every source (PIL image, path, bytes, data: URL) goes through one decode path that applies the
EXIF orientation (as transformers' `load_image` does), so a phone photo is embedded upright.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import describe

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
# Largest image decoded (8192x8192): bounds the memory one item can take, whatever its file size.
# The model never sees more than `max_pixels` (about 1M for Qwen2-VL); bigger images are downscaled.
MAX_DECODE_PIXELS = 1 << 26
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image cannot be loaded or preprocessed; the message says why."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def load(cls, checkpoint: Path) -> "ImageProcessorConfig":
        path = Path(checkpoint) / "preprocessor_config.json"
        if not path.exists():
            return cls()
        raw: dict[str, Any] = json.loads(path.read_text())
        size = raw.get("size") or {}
        return cls(
            min_pixels=raw.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or cls.min_pixels,
            max_pixels=raw.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or cls.max_pixels,
            patch_size=raw.get("patch_size", 14),
            temporal_patch_size=raw.get("temporal_patch_size", 2),
            merge_size=raw.get("merge_size", 2),
            image_mean=tuple(raw.get("image_mean", CLIP_MEAN)),
            image_std=tuple(raw.get("image_std", CLIP_STD)),
        )


@dataclass(frozen=True)
class ProcessedImage:
    """One preprocessed image or video: flat patches [grid_t * grid_h * grid_w, C*T*P*P] and its grid.

    `video` marks a clip (its placeholder is the video pad token; see `tte_engine.video`).
    """

    patches: torch.Tensor
    grid_thw: tuple[int, int, int]
    num_tokens: int  # LLM placeholder tokens = grid_t * grid_h * grid_w / merge_size**2
    digest: str  # content hash, for caches keyed by image content
    video: bool = False


REMOTE_URL = ("http://", "https://")


def not_fetched(url: str) -> str:
    """Why a remote image or video URL is an item's error."""
    return f"{url[:200]!r}: http(s) URLs are not fetched (nothing is downloaded at run time); pass a file path, bytes or a data: URL"


# Pillow formats that run an external program on the data: EPS goes through Ghostscript (when `gs` is
# installed), with no timeout, on whatever a client sent labelled as any image type.
_EXTERNAL_DECODERS = frozenset({"EPS"})


def _open_image(fp) -> Image.Image:
    """Image.open limited to the formats Pillow decodes itself."""
    Image.init()
    return Image.open(fp, formats=[f for f in Image.OPEN if f not in _EXTERNAL_DECODERS])


def load_image(image: Any, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Open a PIL image, file path, `data:` URL, raw bytes, or uint8 numpy array as an upright RGB image.

    The EXIF orientation (tags 2-8) is applied. An image of more than `max_pixels` pixels is refused
    before it is decoded. Raises ImageError (never another exception) with a message that holds no
    object reprs, so error rows are the same on every run.
    """
    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, (bytes, bytearray, memoryview)):
            img = _open_image(io.BytesIO(bytes(image)))
        elif isinstance(image, str) and image.startswith("data:"):
            header, _, payload = image.partition(",")
            if ";base64" not in header:
                raise ImageError("data: URLs must be base64-encoded")
            img = _open_image(io.BytesIO(base64.b64decode(payload, validate=True)))
        elif isinstance(image, str) and image.startswith(REMOTE_URL):
            raise ImageError(not_fetched(image))
        elif isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise ImageError(f"no image file at {str(path)!r}")
            img = _open_image(path)
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
                raise ImageError(f"numpy images must be uint8 HxW or HxWxC (C in 1, 3, 4), got {image.dtype} {image.shape}")
            img = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
        else:
            raise ImageError(f"unsupported image type {type(image).__name__}")
        width, height = img.size
        if width * height > max_pixels:  # checked before decoding: a tiny file can hold a huge image
            raise ImageError(f"image of {width}x{height} pixels exceeds the {max_pixels} pixel decode limit")
        img.load()
        if img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
            img = ImageOps.exif_transpose(img)
        img = img if img.mode == "RGB" else img.convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError as exc:  # its message holds the repr of the file object
        raise ImageError("cannot decode image (not an image, or a format Pillow cannot read)") from exc
    except binascii.Error as exc:
        raise ImageError(f"cannot decode image (bad base64: {exc})") from exc
    except Exception as exc:  # whatever a decoder raises on a malformed file is this image's error
        raise ImageError(f"cannot decode image ({describe(exc)})") from exc
    return img


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Sides divisible by `factor`, pixel count in [min_pixels, max_pixels], aspect ratio kept."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image: Any, cfg: ImageProcessorConfig, max_pixels: int = MAX_DECODE_PIXELS) -> ProcessedImage:
    """Load (see `load_image`) and preprocess one image; raises ImageError.

    `digest` identifies the result: it hashes the resized pixels together with their shape and
    dtype, the grid and every preprocessing setting, so two images share it only when the model
    would see the same thing (caches and prefix blocks are keyed by it).
    """
    img = load_image(image, max_pixels)
    width, height = img.size
    if min(width, height) < 1:
        raise ImageError("image has no pixels")
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    new_h, new_w = smart_resize(height, width, p * m, cfg.min_pixels, cfg.max_pixels)
    arr = np.asarray(img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    x = x.transpose(2, 0, 1)  # CHW
    gh, gw = new_h // p, new_w // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p)).reshape(gh * gw, 3 * t * p * p)
    patches = torch.from_numpy(np.ascontiguousarray(x))
    header = repr(("image", arr.shape, str(arr.dtype), (1, gh, gw), cfg)).encode()
    digest = hashlib.blake2b(header + arr.tobytes(), digest_size=16).hexdigest()
    return ProcessedImage(patches=patches, grid_thw=(1, gh, gw), num_tokens=gh * gw // (m * m), digest=digest)
