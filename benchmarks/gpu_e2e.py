"""End-to-end measurements of DESIGN §6's workload, each beside transformers' naive pipeline.

The parts `benchmarks/gpu_one_call.py` runs (and this script runs alone, see `main`):

- **Decode ms/step** (`engine_decode`): B text queries of ~`prompt_tokens` tokens (the length of
  §6's 448x448 image + 48-token query) are admitted with `make_sequence`/`add_request` and
  prefilled with `step()` until every one is decoding; after `warmup` steps, `steps` consecutive
  `Engine.step()` calls are timed between two CUDA events (perf_counter on a CPU dry run). Each
  step ends with the sampled tokens' readback, so the time covers the host's work too. The steps
  are checked to be pure decode steps (each sequence gained exactly `steps` tokens, none left
  the think phase). Graphs on and off are separate engines (`cuda_graphs=True/False`).
- **The weight-read floor** (`llm_weight_bytes`): the bytes of the language model's weights a
  decode step must read (layers, final norm, LM head = tied embeddings; not the vision tower or
  the embedding head), over the measured copy bandwidth (read + write bytes per second).
- **transformers' decode ms/step** (`naive_decode`): the same prompts through the naive
  pipeline's model and `generate()` (greedy, suppressed ids, left padding); per-step time is the
  slope between `short` and `long` new tokens, so its prefill cancels out.
- **TTE query latency and throughput** (`engine_embed`, `naive_embed`): `Engine.embed` of B
  image + text queries (§6: 448x448 image, ~48 text tokens, `trace` generated tokens, stop tokens
  demoted so every trace runs its budget), wall time from the call to the CPU embeddings, best
  of `reps` after a warm-up. The naive pipeline (generate, then a second full forward) runs with a
  shorter trace budget and is extrapolated per step: t(trace) = t(long) + (trace - long) x
  (t(long) - t(short)) / (long - short); both measured points are kept in the result.
- **Parity** (`graph_parity`): on a small random checkpoint, 5 items run with graphs on and off,
  their trace budgets ending them at different steps so the batch shrinks through buckets 8, 4,
  2 and 1 (on CUDA the graphed engine must really have captured). In fp32 it is strict: greedy traces
  and seeded sampled traces (temperature 0.8, top_p 0.9) identical, cosine >= 0.99999 for every
  item. In bf16 trace equality is informational (`traces_identical`, `first_divergence`), not a
  failure: eager and graphed steps use different decode-attention split counts and GEMM row
  counts (the graph buckets pad the batch), so in bf16 a near-tie between two logits of a random
  tiny model can flip a token and every later one, with no bug anywhere; a bf16 run passes when it
  captured and every item whose greedy traces are identical has cosine >= 0.999 (an item whose
  trace diverged embeds different tokens, so its cosine says nothing about the graphs).
  `agreement` compares the engine with the naive pipeline.

    python benchmarks/gpu_e2e.py --out e2e.json                                   # on a CUDA machine
    python benchmarks/gpu_e2e.py --device cpu --spec tiny --batches 1,2 --out /tmp/e2e.json  # dry run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import synthetic_image  # noqa: E402
from naive_pipeline import NaivePipeline  # noqa: E402

from tte_engine import Engine, SamplingParams  # noqa: E402
from tte_engine.random_checkpoint import SPECS, RandomSpec, build_random_checkpoint  # noqa: E402
from tte_engine.sequence import Phase  # noqa: E402

QWEN2VL_2B = RandomSpec(
    hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2, mrope_section=(16, 24, 24),
    vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vision_mlp_ratio=4, max_position_embeddings=32768,
    min_pixels=56 * 56, max_pixels=28 * 28 * 1280, head="last_token", tie_word_embeddings=True, vocab_size=151936,
)
TINY = replace(SPECS["tiny-random"], head="last_token")
QUESTION = ("Look at the picture carefully and describe the main objects, their colors, their positions relative to each "
            "other, and anything unusual about the scene in detail")
PARITY_COSINE = {torch.float32: 0.99999, torch.bfloat16: 0.999}


# ---------------------------------------------------------------------------------------------- setup
def ensure_checkpoint(workdir, spec_name: str, dtype: str, *, stop: bool = False, head: str = "last_token") -> Path:
    """A random checkpoint under `workdir` (built once; `stop=False` demotes the stop tokens so
    every trace runs its full budget). A marker file says the build, demotion included, finished."""
    spec = replace(QWEN2VL_2B if spec_name == "2b" else TINY, head=head)
    path = Path(workdir) / f"{spec_name}-{head}-{dtype}{'' if stop else '-nostop'}"
    marker = path / ".complete"
    if not marker.exists():
        build_random_checkpoint(path, spec, seed=0, dtype=dtype, stop=stop)  # stop=False: never_stop's weights, written once
        marker.write_text("ok")
    return path


def make_engine(path, device: str, dtype: str, *, graphs: bool, max_num_seqs: int, cache_memory: int | None = None,
                max_model_len: int | None = None) -> tuple[Engine, dict]:
    """An engine and what its start cost and captured: seconds, graph buckets, why it runs eagerly."""
    start = time.perf_counter()
    extra = {} if cache_memory is None else {"cache_memory": cache_memory}
    engine = Engine(path, device=device, dtype=dtype, cuda_graphs=graphs, max_num_seqs=max_num_seqs, max_model_len=max_model_len, **extra)
    sync(device)
    runner = engine.stages[0].runner  # a failed capture leaves no graphs and says why (`graphs_eager_reason`)
    info = {"start_s": round(time.perf_counter() - start, 2), "graphs": graphs, "max_model_len": engine.max_model_len,
            "captured_buckets": sorted(runner.graphs.graphs) if runner.graphs is not None else [], "eager_reason": runner.graphs_eager_reason}
    return engine, info


def make_naive(engine: Engine, path, device: str, dtype: str) -> NaivePipeline:
    p = engine.prompts
    return NaivePipeline(path, think_start=engine.tte.think.start, suffix_ids=p.suffix_ids, stop_ids=p.think_end_ids + p.eos_ids,
                         suppress_ids=p.suppressed_ids, instruction=engine.tte.instructions["default"], device=device,
                         dtype=getattr(torch, dtype))


def free() -> None:
    """Return the memory of models and caches the caller has dropped (`del`) to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class DeviceClock:
    """Milliseconds between start() and stop(): CUDA events on a GPU (the device's own timeline),
    perf_counter elsewhere. stop() synchronizes."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self.a.record()
        else:
            self.t = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b)
        return (time.perf_counter() - self.t) * 1e3


class ThreadClock:
    """Milliseconds of this thread's CPU time between start() and stop() (CPU benchmarks on a shared
    machine: other processes' load does not count)."""

    def start(self) -> None:
        self.t = time.thread_time()

    def stop(self) -> float:
        return (time.thread_time() - self.t) * 1e3


def llm_weight_bytes(engine: Engine) -> int:
    """Bytes of the weights one decode step reads: the language model (tied embeddings counted
    once, as the LM head), not the vision tower or the embedding head."""
    model = engine.stages[0].runner.model
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if not name.startswith(("visual.", "head.")))


def decode_prompts(engine: Engine, count: int, prompt_tokens: int) -> list[str]:
    """`count` distinct texts whose prompts hold about `prompt_tokens` tokens on this engine."""
    base = len(engine.make_sequence("query 0:").prompt.token_ids)
    per = max(1, len(engine.make_sequence("query 0: " + QUESTION).prompt.token_ids) - base)
    reps = max(1, round((prompt_tokens - base) / per))
    return [f"query {i}: " + " ".join([QUESTION] * reps) for i in range(count)]


def tte_items(count: int, image: int) -> list[dict]:
    return [{"text": QUESTION, "image": synthetic_image(image, image, i)} for i in range(count)]


# ---------------------------------------------------------------------------------------------- decode
@contextmanager
def decoding(engine: Engine, prompts: list[str], batch: int, *, warmup: int, budget: int):
    """`batch` sequences admitted, prefilled and stepped `warmup` times, so the next `Engine.step()`
    calls are pure decode steps (each trace may run `budget` more tokens); aborted on exit. Mixed
    steps are off while prefilling: a sequence prefilled early would otherwise decode during the
    later prefill steps and spend its trace budget before the timed steps end."""
    seqs = [engine.make_sequence(p, i, max_trace_tokens=warmup + budget + 8) for i, p in enumerate(prompts[:batch])]
    for seq in seqs:
        engine.add_request(seq)
    mixed, engine.scheduler.mixed_steps = engine.scheduler.mixed_steps, False
    try:
        prefill_steps = 0
        while any(s.needs_prefill for s in seqs):
            engine.step()
            prefill_steps += 1
            if prefill_steps > 10_000:
                raise RuntimeError("prefill did not finish")
        engine.scheduler.mixed_steps = mixed
        for _ in range(warmup):
            engine.step()
        yield seqs
    finally:
        engine.scheduler.mixed_steps = mixed
        engine.scheduler.abort_all()


def engine_decode(engine: Engine, prompts: list[str], batch: int, *, warmup: int = 4, steps: int = 32) -> dict:
    """ms per pure decode step at `batch` (see the module docstring); also the tokens each sequence
    generated, so two engines' traces can be compared."""
    with decoding(engine, prompts, batch, warmup=warmup, budget=steps) as seqs:
        engine.scheduler.flush()  # mid-trace, a decoding sequence's tokens lag until flushed (DecodeBatch)
        before = [len(s.trace_ids) for s in seqs]
        clock = DeviceClock(engine.device)
        clock.start()
        for _ in range(steps):
            engine.step()
        ms = clock.stop()
        engine.scheduler.flush()
        pure = all(len(s.trace_ids) - b == steps and s.phase == Phase.THINK for s, b in zip(seqs, before))
        tokens = [list(s.trace_ids) for s in seqs]
        context = sum(len(s) for s in seqs) / batch
    if not pure:
        raise RuntimeError(f"B={batch}: the timed steps were not all pure decode steps (a trace ended or a prefill ran)")
    return {"batch": batch, "ms_per_step": round(ms / steps, 4), "steps": steps, "warmup": warmup,
            "mean_context_tokens": round(context, 1), "tokens": tokens}


def profile_decode(engine: Engine, prompts: list[str], batch: int, *, steps: int = 8, table: Path | None = None) -> dict:
    """torch.profiler over `steps` pure decode steps at `batch`: per step, the host's wall time
    (perf_counter around the steps), the device time its kernels ran, and how many kernels
    launched; the top ops by device and by host time go to `table` (text) when given. Where the
    decode step loses time to its floor: host-bound steps show host ms >> kernel ms."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(engine.device).type == "cuda" else [])
    with decoding(engine, prompts, batch, warmup=3, budget=steps) as _seqs:
        sync(engine.device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            sync(engine.device)
            wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in kernels)
    out = {"batch": batch, "steps": steps, "wall_ms_per_step": round(wall * 1e3 / steps, 4),
           "kernel_ms_per_step": round(device_us / 1e3 / steps, 4),
           "kernels_per_step": round(sum(e.count for e in kernels) / steps, 1)}
    if table is not None:
        parts = [f"decode B={batch}, {steps} steps: {out}"]
        for key in ("self_device_time_total", "self_cpu_time_total"):
            try:
                parts.append(f"--- sorted by {key}\n" + events.table(sort_by=key, row_limit=30, max_name_column_width=70))
            except Exception as exc:  # noqa: BLE001 - a table the profiler cannot sort this way is left out
                parts.append(f"--- sorted by {key}: {type(exc).__name__}: {exc}")
        with open(table, "a") as f:
            f.write("\n".join(parts) + "\n\n")
    return out


def naive_generate_ms(naive: NaivePipeline, prompts: list[str], new_tokens: int) -> float:
    """Wall ms of the naive pipeline's `generate()` (prefill + new_tokens greedy steps, no early stop)."""
    ids, images = zip(*(naive._prompt(p) for p in prompts))
    batch = naive._batch(list(ids), list(images))
    clock = DeviceClock(naive.device)
    clock.start()
    with torch.no_grad():
        naive.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             suppress_tokens=naive.suppress_ids, pad_token_id=naive.pad_id)
    return clock.stop()


def naive_decode(naive: NaivePipeline, prompts: list[str], batch: int, *, short: int = 4, long: int = 20) -> dict:
    """transformers' ms per decode step at `batch`: the slope of generate() between `short` and `long` new tokens."""
    t_short = naive_generate_ms(naive, prompts[:batch], short)
    t_long = naive_generate_ms(naive, prompts[:batch], long)
    slope = (t_long - t_short) / (long - short)
    return {"batch": batch, "ms_per_step": round(slope, 4) if slope > 0 else None,  # None: noise swamped the slope
            "generate_ms": {short: round(t_short, 2), long: round(t_long, 2)}}


def varied_traces(engine: Engine, prompts: list[str], budgets: tuple[int, int], seed: int = 0, clock=None,
                  suffix_wait_steps: int | None = None) -> dict:
    """Traces that end at different lengths (budgets drawn uniformly from `budgets`) beside equal
    ones of the same total tokens: ms per trace token of a whole run (prefill included, the same
    prompts; `clock`, default the device's wall clock, `DeviceClock`), how many of its steps were
    pure decode steps (the CUDA-graph path) rather than mixed with the embed suffixes of traces that
    just ended (eager), and whether every trace ran to its budget. `suffix_wait_steps`: the
    scheduler's for these runs (None: the engine's, `EngineConfig.suffix_wait_steps`)."""
    import random

    rng = random.Random(seed)
    varied = [rng.randint(*budgets) for _ in prompts]
    runs = {"varied": varied, "equal": [round(sum(varied) / len(varied))] * len(prompts)}
    runner, pure = engine.stages[0].runner, {"n": 0}
    real, wait = runner._run_decode, engine.scheduler.suffix_wait_steps

    def counted(decode):
        pure["n"] += 1
        return real(decode)

    runner._run_decode = counted
    engine.scheduler.suffix_wait_steps = wait if suffix_wait_steps is None else suffix_wait_steps
    out: dict = {"batch": len(prompts), "budgets": list(budgets), "suffix_wait_steps": engine.scheduler.suffix_wait_steps}
    try:
        for name, lens in runs.items():
            engine.reset_prefix_cache()  # each run computes its prompts: the other run's cached blocks would flatter it
            seqs = [engine.make_sequence(p, i, max_trace_tokens=b) for i, (p, b) in enumerate(zip(prompts, lens))]
            for seq in seqs:
                engine.add_request(seq)
            before, steps = pure["n"], 0
            timer = clock or DeviceClock(engine.device)
            timer.start()
            while engine.has_unfinished():
                engine.step()
                steps += 1
            ms = timer.stop()
            tokens = sum(len(s.trace_ids) for s in seqs)
            out[name] = {"ms_per_trace_token": round(ms / tokens, 5), "ms": round(ms, 1), "trace_tokens": tokens,
                         "steps": steps, "pure_decode_steps": pure["n"] - before,
                         "full_traces": all(len(s.trace_ids) == b for s, b in zip(seqs, lens))}
    finally:
        del runner._run_decode  # the class's method again
        engine.scheduler.suffix_wait_steps = wait
    out["varied_vs_equal"] = round(out["varied"]["ms_per_trace_token"] / out["equal"]["ms_per_trace_token"], 2)
    return out


# ---------------------------------------------------------------------------------------------- TTE queries
def engine_embed(engine: Engine, items: list, trace: int, reps: int = 2) -> dict:
    """Best wall seconds of `Engine.embed(items)` with `trace`-token traces, after a warm-up. Each
    timed call starts cold (prefix cache and kept vision-tower outputs emptied): the naive
    pipeline keeps nothing from call to call, and the warm-up's blocks would otherwise spare the
    timed calls the vision tower and most of the prefill."""
    res = engine.embed(items, max_trace_tokens=trace)
    full = all(len(t) == trace for t in res.trace_token_ids)
    best = float("inf")
    for _ in range(reps):
        engine.reset_prefix_cache()
        sync(engine.device)
        start = time.perf_counter()
        engine.embed(items, max_trace_tokens=trace)
        best = min(best, time.perf_counter() - start)
    return {"batch": len(items), "seconds": round(best, 4), "queries_per_s": round(len(items) / best, 3),
            "trace": trace, "full_traces": full}


def naive_embed(naive: NaivePipeline, items: list, trace: int, *, short: int, long: int, warmup: bool = True) -> dict:
    """The naive pipeline at `short` and `long` trace tokens, extrapolated per step to `trace`
    (warmup: one untimed call first; the first batch of a series needs it, the others not)."""
    if warmup:
        naive(items, short)
    times, full = {}, True
    for n in sorted({short, long}):
        sync(naive.device)
        start = time.perf_counter()
        _, traces = naive(items, n)
        sync(naive.device)
        times[n] = time.perf_counter() - start
        full = full and all(len(t) == n for t in traces)
    per_step = (times[long] - times[short]) / (long - short) if long > short else 0.0
    seconds = times[long] + (trace - long) * per_step
    return {"batch": len(items), "seconds": round(seconds, 4), "queries_per_s": round(len(items) / seconds, 3),
            "trace": trace, "measured_s": {n: round(t, 4) for n, t in times.items()}, "per_step_s": round(per_step, 5),
            "extrapolated": long != trace, "extrapolation_unreliable": long != trace and per_step <= 0, "full_traces": full}


def agreement(engine: Engine, naive: NaivePipeline, items: list, trace: int = 8) -> dict:
    """Engine vs naive pipeline on the same items: equal greedy traces and the smallest cosine
    (informational in bf16, where near-tied random logits let greedy traces drift apart)."""
    ours = engine.embed(items, max_trace_tokens=trace)
    ref, ref_traces = naive(items, trace)
    same = [i for i, (a, b) in enumerate(zip(ours.trace_token_ids, ref_traces)) if a == b]
    cos = F.cosine_similarity(ours.embeddings, ref.float().cpu())
    return {"items": len(items), "traces_equal": len(same), "cosine_min": round(float(cos.min()), 6),
            "cosine_min_equal_traces": round(float(cos[same].min()), 6) if same else None}


# ---------------------------------------------------------------------------------------------- parity
PARITY_BUDGETS = (14, 4, 10, 7, 2)  # graph_parity's trace budgets: 5 rows (bucket 8), then 4, 3 (bucket 4), 2, 1


def _run_budgets(engine, items: list, budgets, sampling=None) -> tuple[list[list[int]], torch.Tensor]:
    """(trace ids, embeddings [N, D]) of items run together, item i with a trace budget of budgets[i]."""
    seqs = [engine.make_sequence(item, i, max_trace_tokens=b, sampling=sampling) for i, (item, b) in enumerate(zip(items, budgets))]
    engine.run(seqs)
    return [s.trace_ids for s in seqs], torch.stack([s.embedding for s in seqs])


def graph_parity(workdir, device: str, dtype: str, head: str, budgets=PARITY_BUDGETS, strict_traces: bool | None = None) -> dict:
    """Decode graphs on vs off on a small random checkpoint, same items (text and image+text, 5
    items so buckets are padded), with trace budgets that end the traces at different steps, so
    the decode batch shrinks through buckets 8, 4, 2 and 1. On CUDA the graphed engine must really
    have captured.

    `strict_traces` (default: fp32 only): the greedy and the seeded sampled traces must be
    identical and every item's cosine >= PARITY_COSINE[dtype]. Otherwise (bf16) trace equality is
    reported, not required (`traces_identical`, `first_divergence`: see the module docstring for
    why a bf16 token may flip), but at least half of the items' greedy traces must be identical (a
    near-tie flips a token here and there; a graph path wrong only in bf16 would flip them all, and
    with no identical trace left the cosine bound would check nothing), and the cosine bound applies
    to those items (`cosine_min_identical`, over `cosine_items` items)."""
    strict = dtype == "float32" if strict_traces is None else strict_traces
    path = ensure_checkpoint(workdir, "tiny", "float32", stop=True, head=head)
    items = ["a cat on a chair", {"text": "What is in the picture?", "image": synthetic_image(56, 84, 1)},
             "two dogs play with a ball in the park while a man rides a bicycle along the river",
             {"text": "Describe it.", "image": synthetic_image(112, 56, 2)}, "a table of numbers"]
    cache = 256 << 20  # a tiny model: without it each engine would take 80% of the GPU as cache
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7)  # a sampled graph step samples from the graph's logits buffer
    eager, _ = make_engine(path, device, dtype, graphs=False, max_num_seqs=16, max_model_len=1024, cache_memory=cache)
    (ref, ref_emb), (ref_sampled, _) = _run_budgets(eager, items, budgets), _run_budgets(eager, items, budgets, sampled)
    del eager
    free()
    graphed, info = make_engine(path, device, dtype, graphs=True, max_num_seqs=16, max_model_len=1024, cache_memory=cache)
    (res, res_emb), (res_sampled, _) = _run_budgets(graphed, items, budgets), _run_budgets(graphed, items, budgets, sampled)
    del graphed
    free()
    same = [a == b for a, b in zip(res, ref)]
    sampled_equal = sum(a == b for a, b in zip(res_sampled, ref_sampled))
    identical = all(same) and sampled_equal == len(items)
    cos = F.cosine_similarity(res_emb.float(), ref_emb.float())
    kept = [i for i, s in enumerate(same) if s]
    cos_identical = float(cos[kept].min()) if kept else None
    threshold = PARITY_COSINE[getattr(torch, dtype)]
    captured = bool(info["captured_buckets"]) or torch.device(device).type != "cuda"
    if strict:
        passed = identical and float(cos.min()) >= threshold and captured
    else:  # bf16: most traces identical, and the cosine bound where they are
        passed = captured and 2 * len(kept) >= len(items) and cos_identical is not None and cos_identical >= threshold
    return {"dtype": dtype, "head": head, "items": len(items), "strict_traces": strict,
            "traces_identical": identical, "traces_equal": sum(same), "sampled_traces_equal": sampled_equal,
            "first_divergence": {"greedy": first_divergence(ref, res), "sampled": first_divergence(ref_sampled, res_sampled)},
            "cosine_min": round(float(cos.min()), 7), "cosine_min_identical": None if cos_identical is None else round(cos_identical, 7),
            "cosine_items": len(items) if strict else len(kept), "cosine_threshold": threshold,
            "trace_lengths": [len(t) for t in ref],
            "captured_buckets": info["captured_buckets"], "eager_reason": info["eager_reason"], "passed": passed}


def first_divergence(ref: list[list[int]], res: list[list[int]]) -> dict | None:
    """Where two runs' traces first differ: the first item that differs and the step (token index)
    in it; a trace that is a prefix of the other differs at the shorter one's length. None if all equal."""
    for i, (a, b) in enumerate(zip(ref, res)):
        if a != b:
            step = next((j for j, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
            return {"item": i, "step": step, "tokens": [a[step] if step < len(a) else None, b[step] if step < len(b) else None]}
    return None


def compare_tokens(a: list[list[int]], b: list[list[int]]) -> dict:
    """How many sequences generated identical tokens in two decode runs, and where the first differs."""
    same = sum(x == y for x, y in zip(a, b))
    first = min((next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a, b) if x != y), default=None)
    return {"sequences": len(a), "identical": same, "first_difference_at": first}


# ---------------------------------------------------------------------------------------------- alone
def main(argv=None):
    ap = argparse.ArgumentParser(description="DESIGN §6 end-to-end: decode ms/step and TTE queries, engine vs naive transformers")
    ap.add_argument("--spec", default="2b", choices=["2b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32", help="TTE query batches")
    ap.add_argument("--decode-batches", default="1,8,32,128,256")
    ap.add_argument("--trace", type=int, default=128)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--workdir", default="/tmp/tte_e2e")
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every decode step eager (vLLM's flag)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    path = ensure_checkpoint(args.workdir, args.spec, args.dtype if args.dtype != "float16" else "bfloat16")
    decode_batches = [int(b) for b in args.decode_batches.split(",")]
    engine, info = make_engine(path, args.device, args.dtype, graphs=args.device.startswith("cuda") and not args.enforce_eager,
                               max_num_seqs=max(decode_batches))
    naive = make_naive(engine, path, args.device, args.dtype)
    prompts = decode_prompts(engine, max(decode_batches), 330)
    out = {"engine": info, "decode": [], "queries": []}
    for b in decode_batches:
        ours, theirs = engine_decode(engine, prompts, b), naive_decode(naive, prompts, b)
        ours.pop("tokens")
        out["decode"].append({"ours": ours, "naive": theirs})
        ratio = f"{theirs['ms_per_step'] / ours['ms_per_step']:.1f}x" if theirs["ms_per_step"] else "-"
        print(f"decode B={b:3d}: ours {ours['ms_per_step']:.3f} ms/step  transformers {theirs['ms_per_step']} ms/step  {ratio}", flush=True)
    for b in map(int, args.batches.split(",")):
        items = tte_items(b, args.image)
        ours = engine_embed(engine, items, args.trace)
        theirs = naive_embed(naive, items, args.trace, short=min(8, args.trace), long=min(32, args.trace))
        out["queries"].append({"ours": ours, "naive": theirs})
        print(f"TTE B={b:3d}: ours {ours['seconds']:.3f} s ({ours['queries_per_s']:.2f} q/s)  naive {theirs['seconds']:.3f} s "
              f"({theirs['queries_per_s']:.2f} q/s, extrapolated from {theirs['measured_s']})", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
