"""Custom ops for the hot path, each a Triton kernel beside its PyTorch reference twin.

Installed as `tte_engine.kernels`. Every op takes `impl="auto" | "triton" | "torch"`; "auto" runs
Triton on CUDA tensors and the reference elsewhere. Kernels know nothing about models.
"""

from .activations import swiglu
from .attention import decode_attention, prefill_attention, store_kv
from .norms import add_rms_norm, rms_norm
from .pooling import pool_last_normalize, pool_last_rmsnorm_normalize
from .rotary import apply_mrope, rotary_cos_sin
from .sampling import gumbel_argmax

__all__ = [
    "add_rms_norm",
    "apply_mrope",
    "decode_attention",
    "gumbel_argmax",
    "pool_last_normalize",
    "pool_last_rmsnorm_normalize",
    "prefill_attention",
    "rms_norm",
    "rotary_cos_sin",
    "store_kv",
    "swiglu",
]
