"""Configuration: the model architecture, the TTE checkpoint config, and the engine's knobs.

`ModelConfig` is the small, flat description of a Qwen2-VL the runtime needs; it is parsed
once from a Hugging Face `config.json` (through transformers' own config class, so both the
old flat hub layout and the nested v5 layout work) and can be stored verbatim in an engine
directory. `TTEConfig` mirrors `tte_config.json` (DESIGN §4).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .errors import one_line as _one_line

logger = logging.getLogger("tte_engine")

TTE_CONFIG_NAME = "tte_config.json"
TTE_FORMAT_VERSION = 1
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


# What config.json's quantization_config must be (model/loader.py `checkpoint_quantization` reads it).
QUANTIZATION_CONFIG_WANT = ('an object naming the FP8 scheme, as its producer writes it ({"quant_method": "compressed-tensors", ...} '
                            'from llm-compressor, or {"quant_method": "modelopt", ...})')

MAX_POSITIONS = 1 << 20  # the longest context a checkpoint may declare (a rotary table of 2**20 positions is ~0.5 GiB at head dim 128)


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON `true` is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_type(value: Any) -> str:
    """The JSON name of `value`'s type, for error messages."""
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                       (list, "an array"), (dict, "an object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def read_json_object(path: Path, required: bool = False) -> dict | None:
    """The JSON object in `path` (None when there is no such file, unless `required`); raises
    CheckpointError naming the file when it is missing (`required`), cannot be read, is not JSON,
    or holds something other than an object."""
    if not path.exists():
        if required:
            raise CheckpointError(f"missing {path}")
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, or not UTF-8 text; RecursionError: nested too deep
        raise CheckpointError(f"cannot read {path}: {_one_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {json_type(raw)}")
    return raw


def bad_field(source: str, name: str, want: str, value: Any) -> CheckpointError:
    """The CheckpointError for field `name` of the file `source` that is not `want`: one line."""
    shown = repr(value) if len(repr(value)) <= 80 else f"{json_type(value)} {repr(value)[:60]}..."
    return CheckpointError(f"{source}: {name} must be {want}, got {shown}")


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: int
    hidden_act: str
    out_hidden_size: int  # the merger's output width = the language model's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    torch_dtype: str = "float32"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parse a Qwen2-VL `config.json` dict (flat hub layout or nested transformers-5 layout).

        Raises CheckpointError (naming `source` and the field) for anything the runtime cannot build."""
        from transformers import Qwen2VLConfig

        if not isinstance(hf, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {json_type(hf)}")
        if hf.get("model_type") not in ("qwen2_vl", None):
            raise CheckpointError(f"{source}: expected a Qwen2-VL checkpoint (model_type 'qwen2_vl'), got {hf.get('model_type')!r}")
        for name in ("text_config", "vision_config", "rope_scaling", "rope_parameters"):
            if hf.get(name) is not None and not isinstance(hf[name], dict):
                raise bad_field(source, name, "an object", hf[name])
        if hf.get("quantization_config") is not None and not isinstance(hf["quantization_config"], dict):  # else transformers' AttributeError, in the tokenizer
            raise bad_field(source, "quantization_config", QUANTIZATION_CONFIG_WANT, hf["quantization_config"])
        if "architecture" in hf and "model_type" not in hf:  # TensorRT-LLM's checkpoint format (tte-export --target trtllm-legacy)
            raise CheckpointError(f"{source}: a TensorRT-LLM checkpoint (its 'architecture' field), not a Hugging Face one: it is built "
                                  "into a TensorRT-LLM engine (build.sh); tte_engine loads the native engine directory or an hf/ export")
        if not hf.get("vision_config"):  # transformers would fill in Qwen2-VL-7B's tower, and a later check blame its sizes
            raise CheckpointError(f"{source}: vision_config is missing or empty: a Qwen2-VL config describes its vision tower there "
                                  "(a text-only model's config.json is no Qwen2-VL checkpoint)")
        hf = {k: v for k, v in hf.items() if k not in ("architectures", "transformers_version")}
        try:
            cfg = Qwen2VLConfig(**hf)
        except Exception as exc:  # transformers raises several types for malformed configs
            raise CheckpointError(f"{source}: cannot parse the Qwen2-VL config: {_one_line(exc)}") from exc
        t, v = cfg.text_config, cfg.vision_config
        if getattr(t, "use_sliding_window", False):
            raise CheckpointError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported")
        rope = t.rope_parameters or {}
        vrope = v.rope_parameters or {}
        if not isinstance(rope, dict) or not isinstance(vrope, dict):
            raise bad_field(source, "rope_parameters", "an object", rope if not isinstance(rope, dict) else vrope)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):  # the runtime has M-RoPE only: a scaled rope would load and compute something else
            raise CheckpointError(f"{source}: rope scaling {kind!r} is not supported (Qwen2-VL's plain M-RoPE only)")
        if getattr(t, "hidden_act", "silu") != "silu":  # the decoder's MLP is SwiGLU with SiLU (kernels/activations.py)
            raise bad_field(source, "hidden_act", "'silu' (the decoder's MLP is SwiGLU)", t.hidden_act)
        section = rope.get("mrope_section")
        if section is None:  # Qwen2-VL's own sections; where they cannot fit (check(): they sum to head_dim / 2), say it is a default
            section = (16, 24, 24)
            if is_int(t.hidden_size) and is_int(t.num_attention_heads) and t.num_attention_heads > 0 and t.hidden_size // t.num_attention_heads // 2 != sum(section):
                raise CheckpointError(f"{source}: mrope_section (in rope_scaling / rope_parameters) is missing, and Qwen2-VL's default "
                                      f"[16, 24, 24] needs head_dim 128 (hidden_size {t.hidden_size} / num_attention_heads {t.num_attention_heads})")
        if not isinstance(section, (list, tuple)):
            raise bad_field(source, "mrope_section", "a list of 3 integers", section)
        dtype = hf.get("dtype") or hf.get("torch_dtype") or t.dtype or "float32"
        try:
            rope_theta, vision_theta = rope.get("rope_theta", 1000000.0), vrope.get("rope_theta", 10000.0)
            rope_theta, vision_theta = float(rope_theta), float(vision_theta)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise bad_field(source, "rope_theta", "a positive number", rope_theta) from None
        if "hidden_size" not in hf["vision_config"] and v.hidden_size != t.hidden_size:  # check() would blame a number the file lacks
            raise CheckpointError(f"{source}: vision_config has no hidden_size (the merger's output width), and transformers' default "
                                  f"{v.hidden_size} is not the model's hidden_size {t.hidden_size}: set vision_config.hidden_size")
        out = cls(
            text=TextConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size,
                num_layers=t.num_hidden_layers,
                num_heads=t.num_attention_heads,
                num_kv_heads=t.num_key_value_heads,
                rms_norm_eps=t.rms_norm_eps,
                rope_theta=rope_theta,
                mrope_section=tuple(section),
                max_position_embeddings=t.max_position_embeddings,
                tie_word_embeddings=bool(cfg.tie_word_embeddings),
            ),
            vision=VisionConfig(
                depth=v.depth,
                embed_dim=v.embed_dim,
                num_heads=v.num_heads,
                mlp_ratio=v.mlp_ratio,
                hidden_act=v.hidden_act,
                out_hidden_size=v.hidden_size,
                patch_size=v.patch_size,
                temporal_patch_size=v.temporal_patch_size,
                spatial_merge_size=v.spatial_merge_size,
                in_channels=v.in_channels,
                rope_theta=vision_theta,
            ),
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            vision_start_token_id=cfg.vision_start_token_id,
            vision_end_token_id=cfg.vision_end_token_id,
            torch_dtype=str(dtype).replace("torch.", ""),
        )
        out.check(source)
        return out

    def check(self, source: str = "config.json") -> None:
        """Raise CheckpointError naming `source` and the first field the runtime cannot build a model from
        (a wrong type, a non-positive size, heads that do not divide the width, a token id outside the vocabulary)."""
        from .model.vision_tower import _ACTIVATIONS

        t, v = self.text, self.vision
        positive = [("vocab_size", t.vocab_size), ("hidden_size", t.hidden_size), ("intermediate_size", t.intermediate_size),
                    ("num_hidden_layers", t.num_layers), ("num_attention_heads", t.num_heads),
                    ("num_key_value_heads", t.num_kv_heads), ("max_position_embeddings", t.max_position_embeddings),
                    ("vision_config.depth", v.depth), ("vision_config.embed_dim", v.embed_dim),
                    ("vision_config.num_heads", v.num_heads), ("vision_config.hidden_size", v.out_hidden_size),
                    ("vision_config.patch_size", v.patch_size), ("vision_config.temporal_patch_size", v.temporal_patch_size),
                    ("vision_config.spatial_merge_size", v.spatial_merge_size), ("vision_config.in_channels", v.in_channels)]
        for name, value in positive:
            if not is_int(value) or value < 1:
                raise bad_field(source, name, "a positive integer", value)
        if t.max_position_embeddings > MAX_POSITIONS:  # the rotary table is sized by it (unless max_model_len is lower)
            raise bad_field(source, "max_position_embeddings", f"at most {MAX_POSITIONS} (Qwen2-VL's is 32768)", t.max_position_embeddings)
        for name, value in (("rms_norm_eps", t.rms_norm_eps), ("rope_theta", t.rope_theta),
                            ("vision_config.rope_theta", v.rope_theta), ("vision_config.mlp_ratio", v.mlp_ratio)):
            if not is_number(value) or not 0 < value < float("inf"):
                raise bad_field(source, name, "a positive number", value)
        if int(v.embed_dim * v.mlp_ratio) < 1:
            raise bad_field(source, "vision_config.mlp_ratio", "large enough for an MLP of at least 1 unit", v.mlp_ratio)
        for name, width, heads in (("hidden_size", t.hidden_size, t.num_heads), ("vision_config.embed_dim", v.embed_dim, v.num_heads)):
            if width % heads or (width // heads) % 2:
                raise CheckpointError(f"{source}: {name} {width} must split into {heads} heads of an even size")
        if t.num_heads % t.num_kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads {t.num_heads} must be a multiple of num_key_value_heads {t.num_kv_heads}")
        section = t.mrope_section
        if len(section) != 3 or not all(is_int(x) and x >= 0 for x in section):
            raise bad_field(source, "mrope_section", "a list of 3 integers >= 0", list(section))
        if sum(section) != t.head_dim // 2:
            raise CheckpointError(f"{source}: mrope_section {list(section)} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.out_hidden_size != t.hidden_size:
            raise CheckpointError(f"{source}: vision_config.hidden_size {v.out_hidden_size} (the merger's output) must equal hidden_size {t.hidden_size}")
        if v.hidden_act not in _ACTIVATIONS:
            raise bad_field(source, "vision_config.hidden_act", f"one of {sorted(_ACTIVATIONS)}", v.hidden_act)
        if not isinstance(t.tie_word_embeddings, bool):
            raise bad_field(source, "tie_word_embeddings", "true or false", t.tie_word_embeddings)
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value < t.vocab_size:
                raise bad_field(source, name, f"a token id in [0, {t.vocab_size})", value)
        if self.torch_dtype not in FLOAT_DTYPES:
            raise bad_field(source, "torch_dtype", f"one of {', '.join(FLOAT_DTYPES)}", self.torch_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        text = dict(d["text"], mrope_section=tuple(d["text"]["mrope_section"]))
        return cls(**{**d, "text": TextConfig(**text), "vision": VisionConfig(**d["vision"])})


@dataclass(frozen=True)
class HeadConfig:
    """The embedding head: `last_token` (final norm at the last token) or `mhsa` (K extra layers)."""

    type: str = "last_token"
    source_layer: int = -8  # mhsa: the head reads the residual stream entering layer L + source_layer
    num_layers: int = 8
    weights: str = "embedding_head.safetensors"

    def check_layers(self, layers: int, source: str = TTE_CONFIG_NAME) -> None:
        """Raise CheckpointError (naming `source` and the field) when an mhsa head does not fit a
        `layers`-layer backbone: source_layer must index a layer, Python-style ([-L, L): -K is the
        residual stream entering layer L-K), and num_layers must be in [1, L]."""
        if not -layers <= self.source_layer < layers:
            raise bad_field(source, "head.source_layer", f"in [-{layers}, {layers}) for this {layers}-layer model", self.source_layer)
        if not 1 <= self.num_layers <= layers:
            raise bad_field(source, "head.num_layers", f"in [1, {layers}] for this {layers}-layer model", self.num_layers)


@dataclass(frozen=True)
class ThinkConfig:
    start: str = "<think>"
    end: str = "</think>"
    max_tokens: int = 256


@dataclass(frozen=True)
class TTEConfig:
    """`tte_config.json`: how a checkpoint thinks and embeds (DESIGN §4)."""

    format_version: int = TTE_FORMAT_VERSION
    mode: str = "unified"  # or "two_model"
    reasoner: str | None = None  # two_model: path (relative to the checkpoint) or alias of the reasoner
    head: HeadConfig = field(default_factory=HeadConfig)
    normalize: bool = True
    think: ThinkConfig = field(default_factory=ThinkConfig)
    embed_suffix: str = "<|endoftext|>"
    instructions: dict[str, str] = field(default_factory=lambda: {"default": "Represent the given input."})

    @classmethod
    def load(cls, checkpoint: Path) -> "TTEConfig":
        """Read `tte_config.json`; a checkpoint without one is a last-token unified model."""
        path = Path(checkpoint) / TTE_CONFIG_NAME
        if not path.exists():
            logger.info("%s has no %s: using a last-token unified head with defaults", checkpoint, TTE_CONFIG_NAME)
            return cls()
        return cls.from_dict(read_json_object(path, required=True), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "tte_config") -> "TTEConfig":
        """Parse and check a `tte_config.json` dict: every field's type and range; raises CheckpointError
        naming `source` and the field. Unknown keys are refused (a misspelt one would silently give the default),
        at the top level as in head/think; keys beginning with "_" are free (comments, extensions)."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {json_type(raw)}")
        version = raw.get("format_version", TTE_FORMAT_VERSION)
        if not is_int(version) or version < 1:
            raise bad_field(source, "format_version", "a positive integer", version)
        if version > TTE_FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has format_version {version}; this tte_engine reads up to {TTE_FORMAT_VERSION}: upgrade tte_engine"
            )
        _check_keys(raw, cls, "", source)  # after the version: a newer format's keys say "upgrade", not "unknown"
        mode = raw.get("mode", "unified")
        if not isinstance(mode, str) or mode not in ("unified", "two_model"):
            raise bad_field(source, "mode", "'unified' or 'two_model'", mode)
        reasoner = raw.get("reasoner")
        if reasoner is not None and not (isinstance(reasoner, str) and reasoner.strip()):
            raise bad_field(source, "reasoner", "a checkpoint path or alias (a non-empty string)", reasoner)
        if mode == "two_model" and not reasoner:
            raise CheckpointError(f"{source}: mode 'two_model' needs a 'reasoner' checkpoint")
        head = HeadConfig(**_section(raw, "head", HeadConfig, source))
        if not isinstance(head.type, str) or head.type not in ("last_token", "mhsa"):
            raise bad_field(source, "head.type", "'last_token' or 'mhsa'", head.type)
        if not is_int(head.source_layer):
            raise bad_field(source, "head.source_layer", "an integer", head.source_layer)
        if not is_int(head.num_layers) or head.num_layers < 1:
            raise bad_field(source, "head.num_layers", "a positive integer", head.num_layers)
        if not isinstance(head.weights, str) or not head.weights.strip():
            raise bad_field(source, "head.weights", "a file name", head.weights)
        think = ThinkConfig(**_section(raw, "think", ThinkConfig, source))
        for name in ("start", "end"):
            if not isinstance(getattr(think, name), str) or not getattr(think, name):
                raise bad_field(source, f"think.{name}", "a non-empty string", getattr(think, name))
        if think.end == think.start:  # a trace is cut where think.end appears: it must differ from the marker that opens it
            raise bad_field(source, "think.end", "a marker other than think.start", think.end)
        if not is_int(think.max_tokens) or think.max_tokens < 0:
            raise bad_field(source, "think.max_tokens", "an integer >= 0", think.max_tokens)
        normalize = raw.get("normalize", True)
        if not isinstance(normalize, bool):
            raise bad_field(source, "normalize", "true or false", normalize)
        suffix = raw.get("embed_suffix", "<|endoftext|>")
        if not isinstance(suffix, str):
            raise bad_field(source, "embed_suffix", "a string", suffix)
        instructions = raw.get("instructions") or {"default": "Represent the given input."}
        if not isinstance(instructions, dict):
            raise bad_field(source, "instructions", "an object of name: instruction text", instructions)
        for name, text in instructions.items():
            if not isinstance(text, str):
                raise bad_field(source, f"instructions.{name}", "a string", text)
        if "default" not in instructions:
            raise CheckpointError(f"{source}: instructions must have a 'default' entry")
        return cls(format_version=version, mode=mode, reasoner=reasoner, head=head, normalize=normalize, think=think,
                   embed_suffix=suffix, instructions=dict(instructions))

    def check_for(self, model_cfg: "ModelConfig", source: str = TTE_CONFIG_NAME) -> None:
        """Raise CheckpointError (naming `source` and the field) when the head does not fit the model
        (`HeadConfig.check_layers`, for an mhsa head)."""
        if self.head.type == "mhsa":
            self.head.check_layers(model_cfg.text.num_layers, source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_keys(value: dict[str, Any], kind: type, prefix: str, source: str) -> None:
    """Refuse keys of `value` that are no field of the dataclass `kind` (a typo such as "embed_sufix"
    would otherwise silently give the default), naming the closest field; "_"-prefixed keys are free."""
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = [k for k in value if k not in known and not k.startswith("_")]
    if unknown:
        close = [difflib.get_close_matches(k, known, n=1) for k in unknown]
        named = [f"{prefix}{k}" + (f" (did you mean {prefix}{c[0]}?)" if c else "") for k, c in zip(unknown, close)]
        raise CheckpointError(f"{source}: unknown field(s) {', '.join(named)} (known: {', '.join(sorted(known))})")


def _section(raw: dict[str, Any], name: str, kind: type, source: str) -> dict[str, Any]:
    """The `name` object of `raw` (absent: {}), its keys checked against the dataclass `kind`'s fields."""
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise bad_field(source, name, "an object", value)
    _check_keys(value, kind, f"{name}.", source)
    return {k: v for k, v in value.items() if not k.startswith("_")}


@dataclass
class EngineConfig:
    """Runtime knobs. Defaults suit a single GPU or a CPU test run; every field can be overridden."""

    device: str = "cpu"
    dtype: str = "auto"  # "auto" = float32 on CPU, the checkpoint's dtype (bf16 for hub models) on CUDA
    block_size: int = 16  # tokens per KV-cache block
    cache_memory: float | int | None = None  # bytes (int) or fraction of free device memory (float <= 1)
    max_num_seqs: int = 256  # sequences decoded together
    max_num_batched_tokens: int = 4096  # prefill tokens per step (long prompts are chunked)
    max_vision_patches: int = 65536  # vision-tower patches per call
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    impl: str = "auto"  # op implementations: "auto" | "triton" | "torch"
    # Decode steps replayed from CUDA graphs, one per batch bucket (None: on for CUDA, off elsewhere).
    # True on CPU runs the graph path's padded static-buffer code eagerly (how the tests check it).
    cuda_graphs: bool | None = None
    # Decode steps the embed suffix of a trace that just ended may wait before it is prefilled, so
    # that the suffixes of traces ending close together are prefilled in one step and the decode
    # steps in between stay pure: with CUDA graphs those replay a graph, while a step with prefill
    # rows runs eagerly. It never waits once nothing else decodes, and a new prompt's prefill takes
    # the waiting suffixes along. Results do not change. 0: prefill each suffix at the next step.
    # None: SUFFIX_WAIT_WITH_GRAPHS (8) with CUDA graphs; 0 without, where a decode step of a large
    # model costs enough (a 2B model's on CPU: ~0.1-1 s) that waiting would mostly add latency.
    suffix_wait_steps: int | None = None
    # Reuse the KV of full prompt blocks already computed (same tokens, same images), as vLLM does.
    enable_prefix_caching: bool = True
    # CPU: lay the linear weights out once in oneDNN's blocked GEMM format (model/cpu_linear.py).
    # None: on for a CPU engine in float32/bfloat16 where torch has oneDNN; False keeps plain weights.
    prepack_weights: bool | None = None

    def check(self) -> None:
        """Raise ValueError naming the first knob whose value cannot work (before anything is loaded)."""
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_vision_patches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.suffix_wait_steps is not None and (isinstance(self.suffix_wait_steps, bool) or not isinstance(self.suffix_wait_steps, int)
                                                   or self.suffix_wait_steps < 0):
            raise ValueError(f"EngineConfig.suffix_wait_steps must be an integer >= 0 or None, got {self.suffix_wait_steps!r}")
        if self.max_model_len is not None and (isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"EngineConfig.max_model_len must be a positive integer or None, got {self.max_model_len!r}")
        for name in ("cuda_graphs", "prepack_weights"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):  # 0 == False, but 0 is no answer here
                raise ValueError(f"EngineConfig.{name} must be True, False or None, got {getattr(self, name)!r}")
        if self.prepack_weights and not str(self.device).startswith("cpu"):
            raise ValueError(f"EngineConfig.prepack_weights=True is for CPU engines (device is {self.device!r})")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"EngineConfig.enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
