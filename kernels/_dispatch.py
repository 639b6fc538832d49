"""Choose an op's implementation once per call: Triton on CUDA, the PyTorch reference elsewhere.

Every public op takes `impl="auto" | "triton" | "torch"`. "auto" keeps CPU runs (tests, CI, small
jobs) on plain PyTorch and sends CUDA tensors to Triton when it is installed. "triton" forces the
kernel, which on CPU only works under `TRITON_INTERPRET=1` (how the tests check the kernels).

The small helpers below are shared by the Triton wrappers; none of them imports triton eagerly.
"""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
IMPLS = ("auto", "triton", "torch")


def use_triton(impl: str, x: torch.Tensor) -> bool:
    """True when the Triton kernel should run for tensor `x` under the requested `impl`."""
    if impl == "torch":
        return False
    if impl == "auto":
        return HAS_TRITON and x.is_cuda
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' was requested but triton is not installed (pip install triton)")
        return True
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n: Triton block shapes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()


def row_warps(block: int) -> int:
    """Warps for a kernel that holds one row of `block` elements: about 8-16 elements per thread."""
    return 4 if block < 2048 else 8 if block < 8192 else 16


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype of a torch float dtype (passed to kernels as a constexpr)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU through numpy."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def _fix_interpreter_scalar_index() -> None:
    """Let the triton 3.6 interpreter use a loaded scalar as a loop bound under numpy >= 2.4.

    The interpreter holds scalars as 1-element arrays and turns them into Python ints with int(),
    which numpy 2.4 refuses, so `for i in range(start, end)` fails there although it compiles
    fine. This applies the upstream fix (triton-lang/triton#9171, PR #9172) in interpreter mode.
    """
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if HAS_TRITON and interpreting():
    _fix_interpreter_scalar_index()
