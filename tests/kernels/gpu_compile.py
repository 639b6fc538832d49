"""Compile every Triton kernel the engine launches for a Hopper GPU, on a machine without one.

The kernel tests run the kernels under TRITON_INTERPRET=1, which accepts code that the real
compiler refuses (and a GPU session is short: one kernel that does not compile there loses it).
Here Triton's own CUDA compiler (its bundled ptxas) builds each kernel for sm_90, as an H100/H200
would, while the engine runs end to end on CPU tensors: a driver stand-in names the target, and
each launch compiles the kernel and returns without running it (`JITFunction.run(warmup=True)`),
so outputs are garbage; what this checks is that every variant the engine asks for compiles and
fits the GPU (shared memory <= 227 KiB per block on sm_90, <= 1024 threads, <= 64 Ki registers per
block, read with the cuobjdump Triton bundles); spilled bytes are reported.

Workloads: a checkpoint with Qwen2-VL-2B's layer geometry (hidden 1536, 12/2 heads, head dim 128,
intermediate 8960; one layer, one vision block) in bf16, each head type, with decode graphs'
fixed-split code; and tiny-random in fp32 (the GPU parity dtype). Text and image items, a chunked
long prompt, several decode buckets; the sampling kernel on its own.

    python tests/kernels/gpu_compile.py [--arch 90] [--json out.json]

Run by tests/kernels/test_gpu_compile.py in a child process (the test session interprets Triton).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile for real

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from PIL import Image  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

REGISTERS_PER_BLOCK = 65536  # 32-bit registers one block may use on sm_80 / sm_90 (same table); more fails at launch
MAX_SHARED = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (CUDA C Programming Guide, compute capabilities table)


class CompileOnlyDriver(DriverBase):
    """Triton's view of a GPU that is not there: the target to compile for, device 0, stream 0."""

    @classmethod
    def is_active(cls):
        return False

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("compile only")

    def get_benchmarker(self):
        raise NotImplementedError("compile only")

    def get_device_interface(self):
        raise NotImplementedError("compile only")

    def get_empty_cache_for_benchmark(self):
        raise NotImplementedError("compile only")

    def clear_cache(self, cache):
        pass


class Recorder:
    """Every launch becomes a compile (no run); each distinct compiled variant is recorded."""

    def __init__(self):
        self.variants: dict[str, dict[str, dict]] = defaultdict(dict)  # kernel -> variant hash -> facts
        self.launches: dict[str, int] = defaultdict(int)
        run = JITFunction.run
        recorder = self

        def launch(self, grid):
            def call(*args, **kwargs):
                kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
                name = self.fn.__name__
                recorder.launches[name] += 1
                md = kernel.metadata
                if md.hash not in recorder.variants[name]:
                    recorder.variants[name][md.hash] = {"num_warps": md.num_warps, "num_stages": md.num_stages, "shared_bytes": md.shared,
                                                        "cubin_bytes": len(kernel.asm["cubin"]), **resource_usage(kernel.asm["cubin"])}
                return kernel

            return call

        JITFunction.__getitem__ = launch


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and spill bytes (STACK, LOCAL) of a compiled kernel, as the cuobjdump that
    Triton bundles reads them from the cubin ({} when it cannot): spills cost a GPU memory traffic."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(found["REG"]), "spill_bytes": int(found.get("STACK", 0)) + int(found.get("LOCAL", 0))} if "REG" in found else {}


def all_kernels() -> set[str]:
    """Names of every @triton.jit function in tte_engine.kernels that a wrapper launches."""
    import tte_engine.kernels as pkg

    names = set()
    for path in Path(pkg.__file__).parent.glob("*.py"):
        module = __import__(f"tte_engine.kernels.{path.stem}", fromlist=["_"])
        names |= {n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel")}
    return names


def image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _any_token(ids):
    """Greedy ids with NO_TOKEN (-1) made token 0."""
    return ids.clip(min=0) if isinstance(ids, np.ndarray) else ids.clamp_min(0)


def run_workloads(workdir: Path) -> list[str]:
    from tte_engine import Engine
    from tte_engine.random_checkpoint import ARCH_SPECS, SPECS, build_random_checkpoint

    items = ["a cat on a chair", {"text": "What is shown in this picture?", "image": image(84, 56, 1)},
             " ".join(["a long text that is prefilled in several chunks"] * 30), {"image": image(56, 112, 2)}, "two dogs"]
    # no kernel runs, so the logits are unwritten memory: a row of them may or may not be finite, and an
    # item whose logits are not ends at once (NO_TOKEN): every item takes a token whatever they hold,
    # so that each workload runs the same steps, launch by launch, at every run
    from tte_engine import sampling

    real_greedy = sampling.Suppression.greedy
    sampling.Suppression.greedy = lambda self, logits, array=None: _any_token(real_greedy(self, logits, array))
    runs = []
    geometry = replace(ARCH_SPECS["unified-2b"], num_layers=1, vision_depth=1, head_layers=1, max_pixels=28 * 28 * 64)
    for head in ("mhsa", "last_token"):
        path = build_random_checkpoint(workdir / f"2b-{head}", replace(geometry, head=head), dtype="bfloat16")
        for graphs in (True, False):
            engine = Engine(path, impl="triton", dtype="bfloat16", cuda_graphs=graphs, max_num_seqs=16, max_num_batched_tokens=128)
            engine.embed(items, max_trace_tokens=3, errors="return")  # no kernel runs: the outputs are unwritten memory (NaN rows)
            runs.append(f"2B geometry, {head}, bf16, cuda_graphs={graphs}")
    tiny = build_random_checkpoint(workdir / "tiny", SPECS["tiny-random"], dtype="float32")
    Engine(tiny, impl="triton", dtype="float32", cuda_graphs=True, max_num_seqs=8).embed(items, max_trace_tokens=3, errors="return")
    runs.append("tiny-random, mhsa, fp32, cuda_graphs=True")
    sampling.Suppression.greedy = real_greedy
    # temperature sampling's kernel, called directly: in an engine, a compile-only launch's unwritten
    # output would come back as the next token ids
    from tte_engine.kernels import sampling as sampling_kernels

    for vocab in (151936, 1001):  # Qwen2-VL's vocabulary, and an odd size (nothing divisible to specialize on)
        sampling_kernels.gumbel_argmax(torch.randn(4, vocab), torch.arange(4), torch.zeros(4, dtype=torch.int64), impl="triton")
    runs.append("gumbel_argmax, 4 rows of 151,936 and of 1,001 ids")
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED), help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args(argv)
    driver.set_active(CompileOnlyDriver(args.arch))
    recorder = Recorder()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_workloads(Path(tmp))
    expected = all_kernels()
    too_big = [f"{name} {h[:8]}: {v['shared_bytes']} bytes shared, {v['num_warps']} warps"
               for name, vs in recorder.variants.items() for h, v in vs.items()
               if v["shared_bytes"] > MAX_SHARED[args.arch] or v["num_warps"] * 32 > 1024
               or v.get("registers", 0) * v["num_warps"] * 32 > REGISTERS_PER_BLOCK]
    report = {"arch": args.arch, "triton": triton.__version__, "seconds": round(time.perf_counter() - start, 1), "runs": runs,
              "kernels": {n: {"launches": recorder.launches[n], "variants": list(recorder.variants[n].values())} for n in sorted(recorder.variants)},
              "never_launched": sorted(expected - set(recorder.variants)), "too_big": too_big}
    for name, facts in report["kernels"].items():
        shared = max(v["shared_bytes"] for v in facts["variants"])
        regs = max((v.get("registers", 0) for v in facts["variants"]), default=0)
        spills = max((v.get("spill_bytes", 0) for v in facts["variants"]), default=0)
        print(f"{name:<24} {len(facts['variants']):>3} variants, {facts['launches']:>5} launches, max shared {shared:>6} B, "
              f"max {regs:>3} registers, spills {spills} B")
    print(f"sm_{args.arch}, triton {triton.__version__}, {report['seconds']} s; never launched: {report['never_launched'] or 'none'}; "
          f"over the GPU's limits: {too_big or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if report["never_launched"] or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
