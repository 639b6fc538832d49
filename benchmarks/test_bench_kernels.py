"""Micro-benchmarks of the kernels ops: `pytest --benchmark-only -k kernels`.

Each op runs at a decode-batch / short-prefill size of Qwen2-VL-2B's shapes (64 tokens, 8
sequences of 512 cached tokens in shuffled KV blocks of 16).
- On CUDA (bf16) the benchmark times the Triton kernel (pytest-benchmark rounds, each call followed
  by a synchronize) and, in the same test, its baseline: the eager PyTorch reference
  (`impl="torch"`), the same number of rounds, median. Both outputs are compared first (bf16
  tolerance; not for the in-place ops, which tests/kernels checks); a mismatch is the only
  failure. The ratio is printed and stored in `extra_info`.
- On CPU (fp32) only the PyTorch reference path exists outside the Triton interpreter, so it is
  timed alone (what CPU runs use) and no ratio is claimed. `benchmarks/gpu_check.py` is the fuller
  GPU report (more shapes, L2 flushed, GB/s against the copy bandwidth).
"""

import statistics
import time

import pytest
import torch

from tte_engine import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
IMPL = "triton" if DEVICE == "cuda" else "torch"  # what the engine runs on this device
ROUNDS = 20 if DEVICE == "cuda" else 5
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 1536, 8960, 12, 2, 128, 16  # Qwen2-VL-2B
TOKENS = 64
IN_PLACE = {"apply_mrope", "store_kv"}  # write into their inputs: timed, not compared (tests/kernels checks them)
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


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, rounds: int) -> float:
    """Median wall seconds of `fn()` followed by a device synchronize, after two warm-up calls."""
    times = []
    for i in range(rounds + 2):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("op", OPS)
def test_bench_kernels(benchmark, ops, op):
    call = ops[op]

    def run():
        call(IMPL)
        _sync()

    benchmark.group = "kernels"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), impl=IMPL)
    baseline_s = None
    if IMPL != "torch":  # the kernel must agree with its eager reference before either time means anything
        if op not in IN_PLACE:
            for a, b in zip(_outputs(call(IMPL)), _outputs(call("torch"))):
                assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2), f"{op}: triton and eager disagree"
        baseline_s = _seconds(lambda: call("torch"), ROUNDS)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    ours_s = benchmark.stats.stats.median
    if baseline_s is None:
        benchmark.extra_info.update(baseline=None)
        print(f"[kernels {op}] torch reference {ours_s * 1e6:.1f} us on {DEVICE} (no baseline here: Triton is timed only on CUDA)")
    else:
        benchmark.extra_info.update(eager_median_us=round(baseline_s * 1e6, 2), speedup_vs_eager=round(baseline_s / ours_s, 2))
        print(f"[kernels {op}] triton {ours_s * 1e6:.1f} us | eager torch {baseline_s * 1e6:.1f} us | {baseline_s / ours_s:.2f}x")
