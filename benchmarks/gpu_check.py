"""GPU check of the kernels: run their tests on the GPU, then time each against PyTorch eager.

Run from the repository root on a CUDA machine (H100/H200, torch >= 2.11, triton >= 3.6) where
the package is installed (`pip install --no-deps -e .`):

    python benchmarks/gpu_check.py --out results.json

1. `pytest tests/kernels` with CUDA visible, so every test runs the compiled kernels on the GPU.
2. The device copy bandwidth: a 1 GiB device-to-device copy, bytes read + written.
3. Every op at Qwen2-VL-2B sizes (hidden 1536, 12 heads, 2 KV heads, head_dim 128, intermediate
   8960; batch 1-256; contexts up to 4096; bf16, KV blocks of 16 in shuffled order): the Triton
   kernel and the eager reference (`impl="torch"`), each timed by triton.testing.do_bench (median,
   L2 flushed before every run), and their outputs compared. Bytes are the op's essential traffic
   (what it must read and write), so GB/s over the copy bandwidth is the distance to the memory
   roofline; attention also reports TFLOP/s (prefill is compute-bound).
It prints the table and writes it, with the test summary, as JSON to --out. About 2-3 minutes.
Exit status: 0 when the tests pass (or, with a message, when there is no GPU), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 1536, 8960, 12, 2, 128, 16  # Qwen2-VL-2B
DTYPE, ELEM = torch.bfloat16, 2  # bytes per element
SCALE = HEAD_DIM**-0.5
TEST_TIMEOUT_S = 200


def run_tests() -> dict:
    """`pytest tests/kernels` in a child process; its summary line, pass/fail and duration."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider"]
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # its captured output is bytes even with text=True
        return {"passed": False, "summary": f"timed out after {TEST_TIMEOUT_S} s", "seconds": TEST_TIMEOUT_S,
                "output_tail": (e.stdout or b"").decode(errors="replace")[-4000:]}
    lines = run.stdout.strip().splitlines()
    result = {"passed": run.returncode == 0, "summary": lines[-1] if lines else run.stderr.strip()[-300:],
              "seconds": round(time.perf_counter() - start, 1)}
    if run.returncode != 0:
        result["output_tail"] = (run.stdout + run.stderr)[-4000:]
    return result


def copy_bandwidth(do_bench) -> float:
    """Bytes per second of a large device-to-device copy, counting the read and the write."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def _rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=DTYPE)


def _paged(lens: list[int]):
    """Random K/V caches holding lens[b] tokens per sequence in shuffled blocks, with their tables."""
    max_blocks = max(-(-n // BLOCK_SIZE) for n in lens)
    num_blocks = len(lens) * max_blocks
    tables = torch.randperm(num_blocks, device="cuda").view(len(lens), max_blocks).to(torch.int32)
    k_cache = _rand(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return k_cache, torch.randn_like(k_cache), tables, torch.tensor(lens, dtype=torch.int32, device="cuda")


def cases():
    """(op, shape, call(impl), bytes, flops, compare) per measurement. Each case is measured before
    the generator moves on, so the calls bind the inputs of their own iteration."""
    from tte_engine import kernels

    for t in (1, 256, 4096):
        x, res, w = _rand(t, HIDDEN), _rand(t, HIDDEN), _rand(HIDDEN)
        yield ("rms_norm", f"T={t} D={HIDDEN}", lambda i: kernels.rms_norm(x, w, impl=i),
               (2 * t + 1) * HIDDEN * ELEM, 0, True)
        yield ("add_rms_norm", f"T={t} D={HIDDEN}", lambda i: kernels.add_rms_norm(x, res, w, impl=i),
               (4 * t + 1) * HIDDEN * ELEM, 0, True)
    for t in (1, 256, 4096):
        gate_up = _rand(t, 2 * INTER)
        yield "swiglu", f"T={t} I={INTER}", lambda i: kernels.swiglu(gate_up, impl=i), 3 * t * INTER * ELEM, 0, True
    for b in (1, 64, 256):
        hidden, res, w = _rand(b * 128, HIDDEN), _rand(b * 128, HIDDEN), _rand(HIDDEN)
        cu = torch.arange(0, b * 128 + 1, 128, dtype=torch.int32, device="cuda")
        yield ("pool_last_normalize", f"B={b} D={HIDDEN}", lambda i: kernels.pool_last_normalize(hidden, cu, impl=i),
               b * HIDDEN * (ELEM + 4), 0, True)
        yield ("pool_last_rmsnorm_normalize", f"B={b} D={HIDDEN} +residual",
               lambda i: kernels.pool_last_rmsnorm_normalize(hidden, cu, w, residual=res, impl=i),
               b * HIDDEN * (2 * ELEM + 4) + HIDDEN * ELEM, 0, True)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    cos_sin = kernels.rotary_cos_sin(inv_freq, 8192)
    for t in (1, 256, 4096):
        qkv = _rand(t, (HEADS + 2 * KV_HEADS) * HEAD_DIM)  # q and k are views of the fused projection
        q = qkv[:, : HEADS * HEAD_DIM].view(t, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(t, KV_HEADS, HEAD_DIM)
        pos = torch.randint(0, 8192, (3, t), device="cuda")
        yield ("apply_mrope", f"T={t} H={HEADS}+{KV_HEADS}",
               lambda i: kernels.apply_mrope(q, k, pos, cos_sin, (16, 24, 24), impl=i),
               t * ((HEADS + KV_HEADS) * HEAD_DIM * 2 * ELEM + HEAD_DIM * 4 + 3 * 8), 0, False)
    for t in (1, 256, 4096):
        k, v = _rand(t, KV_HEADS, HEAD_DIM), _rand(t, KV_HEADS, HEAD_DIM)
        k_cache, v_cache, _, _ = _paged([t + BLOCK_SIZE])
        slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device="cuda")[:t]
        yield ("store_kv", f"T={t}", lambda i: kernels.store_kv(k, v, k_cache, v_cache, slots, impl=i),
               t * (KV_HEADS * HEAD_DIM * 4 * ELEM + 8), 0, False)
    for b, ctx in ((1, 4096), (32, 1024), (32, 4096), (256, 512), (256, 4096)):
        k_cache, v_cache, tables, lens = _paged([ctx] * b)
        q = _rand(b, HEADS, HEAD_DIM)
        yield ("decode_attention", f"B={b} ctx={ctx}",
               lambda i: kernels.decode_attention(q, k_cache, v_cache, tables, lens, SCALE, impl=i),
               b * (ctx * KV_HEADS * HEAD_DIM * 2 * ELEM + 2 * HEADS * HEAD_DIM * ELEM),
               4 * b * ctx * HEADS * HEAD_DIM, True)
    for b, q_len, ctx in ((1, 4096, 4096), (8, 512, 512), (32, 16, 1024)):  # fresh prompts; embed suffixes
        k_cache, v_cache, tables, lens = _paged([ctx] * b)
        q = _rand(b * q_len, HEADS, HEAD_DIM)
        cu = torch.arange(0, b * q_len + 1, q_len, dtype=torch.int32, device="cuda")
        visible = b * (q_len * (ctx - q_len) + q_len * (q_len + 1) // 2)  # (query, key) pairs under the mask
        yield ("prefill_attention", f"B={b} q={q_len} ctx={ctx}",
               lambda i: kernels.prefill_attention(q, k_cache, v_cache, tables, cu, lens, SCALE, impl=i),
               b * (2 * q_len * HEADS * HEAD_DIM * ELEM + ctx * KV_HEADS * HEAD_DIM * 2 * ELEM),
               4 * visible * HEADS * HEAD_DIM, True)


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def measure(do_bench, copy_bps: float) -> list[dict]:
    rows = []
    for op, shape, call, nbytes, flops, compare in cases():
        match = None
        if compare:
            match = all(
                torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
                for a, b in zip(_outputs(call("triton")), _outputs(call("torch")))
            )
        triton_ms = do_bench(lambda: call("triton"))
        torch_ms = do_bench(lambda: call("torch"))
        gbps = nbytes / (triton_ms * 1e-3) / 1e9
        rows.append({
            "op": op, "shape": shape, "triton_us": round(triton_ms * 1e3, 2), "eager_us": round(torch_ms * 1e3, 2),
            "speedup": round(torch_ms / triton_ms, 2), "GBps": round(gbps, 1),
            "frac_of_copy": round(gbps * 1e9 / copy_bps, 3),
            "TFLOPs": round(flops / (triton_ms * 1e-3) / 1e12, 1) if flops else None, "matches_eager": match,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'op':<28} {'shape':<24} {'triton us':>10} {'eager us':>10} {'speedup':>8} {'GB/s':>8} "
            f"{'of copy':>8} {'TFLOP/s':>8}  match")
    print(head)
    print("-" * len(head))
    for r in rows:
        tflops = "" if r["TFLOPs"] is None else f"{r['TFLOPs']:.1f}"
        match = {True: "yes", False: "NO", None: "-"}[r["matches_eager"]]
        print(f"{r['op']:<28} {r['shape']:<24} {r['triton_us']:>10.2f} {r['eager_us']:>10.2f} {r['speedup']:>7.2f}x "
              f"{r['GBps']:>8.0f} {r['frac_of_copy']:>8.0%} {tflops:>8}  {match}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the results as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (the CPU suite is `pytest tests/kernels`).")
        return 0
    import triton
    from triton.testing import do_bench

    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"{report['device']}: torch {report['torch']}, triton {report['triton']}")
    print("running pytest tests/kernels on the GPU ...", flush=True)
    report["tests"] = tests = run_tests()
    print(f"tests: {tests['summary']} ({tests['seconds']} s)")
    if not tests["passed"]:
        print(tests.get("output_tail", ""))
    copy_bps = copy_bandwidth(do_bench)
    report["copy_GBps"] = round(copy_bps / 1e9, 1)
    print(f"device copy bandwidth: {report['copy_GBps']} GB/s (read + write)\n", flush=True)
    report["kernels"] = rows = measure(do_bench, copy_bps)
    print_table(rows)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return 0 if tests["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
