"""Request types, validation, and prompt building with the checkpoint's chat template.

An item is a `str`, a dict, or a `Query` with `text`, `image` and an optional `instruction`.
The prompt is the chat template applied to one user turn (image placeholder first, then
"{instruction}\\n{text}"), the generation prompt, and in think mode the think-start token. Each
image placeholder is then expanded to the number of tokens the vision tower will produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig, TTEConfig
from .errors import CheckpointError, InvalidInputError
from .vision import ImageError, ImageProcessorConfig, ProcessedImage, preprocess_image


@dataclass
class Query:
    """One thing to embed: text, an image (PIL image, path, bytes, data: URL, uint8 array), or both.

    `trace` supplies the reasoning trace instead of generating it (a teacher's offline trace, or
    a cached one): a string, or token ids; the engine then only prefills query + trace + suffix.
    """

    text: str | None = None
    image: Any = None
    instruction: str | None = None
    trace: str | list[int] | None = None


@dataclass
class Prompt:
    """A validated, tokenized request: what the scheduler needs and nothing else."""

    token_ids: list[int]
    images: list[ProcessedImage] = field(default_factory=list)
    given_trace_ids: list[int] | None = None  # a supplied trace (not generated)


def as_query(item: Any, index: int) -> Query:
    if isinstance(item, Query):
        query = item
    elif isinstance(item, str):
        query = Query(text=item)
    elif isinstance(item, dict):
        unknown = set(item) - {"text", "image", "instruction", "trace"}
        if unknown:
            raise InvalidInputError(f"unknown field(s) {sorted(unknown)}; expected text, image, instruction, trace", index)
        query = Query(**item)
    else:
        raise InvalidInputError(f"expected a str, dict or Query, got {type(item).__name__}", index)
    if query.text is not None and not isinstance(query.text, str):
        raise InvalidInputError(f"text must be a string, got {type(query.text).__name__}", index)
    if query.instruction is not None and not isinstance(query.instruction, str):
        raise InvalidInputError(f"instruction must be a string, got {type(query.instruction).__name__}", index)
    if query.trace is not None and not (isinstance(query.trace, str) or all(isinstance(t, int) for t in query.trace)):
        raise InvalidInputError("trace must be a string or a list of token ids", index)
    if not (query.text or "").strip() and query.image is None:
        raise InvalidInputError("empty item: no text and no image", index)
    return query


def _single_or_sequence(tokenizer, text: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(text)
    if isinstance(ids, int) and ids != tokenizer.unk_token_id:
        return [ids]
    return tokenizer(text, add_special_tokens=False).input_ids


class PromptBuilder:
    """Turns queries into token ids; holds the token ids of the think markers, suffix and stops."""

    def __init__(self, checkpoint: Path, tokenizer, tte: TTEConfig, model_cfg: ModelConfig, image_cfg: ImageProcessorConfig):
        self.tokenizer = tokenizer
        self.tte = tte
        self.model_cfg = model_cfg
        self.image_cfg = image_cfg
        if not getattr(tokenizer, "chat_template", None):
            raise CheckpointError(f"{checkpoint}: the tokenizer has no chat template")
        self.think_start_ids = _single_or_sequence(tokenizer, tte.think.start)
        self.think_end_ids = _single_or_sequence(tokenizer, tte.think.end)
        self.suffix_ids = _single_or_sequence(tokenizer, tte.embed_suffix) if tte.embed_suffix else []
        self.eos_ids = self._eos_ids(checkpoint)
        self.stop_sequences = [self.think_end_ids] + [[e] for e in self.eos_ids]
        self.suppressed_ids = [
            model_cfg.image_token_id,
            model_cfg.video_token_id,
            model_cfg.vision_start_token_id,
            model_cfg.vision_end_token_id,
        ]
        self._reserved = [tokenizer.convert_ids_to_tokens(i) for i in self.suppressed_ids]

    def _eos_ids(self, checkpoint: Path) -> list[int]:
        ids: list[int] = []
        gen = Path(checkpoint) / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return list(dict.fromkeys(ids))

    def instruction_for(self, query: Query, instruction: str | None) -> str:
        chosen = query.instruction if query.instruction is not None else instruction
        if chosen is None:
            return self.tte.instructions["default"]
        return self.tte.instructions.get(chosen, chosen)  # a named task instruction, or the literal text

    def build(self, query: Query, index: int, *, think: bool, instruction: str | None = None) -> Prompt:
        images = []
        if query.image is not None:
            try:
                images.append(preprocess_image(query.image, self.image_cfg))
            except ImageError as exc:
                raise InvalidInputError(f"image: {exc}", index) from exc
        text = self.instruction_for(query, instruction)
        if (query.text or "").strip():
            text = f"{text}\n{query.text}" if text else query.text
        for token in self._reserved:
            if token in text:
                raise InvalidInputError(f"text contains the reserved vision token {token!r}", index)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(rendered, add_special_tokens=False).input_ids
        ids = self._expand_image_tokens(ids, images, index)
        if think:
            ids += self.think_start_ids
        given = None
        if query.trace is not None:
            if not think:
                raise InvalidInputError("a trace was supplied but think=False", index)
            given = self.tokenizer(query.trace, add_special_tokens=False).input_ids if isinstance(query.trace, str) else list(query.trace)
            vocab = self.model_cfg.text.vocab_size
            if any(not 0 <= t < vocab for t in given):
                raise InvalidInputError(f"trace token ids must lie in [0, {vocab})", index)
        return Prompt(token_ids=ids, images=images, given_trace_ids=given)

    def _expand_image_tokens(self, ids: list[int], images: list[ProcessedImage], index: int) -> list[int]:
        pad = self.model_cfg.image_token_id
        if ids.count(pad) != len(images):
            raise InvalidInputError(
                f"the chat template produced {ids.count(pad)} image placeholders for {len(images)} image(s)", index
            )
        out: list[int] = []
        remaining = iter(images)
        for tok in ids:
            out += [pad] * next(remaining).num_tokens if tok == pad else [tok]
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
