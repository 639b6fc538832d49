"""The `/v1/embeddings` request body and its translation into engine items.

OpenAI's shape (`input`: a string or a list of strings) plus two extensions: an `input` element
may be an object `{"text", "image", "images", "video", "videos", "video_options", "instruction"}`
(the tte-embed JSONL form, so one request can mix text, image and video items), and vLLM's chat
form (`messages`, one item per request: user text, `image_url` and `video_url` parts, images
before videos, each kind in the order given; a system message becomes the instruction). Images
come as `data:` URLs; local paths only when the server allows them, under the allowed root;
remote URLs are never fetched.
Token-id inputs (OpenAI allows them) are refused with a 400 that says how to turn them off.

Values are typed strictly (`"think": "yes"` is an error, not True). Unknown top-level fields are
ignored with a logged warning, as vLLM does; unknown fields inside an item or a message are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag


class RequestError(Exception):
    """A request the server refuses; rendered as an OpenAI-style error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error", headers: dict | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers, self.code = status, message, param, type, headers, code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: str
    detail: str | None = None  # accepted for OpenAI compatibility; images are always processed at the checkpoint's resolution


class VideoURL(_Strict):
    url: str  # vLLM's VideoURL has nothing else


# A content part has exactly the keys its type allows (OpenAI's and vLLM's part shapes); an extra key
# (an image_url beside a text part's text) is a 422 naming it, never dropped without a word.
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


class VideoPart(_Strict):  # vLLM's video part
    type: Literal["video_url"]
    video_url: VideoURL | str


PART_TYPES = {"text": "TextPart", "image_url": "ImagePart", "video_url": "VideoPart"}


def _part_tag(part) -> str | None:
    """The union member a content part is validated as, chosen by its `type` (capitalized tags: error paths skip them)."""
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return PART_TYPES.get(kind) if isinstance(kind, str) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[ImagePart, Tag("ImagePart")] | Annotated[VideoPart, Tag("VideoPart")],
    Discriminator(_part_tag, custom_error_type="content_part_type",
                  custom_error_message="a content part's type must be one of 'text', 'image_url', 'video_url'"),
]


class Message(_Strict):
    role: Literal["system", "user"]
    content: str | list[ContentPart]
    name: str | None = None  # OpenAI's optional participant name; not used


class InputItem(_Strict):
    text: str | None = None
    image: str | None = None  # a data: URL (or a local path when allowed)
    images: list[str] | None = None
    video: str | None = None  # a data: URL of a video file (or a local path when allowed)
    videos: list[str] | None = None
    video_options: dict | None = None  # tte_engine.video.VideoOptions fields
    instruction: str | None = None


DEFAULT_MM_LIMITS = {"image": 8, "video": 1}  # per item, as vLLM's --limit-mm-per-prompt


TOKEN_IDS_REFUSED = (
    "'input' holds token ids; this server embeds text and images, not token ids. LangChain's "
    "OpenAIEmbeddings sends token ids by default: pass check_embedding_ctx_length=False"
)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # vLLM's way: unknown fields are ignored (and logged)

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr | InputItem | StrictInt | list[StrictInt]] | None = None  # ints: token ids (refused)
    messages: list[Message] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    user: StrictStr | None = None
    # vLLM / TEI
    truncate_prompt_tokens: StrictInt | None = Field(default=None, ge=-1)
    truncate: StrictBool | None = None
    normalize: StrictBool | None = None
    # tte extensions
    think: StrictBool | None = None
    instruction: StrictStr | None = None
    max_trace_tokens: StrictInt | None = Field(default=None, ge=0)
    return_trace: StrictBool = False
    video_options: dict | None = None  # for the videos of `messages` and of items that give none


def resolve_image(url: str, param: str, local_root: Path | None) -> str:
    """A `data:` URL passes through; a local path (absolute, or relative to `local_root`) must name a
    file under `local_root`; nothing is fetched. Raises RequestError(400, param); messages never
    show the server's directories."""
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://", "ftp://")):
        raise RequestError(400, "remote images are never fetched: send the image as a data: URL", param)
    if local_root is None:
        raise RequestError(400, "local image paths are disabled (start tte-serve with --allow-local-files); send a data: URL", param)
    try:
        path = (local_root / Path(url.removeprefix("file://")).expanduser()).resolve()
        is_file = path.is_file()
    except (ValueError, RuntimeError, OSError) as exc:  # a NUL byte, an unknown ~user, a symlink loop
        raise RequestError(400, f"not a usable local image path ({type(exc).__name__})", param) from exc
    if not path.is_relative_to(local_root):
        raise RequestError(400, "local image paths must lie under the directory the server allows (--allow-local-files)", param)
    if not is_file:
        raise RequestError(400, f"no image file at {url!r}", param)
    return str(path)


def request_items(req: EmbeddingRequest, local_root: Path | None, limits: dict[str, int] | None = None) -> tuple[list[dict | str], list[dict]]:
    """(items for the engine, for each item the body paths its errors are reported under: the key
    None for the item, and for `messages` also the item field to blame ("text", "instruction",
    "images[k]", "videos[k]") mapped to its part). `limits`: most images / videos per item.
    Raises RequestError for a request that names no usable items, or more media than the limits."""
    limits = {**DEFAULT_MM_LIMITS, **(limits or {})}
    if (req.input is None) == (req.messages is None):
        raise RequestError(422, "give exactly one of 'input' or 'messages'", "input")
    if req.messages is not None:
        item, params = _conversation_item(req.messages, local_root)
        if req.video_options is not None and "videos" in item:
            item["video_options"] = req.video_options
        _check_media(item, limits, "messages")
        return [item], [params]
    raw = [req.input] if isinstance(req.input, str) else req.input
    if not raw:
        raise RequestError(400, "'input' must not be empty", "input")
    if any(isinstance(e, (int, list)) for e in raw):
        raise RequestError(400, TOKEN_IDS_REFUSED, "input")
    items: list[dict | str] = []
    params: list[dict] = []
    for i, element in enumerate(raw):
        params.append({None: f"input[{i}]"})
        if isinstance(element, str):
            items.append(element)
        else:
            item = element.model_dump(exclude_none=True)
            for name in ("image", "video"):
                if name in item:
                    item[name] = resolve_image(item[name], f"input[{i}].{name}", local_root)
            for name in ("images", "videos"):
                if name in item:
                    item[name] = [resolve_image(u, f"input[{i}].{name}[{k}]", local_root) for k, u in enumerate(item[name])]
            # an item's error names its field: input[i].text, input[i].images[k], ... (the item's own fields only)
            params[-1].update({name: f"input[{i}].{name}" for name in item})
            params[-1].update({f"{name}[{k}]": f"input[{i}].{name}[{k}]" for name in ("images", "videos") for k in range(len(item.get(name, ())))})
            if req.video_options is not None and ("video" in item or "videos" in item):
                item.setdefault("video_options", req.video_options)
            _check_media(item, limits, f"input[{i}]")
            items.append(item)
    return items, params


def _check_media(item: dict, limits: dict[str, int], param: str) -> None:
    for kind in ("image", "video"):
        n = (kind in item) + len(item.get(kind + "s", []))
        if n > limits[kind]:
            raise RequestError(400, f"{n} {kind}s in one item; this server takes at most {limits[kind]} (--limit-mm-per-prompt)", param)


def _conversation_item(messages: list[Message], local_root: Path | None) -> tuple[dict, dict]:
    texts, system, media = [], [], {"images": [], "videos": []}
    params: dict = {None: "messages"}
    if not messages:
        raise RequestError(400, "'messages' must not be empty", "messages")
    for m, message in enumerate(messages):
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for p, part in enumerate(parts):
            where = f"messages[{m}].content[{p}]"
            if part.type == "text":
                (system if message.role == "system" else texts).append(part.text)
                params.setdefault("instruction" if message.role == "system" else "text", where)
            else:
                if message.role != "user":
                    raise RequestError(400, "images and videos belong in user messages", where)
                ref = part.image_url if part.type == "image_url" else part.video_url
                url = ref if isinstance(ref, str) else ref.url
                if not url:
                    raise RequestError(422, f"an {part.type} part needs '{part.type}.url'", where)
                found = media["images" if part.type == "image_url" else "videos"]
                params[f"{'images' if part.type == 'image_url' else 'videos'}[{len(found)}]"] = where
                found.append(resolve_image(url, f"{where}.{part.type}", local_root))
    item: dict = {"text": "\n".join(texts)} if texts else {}
    item.update({k: v for k, v in media.items() if v})
    if system:
        item["instruction"] = "\n".join(system)
    return item, params
