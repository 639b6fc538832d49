"""Hugging Face-format checkpoints of a loaded model: float, FP8 in `compressed-tensors` layout, FP8 in ModelOpt layout.

The tensors are those of our `Qwen2VL`, un-fused back into the hub naming (`model.layers.{i}.self_attn.q_proj`,
`visual.blocks.{i}.attn.qkv`, ...): every hub tensor name of `names.checkpoint_shapes` is mapped
through the loader's own table (`loader.target_of`), so export and load use one mapping.

FP8 covers the decoder's linears (q/k/v/o, gate/up/down); the embeddings, the LM head, norms and
the vision tower stay in the float dtype, and the `mhsa` head's weight file stays float too (it is
ours, not part of the Hugging Face model). Two layouts, as their readers define them:

- `compressed-tensors` (the `compressed-tensors` package's own `QuantizationConfig`, preset
  `FP8_DYNAMIC`, format `float-quantized`): `weight` float8_e4m3fn [out, in] + `weight_scale`
  float32 [out, 1]; activations dynamic per token. This is exactly our native scheme: the E4M3
  bytes and scales are those of the native engine directory (the weight bytes are produced by the
  package's `FloatQuantizationCompressor` from our scales). Readers: transformers with the
  `compressed-tensors` package, vLLM, TensorRT-LLM's PyTorch backend (`quant_method:
  compressed-tensors`, tensorrt_llm/models/quant_config_utils.py).
- ModelOpt (`hf_quant_config.json`, the legacy `{"producer", "quantization": {...}}` shape that
  TensorRT-LLM's `tensorrt_llm/quantization/modelopt_config.py` parses): `quant_algo`
  `FP8_PER_CHANNEL_PER_TOKEN` -> `weight_scale` float32 [out] (TensorRT-LLM's
  `FP8RowwiseLinearMethod` in tensorrt_llm/_torch/modules/linear.py), or `FP8` -> scalar
  `weight_scale` and scalar static `input_scale` = calibrated amax / 448 (`FP8QDQLinearMethod`, which
  takes the max over fused q/k/v and gate/up parts and re-rounds the weights to that max).
  As nvidia-modelopt 0.47's `export_hf_checkpoint` writes it for Qwen2-VL (checked by hand on CPU):
  the same file plus the flat `quant_method: modelopt` copy inline in config.json, and the
  exclude list `lm_head`, `model.embed_tokens`, `visual*`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import TTE_CONFIG_NAME
from ..model.fp8 import FP8_MAX, quantize_rows, quantize_tensor
from ..model.loader import _part_bounds, head_target_of, target_of
from ..model.names import checkpoint_shapes, head_shapes
from ..model.qwen2_vl import Qwen2VL
from .native import copy_aux_files, exported_tte_config, readable

logger = logging.getLogger("tte_engine")

SHARD_BYTES = 2 << 30
FORMATS = ("compressed-tensors", "modelopt")
MODELOPT_ALGOS = {"per-channel": "FP8_PER_CHANNEL_PER_TOKEN", "per-tensor": "FP8"}
_FP8_PARAMS = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight")
IGNORED = ["lm_head", "re:.*visual.*"]  # compressed-tensors: modules left in float (regex form matches either naming)
EXCLUDED = ["lm_head", "model.embed_tokens", "visual*"]  # ModelOpt/TensorRT-LLM: fnmatch patterns of unquantized modules (ModelOpt's own)


def _slice(model: Qwen2VL, state: dict[str, torch.Tensor], target: tuple[str, int | None], shape: tuple[int, ...]) -> torch.Tensor:
    param, part = target
    t = state[param]
    if part is not None:
        lo, hi = _part_bounds(model, param, part)
        t = t[lo:hi]
    return t.reshape(shape)


def hub_tensors(model: Qwen2VL) -> Iterator[tuple[str, torch.Tensor, str | None]]:
    """(hub name, tensor [hub shape], our fused parameter if the tensor is a decoder linear weight else None).

    Covers the backbone and vision tower (the model's Hugging Face checkpoint), not the mhsa head.
    The patch embedding comes back as the Conv3d weight [embed, C, T, P, P].
    """
    state = model.state_dict()
    for name, shape in checkpoint_shapes(model.cfg).items():
        target = target_of(name)
        if target is None:
            raise KeyError(f"no parameter for hub tensor {name}")
        linear = target[0] if target[0].startswith("layers.") and target[0].endswith(_FP8_PARAMS) else None
        yield name, _slice(model, state, target, shape), linear


def head_tensors(model: Qwen2VL) -> dict[str, torch.Tensor]:
    """The mhsa head's weight file (`layers.{i}.*`, `norm.weight`), float, in the checkpoint's naming."""
    state = model.state_dict()
    return {n: _slice(model, state, head_target_of(n), shape) for n, shape in head_shapes(model.cfg, len(model.head.layers)).items()}


def compressed_tensors_config() -> dict[str, Any]:
    """config.json `quantization_config` for FP8 per-channel weights + dynamic per-token activations.

    Built with the `compressed-tensors` package (preset FP8_DYNAMIC, format float-quantized);
    raises ImportError with the install hint when it is missing.
    """
    try:
        from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    except ImportError as exc:
        raise ImportError("the compressed-tensors layout needs the compressed-tensors package: pip install compressed-tensors (the [export] extra)") from exc
    cfg = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])},
        format="float-quantized",
        quantization_status="compressed",
        ignore=list(IGNORED),
    )
    return cfg.model_dump(mode="json")


def _compress_ct(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """E4M3 weight [out, in] + scale [out, 1] through compressed-tensors' own compressor (scales: ours)."""
    from compressed_tensors.compressors import FloatQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    _, scale = quantize_rows(weight)
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    out = FloatQuantizationCompressor.compress({"weight": weight.float(), "weight_scale": scale[:, None]}, scheme)
    return {"weight": out["weight"].contiguous(), "weight_scale": scale[:, None].contiguous()}


def modelopt_config(algo: str) -> dict[str, Any]:
    """hf_quant_config.json in ModelOpt's legacy shape (what TensorRT-LLM's modelopt_config.py parses)."""
    return {
        "producer": {"name": "modelopt", "version": "tte-export"},
        "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": list(EXCLUDED)},
    }


def modelopt_inline_config(algo: str) -> dict[str, Any]:
    """config.json `quantization_config` in ModelOpt's flat shape (as modelopt 0.47 writes next to hf_quant_config.json)."""
    static = algo == "FP8"
    acts = {"dynamic": not static, "num_bits": 8, "type": "float", **({} if static else {"strategy": "token"})}
    weights = {"dynamic": False, "num_bits": 8, "type": "float", **({} if static else {"strategy": "channel"})}
    return {"config_groups": {"group_0": {"input_activations": acts, "weights": weights, "targets": ["Linear"]}},
            "ignore": list(EXCLUDED), "quant_algo": algo, "producer": {"name": "modelopt", "version": "tte-export"},
            "quant_method": "modelopt"}


def _save_shards(tensors: dict[str, torch.Tensor], out: Path) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past 2 GiB."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name], size = t, size + nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: f for f, shard in zip(names, shards) for n in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f, shard in zip(names, shards):
        save_file(shard, str(out / f), metadata={"format": "pt"})
        readable(out / f)
    return names


def write_hf_checkpoint(
    engine,
    out: Path,
    *,
    dtype: torch.dtype,
    fp8: str | None = None,
    modelopt_algo: str = "FP8_PER_CHANNEL_PER_TOKEN",
    input_amax: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Write the embedder of `engine` as a Hugging Face Qwen2-VL checkpoint directory into `out`.

    fp8: None (float weights in `dtype`), "compressed-tensors" or "modelopt" (see the module doc);
    modelopt_algo: "FP8_PER_CHANNEL_PER_TOKEN" or "FP8" (needs `input_amax`: max |input| per
    fused module, `layers.{i}.{qkv_proj|o_proj|gate_up_proj|down_proj}`, from calibration).
    Copies tokenizer / processor files and writes tte_config.json (+ the float mhsa head file).
    Returns a summary dict (format, quantized tensor count, files). Raises ValueError on bad options.
    """
    if fp8 not in (None, *FORMATS):
        raise ValueError(f"fp8 must be None or one of {FORMATS}, got {fp8!r}")
    if fp8 == "modelopt" and modelopt_algo not in MODELOPT_ALGOS.values():
        raise ValueError(f"modelopt_algo must be one of {sorted(MODELOPT_ALGOS.values())}, got {modelopt_algo!r}")
    if fp8 == "modelopt" and modelopt_algo == "FP8" and not input_amax:
        raise ValueError("ModelOpt per-tensor FP8 needs calibrated activation ranges (--calibration > 0)")
    model: Qwen2VL = engine.stages[-1].runner.model
    out.mkdir(parents=True, exist_ok=True)
    copy_aux_files(engine.checkpoint, out)
    hf_config = json.loads((engine.checkpoint / "config.json").read_text())
    hf_config.pop("quantization_config", None)
    hf_config["torch_dtype"] = str(dtype).replace("torch.", "")

    tensors: dict[str, torch.Tensor] = {}
    quantized = 0
    for name, t, fused in hub_tensors(model):
        stem = name[: -len(".weight")]
        if fp8 is None or fused is None or not name.endswith(".weight"):
            tensors[name] = t.detach().to("cpu", dtype).contiguous()
            continue
        quantized += 1
        if fp8 == "compressed-tensors":
            packed = _compress_ct(t.detach().cpu())
            tensors[name], tensors[stem + ".weight_scale"] = packed["weight"], packed["weight_scale"]
        elif modelopt_algo == "FP8_PER_CHANNEL_PER_TOKEN":
            q, scale = quantize_rows(t.detach().cpu())
            tensors[name], tensors[stem + ".weight_scale"] = q, scale
        else:
            q, scale = quantize_tensor(t.detach().cpu())
            amax = input_amax[fused[: -len(".weight")]]
            tensors[name], tensors[stem + ".weight_scale"] = q, scale.reshape(())
            tensors[stem + ".input_scale"] = torch.tensor(max(amax, 1e-12) / FP8_MAX, dtype=torch.float32)
    if fp8 == "compressed-tensors":
        hf_config["quantization_config"] = compressed_tensors_config()
    if fp8 == "modelopt":
        (out / "hf_quant_config.json").write_text(json.dumps(modelopt_config(modelopt_algo), indent=2))
        hf_config["quantization_config"] = modelopt_inline_config(modelopt_algo)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    files = _save_shards(tensors, out)
    (out / TTE_CONFIG_NAME).write_text(json.dumps(exported_tte_config(engine), indent=2))
    if model.head is not None:
        save_file({n: t.detach().to("cpu", dtype).contiguous() for n, t in head_tensors(model).items()},
                  str(out / engine.tte.head.weights), metadata={"format": "pt"})
        readable(out / engine.tte.head.weights)
    return {"format": fp8 or "float", "quant_algo": modelopt_algo if fp8 == "modelopt" else ("FP8_DYNAMIC" if fp8 else None),
            "quantized_linears": quantized, "weights": files}
