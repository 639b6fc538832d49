"""The `impl` switch every public op takes: "auto" | "triton" | "torch"."""

import subprocess
import sys

import pytest
import torch

from tte_engine import kernels
from tte_engine.kernels import activations, attention, norms, pooling, rotary


def _calls(device):
    """Op name -> call(impl) running the public op on small fixed inputs and returning its results."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x, residual, weight = rand(5, 96), rand(5, 96), rand(96)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=device)
    q, k, v = rand(5, 4, 64), rand(5, 2, 64), rand(5, 2, 64)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, device=device).float() / 64))
    cos_sin = kernels.rotary_cos_sin(inv_freq, 32)
    positions = torch.randint(0, 32, (3, 5), generator=g).to(device)
    k_cache, v_cache = rand(4, 4, 2, 64), rand(4, 4, 2, 64)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    lens = torch.tensor([6, 8], dtype=torch.int32, device=device)

    def store(impl):
        kc, vc = k_cache.clone(), v_cache.clone()
        kernels.store_kv(k, v, kc, vc, torch.tensor([0, 3, 5, 9, 12], device=device), impl=impl)
        return kc, vc

    return {
        "rms_norm": lambda impl: kernels.rms_norm(x, weight, impl=impl),
        "add_rms_norm": lambda impl: kernels.add_rms_norm(x, residual, weight, impl=impl),
        "swiglu": lambda impl: kernels.swiglu(x, impl=impl),
        "pool_last_normalize": lambda impl: kernels.pool_last_normalize(x, cu, impl=impl),
        "pool_last_rmsnorm_normalize": lambda impl: kernels.pool_last_rmsnorm_normalize(
            x, cu, weight, residual=residual, impl=impl
        ),
        "apply_mrope": lambda impl: kernels.apply_mrope(
            q.clone(), k.clone(), positions, cos_sin, (8, 12, 12), impl=impl
        ),
        "store_kv": store,
        "decode_attention": lambda impl: kernels.decode_attention(
            q[:2], k_cache, v_cache, tables, lens, 0.125, impl=impl
        ),
        "prefill_attention": lambda impl: kernels.prefill_attention(
            q, k_cache, v_cache, tables, cu, lens, 0.125, impl=impl
        ),
    }


OPS = list(_calls("cpu"))


def _pairs(results, references):
    """Zip an op's outputs (a tensor or a tuple of them) with the reference's."""
    if not isinstance(results, tuple):
        results, references = (results,), (references,)
    return zip(results, references, strict=True)


@pytest.mark.parametrize("op", OPS)
def test_triton_matches_torch(op, device, assert_matches):
    call = _calls(device)[op]
    for out, ref in _pairs(call("triton"), call("torch")):
        assert_matches(out, ref, torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_auto_is_triton_on_cuda_and_torch_elsewhere(op, device, monkeypatch):
    call = _calls(device)[op]
    expected = call("triton" if device == "cuda" else "torch")
    if device == "cpu":  # auto must not even try a kernel
        for module in (activations, attention, norms, pooling, rotary):
            for name in dir(module):
                if name.endswith("_triton") and name != "use_triton":
                    monkeypatch.setattr(module, name, None)
    for out, ref in _pairs(call("auto"), expected):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_unknown_impl_is_a_value_error(op, device):
    with pytest.raises(ValueError, match="impl must be one of"):
        _calls(device)[op]("cuda")


def test_kernels_import_and_run_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail like an absent package
        "import torch\n"
        "from tte_engine import kernels\n"
        "x = torch.randn(3, 8)\n"
        "assert kernels.rms_norm(x, torch.ones(8)).shape == (3, 8)\n"
        "try:\n"
        "    kernels.rms_norm(x, torch.ones(8), impl='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('impl=triton without triton must fail')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
