"""Configuration: the model architecture, the TTE checkpoint config, and the engine's knobs.

`ModelConfig` is the small, flat description of a Qwen2-VL the runtime needs; it is parsed
once from a Hugging Face `config.json` (through transformers' own config class, so both the
old flat hub layout and the nested v5 layout work) and can be stored verbatim in an engine
directory. `TTEConfig` mirrors `tte_config.json` (DESIGN §4).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

logger = logging.getLogger("tte_engine")

TTE_CONFIG_NAME = "tte_config.json"
TTE_FORMAT_VERSION = 1


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
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Parse a Qwen2-VL `config.json` dict (flat hub layout or nested transformers-5 layout)."""
        from transformers import Qwen2VLConfig

        if hf.get("model_type") not in ("qwen2_vl", None):
            raise CheckpointError(f"expected a Qwen2-VL checkpoint (model_type 'qwen2_vl'), got {hf.get('model_type')!r}")
        hf = {k: v for k, v in hf.items() if k not in ("architectures", "transformers_version")}
        try:
            cfg = Qwen2VLConfig(**hf)
        except Exception as exc:  # transformers raises several types for malformed configs
            raise CheckpointError(f"cannot parse the Qwen2-VL config: {exc}") from exc
        t, v = cfg.text_config, cfg.vision_config
        if getattr(t, "use_sliding_window", False):
            raise CheckpointError("sliding-window attention (use_sliding_window=true) is not supported")
        rope = t.rope_parameters or {}
        section = tuple(rope.get("mrope_section") or (16, 24, 24))
        head_dim = t.hidden_size // t.num_attention_heads
        if sum(section) != head_dim // 2:
            raise CheckpointError(f"mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}")
        vrope = v.rope_parameters or {}
        dtype = hf.get("dtype") or hf.get("torch_dtype") or t.dtype or "float32"
        return cls(
            text=TextConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size,
                num_layers=t.num_hidden_layers,
                num_heads=t.num_attention_heads,
                num_kv_heads=t.num_key_value_heads,
                rms_norm_eps=t.rms_norm_eps,
                rope_theta=float(rope.get("rope_theta", 1000000.0)),
                mrope_section=section,
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
                rope_theta=float(vrope.get("rope_theta", 10000.0)),
            ),
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            vision_start_token_id=cfg.vision_start_token_id,
            vision_end_token_id=cfg.vision_end_token_id,
            torch_dtype=str(dtype).replace("torch.", ""),
        )

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
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "tte_config") -> "TTEConfig":
        version = raw.get("format_version", TTE_FORMAT_VERSION)
        if version > TTE_FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has format_version {version}; this tte_engine reads up to {TTE_FORMAT_VERSION}: upgrade tte_engine"
            )
        try:
            cfg = cls(
                format_version=version,
                mode=raw.get("mode", "unified"),
                reasoner=raw.get("reasoner"),
                head=HeadConfig(**raw.get("head", {})),
                normalize=raw.get("normalize", True),
                think=ThinkConfig(**raw.get("think", {})),
                embed_suffix=raw.get("embed_suffix", "<|endoftext|>"),
                instructions=dict(raw.get("instructions") or {"default": "Represent the given input."}),
            )
        except TypeError as exc:
            raise CheckpointError(f"{source}: unknown field ({exc})") from exc
        if cfg.mode not in ("unified", "two_model"):
            raise CheckpointError(f"{source}: mode must be 'unified' or 'two_model', got {cfg.mode!r}")
        if cfg.mode == "two_model" and not cfg.reasoner:
            raise CheckpointError(f"{source}: mode 'two_model' needs a 'reasoner' checkpoint")
        if cfg.head.type not in ("last_token", "mhsa"):
            raise CheckpointError(f"{source}: head.type must be 'last_token' or 'mhsa', got {cfg.head.type!r}")
        if "default" not in cfg.instructions:
            raise CheckpointError(f"{source}: instructions must have a 'default' entry")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
