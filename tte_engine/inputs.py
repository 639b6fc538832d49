"""Request types, validation, and prompt building with the checkpoint's chat template.

An item is a `str`, a dict, or a `Query` with `text`, `image` / `images`, `video` / `videos`
(see `tte_engine.video`) and an optional `instruction`. The prompt is the chat template applied
to one user turn (image placeholders first, then video placeholders, each in its own vision
block, then "{instruction}\\n{text}"), the generation prompt, and in think mode the think-start
token. Each placeholder is then expanded to the number of tokens the vision tower will produce.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import GENERATION_CONFIG, PREPROCESSOR_CONFIG
from .config import TTE_CONFIG_NAME, ModelConfig, TTEConfig, bad_field, is_int, is_number, read_json_object
from .errors import CheckpointError, InvalidInputError
from .sampling import SamplingParams
from .video import VideoError, VideoOptions, preprocess_video
from .vision import MAX_DECODE_PIXELS, ImageError, ImageProcessorConfig, ProcessedImage, preprocess_image

logger = logging.getLogger("tte_engine")

FIELDS = ("text", "image", "images", "video", "videos", "video_options", "instruction", "trace")


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
    images: list[Any] | None = None  # several images, each in its own vision block, in this order (after `image`)
    video: Any = None  # a video file (path, bytes, data: URL; PyAV) or a list of frames / uint8 array [T, H, W, 3]
    videos: list[Any] | None = None  # several videos, each in its own vision block, in this order (after `video`)
    video_options: VideoOptions | dict | None = None  # sampling and pixel budgets (tte_engine.video.VideoOptions fields)


@dataclass
class Prompt:
    """A validated, tokenized request: what the scheduler needs and nothing else."""

    token_ids: list[int]
    images: list[ProcessedImage] = field(default_factory=list)  # images and videos, in prompt order
    given_trace_ids: list[int] | None = None  # a supplied trace (not generated)


def check_text(value: Any, name: str, index: int | None) -> None:
    """Raise InvalidInputError unless `value` is None or a str that is valid Unicode (no lone surrogates)."""
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, got {type(value).__name__}", index, name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{name} is not valid Unicode (a lone surrogate at character {exc.start})", index, name) from None


def check_settings(think, max_trace_tokens, instruction, sampling, truncate_prompt_tokens, index) -> None:
    """Type-check the per-call settings of Engine.embed / make_sequence (a bool is not a count,
    "yes" is not True); raises InvalidInputError naming `index` (None: the whole call) and the
    setting (its `field`)."""
    def bad(reason, field):
        return InvalidInputError(reason, index, field)

    if not isinstance(think, bool):
        raise bad(f"think must be a bool, got {type(think).__name__}", "think")
    for name, value, least in (("max_trace_tokens", max_trace_tokens, 0), ("truncate_prompt_tokens", truncate_prompt_tokens, 1)):
        if value is not None and not _is_int(value):
            raise bad(f"{name} must be an int, got {type(value).__name__}", name)
        if value is not None and value < least and not (name == "truncate_prompt_tokens" and value == -1):
            raise bad(f"{name} must be >= {least}{' or -1' if name == 'truncate_prompt_tokens' else ''}, got {value}", name)
    check_text(instruction, "instruction", index)
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise bad(f"sampling must be a SamplingParams, got {type(sampling).__name__}", "sampling")


def _is_int(t: Any) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


def as_query(item: Any, index: int) -> Query:
    """A validated Query for one item: a str (the text), a dict with keys among FIELDS, or a Query.

    Every field is type-checked: text and instruction are str (valid Unicode), trace a str or a
    list/tuple of int token ids, an item has text or an image. Raises InvalidInputError naming
    `index` (and the bad field); nothing else.
    """
    if isinstance(item, Query):
        query = item
    elif isinstance(item, str):
        query = Query(text=item)
    elif isinstance(item, dict):
        unknown = [k for k in item if k not in FIELDS]
        if unknown:
            names = ", ".join(repr(k) if isinstance(k, str) else f"a key of type {type(k).__name__}" for k in unknown)
            raise InvalidInputError(f"unknown field(s) {names}; expected {', '.join(FIELDS)}", index)
        query = Query(**item)
    else:
        raise InvalidInputError(f"expected a str, dict or Query, got {type(item).__name__}", index)
    check_text(query.text, "text", index)
    check_text(query.instruction, "instruction", index)
    if isinstance(query.trace, str):
        check_text(query.trace, "trace", index)
    elif query.trace is not None:  # bytes, dicts, sets or bools are not token ids, even though they iterate to ints
        if not (isinstance(query.trace, (list, tuple)) and all(_is_int(t) for t in query.trace)):
            raise InvalidInputError(f"trace must be a string or a list of int token ids, got {type(query.trace).__name__}", index, "trace")
        query = replace(query, trace=[int(t) for t in query.trace])
    for name in ("images", "videos"):
        if getattr(query, name) is not None and not isinstance(getattr(query, name), (list, tuple)):
            raise InvalidInputError(f"{name} must be a list, got {type(getattr(query, name)).__name__}", index, name)
    if query.video_options is not None and not isinstance(query.video_options, (dict, VideoOptions)):
        raise InvalidInputError(f"video_options must be a dict, got {type(query.video_options).__name__}", index, "video_options")
    if not (query.text or "").strip() and query.image is None and not query.images and query.video is None and not query.videos:
        raise InvalidInputError("empty item: no text, image or video", index)
    return query


def _single_or_sequence(tokenizer, text: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(text)
    if isinstance(ids, int) and ids != tokenizer.unk_token_id:
        return [ids]
    return tokenizer(text, add_special_tokens=False).input_ids


def check_image_config(cfg: ImageProcessorConfig, model_cfg: ModelConfig, source: str = PREPROCESSOR_CONFIG) -> None:
    """Raise CheckpointError (naming `source` and the field) for image preprocessing that cannot work
    or does not fit the model: sizes must be positive integers, min_pixels <= max_pixels, the patch,
    temporal patch and merge sizes those of the vision tower, image_mean / image_std one number per
    input channel (std nonzero). Refused at load, not by every image later."""
    for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
        value = getattr(cfg, name)
        if not is_int(value) or value < 1:
            raise bad_field(source, name, "a positive integer", value)
    if cfg.min_pixels > cfg.max_pixels:
        raise CheckpointError(f"{source}: min_pixels {cfg.min_pixels} must not exceed max_pixels {cfg.max_pixels}")
    v = model_cfg.vision
    for name, ours, model in (("patch_size", cfg.patch_size, v.patch_size), ("temporal_patch_size", cfg.temporal_patch_size, v.temporal_patch_size),
                              ("merge_size", cfg.merge_size, v.spatial_merge_size)):
        if ours != model:
            raise CheckpointError(f"{source}: {name} {ours} differs from the vision tower's {model} (config.json)")
    for name in ("image_mean", "image_std"):
        value = getattr(cfg, name)
        if len(value) != v.in_channels or not all(is_number(x) and np.isfinite(x) for x in value):
            raise bad_field(source, name, f"a list of {v.in_channels} numbers", list(value))
    if any(x == 0 for x in cfg.image_std):
        raise bad_field(source, "image_std", "nonzero numbers", list(cfg.image_std))


class PromptBuilder:
    """Turns queries into token ids; holds the token ids of the think markers, suffix and stops."""

    def __init__(self, checkpoint: Path, tokenizer, tte: TTEConfig, model_cfg: ModelConfig, image_cfg: ImageProcessorConfig):
        self.tokenizer = tokenizer
        self.tte = tte
        self._warned: set[str] = set()  # literal instructions looked at for a misspelled name (`_warn_if_misspelled`)
        self.model_cfg = model_cfg
        self.image_cfg = image_cfg
        # The checkpoint's configs as the runtime will use them: a bad one fails here, at load, naming
        # its file and field, instead of failing every item later (the files themselves were checked
        # before the tokenizer loaded: `checkpoint.check_checkpoint_files`, in Engine)
        # the file the TTE settings come from, named in their errors (tte_config.json where it is absent: its defaults)
        self.tte_source = tte_source = str(Path(checkpoint) / ("engine.json" if (Path(checkpoint) / "engine.json").is_file() else TTE_CONFIG_NAME))
        tte.check_for(model_cfg, tte_source)
        check_image_config(image_cfg, model_cfg, str(Path(checkpoint) / PREPROCESSOR_CONFIG))
        if not getattr(tokenizer, "chat_template", None):
            raise CheckpointError(f"{checkpoint}: the tokenizer has no chat template")
        self.think_start_ids = _single_or_sequence(tokenizer, tte.think.start)
        self.think_end_ids = _single_or_sequence(tokenizer, tte.think.end)
        self.suffix_ids = _single_or_sequence(tokenizer, tte.embed_suffix) if tte.embed_suffix else []
        self.suppressed_ids = [  # vision markers and placeholders: never in a trace, nor in what the engine adds
            model_cfg.image_token_id,
            model_cfg.video_token_id,
            model_cfg.vision_start_token_id,
            model_cfg.vision_end_token_id,
        ]
        markers = [("think.start", self.think_start_ids), ("think.end", self.think_end_ids)]
        for name, ids in markers + ([("embed_suffix", self.suffix_ids)] if tte.embed_suffix else []):
            if not ids:
                raise CheckpointError(f"{tte_source}: {name} gives no tokens with the checkpoint's tokenizer")
            if not all(is_int(t) and 0 <= t < model_cfg.text.vocab_size for t in ids):
                raise CheckpointError(f"{tte_source}: {name} gives token ids {ids} outside the model's vocabulary of "
                                      f"{model_cfg.text.vocab_size} (does the tokenizer belong to this checkpoint?)")
            vision = [t for t in ids if t in self.suppressed_ids]
            if vision:  # a placeholder with no image behind it: every item would fail
                raise CheckpointError(f"{tte_source}: {name} holds the vision token id(s) {vision} (image, video, vision "
                                      "start or end, per config.json); a marker must be text")
        if self.think_end_ids == self.think_start_ids:  # two strings the tokenizer makes the same tokens: a trace would end where it starts
            raise CheckpointError(f"{tte_source}: think.end {tte.think.end!r} gives the same tokens {self.think_end_ids} as think.start "
                                  f"{tte.think.start!r}: a trace's end must differ from its start")
        self.closing_tokens = len(self.think_end_ids) + len(self.suffix_ids)  # what follows every prompt, given trace aside
        self.eos_ids = self._eos_ids(checkpoint)
        self.stop_sequences = [self.think_end_ids] + [[e] for e in self.eos_ids]
        self._reserved = [tokenizer.convert_ids_to_tokens(i) for i in self.suppressed_ids]
        for name, tid, token in zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
                                    self.suppressed_ids, self._reserved):
            if not isinstance(token, str) or not token:
                raise CheckpointError(f"{checkpoint}: the tokenizer has no token for {name} {tid} of the model config "
                                      "(a tokenizer that does not belong to this checkpoint, or incomplete tokenizer files)")
        # No token spans more characters than its vocabulary string has (a byte-level token's string
        # has one character per byte), so a text of more than max_tokens * max_token_chars characters
        # cannot fit max_tokens tokens: refused before it is tokenized.
        self.max_token_chars = max(map(len, tokenizer.get_vocab()))
        self.max_image_pixels = MAX_DECODE_PIXELS  # larger images are refused before decoding (servers lower it)
        self.video_options = VideoOptions()  # defaults for items without video_options (VideoOptions.mmeb_v2(): 8 frames)

    def check_size(self, query: Query, instruction: str | None, max_tokens: int, index: int, *, text: bool = True) -> None:
        """Refuse, before any tokenizing, a text/instruction/trace too long for `max_tokens` tokens
        (`text=False`: the text is cut instead). Raises InvalidInputError naming the field."""
        cap = max_tokens * self.max_token_chars
        fields = [("instruction", self.instruction_for(query, instruction)), ("trace", query.trace)] + ([("text", query.text)] if text else [])
        for name, value in fields:
            if isinstance(value, str) and len(value) > cap:
                raise InvalidInputError(f"{name} of {len(value)} characters cannot fit the model limit (a prompt may hold {max_tokens} tokens here)", index, name)
            if isinstance(value, list) and len(value) > max_tokens:
                raise InvalidInputError(f"{name} of {len(value)} tokens exceeds the model limit (a prompt may hold {max_tokens} tokens here)", index, name)

    def truncate(self, query: Query, prompt: Prompt, max_tokens: int, index: int, *, think: bool, instruction: str | None) -> Prompt:
        """`prompt` rebuilt with the end of `query.text` cut so it holds at most `max_tokens` tokens
        (the image, instruction and template are kept whole). The text is cut at a character
        boundary taken from the tokenizer's offsets, so a token that holds part of a character (a
        byte-level token of an emoji or a CJK character) never leaves a broken character (U+FFFD)
        behind. Raises InvalidInputError when even an empty text does not fit."""
        if len(prompt.token_ids) > max_tokens and not getattr(self.tokenizer, "is_fast", True):
            raise InvalidInputError("truncation needs the checkpoint's fast tokenizer (tokenizer.json): a slow one gives no character offsets", index)
        images = [i for i in prompt.images if not i.video]  # keep the processed images and videos as they are
        videos = [i for i in prompt.images if i.video]
        text = query.text or ""
        while (excess := len(prompt.token_ids) - max_tokens) > 0:  # each pass cuts text shorter: it ends
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if excess >= len(encoded.input_ids):
                raise InvalidInputError(f"the prompt holds {len(prompt.token_ids) - len(encoded.input_ids)} tokens besides its text; "
                                        f"it cannot be truncated to {max_tokens}", index)
            # keep the characters the first len - excess tokens cover: up to the end of the last kept
            # token's span, or its start when that span runs to the end of the text (a character split
            # over the last tokens); re-tokenizing a cut can merge differently: the loop then cuts again
            start, end = encoded.offset_mapping[len(encoded.input_ids) - excess - 1]
            text = text[: min(end if end < len(text) else start, len(text) - 1)]
            query = replace(query, text=text, image=None, images=images, video=None, videos=videos)
            prompt = self.build(query, index, think=think, instruction=instruction)
        return prompt

    def _eos_ids(self, checkpoint: Path) -> list[int]:
        """The stop token ids: generation_config.json's eos_token_id (an id or a list of ids) and the
        tokenizer's eos token. Raises CheckpointError naming the file for an id that is not an int in
        the model's vocabulary."""
        ids: list[int] = []
        vocab = self.model_cfg.text.vocab_size
        gen = Path(checkpoint) / GENERATION_CONFIG
        raw = (read_json_object(gen) or {}).get("eos_token_id")
        eos = raw if isinstance(raw, list) else [raw] if raw is not None else []
        if not all(is_int(t) and 0 <= t < vocab for t in eos):
            raise bad_field(str(gen), "eos_token_id", f"a token id or a list of token ids in [0, {vocab})", raw)
        ids += eos
        tok_eos = self.tokenizer.eos_token_id
        if tok_eos is not None:
            if not is_int(tok_eos) or not 0 <= tok_eos < vocab:
                raise CheckpointError(f"{checkpoint}: the tokenizer's eos token id {tok_eos!r} is outside the model's vocabulary [0, {vocab})")
            ids.append(tok_eos)
        return list(dict.fromkeys(ids))

    def _check_reserved(self, text: str, field: str, index: int | None) -> None:
        """Raises InvalidInputError (naming `field`) when `text` holds a vision placeholder token."""
        for token in self._reserved:
            if token in text:
                raise InvalidInputError(f"{field} contains the reserved vision token {token!r}", index, field)

    def check_instruction(self, instruction: str | None) -> None:
        """A call's instruction (a name or literal text; None: the default) as a call setting: raises
        InvalidInputError(index=None, field="instruction") when it holds a vision placeholder token."""
        if instruction is not None:
            self._check_reserved(self.tte.instructions.get(instruction, instruction), "instruction", None)

    def instruction_for(self, query: Query, instruction: str | None) -> str:
        chosen = query.instruction if query.instruction is not None else instruction
        if chosen is None:
            return self.tte.instructions["default"]
        named = self.tte.instructions.get(chosen)
        if named is None:
            self._warn_if_misspelled(chosen)
        return chosen if named is None else named  # a named task instruction, or the literal text

    def _warn_if_misspelled(self, text: str) -> None:
        """A literal instruction that looks like a misspelled name (one word, close to a named
        instruction of the checkpoint) is used as given, with one warning per distinct text: a typo
        in a name would otherwise embed with a one-word instruction, silently."""
        if text in self._warned or any(c.isspace() for c in text) or len(self._warned) > 1000:
            return
        self._warned.add(text)
        close = difflib.get_close_matches(text, [n for n in self.tte.instructions if n != "default"], n=1, cutoff=0.75)
        if close:  # a warning, not a log record: the caller can fix it, and a library user sees it without configuring logging
            warnings.warn(f"instruction {text!r} is not a named instruction of this checkpoint (did you mean {close[0]!r}?): it is used "
                          f"as literal text; named ones: {', '.join(sorted(self.tte.instructions))}", UserWarning, stacklevel=2)

    def build(self, query: Query, index: int, *, think: bool, instruction: str | None = None, max_tokens: int | None = None) -> Prompt:
        """The item's prompt; `max_tokens`: the most its images and videos may take (see `_vision_inputs`)."""
        images = self._vision_inputs(query, index, max_tokens)
        text = self.instruction_for(query, instruction)
        self._check_reserved(text, "instruction", index)
        if (query.text or "").strip():
            self._check_reserved(query.text, "text", index)
            text = f"{text}\n{query.text}" if text else query.text
        content = [{"type": "video" if i.video else "image"} for i in images] + [{"type": "text", "text": text}]
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
            given = self.trace_ids(query.trace, index)
        return Prompt(token_ids=ids, images=images, given_trace_ids=given)

    def trace_ids(self, trace: str | list[int], index: int) -> list[int]:
        """A supplied trace as token ids (a string is tokenized). Raises InvalidInputError (field
        "trace") for an id outside the vocabulary or a vision token: the model never generates those,
        and a vision placeholder would be taken for an image's row."""
        given = self.tokenizer(trace, add_special_tokens=False).input_ids if isinstance(trace, str) else list(trace)
        vocab = self.model_cfg.text.vocab_size
        if any(not 0 <= t < vocab for t in given):
            raise InvalidInputError(f"trace token ids must lie in [0, {vocab})", index, "trace")
        reserved = set(given).intersection(self.suppressed_ids)
        if reserved:
            token = self.tokenizer.convert_ids_to_tokens(min(reserved))
            raise InvalidInputError(f"trace contains the reserved vision token {token!r}", index, "trace")
        return given

    def _vision_inputs(self, query: Query, index: int, max_tokens: int | None = None) -> list[ProcessedImage]:
        """Preprocess the item's images (`image`, then `images`) and videos (`video`, then `videos`), in prompt order.

        Already processed entries (a prompt rebuilt for truncation) are kept as they are. Raises
        InvalidInputError naming the field ("image", "images[i]", "video", "videos[i]", "video_options"),
        also for the first one that takes the item's vision tokens past `max_tokens`: an item of a
        thousand videos stops there instead of holding them all in memory.
        """
        sources = ([("image", query.image)] if query.image is not None else [])
        sources += [(f"images[{i}]", img) for i, img in enumerate(query.images or [])]
        out: list[ProcessedImage] = []
        tokens = 0

        def keep(name: str, processed: ProcessedImage) -> None:
            nonlocal tokens
            tokens += processed.num_tokens
            if max_tokens is not None and tokens > max_tokens:
                raise InvalidInputError(f"{name}: the item's images and videos up to this one take {tokens} tokens, "
                                        f"more than the model limit of {max_tokens}", index, name)
            out.append(processed)

        for name, image in sources:
            try:
                processed = image if isinstance(image, ProcessedImage) else preprocess_image(image, self.image_cfg, self.max_image_pixels)
            except ImageError as exc:
                raise InvalidInputError(f"{name}: {exc}", index, name) from exc
            keep(name, processed)
        videos = ([("video", query.video)] if query.video is not None else []) + [(f"videos[{i}]", v) for i, v in enumerate(query.videos or [])]
        try:  # checked even for an item without a video, as a request's video_options are
            opts = self.video_options.updated(query.video_options)
        except VideoError as exc:
            raise InvalidInputError(f"video_options: {exc}", index, "video_options") from exc
        for name, video in videos:
            try:
                processed = video if isinstance(video, ProcessedImage) else preprocess_video(
                    video, self.image_cfg, opts, max_frame_pixels=self.max_image_pixels,
                    max_tokens=None if max_tokens is None else max_tokens - tokens)
            except VideoError as exc:
                raise InvalidInputError(f"{name}: {exc}", index, name) from exc
            keep(name, processed)
        return out

    def _expand_image_tokens(self, ids: list[int], images: list[ProcessedImage], index: int) -> list[int]:
        """Expand each image / video placeholder to the number of tokens its vision block produces."""
        pads = {False: self.model_cfg.image_token_id, True: self.model_cfg.video_token_id}
        for is_video, pad in pads.items():
            want = sum(i.video == is_video for i in images)
            if ids.count(pad) != want:
                kind = "video" if is_video else "image"
                raise InvalidInputError(f"the chat template produced {ids.count(pad)} {kind} placeholders for {want} {kind}(s)", index)
        out: list[int] = []
        remaining = iter(images)
        for tok in ids:
            out += [tok] * next(remaining).num_tokens if tok in (pads[False], pads[True]) else [tok]
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
