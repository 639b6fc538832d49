"""oneDNN-prepacked linear layers for CPU inference (what vLLM's CPU backend does with its weights).

`F.linear` on CPU hands the GEMM a plain [N, K] weight on every call, and the GEMM re-blocks it
each time. oneDNN's `_reorder_linear_weight` lays a weight out once in the blocked format its
GEMM reads; `_linear_pointwise` then multiplies against it directly. Measured on the 2-core EPYC
dev VM (torch 2.13, 2026-11-29), prefill-sized GEMMs (M = 300-2,000, K, N = 384-2,048) ran
1.1-1.5x faster and decode-sized ones (M = 8-64) 1.2-5x; at M = 1 a mid-sized weight is ~20%
slower (a packed call has ~15 us of fixed cost), which the LM head's and MLP's gains outweigh.
The sum order differs from `F.linear`'s, so outputs differ by fp32 rounding (~1e-6 relative),
inside the correctness contract; the parity tests run with packing on.

Weights below `MIN_PACKED_ELEMENTS` stay dense: their GEMMs are too small to repay the fixed
cost. A packed layer still answers `.weight` and `state_dict()` with its exact dense weight
(oneDNN's `to_dense()` is lossless), so exporters that read weights keep working, at the cost
of a copy when they ask.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_PACKED_ELEMENTS = 1 << 17  # K * N below this: F.linear is faster (measured crossover, see above)
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def prepacking_available() -> bool:
    """Whether this torch build has oneDNN's linear prepacking (CPU builds of torch >= 2.1 do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """`nn.Linear` (y = x W^T + b) with W held in oneDNN's blocked layout. x: [..., K] -> [..., N], same dtype.

    An inference layout: `.weight`, `state_dict()` and `load_state_dict()` speak the dense weight,
    but a packed model cannot be deep-copied, pickled whole or moved to another dtype or device
    (oneDNN tensors have no storage); build the engine with `prepack_weights=False` for that."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", _pack(linear.weight), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self._register_state_dict_hook(_dense_weight_in_state_dict)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [N, K] weight (a fresh copy, exactly the one packed); assigning one repacks it."""
        return self.packed.to_dense()

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        if tuple(value.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(value.shape)} for a {self.in_features} -> {self.out_features} linear")
        self.packed = _pack(value)

    @property
    def dtype(self) -> torch.dtype:
        return self.packed.dtype

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            self.weight = state_dict[key].to(self.dtype)
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k != key}, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, onednn_packed=True"


def linear_into(layer: nn.Linear | PackedLinear, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`layer(x)` for x [M, K] ([M, N] in the layer's dtype) without `Module.__call__` (its Python
    costs ~3 us a call on CPU), packed or not; the layer's bias, if any, included. `out` ([M, N],
    contiguous, the layer's dtype): written in place (a plain layer's GEMM writes it directly, as
    `F.linear` computes: addmm / mm; a packed layer's result is copied in) and returned."""
    if isinstance(layer, PackedLinear):
        y = torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")
        return y if out is None else out.copy_(y)
    if out is None:
        return F.linear(x, layer.weight, layer.bias)
    if layer.bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(layer.bias, x, layer.weight.t(), out=out)


def linear_dtype(layer: nn.Linear | PackedLinear) -> torch.dtype:
    """The dtype of a linear layer's weight (a packed layer's without a dense copy)."""
    return layer.dtype if isinstance(layer, PackedLinear) else layer.weight.dtype


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _dense_weight_in_state_dict(module: PackedLinear, state: dict, prefix: str, local_metadata) -> None:
    state[prefix + "weight"] = module.weight


def pack_linears(model: nn.Module, min_elements: int | None = None) -> int:
    """Replace, in place, every plain `nn.Linear` of `model` on the CPU whose weight is fp32 or bf16
    and has at least `min_elements` (default `MIN_PACKED_ELEMENTS`) elements by a `PackedLinear`;
    returns how many were replaced.

    A weight shared with another module (the LM head tied to the token embedding) is packed as a
    copy: the embedding keeps the dense tensor, so tying costs vocab x hidden more memory."""
    if not prepacking_available():
        return 0
    min_elements = MIN_PACKED_ELEMENTS if min_elements is None else min_elements

    def packable(child: nn.Module) -> bool:
        w = child.weight if type(child) is nn.Linear else None
        return w is not None and w.device.type == "cpu" and w.dtype in PACKABLE_DTYPES and w.numel() >= min_elements

    return len(_swap_children(model, packable, PackedLinear))


@contextlib.contextmanager
def plain_linears(model: nn.Module):
    """Within the block, every `PackedLinear` of `model` is a plain `nn.Linear` again (dense copies),
    for code that traces or copies the model (the ONNX exporter); the packed layers come back after."""
    swapped = _swap_children(model, lambda child: isinstance(child, PackedLinear), _plain)
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _plain(packed: PackedLinear) -> nn.Linear:
    plain = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None, dtype=packed.dtype)
    plain.weight = nn.Parameter(packed.weight, requires_grad=False)
    if packed.bias is not None:
        plain.bias = nn.Parameter(packed.bias.detach(), requires_grad=False)
    return plain


def _swap_children(model: nn.Module, pick, make) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every submodule `pick(child)` accepts by `make(child)`; returns (parent, name, old child) of each."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if pick(child):
                setattr(parent, name, make(child))
                swapped.append((parent, name, child))
    return swapped
