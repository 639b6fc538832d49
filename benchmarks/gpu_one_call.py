"""The GPU check in one call (issue 8 item 5): tests, parity, decode speed, TTE speed, kernels.

On an H100/H200 with torch >= 2.11, triton >= 3.6 and transformers >= 5.17 (nothing optional:
no pyarrow, fastapi or ray is imported), from the repository root, with `.gpu_wheels/` made by
`benchmarks/gpu_wheels.sh` and carried along (Pillow, which the engine needs, and pytest and
hypothesis, which the kernel tests need, installed from it only where the machine lacks them;
Pillow on its own, so that a missing test dependency cannot keep it out):

    python3 -m pip install -q --no-index --find-links .gpu_wheels pillow ;
    python3 -m pip install -q --no-index --find-links .gpu_wheels pytest hypothesis pytest-xdist ;
    python3 -m pip install -q --no-deps --no-build-isolation -e . ; python3 benchmarks/gpu_one_call.py --out $OUT/gpu.json

(the editable install is optional: the driver puts the checkout on sys.path itself, and the kernel
tests run from the repository root; `python3 -m pip` so that the install lands in the interpreter
that runs). The driver itself imports no pytest: without it only the kernel_tests part fails.

and a dry run of every path that does not need CUDA, on any machine (tiny model, small batches):

    python benchmarks/gpu_one_call.py --dry-run --out /tmp/gpu_dry.json

Time. The device call has a hard 6-minute limit that also covers the pip install before this
script (~20-40 s) and the interpreter's exit, so the script's own cap (`--budget-s`, default
310 s on a GPU) is counted from process start, before torch, triton and transformers load (the
imports are the `startup` line of the plan below), not from the first part. Each part runs in its
own try/except under its own time budget (a SIGALRM raises in the part when its budget is spent,
and never past the overall cap), plus whatever the parts before it left unspent of theirs (the
plan's time to that part less the time taken: a required part that runs slow, as a 2B engine's
graph capture may, uses what faster ones saved rather than losing its measurements, and the
plan still bounds the run), so one failing or slow check never stops the others; parts that
need a failed one are skipped and say why, as are parts with no time left. The JSON is rewritten
after every part (a killed run still leaves what it measured), and the run ends with a summary
table and the list of failed or skipped parts (exit status 1 if any).

Order. The parts issue 8 requires are measured beside their baselines in the same run, so each
baseline runs right after the part it is the baseline of, and every required part runs before
any optional one: in a slow run the parts left "out of time" are the optional ones at the end
(`varied_traces`, `kernel_timings`), never a baseline. (Before, `varied_traces` ran before
`decode_eager`, `naive_decode`, `tte_naive` and `agreement`, and the budgets summed to ~595 s
against a 360 s cap counted from the first part.) The worst case, startup plus every part's
budget with kernel_tests overlapping checkpoint, is `planned_s()`: 310 s on a GPU, the cap.
`--part-budget PART=0` skips a part.

Parts, in order, budget on a GPU (what each measures: `gpu_e2e.py` and `gpu_check.py`):
  (startup)          15 s  interpreter, torch/triton/transformers imports (an allowance, measured
                           as `startup_s`).
  checkpoint         80 s  DESIGN §6's Qwen2-VL-2B-sized random model (bf16, stop tokens demoted).
  kernel_tests       80 s  tests/kernels + the GPU-only engine test, compiled on the GPU, in a child
                           process started before the checkpoint build and overlapping it (its
                           80 s count from its start, so the two together take at most 80 s;
                           interpreter-only tests deselected by name); collected before anything
                           is timed.
  copy_bandwidth     10 s  1 GiB device copy (read + write bytes / s): the floor's denominator.
  graph_parity       30 s  tiny model, graphs on vs off: fp32 with the last_token and the mhsa head
                           (strict: identical greedy and seeded sampled traces, cosine >= 0.99999),
                           then bf16 last_token (traces looser: `traces_identical` and
                           `first_divergence` reported, at least half the items' traces
                           identical, cosine >= 0.999 on those). In bf16
                           the eager and the graphed step differ in split counts and padded GEMM
                           rows, so a near-tie in a random model can flip a token without any bug;
                           fp32 keeps the check strict. (The head only runs once a trace ends, so
                           a second bf16 run with the other head would check nothing new.)
  decode_graphs      40 s  2B bf16, cuda_graphs=True: ms per pure decode step at B = 1, 8, 32, 128,
                           256 (CUDA events around `steps` Engine.step() calls after prefill +
                           warm-up), host vs kernel time profiled at the smallest and largest B.
  decode_eager       25 s  its baseline: the same table with cuda_graphs=False, and whether the two
                           engines generated identical tokens (informational in bf16).
  naive_decode       25 s  its other baseline: transformers (the naive pipeline's model, generate())
                           ms/step at the same batches.
  tte_engine         20 s  the graphed engine: TTE query latency at B=1, queries/s at larger batches
                           (448x448 image + ~48 text tokens, 128-token traces); best batch reported.
  tte_naive          25 s  its baseline: the naive pipeline on the same queries, shorter traces
                           extrapolated per step.
  agreement          10 s  engine vs naive pipeline on 2 queries (traces, cosine; informational in bf16).
  -- optional (no target or baseline depends on them) --
  kernel_timings     15 s  every kernel vs its eager reference (gpu_check.py), until its budget ends.
  varied_traces      15 s  the graphed engine: traces ending at different lengths (budgets
                           trace/16..trace) vs equal ones of the same tokens, ms per trace token,
                           and how many steps were pure decode (graphed) rather than mixed with
                           embed suffixes (eager); with the default suffix_wait_steps, then with
                           each suffix prefilled at the next step.

No `--enforce-eager` flag: every run measures both modes, on purpose. Issue 8's graphs-vs-eager
target needs both decode tables from the same run on the same device (decode_graphs, then
decode_eager with cuda_graphs=False), and graph_parity compares the two on the same items; a flag
that turned graphs off would only drop the graphed half of that comparison. A run with no graphs
at all is `gpu_e2e.py --enforce-eager` (vLLM's flag); here `--part-budget PART=0` skips one part.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the overall clock starts at process start, before the heavy imports below

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

# decode_graphs profiles the graphed engine after its capture, and later parts replay its graphs:
# CUPTI's teardown and lazy re-initialization between profiler sessions have crashed processes
# holding CUDA graphs (pytorch#75504; torch sets these two itself for its own graphs, inductor's,
# on CUDA < 12.6). Set before torch loads, for this process and the kernel tests' child.
os.environ.setdefault("DISABLE_CUPTI_LAZY_REINIT", "1")
os.environ.setdefault("TEARDOWN_CUPTI", "0")

import torch  # noqa: E402

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # benchmarks/, and the checkout (no install needed)
import gpu_check  # noqa: E402
import gpu_e2e as e2e  # noqa: E402

TARGETS = {"decode_ms_B1": 1.1, "decode_ms_B256": 2.2, "graphs_vs_eager_B1": 2.5}  # issue 8, reported only

# The parts in the order they run: (name, budget seconds on a GPU, budget on a dry run, required).
# Each baseline right after its counterpart; the optional parts last (see the module docstring).
PARTS = (
    ("checkpoint", 80, 60, True),
    ("kernel_tests", 80, 240, True),  # counted from the child's start, overlapping checkpoint
    ("copy_bandwidth", 10, 15, True),
    ("graph_parity", 30, 120, True),
    ("decode_graphs", 40, 90, True),
    ("decode_eager", 25, 90, True),
    ("naive_decode", 25, 60, True),
    ("tte_engine", 20, 60, True),
    ("tte_naive", 25, 60, True),
    ("agreement", 10, 30, True),
    ("kernel_timings", 15, 60, False),
    ("varied_traces", 15, 60, False),
)
BUDGETS = {name: (gpu, dry) for name, gpu, dry, _ in PARTS}  # name: (budget on a GPU, budget on a dry run)
ORDER = [name for name, *_ in PARTS]
OPTIONAL = [name for name, _, _, required in PARTS if not required]
STARTUP_S = (15, 15)  # allowance for the interpreter and the imports before the first part (GPU, dry)
CAP_S = (310, 900)  # default overall cap from process start: 6 min less the pip install and the exit (GPU); dry


def planned_s(dry: bool = False, overrides: dict[str, float] | None = None, through: str | None = None) -> float:
    """The worst case of a run (to the end of part `through`, default the last one): the startup
    allowance plus every part's budget, kernel_tests and checkpoint counted together as the
    longer of the two (the kernel tests' child overlaps the checkpoint build and its budget counts
    from its own start)."""
    i = 1 if dry else 0
    b = {name: (overrides or {}).get(name, BUDGETS[name][i]) for name in ORDER[: ORDER.index(through or ORDER[-1]) + 1]}
    return STARTUP_S[i] + max(b["checkpoint"], b.get("kernel_tests", 0)) + sum(v for n, v in b.items() if n not in ("checkpoint", "kernel_tests"))


class PartTimeout(BaseException):
    """A part's time is up. Not an Exception, so library code that falls back on errors (CUDA
    graph capture falls back to eager on any Exception) cannot swallow it."""


def _alarm(signum, frame):
    raise PartTimeout("time budget spent")


class Driver:
    """Runs the parts (in ORDER), keeps the report, writes it after each part."""

    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry = out, dry
        self.t0 = T0  # process start: the imports count against the cap
        self.end = self.t0 + budget_s
        self.report: dict = {"parts": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget_s, "dry_run": dry,
                             "startup_s": round(time.monotonic() - self.t0, 1)}
        self.state: dict = {}
        self.overrides: dict[str, float] = {}
        signal.signal(signal.SIGALRM, _alarm)

    def budget(self, name: str) -> float:
        return self.overrides.get(name, BUDGETS[name][1 if self.dry else 0])

    def unspent_s(self, name: str) -> float:
        """Seconds the parts before `name` left unspent of their budgets (the plan's time to here,
        less the time taken): a part may use them, so that a slow required part (a 2B engine's
        CUDA-graph capture compiling every Triton variant, say) is not cut off while faster ones
        finished early. The plan, and so the cap, still bounds the whole run. None for the
        checkpoint and the kernel tests, which overlap and whose child keeps its own timeout."""
        i = ORDER.index(name)
        if i <= ORDER.index("kernel_tests"):
            return 0.0
        planned = planned_s(self.dry, self.overrides, through=ORDER[i - 1])
        return max(0.0, planned - (time.monotonic() - self.t0))

    def run(self, name: str, fn, *, needs: tuple[str, ...] = ()):
        """Run one part: skipped if a part it needs failed, its budget is 0 or no time is left;
        otherwise its result or error is recorded, and whatever happens the next part runs."""
        done = list(self.report["parts"])
        if done and ORDER.index(name) <= ORDER.index(done[-1]):  # the order is the plan (required parts first)
            raise RuntimeError(f"part {name} runs after {done[-1]}: not in ORDER")
        missing = [n for n in needs if not self.report["parts"].get(n, {}).get("ok")]
        left = self.end - time.monotonic()
        if missing:
            return self._record(name, {"ok": False, "skipped": f"needs {', '.join(missing)}"})
        if self.budget(name) <= 0:
            return self._record(name, {"ok": False, "skipped": "budget 0 (--part-budget)"})
        if left < 5:
            return self._record(name, {"ok": False, "skipped": f"out of time ({left:.1f} s left of the overall budget)"})
        unspent = self.unspent_s(name)
        budget = min(self.budget(name) + unspent, left)
        print(f"\n=== {name} (budget {budget:.0f} s" + (f", {unspent:.0f} of them left unspent by the parts before" if unspent >= 1 else "")
              + f", {time.monotonic() - self.t0:.0f} s elapsed)", flush=True)
        start = time.monotonic()
        try:
            signal.setitimer(signal.ITIMER_REAL, budget)
            try:
                result = fn(start + budget)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)  # disarmed before any handler below runs
            entry = {"ok": not (isinstance(result, dict) and result.get("passed") is False), "result": result}
        except PartTimeout:
            entry = {"ok": False, "error": f"timed out after {budget:.0f} s", "traceback": traceback.format_exc(limit=-4)}
        except Exception as exc:  # noqa: BLE001 - a failing part is recorded, and the run goes on
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc(limit=-8)}
        entry["seconds"], entry["budget_s"] = round(time.monotonic() - start, 1), round(budget, 1)
        if not entry["ok"]:
            print(f"--- {name} FAILED: {entry.get('error') or 'check did not pass'}", flush=True)
        return self._record(name, entry)

    def note(self, name: str, result: dict, doing: str) -> None:
        """Write what part `name` measured so far, as a failed entry saying what it is `doing`; the
        part's own record replaces it when it ends. For what a process crash would otherwise lose."""
        self._record(name, {"ok": False, "error": f"did not finish: {doing}", "result": result})

    def _record(self, name: str, entry: dict):
        self.report["parts"][name] = {**entry, "optional": name in OPTIONAL}
        self.report["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.out.write_text(json.dumps(self.report, indent=1, default=str))
        return entry.get("result")


def over_batches(batches: list[int], deadline: float, measure) -> dict:
    """{"rows": measure(b) for each batch, "passed": no batch failed}, while the part's time lasts.
    A batch that fails is recorded with its error and the next one runs; a batch cut off by the
    part's alarm, and every batch after it, is listed as such; what was measured is kept."""
    rows: list[dict] = []
    for b in batches:
        if rows and (rows[-1].get("skipped") or time.monotonic() > deadline - 2):
            rows.append({"batch": b, "skipped": "part budget spent"})
            continue
        try:
            rows.append(measure(b))
        except PartTimeout:
            rows.append({"batch": b, "skipped": "cut off by the part's time budget"})
        except Exception as exc:  # noqa: BLE001 - one batch failing does not lose the others
            rows.append({"batch": b, "error": f"{type(exc).__name__}: {exc}"[:1000]})
            print(f"  B={b:3d}: FAILED {rows[-1]['error']}", flush=True)
    if not any("skipped" not in r and "error" not in r for r in rows):
        raise RuntimeError(f"no batch measured: {rows}")
    return {"rows": rows, "passed": not any("error" in r for r in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the JSON report (rewritten after every part)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, small batches: every path that does not need CUDA")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"overall time budget from process start (default {CAP_S[0]} on a GPU: the device call's 6 minutes "
                         f"less the pip install before it and the exit; {CAP_S[1]} dry)")
    ap.add_argument("--workdir", default="/tmp/tte_gpu_one_call", help="where the random checkpoints are built")
    ap.add_argument("--decode-batches", default=None, help="default 1,8,32,128,256 (dry: 1,2,4)")
    ap.add_argument("--query-batches", default=None, help="TTE query batches, default 1,32,128 (dry: 1,2)")
    ap.add_argument("--part-budget", action="append", default=[], metavar="PART=SECONDS",
                    help="override one part's time budget (repeatable), e.g. kernel_tests=100; 0 skips the part")
    args = ap.parse_args(argv)

    dry = args.dry_run
    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        print("gpu_one_call: no CUDA device here; use --dry-run to exercise the CPU-runnable paths.")
        return 0
    device, dtype, spec = ("cuda", "bfloat16", "2b") if cuda else ("cpu", "bfloat16", "tiny")
    decode_batches = [int(b) for b in (args.decode_batches or ("1,2,4" if dry else "1,8,32,128,256")).split(",")]
    query_batches = [int(b) for b in (args.query_batches or ("1,2" if dry else "1,32,128")).split(",")]
    trace, image = (8, 56) if dry else (128, 448)
    naive_trace = (2, 4) if dry else (8, 32)  # (short, long) trace tokens the naive pipeline runs; extrapolated to `trace`
    decode_steps, decode_warmup = (6, 2) if dry else (32, 4)
    naive_steps = (2, 6) if dry else (4, 20)
    prompt_tokens = 64 if dry else 330  # §6: 448x448 image (256 tokens) + ~48 text + template
    cache_memory = (256 << 20) if dry else (8 << 30)

    driver = Driver(args.out, args.budget_s or CAP_S[1 if dry else 0], dry)
    for item in args.part_budget:
        name, _, seconds = item.partition("=")
        if name not in BUDGETS:
            ap.error(f"--part-budget: unknown part {name!r} (parts: {', '.join(BUDGETS)})")
        driver.overrides[name] = float(seconds)
    rep, st = driver.report, driver.state
    rep["plan"] = {"order": ORDER, "optional": OPTIONAL, "budgets": {n: driver.budget(n) for n in ORDER},
                   "startup_allowance_s": STARTUP_S[1 if dry else 0], "planned_s": planned_s(dry, driver.overrides)}
    rep["config"] = {"device": device, "dtype": dtype, "spec": spec, "decode_batches": decode_batches, "query_batches": query_batches,
                     "trace": trace, "image": image, "naive_trace": naive_trace, "decode_steps": decode_steps,
                     "decode_warmup": decode_warmup, "naive_steps": naive_steps, "prompt_tokens": prompt_tokens,
                     "cache_memory": cache_memory}
    rep["env"] = {"python": platform.python_version(), "torch": torch.__version__,
                  "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"}
    for mod in ("triton", "transformers"):
        try:
            rep["env"][mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            rep["env"][mod] = f"missing ({type(exc).__name__})"
    print(json.dumps(rep["env"]), flush=True)
    print(f"startup {rep['startup_s']} s; plan {rep['plan']['planned_s']:.0f} s (cap {driver.end - driver.t0:.0f} s): "
          + ", ".join(f"{n} {b:g}" + (" (optional)" if n in OPTIONAL else "") for n, b in rep["plan"]["budgets"].items()), flush=True)
    if rep["plan"]["planned_s"] > driver.end - driver.t0:
        print("  note: the budgets add up to more than the cap; the last parts may be skipped", flush=True)
    torch.manual_seed(0)

    # kernel tests in a child process, overlapping the (CPU-bound) checkpoint build; collected before any timing
    tests = None
    if driver.budget("kernel_tests") > 0:
        tests = gpu_check.TestRun(timeout=min(driver.budget("kernel_tests"), driver.end - time.monotonic()),
                                  tests=gpu_check.KERNEL_TESTS if cuda else ["tests/kernels/test_norms.py", gpu_check.KERNEL_TESTS[1]],
                                  extra=[] if cuda else ["-k", "test_rms_norm and fp32 or test_cuda_engine"],  # dry: a few, interpreted
                                  workers=8 if cuda else 0)  # 8 of the GPU machine's 16 cores; the checkpoint build has the rest

    def checkpoint(_deadline):
        start = time.perf_counter()
        st["path"] = e2e.ensure_checkpoint(args.workdir, spec, dtype)
        return {"path": str(st["path"]), "seconds": round(time.perf_counter() - start, 1)}

    driver.run("checkpoint", checkpoint)
    driver.run("kernel_tests", lambda _d: tests.result())

    def copy_bw(_deadline):
        if cuda:
            from triton.testing import do_bench

            st["bench"] = do_bench
            st["copy_bps"] = gpu_check.copy_bandwidth(do_bench)
        else:
            st["bench"] = gpu_check.cpu_bench
            st["copy_bps"] = gpu_check.copy_bandwidth(gpu_check.cpu_bench, "cpu", 1 << 26)
        return {"GBps": round(st["copy_bps"] / 1e9, 1)}

    driver.run("copy_bandwidth", copy_bw)

    def parity(deadline):
        """fp32 first, with both heads: strict (identical traces, cosine >= 0.99999), the check
        that must not be lost to the budget; then bf16, where a flipped token here and there is
        allowed (see gpu_e2e.graph_parity). One bf16 head is enough: the head runs after the trace."""
        runs = []
        for head, dt in (("last_token", "float32"), ("mhsa", "float32"), ("last_token", "bfloat16")):
            try:
                runs.append(e2e.graph_parity(args.workdir, device, dt, head))
            except PartTimeout:  # keep the runs that finished
                runs.append({"head": head, "dtype": dt, "passed": False, "error": "cut off by the part's time budget"})
                break
            except Exception as exc:  # noqa: BLE001 - the other runs still run
                runs.append({"head": head, "dtype": dt, "passed": False, "error": f"{type(exc).__name__}: {exc}"[:1000],
                             "traceback": traceback.format_exc(limit=-6)})
                print(f"  graphs vs eager, {head} {dt}: FAILED {runs[-1]['error']}", flush=True)
                continue
            r = runs[-1]
            print(f"  graphs vs eager, {head} {dt} ({'strict' if r['strict_traces'] else 'most traces identical'}): "
                  f"traces identical {r['traces_identical']} (greedy {r['traces_equal']}/{r['items']}, sampled "
                  f"{r['sampled_traces_equal']}/{r['items']}, first divergence {r['first_divergence']}), cosine min "
                  f"{r['cosine_min']}, over {r['cosine_items']} checked items {r['cosine_min_identical']} (>= {r['cosine_threshold']}), "
                  f"captured {r['captured_buckets'] or r['eager_reason']}: {'ok' if r['passed'] else 'FAILED'}", flush=True)
        strict = [r for r in runs if r.get("strict_traces")]  # fp32 runs that finished
        return {"passed": bool(strict) and all(r["passed"] for r in runs), "strict_runs": len(strict),
                "bf16_traces_identical": [r.get("traces_identical") for r in runs if r["dtype"] == "bfloat16"], "runs": runs}

    driver.run("graph_parity", parity)

    def decode_table(graphs: bool, key: str):
        def part(deadline):
            engine, info = e2e.make_engine(st["path"], device, dtype, graphs=graphs, max_num_seqs=max(decode_batches), cache_memory=cache_memory)
            print(f"  engine: {info}", flush=True)  # where the part's time went, should it be cut off later
            st[key] = engine  # graphs: kept for the naive parts' prompts, tte_engine, agreement and varied_traces
            prompts = e2e.decode_prompts(engine, max(decode_batches), prompt_tokens)
            floor_ms = e2e.llm_weight_bytes(engine) / st["copy_bps"] * 1e3 if "copy_bps" in st else None
            tokens = {}

            def one(b):
                row = e2e.engine_decode(engine, prompts, b, warmup=decode_warmup, steps=decode_steps)
                tokens[b] = row.pop("tokens")
                row["x_floor"] = round(row["ms_per_step"] / floor_ms, 2) if floor_ms else None
                print(f"  B={b:3d}: {row['ms_per_step']:.3f} ms/step" + (f" ({row['x_floor']}x the floor)" if floor_ms else ""), flush=True)
                return row

            measured = over_batches(decode_batches, deadline, one)
            st[f"tokens_{key}"] = tokens
            out = {"engine": info, "llm_weight_bytes": e2e.llm_weight_bytes(engine),
                   "floor_ms": round(floor_ms, 4) if floor_ms else None, **measured}
            # in the JSON before the profiler runs: a crash in CUPTI (a segfault, which no except catches) keeps the table
            driver.note(f"decode_{key}", out, "profiling (a crash from here on keeps the table measured)")
            out["profile"] = profile_rows(engine, prompts, deadline, args.out.parent / f"profile_{key}.txt")
            if not graphs and "tokens_graphs" in st:
                common = sorted(set(tokens) & set(st["tokens_graphs"]))
                out["graphs_vs_eager_tokens"] = {b: e2e.compare_tokens(st["tokens_graphs"][b], tokens[b]) for b in common}
            if graphs and cuda and not info["captured_buckets"]:
                out["passed"] = False  # the graph table would be an eager table: say so
            return out
        return part

    def profile_rows(engine, prompts, deadline, table: Path) -> list[dict]:
        """Host vs kernel time per decode step at the smallest and largest batch (informational:
        a failure or a spent budget is recorded, not raised)."""
        table.unlink(missing_ok=True)
        rows = []
        for b in sorted({min(decode_batches), max(decode_batches)}):
            if time.monotonic() > deadline - 8:
                rows.append({"batch": b, "skipped": "part budget spent"})
                continue
            try:
                rows.append(e2e.profile_decode(engine, prompts, b, steps=8, table=table))
                print(f"  profile B={b:3d}: {rows[-1]}", flush=True)
            except PartTimeout:  # the decode table measured before stays
                rows.append({"batch": b, "skipped": "cut off by the part's time budget"})
                break
            except Exception as exc:  # noqa: BLE001
                rows.append({"batch": b, "error": f"{type(exc).__name__}: {exc}"[:500]})
        return rows

    # decode_graphs, then its two baselines: the same table without graphs, and transformers
    driver.run("decode_graphs", decode_table(True, "graphs"), needs=("checkpoint",))
    driver.run("decode_eager", decode_table(False, "eager"), needs=("checkpoint",))
    st.pop("eager", None)  # never beside the naive model: the memory peak stays the two engines', as before
    e2e.free()

    def prompt_engine():
        """The graphed engine (prompts, agreement), or where decode_graphs failed before it
        existed, a small eager engine of the same checkpoint."""
        if st.get("graphs") is None and st.get("helper") is None:
            st["helper"], _ = e2e.make_engine(st["path"], device, dtype, graphs=False, max_num_seqs=8, cache_memory=cache_memory)
        return st.get("graphs") or st["helper"]

    def naive_setup():
        """The naive pipeline on the device, and an engine of the same checkpoint for prompts."""
        engine = prompt_engine()
        if "naive" not in st:
            st["naive"] = e2e.make_naive(engine, st["path"], device, dtype)
        return st["naive"], engine

    def naive_decode(deadline):
        naive, engine = naive_setup()
        prompts = e2e.decode_prompts(engine, max(decode_batches), prompt_tokens)
        e2e.naive_generate_ms(naive, prompts[:1], 2)  # warm-up (cuBLAS handles, kernels)

        def one(b):
            row = e2e.naive_decode(naive, prompts, b, short=naive_steps[0], long=naive_steps[1])
            print(f"  B={b:3d}: {row['ms_per_step']} ms/step (generate() ms at {row['generate_ms']} new tokens)", flush=True)
            return row

        return over_batches(decode_batches, deadline, one)

    driver.run("naive_decode", naive_decode, needs=("checkpoint",))

    def tte_engine(deadline):
        if st.get("graphs") is None:  # decode_graphs failed before its engine existed
            st.pop("helper", None)
            e2e.free()
            st["graphs"], _ = e2e.make_engine(st["path"], device, dtype, graphs=cuda, max_num_seqs=max(query_batches), cache_memory=cache_memory)
        engine = st["graphs"]

        def one(b):
            row = e2e.engine_embed(engine, e2e.tte_items(b, image), trace, reps=1 if b > 1 else 2)
            print(f"  B={b:3d}: {row['seconds']:.3f} s, {row['queries_per_s']:.2f} queries/s", flush=True)
            return row

        return over_batches(query_batches, deadline, one)

    # tte_engine, then its baseline (the naive pipeline), then the two side by side
    driver.run("tte_engine", tte_engine, needs=("checkpoint",))

    def tte_naive(deadline):
        naive, _ = naive_setup()

        def one(b):
            row = e2e.naive_embed(naive, e2e.tte_items(b, image), trace, short=naive_trace[0], long=naive_trace[1],
                                  warmup=b == query_batches[0])
            print(f"  B={b:3d}: {row['seconds']:.3f} s (extrapolated from {row['measured_s']}), {row['queries_per_s']:.2f} queries/s", flush=True)
            return row

        return over_batches(query_batches, deadline, one)

    driver.run("tte_naive", tte_naive, needs=("checkpoint",))

    def agree(_deadline):
        naive, engine = naive_setup()
        return e2e.agreement(engine, naive, e2e.tte_items(2, image))

    driver.run("agreement", agree, needs=("checkpoint",))
    st.pop("naive", None)
    st.pop("helper", None)
    e2e.free()

    # the optional parts, last: a slow run loses these, never a baseline
    def kernel_timings(deadline):
        skipped: list[str] = []
        rows = gpu_check.measure(st["bench"], st["copy_bps"], device=device, impls=("triton", "torch") if cuda else ("torch", "torch"),
                                 quick=not cuda, deadline=deadline - 5, skipped=skipped)
        gpu_check.print_table(rows)
        return {"rows": rows, "left_out": skipped, "passed": all(r["matches_eager"] is not False for r in rows)}

    driver.run("kernel_timings", kernel_timings, needs=("copy_bandwidth",))

    def varied_traces(_deadline):
        engine = st["graphs"]
        prompts = e2e.decode_prompts(engine, min(128, max(decode_batches)), prompt_tokens // 4)
        rows = {}
        for name, wait in (("default", None), ("at_once", 0)):  # the engine's suffix_wait_steps (8 with graphs), then each suffix at the next step
            row = rows[name] = e2e.varied_traces(engine, prompts, (max(2, trace // 16), trace), suffix_wait_steps=wait)
            print(f"  B={row['batch']}, suffix_wait_steps={row['suffix_wait_steps']}: {row['varied']['ms_per_trace_token']} ms per trace"
                  f" token with budgets {row['budgets']} ({row['varied']['pure_decode_steps']} of {row['varied']['steps']} steps pure decode)"
                  f" vs {row['equal']['ms_per_trace_token']} equal ({row['equal']['pure_decode_steps']} of {row['equal']['steps']}):"
                  f" x{row['varied_vs_equal']}", flush=True)
        return {**rows["default"], "at_once": rows["at_once"]}

    driver.run("varied_traces", varied_traces, needs=("tte_engine",))
    st.pop("graphs", None)
    e2e.free()

    rep["summary"] = summary = summarize(rep)
    rep["elapsed_s"] = round(time.monotonic() - driver.t0, 1)
    args.out.write_text(json.dumps(rep, indent=1, default=str))
    print_summary(rep, summary)
    failed = [n for n, p in rep["parts"].items() if not p.get("ok")]
    return 1 if failed else 0


def _rows(rep: dict, part: str) -> dict[int, dict]:
    result = rep["parts"].get(part, {}).get("result") or {}
    return {r["batch"]: r for r in result.get("rows", []) if "skipped" not in r and "error" not in r}


def summarize(rep: dict) -> dict:
    """Each speed figure beside its baseline from the same run, and the targets it is judged by."""
    graphs, eager, naive = _rows(rep, "decode_graphs"), _rows(rep, "decode_eager"), _rows(rep, "naive_decode")
    floor = ((rep["parts"].get("decode_graphs", {}).get("result") or {}).get("floor_ms")
             or (rep["parts"].get("decode_eager", {}).get("result") or {}).get("floor_ms"))
    decode = []
    for b in rep["config"]["decode_batches"]:
        g, e, n = (graphs.get(b) or {}).get("ms_per_step"), (eager.get(b) or {}).get("ms_per_step"), (naive.get(b) or {}).get("ms_per_step")
        decode.append({"batch": b, "graphs_ms": g, "eager_ms": e, "naive_ms": n, "floor_ms": floor,
                       "graphs_x_floor": round(g / floor, 2) if g and floor else None,
                       "graphs_vs_eager": round(e / g, 2) if g and e else None,
                       "naive_vs_graphs": round(n / g, 1) if g and n else None})
    ours, theirs = _rows(rep, "tte_engine"), _rows(rep, "tte_naive")
    queries = [{"batch": b, "engine_s": (ours.get(b) or {}).get("seconds"), "naive_s": (theirs.get(b) or {}).get("seconds"),
                "engine_qps": (ours.get(b) or {}).get("queries_per_s"), "naive_qps": (theirs.get(b) or {}).get("queries_per_s"),
                "naive_extrapolated": (theirs.get(b) or {}).get("extrapolated")} for b in rep["config"]["query_batches"]]
    best = lambda key: max((q for q in queries if q[key]), key=lambda q: q[key], default=None)  # noqa: E731
    b_ours, b_naive = best("engine_qps"), best("naive_qps")
    by_batch = {d["batch"]: d for d in decode}
    targets = {
        "decode_ms_B1 <= 1.1": (by_batch.get(1) or {}).get("graphs_ms"),
        "decode_ms_B256 <= 2.2": (by_batch.get(256) or {}).get("graphs_ms"),
        "graphs_vs_eager_B1 >= 2.5": (by_batch.get(1) or {}).get("graphs_vs_eager"),
    }
    varied = (rep["parts"].get("varied_traces", {}).get("result")) or {}
    return {"decode": decode, "queries": queries,
            "varied_traces": varied and {r["suffix_wait_steps"]: {"varied_vs_equal": r["varied_vs_equal"],
                                         **{k: {f: r[k][f] for f in ("ms_per_trace_token", "steps", "pure_decode_steps")} for k in ("varied", "equal")}}
                                         for r in (varied, varied["at_once"])},
            "latency_B1": {"engine_s": (ours.get(1) or {}).get("seconds"), "naive_s": (theirs.get(1) or {}).get("seconds")},
            "best_batch": {"engine": b_ours and {"batch": b_ours["batch"], "qps": b_ours["engine_qps"]},
                           "naive": b_naive and {"batch": b_naive["batch"], "qps": b_naive["naive_qps"]}},
            "targets": targets,
            "failed_parts": [n for n, p in rep["parts"].items() if not p.get("ok")],  # skipped ones included
            "skipped_parts": [n for n, p in rep["parts"].items() if "skipped" in p]}


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def print_summary(rep: dict, s: dict) -> None:
    cfg = rep["config"]
    print(f"\n======== summary ({rep['env']['device']}, torch {rep['env']['torch']}, {cfg['spec']} {cfg['dtype']}, "
          f"{rep['elapsed_s']} s{' DRY RUN' if rep['dry_run'] else ''})")
    print("decode ms/step (CUDA events around pure decode steps; floor = LLM weight bytes / copy bandwidth)")
    print(f"{'B':>5} {'graphs':>9} {'eager':>9} {'naive HF':>9} {'floor':>8} {'x floor':>8} {'graphs/eager':>13} {'HF/graphs':>10}")
    for d in s["decode"]:
        print(f"{d['batch']:>5} {_f(d['graphs_ms']):>9} {_f(d['eager_ms']):>9} {_f(d['naive_ms']):>9} {_f(d['floor_ms']):>8} "
              f"{_f(d['graphs_x_floor'], '{:.2f}x'):>8} {_f(d['graphs_vs_eager'], '{:.2f}x'):>13} {_f(d['naive_vs_graphs'], '{:.1f}x'):>10}")
    print(f"TTE queries ({cfg['trace']}-token traces, {cfg['image']}x{cfg['image']} image; naive run at {cfg['naive_trace']} tokens, "
          "extrapolated per step)")
    print(f"{'B':>5} {'engine s':>9} {'naive s':>9} {'engine q/s':>11} {'naive q/s':>10} {'speedup':>8}")
    for q in s["queries"]:
        sp = q["naive_s"] / q["engine_s"] if q["engine_s"] and q["naive_s"] else None
        print(f"{q['batch']:>5} {_f(q['engine_s'])!s:>9} {_f(q['naive_s'])!s:>9} {_f(q['engine_qps'], '{:.2f}'):>11} "
              f"{_f(q['naive_qps'], '{:.2f}'):>10} {_f(sp, '{:.1f}x'):>8}")
    print(f"best batch: engine {s['best_batch']['engine']}  naive {s['best_batch']['naive']}")
    print(f"traces of different lengths vs equal ones (per trace token; pure decode steps of all): {s['varied_traces'] or '-'}")
    print("targets (issue 8, reported only): " + ", ".join(f"{k}: {_f(v, '{:.3g}')}" for k, v in s["targets"].items()))
    for name, part in rep["parts"].items():
        status = "ok" if part.get("ok") else ("SKIPPED: " + part["skipped"] if "skipped" in part else "FAILED: " + (part.get("error") or "check did not pass"))
        print(f"  {name:<16} {part.get('seconds', '-')!s:>6} s  {status}{'  (optional)' if part.get('optional') else ''}")
    print(f"failed: {', '.join(s['failed_parts']) or 'none'} (skipped among them: {', '.join(s['skipped_parts']) or 'none'})")


if __name__ == "__main__":
    sys.exit(main())
