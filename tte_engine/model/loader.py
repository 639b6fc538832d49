"""Load Hugging Face Qwen2-VL weights (sharded or not, either naming) into our fused layout.

Our layers fuse q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`, and store the
vision patch Conv3d as a linear; the table below says where each checkpoint tensor lands. Tensors
are read one at a time from memory-mapped safetensors and copied into place, so peak memory is
the model plus one tensor.

FP8 checkpoints written by the ecosystem's tools load as they are (`checkpoint_quantization` says
which): every module with a `weight_scale` tensor becomes an `Fp8Linear` holding the E4M3 weight
and one scale per output row (a per-tensor scale is repeated over the rows of its part, so fused
q/k/v or gate/up with different scales stay exact). Formats, as their producers define them:
- `compressed-tensors` (llm-compressor, e.g. the `FP8_DYNAMIC` scheme; config.json
  `quantization_config.quant_method == "compressed-tensors"`, format `float-quantized` or
  `naive-quantized`): `weight` float8_e4m3fn [out, in], `weight_scale` [out, 1] (channel) or [1]
  (tensor); activations dynamic per token, static per tensor (`input_scale`), or none (weight-only).
- ModelOpt (`hf_quant_config.json`, legacy `{"quantization": {...}}` or flat `quant_method:
  modelopt` shape, as TensorRT-LLM's `tensorrt_llm/quantization/modelopt_config.py` reads it):
  `quant_algo` `FP8` (scalar `weight_scale`, static scalar `input_scale`) or
  `FP8_PER_CHANNEL_PER_TOKEN` (`weight_scale` [out], dynamic per-token activations).
Static activation scales are kept (`Fp8Linear.input_scale`, the max over fused parts as
TensorRT-LLM takes it), so the numerics follow the checkpoint's recipe. FP8 KV-cache scales
(`k_scale`/`v_scale`) are ignored: our cache holds the model dtype. Any other scheme (block-scaled
FP8, INT4/INT8, NVFP4, ...) raises a CheckpointError naming it. FP8 bytes are never read as floats
without their scale: an FP8 weight with no `weight_scale`, or FP8 / `*_scale` tensors in a
checkpoint that declares no scheme, raise a CheckpointError before any weight is copied.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import QUANTIZATION_CONFIG_WANT, TTE_CONFIG_NAME, HeadConfig, ModelConfig, bad_field, json_type, read_json_object
from ..errors import CheckpointError, one_line
from .fp8 import FP8_DTYPE, Fp8Linear, decoder_linear_names, swap_in_fp8
from .names import canonical_name, checkpoint_shapes, head_shapes
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
PATCH_EMBED = "visual.patch_embed.proj.weight"  # a Conv3d in the hub layout, a linear in ours (its input flattened)
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head.weight",
    PATCH_EMBED: "visual.patch_embed.weight",
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
        weight_map = read_json_object(index, required=True).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name: shard file, got {json_type(weight_map)}")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise CheckpointError(f"{index}: weight_map.{name} must be a shard file name inside the checkpoint, got {shard!r}")
        return [checkpoint / s for s in sorted(set(weight_map.values()))]
    single = checkpoint / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{checkpoint}: no model.safetensors or model.safetensors.index.json")


_UNREADABLE = (SafetensorError, OSError, ValueError, RuntimeError, TypeError)  # what safetensors raises for a bad file


def _unreadable(f: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{f}: not a readable safetensors file ({one_line(exc)})")


def open_safetensors(f: Path):
    """`safe_open(f)` (a context manager over the memory-mapped file); a missing, truncated, empty or
    garbled file raises CheckpointError naming it, never safetensors' own error."""
    if not f.is_file():
        raise CheckpointError(f"missing weight shard {f}")
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except _UNREADABLE as exc:
        raise _unreadable(f, exc) from exc


def _tensor_names(handle, f: Path) -> list[str]:
    """The tensor names of an open safetensors file; CheckpointError naming `f` if its header is garbled."""
    try:
        return list(handle.keys())
    except _UNREADABLE as exc:
        raise _unreadable(f, exc) from exc


def iter_tensors(files: list[Path], select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in the safetensors `files`, read one at a time (only those `select` keeps).

    Raises CheckpointError naming the file for one that is missing or not readable as safetensors."""
    for f in files:
        with open_safetensors(f) as handle:
            for name in _tensor_names(handle, f):
                if select is None or select(name):
                    try:
                        tensor = handle.get_tensor(name)
                    except _UNREADABLE as exc:
                        raise CheckpointError(f"{f}: tensor {name} cannot be read ({one_line(exc)})") from exc
                    yield name, tensor


def is_fp8(dtype: torch.dtype) -> bool:
    """Every 1-byte float (E4M3, E5M2, their fnuz variants, E8M0) is an FP8 code, meaningless without its scale."""
    return dtype.is_floating_point and dtype.itemsize == 1


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
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: {raw_name} is stored as {tensor.dtype}, not a floating-point type")
        if part is not None:
            lo, hi = _part_bounds(model, pname, part)
            dst = dst[lo:hi]
        if pname.endswith(".weight_scale") and tensor.numel() == 1:
            tensor = tensor.reshape(()).expand(dst.shape)  # a per-tensor scale, repeated over its rows
        elif pname.endswith(".weight") and dst.dtype == FP8_DTYPE and tensor.dtype != FP8_DTYPE:
            raise CheckpointError(f"{source}: {raw_name} has a weight_scale but is stored as {tensor.dtype}, not float8_e4m3fn")
        elif is_fp8(tensor.dtype) and dst.dtype != tensor.dtype:  # casting would drop the scale the codes need
            raise CheckpointError(f"{source}: {raw_name} is stored as {tensor.dtype} without a weight_scale; FP8 weights are not read as plain floats")
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


_QUANT_SUFFIXES = (".weight_scale", ".input_scale")
_IGNORED_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale")  # FP8 KV-cache scales: our cache is not FP8


def _compressed_tensors_scheme(qc: dict, source: str) -> dict:
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise CheckpointError(f"{source}: compressed-tensors format {fmt!r} is not supported (FP8 float-quantized only)")
    activations = set()
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise CheckpointError(f"{source}: quantization_config.config_groups must be an object, got {json_type(groups)}")
    for name, group in groups.items():
        w, a = (group.get("weights") or {}, group.get("input_activations")) if isinstance(group, dict) else (None, None)
        if not isinstance(w, dict) or not isinstance(a, (dict, type(None))):
            raise CheckpointError(f"{source}: quantization_config.config_groups.{name} must be an object with object "
                                  "'weights' and 'input_activations'")
        if (w.get("type"), w.get("num_bits"), w.get("strategy")) not in (("float", 8, "channel"), ("float", 8, "tensor")):
            raise CheckpointError(f"{source}: compressed-tensors group {name!r} quantizes weights as {w.get('type')}{w.get('num_bits')}/"
                                  f"{w.get('strategy')}; only FP8 per channel or per tensor loads")
        if a is None:
            activations.add("none")
        elif (a.get("type"), a.get("num_bits")) == ("float", 8) and a.get("dynamic") is True and a.get("strategy") == "token":
            activations.add("dynamic")
        elif (a.get("type"), a.get("num_bits")) == ("float", 8) and not a.get("dynamic") and a.get("strategy") == "tensor":
            activations.add("static")
        else:
            raise CheckpointError(f"{source}: compressed-tensors group {name!r} quantizes activations as {a}; "
                                  "only FP8 dynamic per token, static per tensor or none load")
    if len(activations) != 1:
        raise CheckpointError(f"{source}: compressed-tensors groups mix activation schemes {sorted(activations)}")
    return {"producer": "compressed-tensors", "activations": activations.pop()}


def _modelopt_scheme(raw: dict, source: str) -> dict:
    inner = raw["quantization"] if isinstance(raw.get("quantization"), dict) else raw  # legacy nested or flat shape
    algo = inner.get("quant_algo")
    if algo not in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        raise CheckpointError(f"{source}: ModelOpt quant_algo {algo!r} is not supported (FP8 or FP8_PER_CHANNEL_PER_TOKEN load)")
    if inner.get("kv_cache_quant_algo") or inner.get("kv_cache_scheme"):
        logger.warning("%s: the checkpoint's FP8 KV-cache scales are ignored (the KV cache holds the model dtype)", source)
    return {"producer": "modelopt", "activations": "static" if algo == "FP8" else "dynamic", "quant_algo": algo}


def checkpoint_quantization(checkpoint: Path) -> dict | None:
    """The FP8 scheme of a Hugging Face checkpoint directory, or None when its weights are float.

    Returns {"producer": "compressed-tensors" | "modelopt", "activations": "dynamic" | "static" |
    "none", ...}. Reads `hf_quant_config.json` (ModelOpt) first, then config.json's
    `quantization_config`. Raises CheckpointError for a quantization scheme we cannot run.
    """
    checkpoint = Path(checkpoint)
    source = str(checkpoint)
    if (checkpoint / "hf_quant_config.json").is_file():
        return _modelopt_scheme(read_json_object(checkpoint / "hf_quant_config.json", required=True), source)
    qc = (read_json_object(checkpoint / "config.json") or {}).get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise bad_field(str(checkpoint / "config.json"), "quantization_config", QUANTIZATION_CONFIG_WANT, qc)
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(qc, source)
    if method.startswith("modelopt"):
        return _modelopt_scheme(qc, source)
    raise CheckpointError(f"{source}: quantization method {qc.get('quant_method')!r} is not supported "
                          "(FP8 checkpoints in compressed-tensors or ModelOpt format load)")


def _module_of(name: str) -> str | None:
    """Our module for a checkpoint tensor `<module>.<weight_scale|input_scale>` (None when it has none)."""
    stem = name.rsplit(".", 1)[0]
    target = target_of(canonical_name(stem + ".weight"))
    return None if target is None else target[0].rsplit(".", 1)[0]


_FP8_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # safetensors dtype codes, as torch spells them


def tensor_headers(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """name -> (file, safetensors dtype code such as "F8_E4M3", shape) of every tensor, from the headers alone."""
    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f in files:
        with open_safetensors(f) as handle:
            for name in _tensor_names(handle, f):
                try:
                    part = handle.get_slice(name)
                    out[name] = (f, part.get_dtype(), tuple(part.get_shape()))
                except _UNREADABLE as exc:
                    raise CheckpointError(f"{f}: tensor {name} cannot be read ({one_line(exc)})") from exc
    return out


def check_fp8_tensors(headers: dict[str, tuple[Path, str, tuple[int, ...]]], quant: dict | None, source: str) -> None:
    """Refuse FP8 codes that would be read without their scale (silently wrong weights otherwise).

    Under a declared scheme every FP8 tensor must be a `<module>.weight` with its `<module>.weight_scale`;
    with no scheme declared, no tensor may be FP8 or a `*_scale`."""
    for name, (f, code, _) in sorted(headers.items()):
        fp8 = code.startswith("F8_")
        if quant is None and (fp8 or name.endswith("_scale")):
            what = f"is stored as {_FP8_NAMES.get(code, code)}" if fp8 else "is a quantization scale"
            raise CheckpointError(f"{f}: tensor {name} {what}, but {source} declares no quantization scheme "
                                  "(no quantization_config in config.json, no hf_quant_config.json)")
        if quant is not None and fp8 and not (name.endswith(".weight") and name + "_scale" in headers):
            raise CheckpointError(f"{f}: FP8 tensor {name} ({_FP8_NAMES.get(code, code)}) has no {name}_scale "
                                  f"tensor, which {quant['producer']} FP8 needs for every quantized weight")


def _fp8_modules(names) -> list[str]:
    return sorted({m for n in names if n.endswith(".weight_scale") and (m := _module_of(n))})


def check_stack(names, prefix: str, n: int, declared: str, holder) -> None:
    """Raise CheckpointError "`declared` is `n`, but `holder` holds ..." where the `<prefix><i>.*` tensor
    `names` do not index a stack of `n` layers, 0 to n-1 (a gap inside is left to the missing-tensor check)."""
    indices = {int(i) for name in names if name.startswith(prefix) and (i := name[len(prefix):].partition(".")[0]).isdigit()}
    beyond = sorted(i for i in indices if i >= n)
    held = max(indices) + 1 if indices else 0
    if beyond:  # named, not counted: one stray `layers.999999999.x` is not a billion layers
        found = f"{prefix}{beyond[0]}.*" + (f" and {len(beyond) - 1} more layer index(es)" if len(beyond) > 1 else "") + f" beyond {prefix}{n - 1}"
    elif held < n:
        found = f"{held} layers ({prefix}0 to {prefix}{held - 1})" if held else f"no {prefix}* tensors"
    else:
        return
    raise CheckpointError(f"{declared} is {n}, but {holder} holds {found}")


def _dims_fit(cfg: ModelConfig, found: dict[str, tuple[Path, tuple[int, ...]]], config: Path) -> None:
    """Name the config.json field behind the first dimension of a key tensor that the file disagrees with."""
    t, v = cfg.text, cfg.vision
    d, e = t.hidden_size, v.embed_dim
    dims = {  # tensor -> (the config.json field(s), the size they give) per dimension
        "model.embed_tokens.weight": (("vocab_size", t.vocab_size), ("hidden_size", d)),
        "model.layers.0.self_attn.k_proj.weight": (("num_key_value_heads x (hidden_size / num_attention_heads)", t.num_kv_heads * t.head_dim),
                                                   ("hidden_size", d)),
        "model.layers.0.mlp.gate_proj.weight": (("intermediate_size", t.intermediate_size), ("hidden_size", d)),
        "visual.blocks.0.attn.proj.weight": (("vision_config.embed_dim", e), ("vision_config.embed_dim", e)),
        "visual.blocks.0.mlp.fc1.weight": (("vision_config.embed_dim x mlp_ratio", int(e * v.mlp_ratio)), ("vision_config.embed_dim", e)),
        "visual.merger.mlp.2.weight": (("vision_config.hidden_size", v.out_hidden_size),
                                       ("vision_config.embed_dim x spatial_merge_size^2", e * v.spatial_merge_size**2)),
    }
    for name, sizes in dims.items():
        f, shape = found.get(name, (None, ()))
        if len(shape) != len(sizes):  # absent (named as missing below), or of another rank (refused by `_shapes_fit`)
            continue
        for (field, size), got in zip(sizes, shape):
            if got != size:
                raise CheckpointError(f"{config}: {field} = {size} does not match the weights: {f} holds {name} of shape {shape}")


def _shapes_fit(found: dict[str, tuple[Path, tuple[int, ...]]], want: dict[str, tuple[int, ...]], config: Path) -> None:
    """Every tensor of `want` in `found` has the shape config.json implies. Exactly: `copy_tensors`
    reshapes what it copies, so a transposed matrix of the right size would load as wrong weights.
    The one other layout taken is the patch embedding's convolution stored flat, as a linear."""
    for name, shape in want.items():
        if name not in found:
            continue
        f, got = found[name]
        if got != tuple(shape) and not (name == PATCH_EMBED and got == (shape[0], math.prod(shape[1:]))):
            raise CheckpointError(f"{f}: {name} has shape {got}, but {config} implies {tuple(shape)}")


@dataclass(frozen=True)
class CheckedWeights:
    """A checkpoint's weight files as `check_weights_fit` read and checked them (headers only), for
    `load_checkpoint_weights`: what was read once is not read again."""

    checkpoint: Path
    files: list[Path]
    headers: dict[str, tuple[Path, str, tuple[int, ...]]]  # tensor name -> (file, dtype code, shape)
    quant: dict | None  # `checkpoint_quantization`


def check_weights_fit(cfg: ModelConfig, checkpoint: Path, head_cfg: HeadConfig) -> CheckedWeights:
    """Check the weights against the config before the model is built, from the safetensors headers
    alone (no tensor data is read): a config.json whose layer count or sizes the files do not hold
    would otherwise allocate the model it describes (100000 layers: minutes and many GB) before the
    first weight showed it wrong. Raises CheckpointError naming config.json's field (or tte_config.json's
    head.num_layers) and the file's tensor and shape; also, as early, an unsupported quantization
    scheme, FP8 tensors without scales and missing tensors (`load_checkpoint_weights` checks the data)."""
    config = checkpoint / "config.json"
    files = safetensors_files(checkpoint)
    headers, quant = tensor_headers(files), checkpoint_quantization(checkpoint)
    check_fp8_tensors(headers, quant, str(checkpoint))
    found = {canonical_name(n): (f, shape) for n, (f, _, shape) in headers.items()}
    where = files[0] if len(files) == 1 else checkpoint / "model.safetensors.index.json"
    # the layer counts first: the expected shapes below are listed per layer
    check_stack(found, "model.layers.", cfg.text.num_layers, f"{config}: num_hidden_layers", where)
    check_stack(found, "visual.blocks.", cfg.vision.depth, f"{config}: vision_config.depth", where)
    _dims_fit(cfg, found, config)
    want = checkpoint_shapes(cfg)
    _shapes_fit(found, want, config)
    check_complete({target_of(n) for n in want}, {target_of(n) for n in want if n in found}, str(checkpoint))
    if head_cfg.type == "mhsa":
        head_file = checkpoint / head_cfg.weights
        if not head_file.exists():
            raise CheckpointError(f"{checkpoint}: the mhsa head's weights {head_cfg.weights} are missing")
        found = {n: (f, shape) for n, (f, _, shape) in tensor_headers([head_file]).items()}
        check_stack(found, "layers.", head_cfg.num_layers, f"{checkpoint / TTE_CONFIG_NAME}: head.num_layers", head_file)
        want = head_shapes(cfg, head_cfg.num_layers)
        _shapes_fit(found, want, config)
        check_complete({head_target_of(n) for n in want}, {head_target_of(n) for n in want if n in found}, str(head_file))
    return CheckedWeights(checkpoint, files, headers, quant)


def load_checkpoint_weights(model: Qwen2VL, weights: CheckedWeights, head_cfg: HeadConfig) -> None:
    """Fill every parameter from a Hugging Face checkpoint dir (+ the mhsa head's weight file), whose
    headers `check_weights_fit` checked against the model's config.

    An FP8 checkpoint (see `checkpoint_quantization`) first turns its quantized linears into
    `Fp8Linear`s. Raises CheckpointError for unreadable, non-float or unsupported weights.
    """
    checkpoint, files, quant = weights.checkpoint, weights.files, weights.quant
    source = str(checkpoint)
    tied = model.cfg.text.tie_word_embeddings
    input_scales: dict[str, float] = {}
    if quant:
        fp8 = _fp8_modules(weights.headers)
        if not fp8:
            raise CheckpointError(f"{source}: declares {quant['producer']} FP8 but holds no weight_scale tensors")
        unsupported = sorted(set(fp8) - set(decoder_linear_names(model, include_vision=True)))
        if unsupported:  # the LM head / embeddings are read as plain weights by the runtime
            raise CheckpointError(f"{source}: FP8 is supported on decoder and vision linears only; quantized: {unsupported[:4]}")
        swap_in_fp8(model, fp8)
        logger.info("%s: %d FP8 linears (%s, activations %s)", source, len(fp8), quant["producer"], quant["activations"])

    def tensors():
        for name, tensor in iter_tensors(files):
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name.endswith(".input_scale"):
                module = _module_of(name)
                if module is None:
                    logger.warning("%s: ignoring unexpected tensor %s", source, name)
                else:  # fused parts share one input: TensorRT-LLM takes the max of their scales too
                    input_scales[module] = max(input_scales.get(module, 0.0), float(tensor.float().max()))
                continue
            yield name, tensor

    def resolve(name: str):
        if name.endswith(".weight_scale"):
            target = target_of(canonical_name(name[: -len("_scale")]))
            return None if target is None else (target[0] + "_scale", target[1])
        target = target_of(canonical_name(name))
        return None if tied and target and target[0] == "lm_head.weight" else target

    filled = copy_tensors(model, tensors(), resolve, source)
    if quant:
        for name, mod in model.named_modules():
            if isinstance(mod, Fp8Linear):
                if quant["activations"] == "none":
                    mod.quantize_activations = False
                elif quant["activations"] == "static":
                    if name not in input_scales:
                        raise CheckpointError(f"{source}: {name} has static FP8 activations but no input_scale")
                    mod.input_scale = torch.tensor(input_scales[name], dtype=torch.float32, device=mod.weight.device)
    not_head = lambda n: not n.startswith("head.") and not (tied and n == "lm_head.weight")  # noqa: E731
    check_complete(_expected(model, not_head), filled, source)
    if model.head is not None:  # (its file's presence was checked by `check_weights_fit`)
        head_file = checkpoint / head_cfg.weights
        filled = copy_tensors(model, iter_tensors([head_file]), head_target_of, str(head_file))
        check_complete(_expected(model, lambda n: n.startswith("head.")), filled, str(head_file))
