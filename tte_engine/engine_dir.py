"""The native engine directory (what `tte-export` writes): reading and validating it, and loading its model.

An engine directory holds everything the runtime needs already in the runtime's own layout, so
loading it derives nothing: `engine.json` (versioned: architecture as our `ModelConfig`, the TTE
config, dtypes, quantization, prompt/stop token ids, the source checkpoint's fingerprint), the
weights as safetensors whose names and shapes are exactly our `Qwen2VL` state_dict (fused
`qkv_proj` / `gate_up_proj`, the patch embedding as a linear, the mhsa head under `head.`; with
FP8, E4M3 weights plus a `weight_scale` per output channel), and the tokenizer / image-processor
files. The model is built on the meta device and the memory-mapped tensors are assigned to it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import FLOAT_DTYPES, HeadConfig, ModelConfig, TTEConfig, is_int
from .errors import CheckpointError, one_line
from .model.fp8 import FP8_DTYPE, swap_in_fp8
from .model.loader import check_complete, check_stack, iter_tensors, tensor_headers
from .model.qwen2_vl import Qwen2VL

logger = logging.getLogger("tte_engine")

ENGINE_FILE = "engine.json"
ENGINE_FORMAT = "tte-engine"
ENGINE_FORMAT_VERSION = 1
QUANT_FP8 = "fp8_e4m3_per_channel"


def is_engine_dir(path: str | Path) -> bool:
    return (Path(path) / ENGINE_FILE).is_file()


TOKEN_LISTS = ("think_start_ids", "think_end_ids", "suffix_ids", "eos_ids", "suppressed_ids")  # engine.json's tokens checked at load


@dataclass(frozen=True)
class EngineDir:
    """A validated engine directory; `load_model` turns it into a ready `Qwen2VL`."""

    path: Path
    model_cfg: ModelConfig
    tte: TTEConfig
    dtype: str  # the stored dtype of every non-quantized tensor
    weight_files: list[str]
    quantized: list[str] = field(default_factory=list)  # module names stored as Fp8Linear
    tokens: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "EngineDir":
        path = Path(path)
        file = path / ENGINE_FILE
        try:
            raw = json.loads(file.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, or not UTF-8 text; RecursionError: nested too deep
            raise CheckpointError(f"cannot read {file}: {one_line(exc)}") from exc
        if not isinstance(raw, dict) or raw.get("format") != ENGINE_FORMAT:
            raise CheckpointError(f"{file} is not a tte_engine engine description (format must be {ENGINE_FORMAT!r})")
        version = raw.get("format_version")
        if not is_int(version) or version < 1:
            raise CheckpointError(f"{file}: format_version is missing" if version is None else f"{file}: format_version must be a positive integer, got {version!r}")
        if version > ENGINE_FORMAT_VERSION:
            raise CheckpointError(
                f"{path} was written by a newer tte-export (engine format {version}); this tte_engine reads up to "
                f"format {ENGINE_FORMAT_VERSION}: upgrade tte_engine or re-export the checkpoint with this version"
            )
        try:
            model_cfg = ModelConfig.from_dict(raw["model"])
            tte = TTEConfig.from_dict(raw["tte"], source=str(file))
            quant = raw.get("quantization")
            quantized = []
            if quant:
                if not isinstance(quant, dict) or quant.get("method") != QUANT_FP8:
                    raise CheckpointError(f"{file}: unsupported quantization method {quant.get('method') if isinstance(quant, dict) else quant!r}")
                quantized = quant["modules"]
                if not isinstance(quantized, list) or not all(isinstance(m, str) and m for m in quantized):
                    raise CheckpointError(f"{file}: quantization.modules must be a list of module names")
            if not isinstance(raw["weights"], list) or not all(isinstance(f, str) and f for f in raw["weights"]):
                raise CheckpointError(f"{file}: weights must be a list of file names, got {raw['weights']!r:.80}")
            if raw["dtype"] not in FLOAT_DTYPES:
                raise CheckpointError(f"{file}: dtype must be one of {', '.join(FLOAT_DTYPES)}, got {raw['dtype']!r:.80}")
            tokens = raw.get("tokens") or {}
            if not isinstance(tokens, dict):  # its lists are compared with the tokenizer's in check_tokens
                raise CheckpointError(f"{file}: tokens must be an object of token id lists, got {tokens!r:.80}")
            for key in TOKEN_LISTS:
                ids = tokens.get(key, [])
                if not (isinstance(ids, list) and all(is_int(i) for i in ids)):
                    raise CheckpointError(f"{file}: tokens.{key} must be a list of token ids, got {ids!r:.80}")
            spec = cls(
                path=path,
                model_cfg=model_cfg,
                tte=tte,
                dtype=raw["dtype"],
                weight_files=list(raw["weights"]),
                quantized=quantized,
                tokens=dict(raw.get("tokens") or {}),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{file}: malformed engine description ({one_line(exc)!r})") from exc
        model_cfg.check(str(file))
        missing = [f for f in spec.weight_files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: weight file(s) {missing} listed in {ENGINE_FILE} are missing")
        return spec

    @property
    def fp8(self) -> bool:
        return bool(self.quantized)

    def check_tokens(self, prompts) -> None:
        """The tokenizer in the directory must give the prompt/stop token ids recorded at export."""
        for key in TOKEN_LISTS:
            if key in self.tokens and list(getattr(prompts, key)) != list(self.tokens[key]):
                raise CheckpointError(
                    f"{self.path}: the tokenizer gives {key}={getattr(prompts, key)} but {ENGINE_FILE} recorded {self.tokens[key]}"
                )

    def check_depths(self, head_cfg: HeadConfig) -> None:
        """Raise CheckpointError when engine.json's layer counts are not what the weight files hold, from
        their headers alone: building a model of 100000 claimed layers, even on the meta device, takes a minute."""
        names, spec, files = tensor_headers([self.path / f for f in self.weight_files]), self.path / ENGINE_FILE, " + ".join(self.weight_files)
        check_stack(names, "layers.", self.model_cfg.text.num_layers, f"{spec}: model.text.num_layers", files)
        check_stack(names, "visual.blocks.", self.model_cfg.vision.depth, f"{spec}: model.vision.depth", files)
        if head_cfg.type == "mhsa":
            check_stack(names, "head.layers.", head_cfg.num_layers, f"{spec}: tte.head.num_layers", files)

    def load_model(self, head_cfg: HeadConfig, *, dtype: torch.dtype, device: str, max_positions: int, impl: str) -> Qwen2VL:
        """Build the model on the meta device and assign the stored tensors (memory-mapped; cast only if dtypes
        differ). Call `check_depths` first: the model is built as engine.json describes it."""
        with torch.device("meta"):
            model = Qwen2VL(self.model_cfg, head_cfg, max_positions=max_positions, impl=impl).to(dtype)
            try:
                swap_in_fp8(model, self.quantized)
            except (AttributeError, TypeError) as exc:  # a name that is no linear layer of this model
                raise CheckpointError(f"{self.path / ENGINE_FILE}: quantization.modules names no linear layer of this model ({one_line(exc)})") from exc
        expected = model.state_dict()
        tied = self.model_cfg.text.tie_word_embeddings
        if tied:
            expected.pop("lm_head.weight", None)
        state: dict[str, torch.Tensor] = {}
        for fname in self.weight_files:
            for name, tensor in iter_tensors([self.path / fname]):
                if name not in expected:
                    raise CheckpointError(f"{self.path / fname}: unexpected tensor {name}")
                want = expected[name]
                if tuple(tensor.shape) != tuple(want.shape):
                    raise CheckpointError(f"{self.path / fname}: {name} has shape {tuple(tensor.shape)}, expected {tuple(want.shape)}")
                # fp8 weights and their fp32 scales keep their dtype; everything else runs in `dtype`
                target = want.dtype if want.dtype in (FP8_DTYPE, torch.float32) and tensor.dtype == want.dtype else dtype
                if want.dtype == FP8_DTYPE and tensor.dtype != FP8_DTYPE:
                    raise CheckpointError(f"{self.path / fname}: {name} should be float8_e4m3fn, got {tensor.dtype}")
                state[name] = tensor.to(device=device, dtype=target)
        check_complete(set(expected), set(state), str(self.path))
        model.load_state_dict(state, strict=not tied, assign=True)
        return model.finalize()
