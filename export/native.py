"""Write a native engine directory (the format `tte_engine.engine_dir` reads; see its docstring).

The weights are the state_dict of the loaded `Qwen2VL`, so they are already in the runtime's
fused layout; with FP8 each selected linear's weight becomes E4M3 plus a per-output-channel
`weight_scale`. Weights are written in shards of at most 2 GiB so a 7B export never holds a
second full copy in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import __version__
from ..config import TTE_CONFIG_NAME
from ..engine_dir import ENGINE_FILE, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, QUANT_FP8
from ..model.fp8 import quantize_rows
from ..model.qwen2_vl import Qwen2VL

SHARD_BYTES = 2 << 30
# Files never copied from the source checkpoint: weights in other layouts and what we rewrite.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".index.json")
_SKIP_NAMES = (TTE_CONFIG_NAME, ENGINE_FILE)


def engine_tensors(model: Qwen2VL, dtype: torch.dtype, fp8_modules: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in the engine layout: floats in `dtype`, the listed linears as E4M3 + fp32 scales."""
    quantized = set(fp8_modules)
    tied = model.cfg.text.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # stored once, as the embedding
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            q, scale = quantize_rows(tensor)
            yield name, q.cpu()
            yield module + ".weight_scale", scale.cpu()
        else:
            yield name, tensor.detach().to("cpu", dtype).contiguous()


def readable(path: Path) -> None:
    """safetensors creates files owner-only; give them the usual umask-governed mode like every other file we write."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_weights(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, progress=None) -> list[str]:
    """Save tensors in <= 2 GiB shards; a single shard is `weights.safetensors`."""
    files, shard, size = [], {}, 0

    def flush():
        nonlocal shard, size
        name = f"weights-{len(files) + 1:05d}.safetensors"
        # one metadata key only: safetensors writes the metadata map in a per-process random order, so
        # a second key would make the same export's bytes (and its fingerprint) differ from run to run
        save_file(shard, str(out / name), metadata={"format": "pt"})
        readable(out / name)
        files.append(name)
        shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
        shard[name], size = tensor, size + nbytes
        if progress:
            progress(nbytes)
    if shard:
        flush()
    if len(files) == 1:
        (out / files[0]).rename(out / "weights.safetensors")
        files = ["weights.safetensors"]
    return files


def copy_aux_files(source: Path, out: Path) -> list[str]:
    """Tokenizer, chat template, image-processor and generation configs (+ config.json) from the checkpoint."""
    copied = []
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in _SKIP_NAMES and not f.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(f, out / f.name)  # follows the symlinks of a Hugging Face cache snapshot
            copied.append(f.name)
    return copied


def exported_tte_config(engine) -> dict[str, Any]:
    """The engine's tte_config as an export writes it: a two_model reasoner stays a checkpoint, named
    by its absolute path (a path relative to the source checkpoint resolves nowhere from the output)."""
    tte = engine.tte.to_dict()
    if engine.tte.mode == "two_model":
        tte["reasoner"] = str(engine.stages[0].checkpoint)  # (`resolve_checkpoint` gives absolute paths)
    return tte


def write_engine_dir(
    engine,
    out: Path,
    *,
    dtype: torch.dtype,
    fp8_modules: list[str],
    source: dict[str, Any],
    progress=None,
) -> dict[str, Any]:
    """Write the engine directory for the embedder of `engine` into `out`; returns the engine.json dict."""
    model: Qwen2VL = engine.stages[-1].runner.model
    out.mkdir(parents=True, exist_ok=True)
    copy_aux_files(engine.checkpoint, out)
    tte = exported_tte_config(engine)
    (out / TTE_CONFIG_NAME).write_text(json.dumps(tte, indent=2))
    files = write_weights(engine_tensors(model, dtype, fp8_modules), out, progress)
    dtype_name = str(dtype).replace("torch.", "")
    model_dict = engine.model_cfg.to_dict()
    model_dict["torch_dtype"] = dtype_name
    p = engine.prompts
    spec = {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        # nothing run-specific here (the export time is in export_report.json): the same export writes the same engine.json
        "producer": {
            "name": "tte-export",
            "tte_engine_version": __version__,
            "torch_version": torch.__version__,
        },
        "architecture": "Qwen2VLForConditionalGeneration",
        "model": model_dict,
        "tte": tte,
        "head": dict(tte["head"], stored_as="head.* tensors in the weights" if engine.tte.head.type == "mhsa" else None),
        "dtype": dtype_name,
        "quantization": None
        if not fp8_modules
        else {
            "method": QUANT_FP8,
            "weights": "float8_e4m3fn, one float32 scale per output channel (weight ~= q * scale[:, None])",
            "activations": "dynamic, per token (E4M3, scale = amax / 448) at run time",
            "modules": list(fp8_modules),
            "vision": any(m.startswith("visual.") for m in fp8_modules),
            "kept_in_dtype": ["embed_tokens", "lm_head", "visual.patch_embed"]
            + ([] if any(m.startswith("visual.") for m in fp8_modules) else ["visual"]),
        },
        "tokens": {
            "think_start_ids": p.think_start_ids,
            "think_end_ids": p.think_end_ids,
            "suffix_ids": p.suffix_ids,
            "eos_ids": p.eos_ids,
            "suppressed_ids": p.suppressed_ids,
            "stop_sequences": p.stop_sequences,
        },
        "source": source,
        "weights": files,
        "accuracy": None,
    }
    (out / ENGINE_FILE).write_text(json.dumps(spec, indent=2))
    return spec
