"""Legacy TensorRT-LLM 1.x checkpoint (`--target trtllm-legacy`): the language model, the build script, and a reader back into our engine.

For TensorRT-LLM releases that still have the TensorRT-engine backend (`trtllm-build`); it was
removed later (PRs #11723, #15763, #15767, #15907, #15918), and current releases run Hugging Face
checkpoints through the PyTorch backend (`--target trtllm`: hf_checkpoint.py + trtllm_runtime.py).
What this target does not do, because it cannot be made right on 1.x: per-channel FP8
(`FP8_PER_CHANNEL_PER_TOKEN`) is refused — 1.x's `Fp8RowwiseAttention.forward` takes no
`mrope_params`, so a Qwen2-VL engine with it does not build; the vision tower is not exported
(build it with TensorRT-LLM's own multimodal builder, whose graph takes `input`,
`rotary_pos_emb`, `attention_mask` -> `encoder_output`); pooling is not possible inside a 1.x
engine (it returns logits only, TensorRT-LLM issue #4414), so this target serves trace generation.

What was followed (read for the format; the code here is our own):
- TensorRT-LLM docs, "TensorRT LLM Checkpoint" (docs/source/architecture/checkpoint.md): a
  directory of `config.json` + `rank{N}.safetensors`; config fields `architecture`, `dtype`,
  `logits_dtype`, `vocab_size`, `max_position_embeddings`, `hidden_size`, `num_hidden_layers`,
  `num_attention_heads`, `num_key_value_heads`, `hidden_act`, `intermediate_size`,
  `norm_epsilon`, `position_embedding_type`, `mapping.{world_size,tp_size,pp_size}`,
  `quantization.{quant_algo,kv_cache_quant_algo,exclude_modules}`; tensor names
  `transformer.layers.{i}.attention.qkv|dense`, `mlp.fc|proj`, `input_layernorm`,
  `post_layernorm`; FP8 `weights_scaling_factor` / `activation_scaling_factor`;
  `attention.kv_cache_scaling_factor` for a quantized KV cache; weights are (out, in).
- tensorrt_llm/models/qwen/config.py (`QWenConfig.from_hugging_face`): for `qwen2_vl`,
  `position_embedding_type` "mrope", `rotary_scaling` {"type": "mrope", "mrope_section": [...]},
  `rotary_base`, `rotary_embedding_dim` = head size, `attn_bias` true, `mlp_bias` false,
  `qwen_type`, `tie_word_embeddings`.
- tensorrt_llm/models/qwen/convert.py (`convert_hf_qwen`) with utils.py (`get_qwen_key_list`):
  q/k/v weights and biases concatenated into `attention.qkv`; `o_proj` -> `attention.dense`;
  `up_proj` -> `mlp.gate` and `gate_proj` -> `mlp.fc` (note the swap: TensorRT-LLM's gated MLP
  computes proj(act(fc(x)) * gate(x))); `down_proj` -> `mlp.proj`; `embed_tokens` ->
  `transformer.vocab_embedding`; final norm -> `transformer.ln_f`; `lm_head.weight` always
  written (a copy of the embedding when tied).
- tensorrt_llm/quantization/layers.py: `FP8Linear` (quant_algo "FP8": per-tensor
  `weights_scaling_factor` [1] and static `activation_scaling_factor` [1]) and
  `Fp8RowwiseLinear` (quant_algo "FP8_PER_CHANNEL_PER_TOKEN": `per_channel_scale` [out], dynamic
  per-token activations — our native FP8 scheme, so that variant is bit-identical to it).

The vision tower and the embedding head are not part of a TensorRT-LLM LLM checkpoint; they are
exported next to it as ONNX (TensorRT-LLM's multimodal flow builds the vision engine separately).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..engine_dir import ENGINE_FILE, QUANT_FP8, EngineDir
from ..errors import CheckpointError
from ..model.fp8 import FP8_DTYPE, FP8_MAX, quantize_rows, quantize_tensor
from ..model.loader import iter_tensors
from ..model.qwen2_vl import Qwen2VL
from .native import readable

logger = logging.getLogger("tte_engine")

FP8_MODES = {"per-tensor": "FP8", "per-channel": "FP8_PER_CHANNEL_PER_TOKEN"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ActivationStats:
    """Max |input| of every backbone linear and a bound on max |k|, |v| per layer, over a calibration run.

    The per-tensor FP8 variant needs static activation scales, and an FP8 KV cache needs a
    scale per layer; both come from running the calibration items with these hooks attached.
    """

    def __init__(self, model: Qwen2VL):
        self.inputs: dict[str, float] = {}
        self.kv: dict[int, float] = {}
        self._hooks = []
        t = model.cfg.text
        for i, layer in enumerate(model.layers):
            for attr in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                self._hooks.append(getattr(layer, attr).register_forward_pre_hook(self._record_input(f"layers.{i}.{attr}")))
            self._hooks.append(layer.qkv_proj.register_forward_hook(self._record_kv(i, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.head_dim)))

    def _record_input(self, name):
        def hook(_module, args):
            self.inputs[name] = max(self.inputs.get(name, 0.0), float(args[0].detach().abs().max()))

        return hook

    def _record_kv(self, layer: int, q_size: int, kv_size: int, head_dim: int):
        def hook(_module, _args, out):
            k = out[..., q_size : q_size + kv_size].float().reshape(-1, head_dim)
            v = out[..., q_size + kv_size :].float()
            # rotary mixes the pair (i, i + d/2): its norm bounds |k| after rotation at any position
            half = head_dim // 2
            k_bound = (k[:, :half].square() + k[:, half:].square()).sqrt().max()
            self.kv[layer] = max(self.kv.get(layer, 0.0), float(k_bound), float(v.abs().max()))

        return hook

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def trtllm_config(cfg: ModelConfig, *, dtype: torch.dtype, fp8: str | None, kv_fp8: bool) -> dict[str, Any]:
    t = cfg.text
    return {
        "architecture": "Qwen2VLForConditionalGeneration",
        "dtype": _DTYPE_NAMES[dtype],
        "logits_dtype": "float32",
        "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_size": t.head_dim,
        "intermediate_size": t.intermediate_size,
        "hidden_act": "silu",
        "norm_epsilon": t.rms_norm_eps,
        "position_embedding_type": "mrope",
        "rotary_base": t.rope_theta,
        "rotary_embedding_dim": t.head_dim,
        "rotary_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "attn_bias": True,
        "mlp_bias": False,
        "qwen_type": "qwen2_vl",
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {
            "quant_algo": FP8_MODES[fp8] if fp8 else None,
            "kv_cache_quant_algo": "FP8" if kv_fp8 else None,
            # TensorRT-LLM's default list starts with these; an explicit list replaces the default, so name them all
            "exclude_modules": ["lm_head", "*ln_f", "*vocab_embedding", "*position_embedding"] if fp8 else None,
        },
    }


def _layer_linears(layer, t) -> dict[str, tuple[str, torch.Tensor, torch.Tensor | None]]:
    """TensorRT-LLM linear name -> (our module attr, weight [out, in], bias)."""
    gate, up = layer.gate_up_proj.weight.detach().chunk(2, dim=0)
    return {
        "attention.qkv": ("qkv_proj", layer.qkv_proj.weight.detach(), layer.qkv_proj.bias.detach()),
        "attention.dense": ("o_proj", layer.o_proj.weight.detach(), None),
        "mlp.fc": ("gate_up_proj", gate, None),  # gate_proj -> mlp.fc
        "mlp.gate": ("gate_up_proj", up, None),  # up_proj -> mlp.gate
        "mlp.proj": ("down_proj", layer.down_proj.weight.detach(), None),
    }


def write_checkpoint(
    model: Qwen2VL,
    out: Path,
    *,
    dtype: torch.dtype,
    fp8: str | None = None,
    stats: ActivationStats | None = None,
    kv_fp8: bool = False,
) -> dict[str, Any]:
    """Write config.json + rank0.safetensors for the backbone of `model` (float weights) into `out`."""
    if fp8 not in (None, *FP8_MODES):
        raise ValueError(f"fp8 must be one of {list(FP8_MODES)} or None, got {fp8!r}")
    if fp8 == "per-channel":
        raise ValueError("per-channel FP8 does not build for Qwen2-VL on TensorRT-LLM 1.x (Fp8RowwiseAttention takes no mrope_params)")
    if (fp8 == "per-tensor" or kv_fp8) and (stats is None or not stats.inputs):
        raise ValueError("per-tensor FP8 and an FP8 KV cache need calibration statistics (--calibration > 0)")
    cfg = model.cfg
    t = cfg.text
    out.mkdir(parents=True, exist_ok=True)
    config = trtllm_config(cfg, dtype=dtype, fp8=fp8, kv_fp8=kv_fp8)
    w: dict[str, torch.Tensor] = {}

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu", dtype).contiguous()

    embed = cast(model.embed_tokens.weight)
    w["transformer.vocab_embedding.weight"] = embed
    w["lm_head.weight"] = embed.clone() if t.tie_word_embeddings else cast(model.lm_head.weight)
    w["transformer.ln_f.weight"] = cast(model.norm)
    for i, layer in enumerate(model.layers):
        p = f"transformer.layers.{i}."
        w[p + "input_layernorm.weight"] = cast(layer.input_norm)
        w[p + "post_layernorm.weight"] = cast(layer.post_attention_norm)
        for name, (attr, weight, bias) in _layer_linears(layer, t).items():
            if fp8 == "per-channel":
                q, scale = quantize_rows(weight)
                w[p + name + ".weight"], w[p + name + ".per_channel_scale"] = q.cpu(), scale.cpu()
            elif fp8 == "per-tensor":
                q, scale = quantize_tensor(weight)
                w[p + name + ".weight"], w[p + name + ".weights_scaling_factor"] = q.cpu(), scale.cpu()
                amax = stats.inputs[f"layers.{i}.{attr}"]
                w[p + name + ".activation_scaling_factor"] = torch.tensor([max(amax, 1e-12) / FP8_MAX], dtype=torch.float32)
            else:
                w[p + name + ".weight"] = cast(weight)
            if bias is not None:
                w[p + name + ".bias"] = cast(bias)
        if kv_fp8:
            w[p + "attention.kv_cache_scaling_factor"] = torch.tensor([max(stats.kv[i], 1e-12) / FP8_MAX], dtype=torch.float32)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(w, str(out / "rank0.safetensors"), metadata={"format": "pt", "producer": "tte-export"})
    readable(out / "rank0.safetensors")
    return config


# ---------------------------------------------------------------------------------------- reader
def read_checkpoint(trt_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors renamed to our fused layout) from a TensorRT-LLM checkpoint of a Qwen2-VL LM.

    FP8 linears come back as an E4M3 `weight` plus a per-output-channel `weight_scale` (per-tensor
    scales are broadcast; mlp.fc/mlp.gate scales are concatenated like their weights). Static
    activation and KV-cache scales have no place in our runtime (it quantizes activations per
    token) and are returned under their TensorRT-LLM names for inspection.
    """
    trt_dir = Path(trt_dir)
    try:
        config = json.loads((trt_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {trt_dir / 'config.json'}: {exc}") from exc
    if config.get("mapping", {}).get("world_size", 1) != 1:
        raise CheckpointError(f"{trt_dir}: only single-rank checkpoints are read (world_size 1)")
    src = dict(iter_tensors([trt_dir / "rank0.safetensors"]))

    def linear(prefix: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = src.pop(prefix + ".weight")
        if weight.dtype != FP8_DTYPE:
            return weight, None
        if prefix + ".per_channel_scale" in src:
            return weight, src.pop(prefix + ".per_channel_scale").float().reshape(-1)
        scale = src.pop(prefix + ".weights_scaling_factor").float().reshape(-1)
        return weight, scale.expand(weight.shape[0]).clone()

    ours: dict[str, torch.Tensor] = {
        "embed_tokens.weight": src.pop("transformer.vocab_embedding.weight"),
        "norm": src.pop("transformer.ln_f.weight"),
    }
    lm_head = src.pop("lm_head.weight")
    if not config.get("tie_word_embeddings"):
        ours["lm_head.weight"] = lm_head
    for i in range(config["num_hidden_layers"]):
        p, q = f"transformer.layers.{i}.", f"layers.{i}."
        ours[q + "input_norm"] = src.pop(p + "input_layernorm.weight")
        ours[q + "post_attention_norm"] = src.pop(p + "post_layernorm.weight")
        for trt_name, attr in (("attention.qkv", "qkv_proj"), ("attention.dense", "o_proj"), ("mlp.proj", "down_proj")):
            weight, scale = linear(p + trt_name)
            ours[q + attr + ".weight"] = weight
            if scale is not None:
                ours[q + attr + ".weight_scale"] = scale
        ours[q + "qkv_proj.bias"] = src.pop(p + "attention.qkv.bias")
        fc, fc_scale = linear(p + "mlp.fc")  # gate_proj
        gate, gate_scale = linear(p + "mlp.gate")  # up_proj
        ours[q + "gate_up_proj.weight"] = torch.cat([fc, gate])
        if fc_scale is not None:
            ours[q + "gate_up_proj.weight_scale"] = torch.cat([fc_scale, gate_scale])
    leftover = [n for n in src if not n.endswith(("activation_scaling_factor", "kv_cache_scaling_factor"))]
    if leftover:
        raise CheckpointError(f"{trt_dir}: unexpected tensors {leftover[:6]}")
    return config, {**ours, **{f"trtllm:{n}": v for n, v in src.items()}}


def to_engine_dir(trt_dir: Path, base: Path, out: Path) -> Path:
    """A native engine directory whose language model comes from the TensorRT-LLM checkpoint at `trt_dir`.

    The vision tower, the embedding head, configs and tokenizer come from the engine directory
    `base` (a TensorRT-LLM checkpoint holds only the LM). Used to verify the converter: the result
    must embed and think like `base` did.
    """
    spec = EngineDir.open(base)
    config, lm = read_checkpoint(trt_dir)
    t = spec.model_cfg.text
    for key, want in (("hidden_size", t.hidden_size), ("num_hidden_layers", t.num_layers), ("vocab_size", t.vocab_size),
                      ("num_key_value_heads", t.num_kv_heads), ("intermediate_size", t.intermediate_size)):
        if config.get(key) != want:
            raise CheckpointError(f"{trt_dir}: {key}={config.get(key)} does not match {base} ({want})")
    not_lm = lambda name: not name.startswith(("layers.", "embed_tokens.", "lm_head.")) and name != "norm"  # noqa: E731
    state: dict[str, torch.Tensor] = dict(iter_tensors([base / f for f in spec.weight_files], not_lm))
    stored = getattr(torch, spec.dtype)
    for name, tensor in lm.items():
        if name.startswith("trtllm:"):
            continue
        keep = tensor.dtype == FP8_DTYPE or name.endswith(".weight_scale")  # E4M3 weights and fp32 scales as they are
        state[name] = tensor if keep else tensor.to(stored)
    quantized = sorted(n[: -len(".weight_scale")] for n in state if n.endswith(".weight_scale"))
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.name not in (ENGINE_FILE, "export_report.json") and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    save_file({n: v.contiguous() for n, v in state.items()}, str(out / "weights.safetensors"), metadata={"format": "pt"})
    readable(out / "weights.safetensors")
    raw = dict(spec.raw)
    raw.update(
        weights=["weights.safetensors"],
        quantization=dict(spec.raw.get("quantization") or {"method": QUANT_FP8}, modules=quantized) if quantized else None,
        source=dict(spec.raw.get("source") or {}, trtllm_checkpoint=str(trt_dir)),
        accuracy=None,
    )
    (out / ENGINE_FILE).write_text(json.dumps(raw, indent=2))
    return out


# ---------------------------------------------------------------------------------------- build
def build_command(*, max_batch_size: int, max_input_len: int, max_seq_len: int, max_multimodal_len: int, kv_fp8: bool) -> list[str]:
    """The `trtllm-build` invocation (paged KV + paged context FMHA, so an embed request can reuse the trace's KV blocks).

    max_input_len must cover the embed request: prompt + trace + think-end + suffix.
    """
    cmd = [
        "trtllm-build",
        "--checkpoint_dir", ".",
        "--output_dir", "engine",
        "--gemm_plugin", "auto",
        "--gpt_attention_plugin", "auto",
        "--remove_input_padding", "enable",
        "--kv_cache_type", "paged",
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable",
        "--max_batch_size", str(max_batch_size),
        "--max_input_len", str(max_input_len),
        "--max_seq_len", str(max_seq_len),
        "--max_num_tokens", str(max(8192, max_input_len)),
        "--max_multimodal_len", str(max_multimodal_len),
    ]
    if kv_fp8:
        cmd += ["--use_fp8_context_fmha", "enable"]
    return cmd


def write_build_files(out: Path, cmd: list[str], *, model_cfg: ModelConfig, tte, fp8: str | None, kv_fp8: bool, head: str) -> None:
    script = "#!/usr/bin/env bash\n# Build the TensorRT-LLM engine of the language model (written by tte-export).\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
    pairs = [" ".join(cmd[i : i + 2]) for i in range(1, len(cmd), 2)]  # one "--flag value" per line
    script += " \\\n    ".join([cmd[0], *pairs]) + "\n"
    (out / "build.sh").write_text(script)
    (out / "build.sh").chmod(0o755)
    (out / "README.md").write_text(
        TRTLLM_README.format(
            quant=FP8_MODES[fp8] if fp8 else "none (bf16/fp16 weights)",
            kv="FP8" if kv_fp8 else "model dtype",
            head=head,
            hidden=model_cfg.text.hidden_size,
            think_end=tte.think.end,
            suffix=tte.embed_suffix,
            cmd=" ".join(cmd),
        )
    )


TRTLLM_README = """# TensorRT-LLM 1.x export (written by tte-export)

For TensorRT-LLM releases with the TensorRT-engine backend (`trtllm-build`, 0.x and 1.x); current
releases removed it: use the `trtllm/` target (PyTorch backend) there.

| file | what |
|---|---|
| `config.json`, `rank0.safetensors` | TensorRT-LLM checkpoint of the language model (Qwen2-VL backbone, M-RoPE), quantization: {quant}; KV cache: {kv} |
| `build.sh` | the exact `trtllm-build` command for the language model (NOT run by tte-export) |
| `tokenizer/` | tokenizer, chat template, image-processor config, HF `config.json` and `tte_config.json` (`--tokenizer_dir`) |

Build: `bash build.sh` runs

    {cmd}

`--max_input_len` covers prompt + trace + think-end + suffix, so an embed request over the whole
sequence fits; enable KV block reuse in the runtime so it reuses the trace's blocks.

What you must supply at run time (TensorRT-LLM's Qwen2-VL runtime, not this export):
- the vision engine: build it with TensorRT-LLM's multimodal builder from the Hugging Face
  checkpoint (its graph takes `input`, `rotary_pos_emb`, `attention_mask` -> `encoder_output`);
  tte-export does not write one for 1.x (our ONNX vision graph has another signature);
- the M-RoPE inputs of each request (`mrope_rotary_cos_sin`, `mrope_position_deltas`, computed from
  the image grids), and the prompt-table rows for the image tokens;
- for KV block reuse with images: per-token extra ids (`input_token_extra_ids`, e.g. an image
  hash) on the image tokens, or two images with the same token count share cached blocks.

Runtime flow of one TTE query: prompt (chat template + instruction + `<think>`) -> vision engine ->
greedy trace until `{think_end}` or EOS (vision tokens suppressed) -> a second context request over
prompt + trace + `{suffix}`. Head type: {head}. The embedding is the final-norm hidden state of the
last token (width {hidden}), which a 1.x engine does not return (logits only, TensorRT-LLM issue
#4414): this target serves trace generation; pool with tte_engine or use the `trtllm/` target.
"""
