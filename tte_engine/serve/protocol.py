"""The `/v1/embeddings` request body and its translation into engine items.

OpenAI's shape (`input`: a string or a list of strings) plus two extensions: an `input` element
may be an object `{"text", "image", "instruction"}` (the tte-embed JSONL form, so one request can
mix text and image items), and vLLM's chat form (`messages`, one item per request: user text and
`image_url` parts; a system message becomes the instruction). Images come as `data:` URLs; local
paths only when the server allows them, under the allowed root; remote URLs are never fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RequestError(Exception):
    """A request the server refuses; rendered as an OpenAI-style error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type, headers


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: str | None = None  # accepted for OpenAI compatibility; images are always processed at the checkpoint's resolution


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(_Strict):
    role: Literal["system", "user"]
    content: str | list[ContentPart]


class InputItem(_Strict):
    text: str | None = None
    image: str | None = None  # a data: URL (or a local path when allowed)
    instruction: str | None = None


class EmbeddingRequest(_Strict):
    model: str | None = None
    input: str | list[str | InputItem] | None = None
    messages: list[Message] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # tte extensions
    think: bool | None = None
    instruction: str | None = None
    max_trace_tokens: int | None = Field(default=None, ge=0)
    return_trace: bool = False


def resolve_image(url: str, param: str, local_root: Path | None) -> str:
    """A `data:` URL passes through; a local path must lie under `local_root`; nothing is fetched."""
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://", "ftp://")):
        raise RequestError(400, "remote images are never fetched: send the image as a data: URL", param)
    if local_root is None:
        raise RequestError(400, "local image paths are disabled (start tte-serve with --allow-local-files); send a data: URL", param)
    try:
        path = Path(url.removeprefix("file://")).expanduser().resolve()
    except (ValueError, RuntimeError, OSError) as exc:  # a NUL byte, an unknown ~user, a symlink loop
        raise RequestError(400, f"not a usable local image path: {exc}", param) from exc
    if not path.is_relative_to(local_root):
        raise RequestError(400, f"local image paths must lie under {local_root}", param)
    return str(path)


def request_items(req: EmbeddingRequest, local_root: Path | None) -> tuple[list[dict | str], str]:
    """(items for the engine, the body field their errors are reported under: "input" or "messages")."""
    if (req.input is None) == (req.messages is None):
        raise RequestError(422, "give exactly one of 'input' or 'messages'", "input")
    if req.messages is not None:
        return [_conversation_item(req.messages, local_root)], "messages"
    raw = [req.input] if isinstance(req.input, str) else req.input
    if not raw:
        raise RequestError(400, "'input' must not be empty", "input")
    items: list[dict | str] = []
    for i, element in enumerate(raw):
        if isinstance(element, str):
            items.append(element)
        else:
            item = element.model_dump(exclude_none=True)
            if "image" in item:
                item["image"] = resolve_image(item["image"], f"input[{i}].image", local_root)
            items.append(item)
    return items, "input"


def _conversation_item(messages: list[Message], local_root: Path | None) -> dict:
    texts, images, system = [], [], []
    if not messages:
        raise RequestError(400, "'messages' must not be empty", "messages")
    for m, message in enumerate(messages):
        parts = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for p, part in enumerate(parts):
            where = f"messages[{m}].content[{p}]"
            if part.type == "text":
                if part.text is None:
                    raise RequestError(422, "a text part needs 'text'", where)
                (system if message.role == "system" else texts).append(part.text)
            else:
                if message.role != "user":
                    raise RequestError(400, "images belong in user messages", where)
                url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                if not url:
                    raise RequestError(422, "an image_url part needs 'image_url.url'", where)
                images.append(resolve_image(url, where + ".image_url", local_root))
    if len(images) > 1:
        raise RequestError(400, f"at most one image per item, got {len(images)}", "messages")
    item: dict = {"text": "\n".join(texts)} if texts else {}
    if images:
        item["image"] = images[0]
    if system:
        item["instruction"] = "\n".join(system)
    return item
