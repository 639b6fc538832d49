"""Fixtures for the kernel tests: where they run and how a kernel's output is judged.

On a CUDA machine the Triton kernels run compiled on the GPU; elsewhere they run under
TRITON_INTERPRET=1, which tests/conftest.py sets before anything imports triton.
"""

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def assert_matches():
    """Compare a kernel output with an fp32 reference: tight in fp32, a few bf16 ulps in bf16.

    NaN anywhere fails: outputs are poisoned with NaN before each call, so an element the
    kernel never wrote shows up here.
    """

    def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol, equal_nan=False)

    return check
