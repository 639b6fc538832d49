"""Micro-benchmarks of the kernels ops: `pytest benchmarks --benchmark-only -k kernels`.

On CPU they time the PyTorch reference path (what CPU runs use), at small shapes and few rounds.
On CUDA they time the Triton kernel and the eager PyTorch reference side by side in one group
per op, so the ratio comes from the same run (benchmarks/gpu_check.py is the fuller GPU report).
"""

import pytest
import torch

from tte_engine import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
IMPLS = ["torch", "triton"] if DEVICE == "cuda" else ["torch"]
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 1536, 8960, 12, 2, 128, 16  # Qwen2-VL-2B
TOKENS = 64
OPS = [
    "rms_norm", "add_rms_norm", "swiglu", "pool_last_normalize", "pool_last_rmsnorm_normalize",
    "apply_mrope", "store_kv", "decode_attention", "prefill_attention",
]


def _rand(*shape):
    return torch.randn(*shape, device=DEVICE).to(DTYPE)


def _paged(lens):
    """Random caches and shuffled block tables holding `lens` tokens per sequence."""
    max_blocks = max(-(-n // BLOCK_SIZE) for n in lens)
    num_blocks = len(lens) * max_blocks
    tables = torch.randperm(num_blocks).view(len(lens), max_blocks).to(DEVICE, torch.int32)
    k_cache = _rand(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return k_cache, torch.randn_like(k_cache), tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def _ops():
    """Op name -> call(impl) on inputs of a decode-batch / short-prefill size."""
    x, residual, weight = _rand(TOKENS, HIDDEN), _rand(TOKENS, HIDDEN), _rand(HIDDEN)
    gate_up = _rand(TOKENS, 2 * INTER)
    cu = torch.arange(0, TOKENS + 1, 8, dtype=torch.int32, device=DEVICE)
    q, k = _rand(TOKENS, HEADS, HEAD_DIM), _rand(TOKENS, KV_HEADS, HEAD_DIM)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    cos_sin = kernels.rotary_cos_sin(inv_freq, 4096)
    positions = torch.randint(0, 4096, (3, TOKENS), device=DEVICE)
    k_cache, v_cache, tables, lens = _paged([512] * 8)
    slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device=DEVICE)[:TOKENS]
    q_prefill = _rand(8 * 64, HEADS, HEAD_DIM)
    cu_prefill = torch.arange(0, 8 * 64 + 1, 64, dtype=torch.int32, device=DEVICE)
    return {
        "rms_norm": lambda impl: kernels.rms_norm(x, weight, impl=impl),
        "add_rms_norm": lambda impl: kernels.add_rms_norm(x, residual, weight, impl=impl),
        "swiglu": lambda impl: kernels.swiglu(gate_up, impl=impl),
        "pool_last_normalize": lambda impl: kernels.pool_last_normalize(x, cu, impl=impl),
        "pool_last_rmsnorm_normalize": lambda impl: kernels.pool_last_rmsnorm_normalize(
            x, cu, weight, residual=residual, impl=impl
        ),
        "apply_mrope": lambda impl: kernels.apply_mrope(q, k, positions, cos_sin, (16, 24, 24), impl=impl),
        "store_kv": lambda impl: kernels.store_kv(k, k, k_cache, v_cache, slots, impl=impl),
        "decode_attention": lambda impl: kernels.decode_attention(
            q[:8], k_cache, v_cache, tables, lens, HEAD_DIM**-0.5, impl=impl
        ),
        "prefill_attention": lambda impl: kernels.prefill_attention(
            q_prefill, k_cache, v_cache, tables, cu_prefill, lens, HEAD_DIM**-0.5, impl=impl
        ),
    }


@pytest.fixture(scope="module")
def ops():
    torch.manual_seed(0)
    return _ops()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_bench_kernels(benchmark, ops, op, impl):
    call = ops[op]

    def run():
        call(impl)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"kernels-{op}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), impl=impl)
    benchmark.pedantic(run, rounds=20 if DEVICE == "cuda" else 5, iterations=1, warmup_rounds=2)
