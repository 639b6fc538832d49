"""GPU check of the kernels: run their tests on the GPU, then time each against PyTorch eager.

Run from the repository root on a CUDA machine (H100/H200, torch >= 2.11, triton >= 3.6) where
the package is installed (`pip install --no-deps -e .`):

    python benchmarks/gpu_check.py --out results.json

(`benchmarks/gpu_one_call.py` runs all of this too, as parts of the one-call GPU check.)

1. The kernel tests with CUDA visible, so every test runs the compiled kernels on the GPU:
   `tests/kernels` and the GPU-only engine test (`KERNEL_TESTS`). Tests that only make sense
   under the CPU Triton interpreter, or that stand in for a GPU, are deselected by name (`CPU_ONLY`).
2. The device copy bandwidth: a 1 GiB device-to-device copy, bytes read + written.
3. Every op at Qwen2-VL-2B sizes (hidden 1536, 12 heads, 2 KV heads, head_dim 128, intermediate
   8960; batch 1-256; contexts up to 4096; bf16, KV blocks of 16 in shuffled order): the Triton
   kernel and the eager reference (`impl="torch"`), each timed by triton.testing.do_bench (median,
   L2 flushed before every run), and their outputs compared. Bytes are the op's essential traffic
   (what it must read and write), so GB/s over the copy bandwidth is the distance to the memory
   roofline; attention also reports TFLOP/s (prefill is compute-bound). `measure(deadline=...)`
   stops between cases when its time is up and says how many it left out.
It prints the table and writes it, with the test summary, as JSON to --out. About 2-3 minutes.
Exit status: 0 when the tests pass (or, with a message, when there is no GPU), 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
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


# What runs on the GPU: the kernel tests (compiled, on the device) and the engine's GPU-only test.
KERNEL_TESTS = ["tests/kernels", "tests/test_engine.py::test_cuda_engine_matches_cpu"]
# Tests written for a machine without a GPU, never run on one: the CPU Triton interpreter's
# (TRITON_INTERPRET=1 is set only without CUDA; on a GPU it would drive compiled kernels with CPU
# tensors), and the compile-only sm_90 check (~20 s of CPU that the GPU's real compiles make moot).
CPU_ONLY = ["tests/test_engine.py::test_triton_kernels_drive_the_engine_like_the_references",
            "tests/kernels/test_gpu_compile.py::test_every_kernel_compiles_for_sm90_and_fits"]


class TestRun:
    """`pytest` over `tests` in a child process, started now; `result()` waits for it (at most
    `timeout` seconds from the start) and returns its summary line, pass/fail and duration."""

    def __init__(self, tests=KERNEL_TESTS, timeout: float = TEST_TIMEOUT_S, extra: list[str] | None = None, workers: int = 0):
        # workers > 0 (with pytest-xdist installed): that many processes compile the kernels' test
        # variants in parallel, the bulk of the tests' time on a GPU (~250 tests, each a fresh compile)
        parallel = ["-n", str(workers)] if workers and importlib.util.find_spec("xdist") is not None else []
        self.cmd = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-o", "addopts=", *parallel,
                    *(f"--deselect={t}" for t in CPU_ONLY), *(extra or [])]
        self.timeout, self.start = timeout, time.perf_counter()
        # its own session: a kill reaches pytest-xdist's workers too (they would keep the GPU, and the
        # pipe that `communicate` waits on, past a timeout)
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def kill(self) -> None:
        """Stop the child and every process it started."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # gone already
            pass

    def result(self) -> dict:
        left = max(1.0, self.timeout - (time.perf_counter() - self.start))
        try:
            out, _ = self.proc.communicate(timeout=left)
        except BaseException as exc:  # never leave it running on the GPU beside what is timed next
            self.kill()
            if not isinstance(exc, subprocess.TimeoutExpired):
                self.proc.communicate()
                raise
            out, _ = self.proc.communicate()
            return {"passed": False, "summary": f"timed out after {self.timeout:.0f} s", "seconds": round(self.timeout, 1),
                    "command": " ".join(self.cmd[2:]), "output_tail": (out or "")[-4000:]}
        lines = out.strip().splitlines()
        result = {"passed": self.proc.returncode == 0, "summary": lines[-1] if lines else f"exit {self.proc.returncode}",
                  "seconds": round(time.perf_counter() - self.start, 1), "command": " ".join(self.cmd[2:])}
        if self.proc.returncode != 0:
            result["output_tail"] = out[-4000:]
        return result


def run_tests() -> dict:
    """The kernel tests on this machine's device (see KERNEL_TESTS); waits for them."""
    return TestRun().result()


def cpu_bench(fn, rounds: int = 5) -> float:
    """do_bench's contract on a CPU (dry runs): median milliseconds of `fn()` over a few calls."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth(do_bench, device: str = "cuda", nbytes: int = 2**30) -> float:
    """Bytes per second of a large device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


_DEV = {"device": "cuda", "dtype": DTYPE}  # set by cases(): where and in what dtype the inputs are made


def _rand(*shape):
    return torch.randn(*shape, device=_DEV["device"], dtype=_DEV["dtype"])


def _paged(lens: list[int]):
    """Random K/V caches holding lens[b] tokens per sequence in shuffled blocks, with their tables."""
    max_blocks = max(-(-n // BLOCK_SIZE) for n in lens)
    num_blocks = len(lens) * max_blocks
    tables = torch.randperm(num_blocks, device=_DEV["device"]).view(len(lens), max_blocks).to(torch.int32)
    k_cache = _rand(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return k_cache, torch.randn_like(k_cache), tables, torch.tensor(lens, dtype=torch.int32, device=_DEV["device"])


def cases(device: str = "cuda", dtype: torch.dtype = DTYPE, quick: bool = False):
    """(op, shape, call(impl), bytes, flops, compare) per measurement. Each case is measured before
    the generator moves on, so the calls bind the inputs of their own iteration. quick: only the
    first (smallest) shape of each op (CPU dry runs)."""
    from tte_engine import kernels

    _DEV.update(device=device, dtype=dtype)
    yield from _all_cases(kernels, device, QUICK_SHAPES if quick else SHAPES)


# token counts, pooled batches, (batch, context) of decode, (batch, q_len, context) of prefill
SHAPES = {"tokens": (1, 256, 4096), "pool": (1, 64, 256),
          "decode": ((1, 4096), (32, 1024), (32, 4096), (256, 512), (256, 4096)),
          "prefill": ((1, 4096, 4096), (8, 512, 512), (32, 16, 1024)),  # fresh prompts; embed suffixes
          "split_sweep": ((1, 4096), (8, 1024), (64, 512)),
          "sample": ((1, 151936), (32, 151936), (256, 151936))}  # (rows, vocab): Qwen2-VL's vocabulary
QUICK_SHAPES = {"tokens": (3,), "pool": (2,), "decode": ((2, 100),), "prefill": ((2, 24, 40),), "split_sweep": ((2, 100),),
                "sample": ((2, 1000),)}  # dry runs


def _all_cases(kernels, device, shapes):

    for t in shapes["tokens"]:
        x, res, w = _rand(t, HIDDEN), _rand(t, HIDDEN), _rand(HIDDEN)
        yield ("rms_norm", f"T={t} D={HIDDEN}", lambda i: kernels.rms_norm(x, w, impl=i),
               (2 * t + 1) * HIDDEN * ELEM, 0, True)
        yield ("add_rms_norm", f"T={t} D={HIDDEN}", lambda i: kernels.add_rms_norm(x, res, w, impl=i),
               (4 * t + 1) * HIDDEN * ELEM, 0, True)
    for t in shapes["tokens"]:
        gate_up = _rand(t, 2 * INTER)
        yield "swiglu", f"T={t} I={INTER}", lambda i: kernels.swiglu(gate_up, impl=i), 3 * t * INTER * ELEM, 0, True
    for b in shapes["pool"]:
        hidden, res, w = _rand(b * 128, HIDDEN), _rand(b * 128, HIDDEN), _rand(HIDDEN)
        cu = torch.arange(0, b * 128 + 1, 128, dtype=torch.int32, device=device)
        yield ("pool_last_normalize", f"B={b} D={HIDDEN}", lambda i: kernels.pool_last_normalize(hidden, cu, impl=i),
               b * HIDDEN * (ELEM + 4), 0, True)
        yield ("pool_last_rmsnorm_normalize", f"B={b} D={HIDDEN} +residual",
               lambda i: kernels.pool_last_rmsnorm_normalize(hidden, cu, w, residual=res, impl=i),
               b * HIDDEN * (2 * ELEM + 4) + HIDDEN * ELEM, 0, True)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    cos_sin = kernels.rotary_cos_sin(inv_freq, 8192)
    for t in shapes["tokens"]:
        qkv = _rand(t, (HEADS + 2 * KV_HEADS) * HEAD_DIM)  # q and k are views of the fused projection
        q = qkv[:, : HEADS * HEAD_DIM].view(t, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(t, KV_HEADS, HEAD_DIM)
        pos = torch.randint(0, 8192, (3, t), device=device)
        yield ("apply_mrope", f"T={t} H={HEADS}+{KV_HEADS}",
               lambda i: kernels.apply_mrope(q, k, pos, cos_sin, (16, 24, 24), impl=i),
               t * ((HEADS + KV_HEADS) * HEAD_DIM * 2 * ELEM + HEAD_DIM * 4 + 3 * 8), 0, False)
    for t in shapes["tokens"]:
        k, v = _rand(t, KV_HEADS, HEAD_DIM), _rand(t, KV_HEADS, HEAD_DIM)
        k_cache, v_cache, _, _ = _paged([t + BLOCK_SIZE])
        slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device=device)[:t]
        yield ("store_kv", f"T={t}", lambda i: kernels.store_kv(k, v, k_cache, v_cache, slots, impl=i),
               t * (KV_HEADS * HEAD_DIM * 4 * ELEM + 8), 0, False)
    for b, ctx in shapes["decode"]:
        k_cache, v_cache, tables, lens = _paged([ctx] * b)
        q = _rand(b, HEADS, HEAD_DIM)
        yield ("decode_attention", f"B={b} ctx={ctx}",
               lambda i: kernels.decode_attention(q, k_cache, v_cache, tables, lens, SCALE, impl=i),
               b * (ctx * KV_HEADS * HEAD_DIM * 2 * ELEM + 2 * HEADS * HEAD_DIM * ELEM),
               4 * b * ctx * HEADS * HEAD_DIM, True)
    # decode_splits is a first guess: time each split count where it matters most (one long context,
    # a few mid ones, many short ones), beside the count it picks ("heuristic" in the shape), to tune it
    for b, ctx in shapes["split_sweep"]:
        k_cache, v_cache, tables, lens = _paged([ctx] * b)
        q = _rand(b, HEADS, HEAD_DIM)
        picked = kernels.attention.decode_splits(b, KV_HEADS, tables.shape[1] * BLOCK_SIZE, _DEV["dtype"], torch.device(device))
        for splits in sorted({1, 2, 4, 8, 16, 32, picked}):
            yield ("decode_attention", f"B={b} ctx={ctx} splits={splits}{' heuristic' if splits == picked else ''}",
                   lambda i, s=splits: kernels.decode_attention(q, k_cache, v_cache, tables, lens, SCALE, num_splits=s, impl=i),
                   b * (ctx * KV_HEADS * HEAD_DIM * 2 * ELEM + 2 * HEADS * HEAD_DIM * ELEM),
                   4 * b * ctx * HEADS * HEAD_DIM, True)
    for b, q_len, ctx in shapes["prefill"]:
        k_cache, v_cache, tables, lens = _paged([ctx] * b)
        q = _rand(b * q_len, HEADS, HEAD_DIM)
        cu = torch.arange(0, b * q_len + 1, q_len, dtype=torch.int32, device=device)
        visible = b * (q_len * (ctx - q_len) + q_len * (q_len + 1) // 2)  # (query, key) pairs under the mask
        yield ("prefill_attention", f"B={b} q={q_len} ctx={ctx}",
               lambda i: kernels.prefill_attention(q, k_cache, v_cache, tables, cu, lens, SCALE, impl=i),
               b * (2 * q_len * HEADS * HEAD_DIM * ELEM + ctx * KV_HEADS * HEAD_DIM * 2 * ELEM),
               4 * visible * HEADS * HEAD_DIM, True)


    # temperature sampling's Gumbel-max pass over fp32 logits (ids may differ from the reference's in
    # near-ties: the logs round differently, see tests/kernels/test_sampling_kernel.py; not compared here)
    for rows, vocab in shapes["sample"]:
        scaled = torch.randn(rows, vocab, device=device)
        seeds, counters = torch.arange(rows, device=device), torch.zeros(rows, dtype=torch.int64, device=device)
        yield ("gumbel_argmax", f"B={rows} V={vocab}", lambda i: kernels.sampling.gumbel_argmax(scaled, seeds, counters, impl=i),
               rows * (vocab * 4 + 24), 0, False)


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def measure(do_bench, copy_bps: float, *, device: str = "cuda", impls: tuple[str, str] = ("triton", "torch"),
            quick: bool = False, deadline: float | None = None, skipped: list | None = None) -> list[dict]:
    """Time every case with impls[0] (the kernel) and impls[1] (its eager baseline). deadline: a
    time.monotonic() value; cases not started by then are left out and listed in `skipped`."""
    rows = []
    ours, base = impls
    for op, shape, call, nbytes, flops, compare in cases(device, DTYPE, quick):
        if deadline is not None and time.monotonic() > deadline:
            if skipped is not None:
                skipped.append(f"{op} {shape}")
            continue
        match = None
        if compare:
            match = all(
                torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
                for a, b in zip(_outputs(call(ours)), _outputs(call(base)))
            )
        triton_ms = do_bench(lambda: call(ours))
        torch_ms = do_bench(lambda: call(base))
        gbps = nbytes / (triton_ms * 1e-3) / 1e9
        rows.append({
            "op": op, "shape": shape, "triton_us": round(triton_ms * 1e3, 2), "eager_us": round(torch_ms * 1e3, 2),
            "speedup": round(torch_ms / triton_ms, 2), "GBps": round(gbps, 1),
            "frac_of_copy": round(gbps * 1e9 / copy_bps, 3),
            "TFLOPs": round(flops / (triton_ms * 1e-3) / 1e12, 1) if flops else None, "matches_eager": match,
            "impls": f"{ours} vs {base}",
        })
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'op':<28} {'shape':<34} {'triton us':>10} {'eager us':>10} {'speedup':>8} {'GB/s':>8} "
            f"{'of copy':>8} {'TFLOP/s':>8}  match")
    print(head)
    print("-" * len(head))
    for r in rows:
        tflops = "" if r["TFLOPs"] is None else f"{r['TFLOPs']:.1f}"
        match = {True: "yes", False: "NO", None: "-"}[r["matches_eager"]]
        print(f"{r['op']:<28} {r['shape']:<34} {r['triton_us']:>10.2f} {r['eager_us']:>10.2f} {r['speedup']:>7.2f}x "
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
