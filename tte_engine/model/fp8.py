"""FP8 (E4M3) linear layers: weights quantized per output channel at export, activations per token at run time.

An `Fp8Linear` holds its weight as `float8_e4m3fn` [out, in] and one fp32 scale per output row
(`weight ~= weight_fp8 * weight_scale[:, None]`). At run time each row (token) of the input is
quantized with its own scale (amax / 448), so no activation calibration is needed.

Where the matmul runs:
- CUDA, compute capability >= 8.9, bf16 activations, both dims multiples of 16: on the FP8 tensor
  cores through `torch._scaled_mm` with row-wise scales (fp32 accumulation, bf16 output).
- Everywhere else (CPU, older GPUs, fp32 engines): the weight is dequantized and the activations
  are *fake*-quantized per token (quantized to E4M3 and straight back), so a CPU run sees the same
  rounding as the GPU path and the export-time accuracy report on CPU predicts the GPU's. Set
  `quantize_activations = False` on a module to get weight-only numerics instead. On CPU the
  dequantized weight is kept after first use (dequantizing per call made a 2B model's decode
  ~10x slower), so an FP8 engine on CPU holds float weights too; on GPUs it is redone per call,
  keeping FP8's memory saving.

Static per-tensor activation scales (ModelOpt's `FP8` recipe, TensorRT-LLM's `quant_algo: FP8`):
set `input_scale` (a 0-d fp32 tensor, amax / 448 from calibration) and the input is fake-quantized
with that one scale instead (always on the dequantized path), so a CPU run reproduces what a
per-tensor FP8 engine computes, clipping included. Checkpoints that carry such scales load this way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D tensor to E4M3 with scale = amax(row) / 448; returns (fp8, fp32 scales [rows])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3 quantization: (fp8, fp32 scale [1]) with scale = amax / 448."""
    xf = x.float()
    scale = (xf.abs().amax() / FP8_MAX).clamp_min(_MIN_SCALE).reshape(1)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fake_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded through E4M3 with one fixed scale (values beyond 448 * scale clip), back in x's dtype."""
    s = scale.to(device=x.device, dtype=torch.float32)
    return ((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s).to(x.dtype)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded through per-row E4M3 and back (what the tensor-core path feeds its matmul)."""
    q, scale = quantize_rows(x)
    return dequantize_rows(q, scale, x.dtype)


def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 tensor cores: CUDA with compute capability >= 8.9 (Ada, Hopper and later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A drop-in for `nn.Linear` whose weight is E4M3 with per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.quantize_activations = True
        self.input_scale: torch.Tensor | None = None  # static per-tensor activation scale (not a parameter: see module doc)
        self.use_scaled_mm: bool | None = None  # None: decided from the input's device and dtype (once per pair)
        self._auto_scaled_mm: dict[tuple[torch.device, torch.dtype], bool] = {}  # those decisions, cached
        self._cpu_weight: torch.Tensor | None = None  # dequantized weight, cached on CPU only

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """Quantize a float linear layer (per output channel)."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)
        q, scale = quantize_rows(linear.weight.detach())
        mod.weight.data, mod.weight_scale.data = q, scale
        if linear.bias is not None:
            mod.bias.data = linear.bias.detach().clone()
        return mod

    def extra_repr(self) -> str:
        acts = "per-token" if self.input_scale is None else "static per-tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3/per-channel, activations={acts}"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight.device.type != "cpu":
            return dequantize_rows(self.weight, self.weight_scale, dtype)
        if self._cpu_weight is None or self._cpu_weight.dtype != dtype:
            self._cpu_weight = dequantize_rows(self.weight, self.weight_scale, dtype)
        return self._cpu_weight

    def _tensor_cores(self, x: torch.Tensor) -> bool:
        if self.use_scaled_mm is not None:
            return self.use_scaled_mm
        key = (x.device, x.dtype)
        use = self._auto_scaled_mm.get(key)
        if use is None:
            # decided on the first forward with this device and dtype: querying the device
            # capability on every call of every linear would cost host time on every step
            use = x.dtype == torch.bfloat16 and self.in_features % 16 == 0 and self.out_features % 16 == 0 and scaled_mm_supported(x.device)
            self._auto_scaled_mm[key] = use
        return use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.quantize_activations and self.input_scale is None and self._tensor_cores(x2):
            xq, xs = quantize_rows(x2)
            y = torch._scaled_mm(
                xq, self.weight.t(), scale_a=xs[:, None], scale_b=self.weight_scale[None, :], out_dtype=torch.bfloat16
            ).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            if not self.quantize_activations:
                xin = x2
            elif self.input_scale is not None:
                xin = fake_quantize_static(x2, self.input_scale)
            else:
                xin = fake_quantize_rows(x2)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(xin, self.dequantized_weight(x.dtype), bias)
        return y.reshape(*shape[:-1], self.out_features)


def decoder_linear_names(model: nn.Module, include_vision: bool = False) -> list[str]:
    """The linear layers `--fp8` quantizes: every decoder and embedding-head linear (+ the vision tower's).

    The token embedding, the LM head and the vision patch embedding are never included.
    """
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name.startswith(("layers.", "head.layers.")):
            names.append(name)
        elif include_vision and name.startswith("visual.") and name != "visual.patch_embed":
            names.append(name)
    return names


def swap_in_fp8(model: nn.Module, names: list[str]) -> None:
    """Replace the named `nn.Linear` submodules by empty `Fp8Linear`s of the same shape (on the same device)."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is {type(old).__name__}, not nn.Linear")
        new = Fp8Linear(old.in_features, old.out_features, old.bias is not None, dtype=old.weight.dtype, device=old.weight.device)
        setattr(parent, attr, new)
