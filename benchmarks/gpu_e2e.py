"""End-to-end GPU benchmark: Engine.embed vs the naive transformers pipeline, same model, same run.

DESIGN §6's workload: a Qwen2-VL-2B-sized random model (last-token head, stop tokens demoted
so every trace runs its full budget), each query a 448x448 image + ~48 text tokens, 128-token
traces, batches of 1, 8 and 32. Prints a table (queries/s of both, speedup) and writes JSON.

    python benchmarks/gpu_e2e.py --out e2e.json                       # on a CUDA machine
    python benchmarks/gpu_e2e.py --spec tiny --device cpu --batches 2 # a dry run anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from conftest import never_stop, synthetic_image  # noqa: E402
from naive_pipeline import NaivePipeline  # noqa: E402

from tte_engine import Engine  # noqa: E402
from tte_engine.random_checkpoint import SPECS, RandomSpec, build_random_checkpoint  # noqa: E402

QWEN2VL_2B = RandomSpec(
    hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2, mrope_section=(16, 24, 24),
    vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vision_mlp_ratio=4, max_position_embeddings=32768,
    min_pixels=56 * 56, max_pixels=28 * 28 * 1280, head="last_token", tie_word_embeddings=True, vocab_size=151936,
)
QUESTION = ("Look at the picture carefully and describe the main objects, their colors, their positions relative to each "
            "other, and anything unusual about the scene in detail")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, reps):
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="2b", choices=["2b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--trace", type=int, default=128)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/tte_e2e")
    ap.add_argument("--out", default="e2e.json")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    spec = QWEN2VL_2B if args.spec == "2b" else replace(SPECS["tiny-random"], head="last_token")
    path = Path(args.workdir) / args.spec
    t0 = time.perf_counter()
    if not (path / "tte_config.json").exists():
        never_stop(build_random_checkpoint(path, spec, seed=0, dtype="bfloat16" if args.dtype == "bfloat16" else "float32"))
    print(f"checkpoint ready in {time.perf_counter() - t0:.1f}s: {path}", flush=True)

    engine = Engine(path, device=args.device, dtype=args.dtype)
    p = engine.prompts
    naive = NaivePipeline(path, think_start=engine.tte.think.start, suffix_ids=p.suffix_ids, stop_ids=p.think_end_ids + p.eos_ids,
                          suppress_ids=p.suppressed_ids, instruction=engine.tte.instructions["default"],
                          device=args.device, dtype=getattr(torch, args.dtype))
    items = [{"text": QUESTION, "image": synthetic_image(args.image, args.image, i)} for i in range(max(map(int, args.batches.split(","))))]

    # the two must agree before their speeds mean anything (in bf16 greedy traces may drift apart)
    check = {"prompt_tokens": len(engine.embed(items[:1], think=False).prompt_token_ids[0])}
    same = engine.embed(items[:2], max_trace_tokens=8)
    ref, ref_traces = naive(items[:2], 8)
    check["traces_equal"] = sum(a == b for a, b in zip(same.trace_token_ids, ref_traces))
    check["cosine_min"] = float(F.cosine_similarity(same.embeddings, ref.cpu()).min())
    print("agreement:", check, flush=True)

    rows = []
    for b in map(int, args.batches.split(",")):
        batch = items[:b]
        engine.embed(batch, max_trace_tokens=args.trace)  # warm-up
        t_engine = timed(lambda: engine.embed(batch, max_trace_tokens=args.trace), args.device, args.reps)
        naive(batch, args.trace)
        t_naive = timed(lambda: naive(batch, args.trace), args.device, args.reps)
        row = {"B": b, "engine_s": t_engine, "naive_s": t_naive, "engine_qps": b / t_engine, "naive_qps": b / t_naive,
               "speedup": t_naive / t_engine, "ms_per_decode_step_engine": 1000 * t_engine / args.trace}
        rows.append(row)
        print(f"B={b:3d}  engine {t_engine:7.3f}s ({b / t_engine:7.2f} q/s)  naive {t_naive:7.3f}s ({b / t_naive:6.2f} q/s)  "
              f"speedup {t_naive / t_engine:5.2f}x", flush=True)
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "torch": torch.__version__,
            "spec": args.spec, "dtype": args.dtype, "trace": args.trace, "image": args.image, "agreement": check, "rows": rows}
    Path(args.out).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
