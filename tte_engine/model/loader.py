"""Load Hugging Face Qwen2-VL weights (sharded or not, either naming) into our fused layout.

Our layers fuse q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`, and store the
vision patch Conv3d as a linear; the table below says where each checkpoint tensor lands. Tensors
are read one at a time from memory-mapped safetensors and copied into place, so peak memory is
the model plus one tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import HeadConfig, ModelConfig
from ..errors import CheckpointError
from .names import canonical_name
from .qwen2_vl import Qwen2VL

logger = logging.getLogger("tte_engine")

# checkpoint suffix inside a decoder layer -> (our parameter, part of a fused parameter or None)
_DECODER_PARTS = {
    "self_attn.q_proj.weight": ("qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("qkv_proj.weight", 2),
    "self_attn.q_proj.bias": ("qkv_proj.bias", 0),
    "self_attn.k_proj.bias": ("qkv_proj.bias", 1),
    "self_attn.v_proj.bias": ("qkv_proj.bias", 2),
    "self_attn.o_proj.weight": ("o_proj.weight", None),
    "mlp.gate_proj.weight": ("gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("gate_up_proj.weight", 1),
    "mlp.down_proj.weight": ("down_proj.weight", None),
    "input_layernorm.weight": ("input_norm", None),
    "post_attention_layernorm.weight": ("post_attention_norm", None),
}
_VISION_RENAMES = {
    "attn.qkv.": "qkv.",
    "attn.proj.": "proj.",
    "mlp.fc1.": "fc1.",
    "mlp.fc2.": "fc2.",
}
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head.weight",
    "visual.patch_embed.proj.weight": "visual.patch_embed.weight",
    "visual.merger.ln_q.weight": "visual.merger_norm.weight",
    "visual.merger.ln_q.bias": "visual.merger_norm.bias",
    "visual.merger.mlp.0.weight": "visual.merger_fc1.weight",
    "visual.merger.mlp.0.bias": "visual.merger_fc1.bias",
    "visual.merger.mlp.2.weight": "visual.merger_fc2.weight",
    "visual.merger.mlp.2.bias": "visual.merger_fc2.bias",
}


def _decoder_target(prefix: str, suffix: str) -> tuple[str, int | None] | None:
    part = _DECODER_PARTS.get(suffix)
    return None if part is None else (prefix + part[0], part[1])


def target_of(name: str) -> tuple[str, int | None] | None:
    """Our parameter (and fused part) for a canonical hub-layout checkpoint tensor name."""
    if name in _TOP_RENAMES:
        return _TOP_RENAMES[name], None
    if name.startswith("model.layers."):
        idx, _, suffix = name[len("model.layers.") :].partition(".")
        return _decoder_target(f"layers.{idx}.", suffix)
    if name.startswith("visual.blocks."):
        idx, _, suffix = name[len("visual.blocks.") :].partition(".")
        for old, new in _VISION_RENAMES.items():
            if suffix.startswith(old):
                suffix = new + suffix[len(old) :]
        return f"visual.blocks.{idx}.{suffix}", None
    return None


def head_target_of(name: str) -> tuple[str, int | None] | None:
    """Our parameter for a tensor of the mhsa head's weight file (`layers.{i}.*`, `norm.weight`)."""
    if name == "norm.weight":
        return "head.norm", None
    if name.startswith("layers."):
        idx, _, suffix = name[len("layers.") :].partition(".")
        return _decoder_target(f"head.layers.{idx}.", suffix)
    return None


def safetensors_files(checkpoint: Path) -> list[Path]:
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint / s for s in shards]
    single = checkpoint / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{checkpoint}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(files: list[Path], select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the safetensors `files`, read one at a time (only those `select` keeps)."""
    for f in files:
        if not f.exists():
            raise CheckpointError(f"missing weight shard {f}")
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if select is None or select(name):
                    yield name, handle.get_tensor(name)


def _part_bounds(model: Qwen2VL, param: str, part: int) -> tuple[int, int]:
    t = model.cfg.text
    if "qkv_proj" in param:
        sizes = [t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.num_kv_heads * t.head_dim]
    else:
        sizes = [t.intermediate_size, t.intermediate_size]
    start = sum(sizes[:part])
    return start, start + sizes[part]


def copy_tensors(model: Qwen2VL, tensors: Iterator[tuple[str, torch.Tensor]], resolve, source: str) -> set[tuple[str, int | None]]:
    """Copy each (name, tensor) to where `resolve` says; returns the (param, part) pairs filled."""
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[tuple[str, int | None]] = set()
    for raw_name, tensor in tensors:
        target = resolve(raw_name)
        if target is None:
            logger.warning("%s: ignoring unexpected tensor %s", source, raw_name)
            continue
        pname, part = target
        if pname not in params:
            logger.warning("%s: ignoring tensor %s (no parameter %s)", source, raw_name, pname)
            continue
        dst = params[pname].data
        if part is not None:
            lo, hi = _part_bounds(model, pname, part)
            dst = dst[lo:hi]
        if dst.numel() != tensor.numel():
            raise CheckpointError(f"{source}: {raw_name} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(tensor.reshape(dst.shape))
        filled.add((pname, part))
    return filled


def _expected(model: Qwen2VL, prefix_filter) -> set[tuple[str, int | None]]:
    out: set[tuple[str, int | None]] = set()
    for name, _ in model.named_parameters():
        if not prefix_filter(name):
            continue
        if "qkv_proj" in name:
            out |= {(name, 0), (name, 1), (name, 2)}
        elif "gate_up_proj" in name:
            out |= {(name, 0), (name, 1)}
        else:
            out.add((name, None))
    return out


def _weight_label(key: str | tuple[str, int | None]) -> str:
    if isinstance(key, str):
        return key
    name, part = key
    return name + ("" if part is None else f"[part {part}]")


def check_complete(expected: set, filled: set, source: str) -> None:
    """Raise a CheckpointError naming the weights of `expected` not in `filled`.

    Elements are parameter names, or (name, part of a fused parameter or None) pairs.
    """
    missing = sorted(_weight_label(key) for key in expected - filled)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: {len(missing)} weight(s) missing: {shown}")


def build_model(cfg: ModelConfig, head_cfg: HeadConfig, *, dtype: torch.dtype, device: str, max_positions: int, impl: str) -> Qwen2VL:
    """An uninitialized model on `device` (built on the meta device, so no random init is paid)."""
    with torch.device("meta"):
        model = Qwen2VL(cfg, head_cfg, max_positions=max_positions, impl=impl)
    return model.to(dtype).to_empty(device=device)


def load_checkpoint_weights(model: Qwen2VL, checkpoint: Path, head_cfg: HeadConfig) -> None:
    """Fill every parameter from a Hugging Face checkpoint dir (+ the mhsa head's weight file)."""
    source = str(checkpoint)
    tied = model.cfg.text.tie_word_embeddings

    def resolve(name: str):
        target = target_of(canonical_name(name))
        return None if tied and target and target[0] == "lm_head.weight" else target

    filled = copy_tensors(model, iter_tensors(safetensors_files(checkpoint)), resolve, source)
    not_head = lambda n: not n.startswith("head.") and not (tied and n == "lm_head.weight")  # noqa: E731
    check_complete(_expected(model, not_head), filled, source)
    if model.head is not None:
        head_file = checkpoint / head_cfg.weights
        if not head_file.exists():
            raise CheckpointError(f"{checkpoint}: the mhsa head's weights {head_cfg.weights} are missing")
        filled = copy_tensors(model, iter_tensors([head_file]), head_target_of, str(head_file))
        check_complete(_expected(model, lambda n: n.startswith("head.")), filled, str(head_file))
