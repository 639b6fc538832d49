"""Host cost of a decode step: our step beside transformers' `generate()` step, one run.

On a micro checkpoint (hidden 64, 2 layers) the model's FLOPs are negligible, so what a step
costs is framework: scheduling, building step inputs, sampling, bookkeeping. That is the cost a
GPU pays on top of its 0.73 ms weight-read floor for a 2B model, and it can be measured here.
(How each choice below came about, and what it replaced: benchmarks/RESULTS.md, stops 13-22.)

What is timed, for each batch size:
- our step: `Engine.step()` over decode steps only, inside one inference mode (as `Engine.embed`
  and tte-serve's loop run them), plus the tokens' writes into their sequences, which a decode
  batch defers to when a trace ends (timed after the steps, spread evenly over them);
- the forward inside it: `Qwen2VL.decode_logits` (embedding, layers, final norm, LM head: what
  transformers' `forward` computes), the only timer in the timed steps (each timer costs ~1-3 us);
- framework share: the median over steps of step - forward (scheduling, step inputs, attention's
  plan, suppression, argmax, readback, bookkeeping); the difference of the two medians is printed
  beside it;
- transformers' step: inside `generate()`, from one forward call to the next (`_hf_step_seconds`),
  measured before each block of STEPS of our steps and over the same trace positions (so the same
  context lengths); the speedup is the lower of the median of the blocks' ratios and the ratio of the two medians.
Further figures come from BREAKDOWN_STEPS steps after the timed ones, with a timer on each part
(`_breakdown`): the host work outside the device step (step - `Runner.decode_forward` -
`HostDecodePlan.step`, the CPU engine's numpy stand-in for device work: what is left when a CUDA
graph replays the rest), the step beside the decoder alone, the host's own work with the device
step stubbed out (`_stubbed_host_seconds`, warm caches, as a GPU host's), and the same for the
CUDA-graph path's host code (`_graph_path_host_seconds`: `cuda_graphs=True`, replay stubbed; not
measured under `--enforce-eager`).

Clock: thread CPU time with one torch thread, for both engines, so a shared machine's other load
counts less; both run in inference mode. Targets (reported, never asserted): ours >= 2x faster than
generate() per step at batch 1 and 64, framework <= 50 us at batch 1 and <= 300 us at batch 256.
Those two are absolute, so they scale with the machine: on the shared 2-core VM of RESULTS.md the
whole step, forward included, runs up to ~2.5x slower in its slow spells (forward 0.41 ms at batch
1 at its normal speed, 0.8-1.0 ms in those), and the framework share with it; the share is also
printed as a percentage of the step, which does not scale.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import replace

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from conftest import verdict
from tte_engine import Engine, SamplingParams
from tte_engine.kernels.attention import HostDecodePlan
from tte_engine.random_checkpoint import SPECS, build_random_checkpoint, never_stop
from tte_engine.scheduler import SUFFIX_WAIT_WITH_GRAPHS

# pytest-benchmark's table on the clock our figures use (thread CPU time, one torch thread): in wall
# time it counted the other load of a shared machine, and disagreed with the printed figures
pytestmark = pytest.mark.benchmark(timer=time.thread_time)
STEPS = 24  # decode steps timed per block
ROUNDS = 5  # blocks, each after a measurement of transformers' step (interleaved: see between_steps)
WARMUP = 2  # untimed steps first
STUBBED_STEPS = 24  # then steps timed with the device step stubbed out (the host's own cost, warm)
BREAKDOWN_STEPS = 24  # then steps with a timer on each part (`_breakdown`)
SPEEDUP_TARGETS = {1: [2.0], 64: [2.0]}  # issue 8, vs transformers' generate() per step
FRAMEWORK_TARGETS_US = {1: [50], 256: [300]}  # issue 8, step - forward


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    spec = replace(SPECS["tiny-random"], hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   mrope_section=(2, 3, 3), head="last_token", think_max_tokens=STEPS + 8)
    return never_stop(build_random_checkpoint(tmp_path_factory.mktemp("micro"), spec, seed=0))


def _texts(n: int) -> list[str]:
    return [f"query number {i}: a short text to think about" for i in range(n)]


class _ForwardTimer:
    """Wraps a method (default: a model's forward; of an object, or of a class) to record the thread CPU seconds spent inside each call."""

    def __init__(self, model, name: str = "forward"):
        self.model, self.name, self.real, self.seconds = model, name, getattr(model, name), []

    def __call__(self, *args, **kwargs):
        start = time.thread_time()
        out = self.real(*args, **kwargs)
        self.seconds.append(time.thread_time() - start)
        return out

    def __get__(self, obj, objtype=None):  # wrapping a class's method: bind the instance
        return self if obj is None else functools.partial(self, obj)

    def __enter__(self):
        setattr(self.model, self.name, self)
        return self

    def __exit__(self, *exc):
        setattr(self.model, self.name, self.real)


def _start_decoding(engine: Engine, batch: int) -> list[list[int]]:
    """Admit `batch` texts and prefill them, so every following step is a pure decode step; returns the prompts."""
    seqs = [engine.make_sequence(t, i, max_trace_tokens=STEPS * ROUNDS + BREAKDOWN_STEPS + STUBBED_STEPS + 8) for i, t in enumerate(_texts(batch))]
    for seq in seqs:
        engine.add_request(seq)
    while any(s.needs_prefill for s in engine.scheduler.running[0]) or engine.scheduler.waiting[0]:
        engine.step()
    return [list(s.prompt.token_ids) for s in seqs]


def _hf_model(checkpoint):
    return Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


@torch.no_grad()
def _hf_generate(model, prompts: list[list[int]], new_tokens: int, suppress: list[int], **options) -> torch.Tensor:
    """generate() over left-padded prompts, exactly `new_tokens` new ones; `options`: its sampling
    arguments (default greedy)."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=0, suppress_tokens=suppress, **(options or dict(do_sample=False)))
    return out[:, width:]


def _hf_step_seconds(model, prompts: list[list[int]], suppress: list[int], first: int, steps: int = STEPS, **options) -> float:
    """transformers' time per decode step now, over the contexts our block of steps has: inside
    `generate()` run for first + steps + 1 new tokens (`options`: its sampling arguments), the
    median of its decode steps first .. first + steps - 1 (its decode step i runs on the prompt + i tokens), each step timed
    from the start of its forward call to the start of the next (the whole loop: forward, logits
    processors, the choice, stopping criteria, the cache's growth), as our steps are timed; the
    faster of two runs (they favour transformers, whose time is the numerator of our ratio).
    (Not the slope of two whole generate() runs of different lengths: their difference let one
    disturbed run swing a block's ratio from 0.1 to 3.6 on this VM.)"""
    stamps: list[float] = []
    hook = model.register_forward_pre_hook(lambda module, args: stamps.append(time.thread_time()))
    try:
        medians = []
        for _ in range(2):
            stamps.clear()
            _hf_generate(model, prompts, first + steps + 1, suppress, **options)
            assert len(stamps) == first + steps + 1, "one forward call per new token"
            # stamps[0]: the prefill's forward; stamps[i]: decode step i's
            medians.append(statistics.median(b - a for a, b in zip(stamps[first : first + steps], stamps[first + 1 : first + steps + 1])))
    finally:
        hook.remove()
    return min(medians)


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_bench_decode_host_cost(benchmark, micro, batch, engine_options):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thread CPU time then covers all the work, and other load on the machine does not count
    try:
        engine = Engine(micro, max_num_seqs=256, cuda_graphs=False)
        hf = _hf_model(micro)
        suppress = engine.prompts.suppressed_ids
        # the two must compute the same thing: greedy traces of the first items agree token for token
        check = engine.embed(_texts(2), max_trace_tokens=8)
        assert _hf_generate(hf, check.prompt_token_ids, 8, suppress).tolist() == check.trace_token_ids

        prompts = _start_decoding(engine, batch)
        _hf_generate(hf, prompts, 4, suppress)  # warm-up
        steps, hf_steps = [], []

        def step():
            start = time.thread_time()
            engine.step()
            steps.append(time.thread_time() - start)

        def between_steps():
            """Untimed, before each of our steps: before each block of STEPS timed steps, transformers'
            step time, so the two sides of each block's ratio are measured seconds apart, under the same load."""
            if len(steps) >= WARMUP and (len(steps) - WARMUP) % STEPS == 0:
                # our next STEPS steps compute trace tokens 1 + len(steps) on (the prefill sampled the first).
                # generate() runs in the inference mode our steps run in (under only its own no_grad, as a
                # user calls it, its batch-1 step measured ~10% slower, which would flatter our ratio)
                hf_steps.append(_hf_step_seconds(hf, prompts, suppress, first=1 + len(steps)))

        runner = engine.stages[0].runner
        model = runner.model
        # inference mode entered once around our steps, as `Engine.embed` and tte-serve's loop do (and around
        # transformers' generate() between blocks). One timer inside the timed steps: the forward's (each
        # timer costs the step ~1-3 us beside what it times)
        with torch.inference_mode(), _ForwardTimer(model, "decode_logits") as forward:
            benchmark.pedantic(step, setup=between_steps, rounds=STEPS * ROUNDS, iterations=1, warmup_rounds=WARMUP)
        with torch.inference_mode():
            # the steps' tokens reach their sequences later, when a trace ends (`DecodeBatch.flush`): that
            # deferred work, timed now, is added to each step's time, spread evenly over the steps it covers
            batch_steps = engine.scheduler._decoding[0].steps
            start = time.thread_time()
            engine.scheduler.flush()
            deferred_s = (time.thread_time() - start) / batch_steps
            parts = _breakdown(engine, runner)
        engine.scheduler.abort_all()
        # the CUDA-graph path's host work (replay stubbed); not measured under --enforce-eager
        graph_path_s = None if engine_options.get("cuda_graphs") is False else _graph_path_host_seconds(micro, batch)
        timed = [s + deferred_s for s in steps[WARMUP:]]
        step_s = statistics.median(timed)
        forwards = forward.seconds[WARMUP : len(steps)]  # each step's model forward: decoder, final norm, LM head
        forward_s = statistics.median(forwards)
        medians_us = (step_s - forward_s) * 1e6  # the difference of the medians, printed beside the share
        # the median over steps of each step's time less its forward's (see the module docstring)
        framework_us = statistics.median(map(float.__sub__, timed, forwards)) * 1e6
        host_us, beside_decoder_us, stubbed_s = parts["outside_device_us"], parts["beside_decoder_us"], parts["stubbed_s"]
        # each block's ratio: transformers' step just before it / our median step in it; their median
        ratios = [hf / statistics.median(timed[k * STEPS : (k + 1) * STEPS]) for k, hf in enumerate(hf_steps)]
        paired, hf_s = statistics.median(ratios), statistics.median(hf_steps)
        # the headline (and its verdict) is the lower of the paired figure and the ratio of the two
        # medians printed beside it: under a shared machine's drift the two can differ (one full run
        # read 2.68x paired, 1.98x from the medians), and a target is met only if both say so
        speedup = min(paired, hf_s / step_s)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(batch=batch, ours_step_ms=round(step_s * 1e3, 3), forward_ms=round(forward_s * 1e3, 3),
                                framework_us=round(framework_us, 1), framework_us_from_medians=round(medians_us, 1), host_us=round(host_us, 1), host_stubbed_us=round(stubbed_s * 1e6, 1),
                                step_minus_decoder_us=round(beside_decoder_us, 1), graph_path_host_us=None if graph_path_s is None else round(graph_path_s * 1e6, 1),
                                deferred_us=round(deferred_s * 1e6, 1),
                                hf_generate_step_ms=round(hf_s * 1e3, 3),
                                speedup_vs_hf=round(speedup, 2), speedup_paired=round(paired, 2), speedup_from_medians=round(hf_s / step_s, 2), block_ratios=[round(r, 2) for r in ratios], clock="thread_time, 1 thread")
    targets = "".join(f" ({verdict(speedup, t)})" for t in SPEEDUP_TARGETS.get(batch, []))
    share_targets = "".join(f" ({verdict(framework_us, t, ' us', most=True)})" for t in FRAMEWORK_TARGETS_US.get(batch, []))
    graph_path = "not measured (--enforce-eager)" if graph_path_s is None else f"{graph_path_s * 1e6:.0f} us with the replay stubbed"
    # first the figures with targets, then the details (thread CPU time, 1 thread, for both sides)
    print(f"\n[decode B={batch}] ours {step_s * 1e3:.3f} ms/step vs transformers generate() {hf_s * 1e3:.3f} ms/step: {speedup:.2f}x faster{targets};"
          f" framework {framework_us:.0f} us = {framework_us / (step_s * 1e4):.0f}% of the step{share_targets}"
          f"\n  details: forward {forward_s * 1e3:.3f} ms; speedup the lower of {hf_s / step_s:.2f}x (the two medians) and {paired:.2f}x (the"
          f" median of the blocks' ratios: {', '.join(f'{r:.2f}' for r in ratios)}); framework = the median over steps of step - forward"
          f" (the median step - the median forward: {medians_us:.0f} us), of which the tokens' deferred writes {deferred_s * 1e6:.1f} us;"
          f" host work outside the device step {host_us:.0f} us, {stubbed_s * 1e6:.0f} us with it stubbed; step - decoder {beside_decoder_us:.0f} us;"
          f" CUDA-graph path's host work {graph_path}; thread CPU time, 1 thread")


def _breakdown(engine: Engine, runner) -> dict[str, float]:
    """After the timed steps, BREAKDOWN_STEPS more with a timer on each part, so that the timed
    steps carry only the forward's: the host work outside the device step (step -
    `Runner.decode_forward` - `HostDecodePlan.step`), the step beside the decoder alone (step -
    `Qwen2VL.forward`), medians over steps of each step's difference, in us; and `stubbed_s`,
    the host's own work with the device step stubbed out (`_stubbed_host_seconds`)."""
    steps = []
    with (_ForwardTimer(runner.model) as decoder, _ForwardTimer(runner, "decode_forward") as device_step,
          _ForwardTimer(HostDecodePlan, "step") as host_plan):
        for _ in range(BREAKDOWN_STEPS):
            start = time.thread_time()
            engine.step()
            steps.append(time.thread_time() - start)
        devices = list(map(sum, zip(device_step.seconds, host_plan.seconds, strict=True)))
        beside = {name: statistics.median(map(float.__sub__, steps, part)) * 1e6 for name, part in
                  (("outside_device_us", devices), ("beside_decoder_us", decoder.seconds))}
        return beside | {"stubbed_s": _stubbed_host_seconds(engine, runner, host_plan)}


def _graph_path_host_seconds(checkpoint, batch: int) -> float:
    """Median thread seconds per decode step of the host's work on the CUDA-graph path (what a GPU
    host does around each replay: scheduling, the padded fixed-layout inputs, block-table update
    fill, readback, bookkeeping), on an engine with `cuda_graphs=True` whose replay is stubbed
    (it returns a real call's outputs, as `_stubbed_host_seconds`). On CPU the graph path's
    forward runs eagerly over full-width tables, so it is not timed: only the host work is."""
    engine = Engine(checkpoint, max_num_seqs=256, cuda_graphs=True)
    times = []
    with torch.inference_mode(), _replaying_first_call(engine.stages[0].runner.graphs, "replay"):
        _start_decoding(engine, batch)
        engine.step()  # the real call
        for _ in range(STUBBED_STEPS):
            start = time.thread_time()
            engine.step()
            times.append(time.thread_time() - start)
    engine.scheduler.abort_all()
    return statistics.median(times)


@contextlib.contextmanager
def _replaying_first_call(owner, name: str):
    """`owner.<name>` stubbed out: its first call for each first argument (a batch size, a bucket)
    runs for real, and later calls return those outputs again; restored on exit."""
    real, outputs = getattr(owner, name), {}

    def stub(first, *args, **kwargs):
        if first not in outputs:
            outputs[first] = real(first, *args, **kwargs)
        return outputs[first]

    setattr(owner, name, stub)
    try:
        yield
    finally:
        setattr(owner, name, real)


def _stubbed_host_seconds(engine: Engine, runner, host_plan: _ForwardTimer) -> float:
    """Median thread seconds per decode step of the host's own work, with the device step
    (`Runner.decode_forward`) stubbed out: it returns the outputs of a real call made first, so the
    forward neither runs nor evicts the host code and data from the CPU caches between steps, as on
    a GPU, whose host replays a graph and waits. The CPU engine's host-side attention plan
    (`host_plan`'s calls, a stand-in for device work) is subtracted, as in "outside the device step".
    This is the closer estimate of what a GPU host adds to each graph replay; the in-step figures
    pay a cold cache after every forward (on this VM the same host code runs 3-7x slower right
    after a forward than in a loop)."""
    with _replaying_first_call(runner, "decode_forward"):
        engine.step()  # the real call
        times = []
        for _ in range(STUBBED_STEPS):
            plans = len(host_plan.seconds)
            start = time.thread_time()
            engine.step()
            times.append(time.thread_time() - start - sum(host_plan.seconds[plans:]))
    return statistics.median(times)


VARIED_BATCH = 192  # sequences in the varied-traces run
VARIED_BUDGETS = (8, 64)  # each trace's budget is drawn uniformly from this range (the uniform run: their mean)


def test_bench_decode_varied_traces(benchmark, micro):
    """What traces of different lengths cost: as traces end, their embed suffixes are prefilled in
    steps that also decode the others (mixed steps), where a run of equal traces has pure decode
    steps. Reports our time per trace token with budgets drawn from VARIED_BUDGETS beside the same
    number of tokens in equal traces, in the same run, and how many steps were mixed: with each
    suffix prefilled at the next step (`suffix_wait_steps=0`, a CPU engine's default) and waiting
    up to SUFFIX_WAIT_WITH_GRAPHS steps to be prefilled with others (the default with CUDA graphs).
    A plain measurement (no baseline engine can stop traces at per-item budgets in one batch; no target)."""
    import gpu_e2e as e2e

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    policies = {"at once": 0, "waiting": SUFFIX_WAIT_WITH_GRAPHS}  # suffix_wait_steps
    rows = {name: [] for name in policies}
    try:
        engine = Engine(micro, max_num_seqs=256, cuda_graphs=False, enable_prefix_caching=False)
        prompts = _texts(VARIED_BATCH)
        e2e.varied_traces(engine, prompts[:8], VARIED_BUDGETS)  # warm-up

        def both():
            for name, wait in policies.items():
                rows[name].append(e2e.varied_traces(engine, prompts, VARIED_BUDGETS, clock=e2e.ThreadClock(), suffix_wait_steps=wait))

        benchmark.pedantic(both, rounds=3, iterations=1)
    finally:
        torch.set_num_threads(threads)
    report = {}
    for name, runs in rows.items():
        assert all(row[kind]["full_traces"] for row in runs for kind in ("varied", "equal"))  # never_stop: every trace runs to its budget
        per_token = {kind: statistics.median(row[kind]["ms_per_trace_token"] for row in runs) * 1e3 for kind in ("varied", "equal")}  # us
        mixed = {kind: (runs[-1][kind]["steps"], runs[-1][kind]["steps"] - runs[-1][kind]["pure_decode_steps"]) for kind in ("varied", "equal")}
        report[name] = {"suffix_wait_steps": runs[-1]["suffix_wait_steps"], "us_per_token": per_token, "steps_and_mixed": mixed}
        print(f"\n[decode varied traces, B={VARIED_BATCH}, suffixes {name} (suffix_wait_steps={runs[-1]['suffix_wait_steps']})]"
              f" {per_token['varied']:.1f} us per trace token with budgets {VARIED_BUDGETS[0]}-{VARIED_BUDGETS[1]}"
              f" ({mixed['varied'][0]} steps, ~{mixed['varied'][1]} of them with prefill rows) vs {per_token['equal']:.1f} us with equal budgets"
              f" ({mixed['equal'][0]} steps, ~{mixed['equal'][1]} with prefill rows): x{per_token['varied'] / per_token['equal']:.2f}"
              f" (thread CPU time, 1 thread; no target)")
    benchmark.extra_info.update(batch=VARIED_BATCH, budgets=VARIED_BUDGETS, policies=report, clock="thread_time, 1 thread")


SAMPLED_STEPS = 12  # decode steps timed per mode in the sampled-decoding benchmark
REAL_VOCAB = 151_936  # Qwen2-VL's vocabulary (config.json `vocab_size`): what a sampling pass covers per row
SAMPLING_MODES = {  # (our SamplingParams, transformers' generate() sampling arguments)
    "greedy": (None, dict(do_sample=False)),
    "temperature 0.7": (SamplingParams(temperature=0.7, seed=1), dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0)),
    "temperature 0.7, top_p 0.9": (SamplingParams(temperature=0.7, top_p=0.9, seed=1),
                                   dict(do_sample=True, temperature=0.7, top_k=0, top_p=0.9)),
}


@pytest.fixture(scope="module")
def micro_real_vocab(tmp_path_factory):
    """The micro model with Qwen2-VL's real vocabulary: sampling's passes over the logits then cost what they cost on the real model."""
    spec = replace(SPECS["tiny-random"], hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   mrope_section=(2, 3, 3), head="last_token", vocab_size=REAL_VOCAB, think_max_tokens=SAMPLED_STEPS + 8)
    return never_stop(build_random_checkpoint(tmp_path_factory.mktemp("micro-vocab"), spec, seed=0))


@pytest.mark.parametrize("batch", [1, 16])
def test_bench_decode_sampled(benchmark, micro_real_vocab, batch):
    """What sampling adds to a decode step at the real vocabulary (151,936 ids): our time per decode
    step greedy, with temperature alone and with temperature and top-p, beside transformers'
    generate() with the same settings in the same run (its median decode step, as in the host-cost
    benchmark). The micro model's forward is small, so the sampling pass over [B, 151,936] logits is
    most of a sampled step here: on the real 2B model it adds the same seconds to a much larger
    forward. Thread CPU time, one thread. A plain report (no target)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report = {}
    try:
        engine = Engine(micro_real_vocab, max_num_seqs=max(batch, 2), cuda_graphs=False, enable_prefix_caching=False)
        hf = _hf_model(micro_real_vocab)
        suppress = engine.prompts.suppressed_ids

        def run_all():
            for name, (params, options) in SAMPLING_MODES.items():
                seqs = [engine.make_sequence(t, i, max_trace_tokens=SAMPLED_STEPS + 4, sampling=params) for i, t in enumerate(_texts(batch))]
                for seq in seqs:
                    engine.add_request(seq)
                while any(s.needs_prefill for s in engine.scheduler.running[0]) or engine.scheduler.waiting[0]:
                    engine.step()
                times = []
                for _ in range(SAMPLED_STEPS):
                    start = time.thread_time()
                    engine.step()
                    times.append(time.thread_time() - start)
                engine.scheduler.abort_all()
                prompts = [list(s.prompt.token_ids) for s in seqs]
                hf_s = _hf_step_seconds(hf, prompts, suppress, 2, SAMPLED_STEPS, **options)
                report.setdefault(name, []).append((statistics.median(times), hf_s))

        benchmark.pedantic(run_all, rounds=2, iterations=1)
    finally:
        torch.set_num_threads(threads)
    greedy_ms = statistics.median(ours for ours, _ in report["greedy"]) * 1e3
    lines, info = [], {}
    for name, runs in report.items():
        ours_ms = statistics.median(ours for ours, _ in runs) * 1e3
        hf_ms = statistics.median(hf for _, hf in runs) * 1e3
        info[name] = dict(ours_ms=round(ours_ms, 3), hf_generate_ms=round(hf_ms, 3), ratio_to_greedy=round(ours_ms / greedy_ms, 2))
        lines.append(f"{name}: ours {ours_ms:.2f} ms/step (x{ours_ms / greedy_ms:.2f} greedy's) vs generate() {hf_ms:.2f} ms: {hf_ms / ours_ms:.2f}x")
    benchmark.extra_info.update(batch=batch, vocab=REAL_VOCAB, modes=info, clock="thread_time, 1 thread")
    print(f"\n[decode sampled B={batch}, vocab {REAL_VOCAB:,}] " + "; ".join(lines) + " (thread CPU time, 1 thread; no target)")
