"""Deterministic random Qwen2-VL checkpoints, built locally: `tiny-random`, test fixtures, benchmarks.

A checkpoint here is a real Hugging Face Qwen2-VL directory (config, safetensors, tokenizer with
the Qwen2-VL special tokens plus `<think>`/`</think>`, chat template, image-processor config,
generation config) plus `tte_config.json`, so transformers loads it as the oracle and our engine
loads it like any hub model. Weights come from a seeded generator: the same spec and seed give
the same bytes on every machine. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import TTE_CONFIG_NAME, ModelConfig, TextConfig, VisionConfig
from .errors import CheckpointError
from .model.names import checkpoint_shapes, head_shapes

logger = logging.getLogger("tte_engine")

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)

# Qwen2-VL's chat template (ChatML with vision placeholders), as shipped with the hub checkpoints.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the tiny BPE vocabulary: enough English for sensible merges, fixed forever.
_CORPUS = """Represent the given input. Represent the given image with the following question.
Find a caption that describes the photo. What is shown in this picture? Answer the question.
A photo of a cat sitting on a red chair next to a window. Two dogs play with a ball in the park.
The quick brown fox jumps over the lazy dog. A diagram of a neural network with many layers.
A man rides a bicycle along the river at sunset; the sky is orange and the water is calm.
Think step by step about the query, describe the relevant objects, then summarize the answer.
The document is a table of numbers with a title, a date and a signature at the bottom.
Retrieve the image that matches the text. Which object is on the left side of the table?
A bowl of fruit: apples, bananas and oranges. A city street with cars, buses and people.
Embedding models map images and text into one vector space where similar things are close."""


@dataclass(frozen=True)
class RandomSpec:
    """Architecture of a random checkpoint (vocab comes from the tokenizer unless set)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_num_heads: int = 4
    vision_mlp_ratio: int = 2
    max_position_embeddings: int = 4096
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16
    head: str = "mhsa"  # "last_token" or "mhsa"
    head_layers: int = 2
    tie_word_embeddings: bool = False
    vocab_size: int | None = None
    think_max_tokens: int = 16


SPECS: dict[str, RandomSpec] = {
    "tiny-random": RandomSpec(),
    # The CPU benchmark model (issue: hidden ~384, 6 layers).
    "bench-small": RandomSpec(
        hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2,
        mrope_section=(8, 12, 12), vision_depth=4, vision_embed_dim=128, vision_mlp_ratio=4,
        head="last_token", max_pixels=28 * 28 * 64, think_max_tokens=24,
    ),
}


# Real architectures with random weights (`tte-export --random-init`): never built implicitly, since
# these aliases name real checkpoints. Qwen2-VL-2B / -7B dimensions plus the paper's 8-layer mhsa head.
ARCH_SPECS: dict[str, RandomSpec] = {
    "unified-2b": RandomSpec(
        hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
        mrope_section=(16, 24, 24), vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vision_mlp_ratio=4,
        max_position_embeddings=32768, max_pixels=28 * 28 * 1280, head="mhsa", head_layers=8,
        tie_word_embeddings=True, vocab_size=151936, think_max_tokens=256,
    ),
    "unified-7b": RandomSpec(
        hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
        mrope_section=(16, 24, 24), vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vision_mlp_ratio=4,
        max_position_embeddings=32768, max_pixels=28 * 28 * 1280, head="mhsa", head_layers=8,
        tie_word_embeddings=False, vocab_size=152064, think_max_tokens=256,
    ),
}


def tte_home() -> Path:
    """$TTE_HOME (default ~/.cache/tte_engine), absolute: checkpoints found under it are recorded by
    path (an export's reasoner), and a relative one would resolve only from this working directory."""
    return Path(os.environ.get("TTE_HOME", Path.home() / ".cache" / "tte_engine")).expanduser().absolute()


def build_tokenizer(path: Path):
    """Train a small byte-level BPE (Qwen2 pre-tokenization) and save it with the chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(path)
    return hf


def model_config_for(spec: RandomSpec, vocab_size: int, token_ids: dict[str, int]) -> ModelConfig:
    return ModelConfig(
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            mrope_section=tuple(spec.mrope_section),
            max_position_embeddings=spec.max_position_embeddings,
            tie_word_embeddings=spec.tie_word_embeddings,
        ),
        vision=VisionConfig(
            depth=spec.vision_depth,
            embed_dim=spec.vision_embed_dim,
            num_heads=spec.vision_num_heads,
            mlp_ratio=spec.vision_mlp_ratio,
            hidden_act="quick_gelu",
            out_hidden_size=spec.hidden_size,
        ),
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
    )


def random_checkpoint_bytes(spec: RandomSpec, itemsize: int) -> tuple[int, int]:
    """(bytes of the model weights, bytes of the mhsa head's weight file) of a checkpoint built from `spec`.

    Without `spec.vocab_size` the vocabulary comes from the tokenizer, which is not built here; the
    estimate then assumes 1024 tokens (the tiny BPE vocabulary is smaller).
    """
    ids = {s: i for i, s in enumerate(SPECIAL_TOKENS)}  # only shapes matter here
    cfg = model_config_for(spec, spec.vocab_size or 1024, ids)

    def nbytes(shapes: dict[str, tuple[int, ...]]) -> int:
        return itemsize * sum(math.prod(shape) for shape in shapes.values())

    return nbytes(checkpoint_shapes(cfg)), nbytes(head_shapes(cfg, spec.head_layers)) if spec.head == "mhsa" else 0


def hf_config_dict(cfg: ModelConfig, token_ids: dict[str, int], dtype: str, layout: str) -> dict:
    """config.json in the flat hub layout ("hub") or the nested transformers-5 layout ("transformers5")."""
    t, v = cfg.text, cfg.vision
    text = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "use_sliding_window": False,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
    }
    vision = {
        "depth": v.depth,
        "embed_dim": v.embed_dim,
        "num_heads": v.num_heads,
        "mlp_ratio": v.mlp_ratio,
        "hidden_size": v.out_hidden_size,
        "hidden_act": v.hidden_act,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "in_channels": v.in_channels,
    }
    out = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": vision,
    }
    if layout == "hub":
        out.update(text, rope_theta=t.rope_theta, torch_dtype=dtype)
        out["rope_scaling"] = {"type": "mrope", "mrope_section": list(t.mrope_section)}
    else:
        rope = {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)}
        out.update(text_config=dict(text, rope_parameters=rope), dtype=dtype)
    return out


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q.weight" in name or "layernorm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    std = 0.5 if "embed_tokens" in name else fan_in**-0.5
    return std * torch.randn(shape, generator=gen)


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded weights, cast tensor by tensor (so a 7B-sized bf16 set never exists in fp32 all at once)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: _random_tensor(name, shape, gen).to(dtype) for name, shape in sorted(shapes.items())}


def _rename_transformers5(name: str) -> str:
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    if name.startswith("visual."):
        return "model." + name
    return name


def _save_weights(weights: dict[str, torch.Tensor], path: Path, shards: int) -> None:
    names = sorted(weights)
    if shards <= 1:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    index, per = {}, -(-len(names) // shards)
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, str(path / fname), metadata={"format": "pt"})
        index.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))


def build_random_checkpoint(
    path: str | Path,
    spec: RandomSpec = SPECS["tiny-random"],
    *,
    seed: int = 0,
    dtype: str = "float32",
    layout: str = "hub",
    shards: int = 1,
    mode: str = "unified",
    reasoner: str | None = None,
    stop: bool = True,
) -> Path:
    """Write a complete random Qwen2-VL + TTE checkpoint directory and return its path.

    layout: "hub" (flat config, `model.layers.*` / `visual.*` names) or "transformers5"
    (nested config, `model.language_model.*` / `model.visual.*` names). stop=False: as
    `never_stop` leaves it, without writing the weights twice (a 2B model's are 4.4 GB).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    token_ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    vocab = spec.vocab_size or -(-len(tok) // 64) * 64
    cfg = model_config_for(spec, vocab, token_ids)
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg, token_ids, dtype, layout), indent=2))
    gen_cfg = {
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
        "pad_token_id": token_ids["<|endoftext|>"],
        "do_sample": False,
    }
    (path / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    preproc = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preproc, indent=2))

    torch_dtype = getattr(torch, dtype)
    weights = random_weights(checkpoint_shapes(cfg), seed, torch_dtype)
    if not stop:
        _zero_stop_rows(weights, tok)
    if layout == "transformers5":
        weights = {_rename_transformers5(n): w for n, w in weights.items()}
    _save_weights(weights, path, shards)

    head: dict = {"type": spec.head}
    if spec.head == "mhsa":
        head.update(source_layer=-spec.head_layers, num_layers=spec.head_layers, weights="embedding_head.safetensors")
        head_w = random_weights(head_shapes(cfg, spec.head_layers), seed + 1, torch_dtype)
        save_file(head_w, str(path / "embedding_head.safetensors"))
    tte = {
        "format_version": 1,
        "mode": mode,
        "head": head,
        "normalize": True,
        "think": {"start": "<think>", "end": "</think>", "max_tokens": spec.think_max_tokens},
        "embed_suffix": "<|endoftext|>",
        "instructions": {"default": "Represent the given input.", "retrieval": "Find a caption that describes the photo."},
    }
    if reasoner is not None:
        tte["reasoner"] = reasoner
    (path / "tte_config.json").write_text(json.dumps(tte, indent=2))
    return path


def ensure_random_checkpoint(path: str | Path, spec: RandomSpec, *, seed: int = 0, dtype: str = "float32", shards: int = 1) -> Path:
    """The random checkpoint at `path`, built there first if it is not complete yet.

    It is built in a temporary sibling directory, removed again whatever stops the build (an error,
    Ctrl-C), and renamed into place only when complete; if another process finished the same
    checkpoint first, its copy is kept (same spec and seed: the same bytes) and ours dropped.
    """
    path = Path(path)
    if (path / TTE_CONFIG_NAME).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        build_random_checkpoint(tmp, spec, seed=seed, dtype=dtype, shards=shards)
        try:
            tmp.rename(path)  # atomic; fails if another builder's complete directory is already there
        except OSError as exc:
            if not (path / TTE_CONFIG_NAME).exists():
                raise CheckpointError(f"cannot move the built checkpoint into {path}: {exc.strerror or exc}") from exc
            logger.info("%s was built by another process meanwhile; keeping its copy", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return path


def ensure_random_alias(name: str) -> Path:
    """Build a named random checkpoint under $TTE_HOME/models on first use (seeded, so identical everywhere)."""
    path = tte_home() / "models" / name
    if not (path / TTE_CONFIG_NAME).exists():
        logger.info("building the %s checkpoint in %s (first use)", name, path)
    return ensure_random_checkpoint(path, SPECS[name], seed=0)


STOP_TOKENS = ("</think>", "<|im_end|>", "<|endoftext|>")


def never_stop(checkpoint: Path) -> Path:
    """Zero the output-projection rows of the stop tokens (`STOP_TOKENS`) of a single-file random
    checkpoint, in place, so their logit is 0 and every greedy trace runs its full budget: fixed
    work for benchmarks and for tests that need a request to stay in flight. Returns `checkpoint`.

    With tied embeddings the rows zeroed are the token embedding's, so those tokens also read as
    zero vectors in a prompt: fine for timing, and both engines of a comparison load the same file.
    Raises KeyError if the file holds neither an LM head nor a token embedding."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    weights = load_file(str(checkpoint / "model.safetensors"))
    _zero_stop_rows(weights, AutoTokenizer.from_pretrained(checkpoint))
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    return checkpoint


def _zero_stop_rows(weights: dict[str, torch.Tensor], tok) -> None:
    """Zero, in place, the stop tokens' rows of the LM head (or, tied, of the token embedding)."""
    names = ("lm_head.weight", "model.embed_tokens.weight", "model.language_model.embed_tokens.weight")
    head = weights[next((n for n in names if n in weights), names[0])]
    for token in STOP_TOKENS:
        head[tok.convert_tokens_to_ids(token)] = 0
