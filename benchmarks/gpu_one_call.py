"""The GPU check in one call (issue 8 item 5): tests, parity, decode speed, TTE speed, kernels.

On an H100/H200 with torch >= 2.11, triton >= 3.6 and transformers >= 5.17 (nothing optional:
no pyarrow, fastapi or ray is imported), from the repository root:

    python3 -m pip install -q --no-deps --no-build-isolation -e . ; python3 benchmarks/gpu_one_call.py --out $OUT/gpu.json

(the install is optional: the driver puts the checkout on sys.path itself, and the kernel tests run
from the repository root; `python3 -m pip` so that the install lands in the interpreter that runs)

and a dry run of every path that does not need CUDA, on any machine (tiny model, small batches):

    python benchmarks/gpu_one_call.py --dry-run --out /tmp/gpu_dry.json

Each part runs in its own try/except under its own time budget (a SIGALRM raises in the part
when its budget is spent; the overall `--budget-s`, default 360 s, the 6 minutes issue 8 allows, caps them all), so one failing
or slow check never stops the others; parts that need a failed one are skipped and say why.
The JSON is rewritten after every part (a killed run still leaves what it measured), and the
run ends with a summary table and the list of failed parts (exit status 1 if any failed).

Parts, in order (what each measures: `gpu_e2e.py` and `gpu_check.py`):
  kernel_tests      tests/kernels + the GPU-only engine test, compiled on the GPU, in a child
                    process that overlaps the checkpoint build (interpreter-only tests deselected
                    by name); collected before anything is timed.
  checkpoint        DESIGN §6's Qwen2-VL-2B-sized random model (bf16, stop tokens demoted).
  copy_bandwidth    1 GiB device copy (read + write bytes / s): the floor's denominator.
  graph_parity      tiny model, graphs on vs off, last_token and mhsa heads, fp32 and bf16:
                    identical greedy and seeded sampled traces, cosine >= 0.99999 (fp32) / 0.999 (bf16).
  decode_graphs     2B bf16, cuda_graphs=True: ms per pure decode step at B = 1, 8, 32, 128, 256
                    (CUDA events around `steps` Engine.step() calls after prefill + warm-up).
  tte_engine        same engine: TTE query latency at B=1, queries/s at larger batches (448x448
                    image + ~48 text tokens, 128-token traces); the best batch is reported.
  varied_traces     same engine: traces ending at different lengths (budgets trace/16..trace) vs
                    equal ones of the same tokens, ms per trace token, and how many steps were
                    pure decode (graphed) rather than mixed with embed suffixes (eager); with the
                    default suffix_wait_steps, then with each suffix prefilled at the next step.
  decode_eager      2B bf16, cuda_graphs=False: the same decode table, and whether the two
                    engines generated identical tokens (informational in bf16).
  naive_decode      transformers (naive pipeline's model, generate()) ms/step at the same batches.
  tte_naive         the naive pipeline on the same queries, shorter traces extrapolated per step.
  agreement         engine vs naive pipeline on 2 queries (traces, cosine; informational in bf16).
  kernel_timings    every kernel vs its eager reference (gpu_check.py), until its budget ends.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # benchmarks/, and the checkout (no install needed)
import gpu_check  # noqa: E402
import gpu_e2e as e2e  # noqa: E402

TARGETS = {"decode_ms_B1": 1.1, "decode_ms_B256": 2.2, "graphs_vs_eager_B1": 2.5}  # issue 8, reported only

# name: (budget seconds on a GPU, budget on a dry run)
BUDGETS = {
    "checkpoint": (120, 60), "kernel_tests": (120, 240), "copy_bandwidth": (15, 15), "graph_parity": (45, 120),
    "decode_graphs": (60, 90), "tte_engine": (35, 60), "decode_eager": (40, 90), "naive_decode": (40, 60),
    "tte_naive": (40, 60), "agreement": (15, 30), "kernel_timings": (30, 60), "varied_traces": (35, 90),
}


class PartTimeout(BaseException):
    """A part's time is up. Not an Exception, so library code that falls back on errors (CUDA
    graph capture falls back to eager on any Exception) cannot swallow it."""


def _alarm(signum, frame):
    raise PartTimeout("time budget spent")


class Driver:
    """Runs the parts, keeps the report, writes it after each part."""

    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry = out, dry
        self.t0 = time.monotonic()
        self.end = self.t0 + budget_s
        self.report: dict = {"parts": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget_s, "dry_run": dry}
        self.state: dict = {}
        self.overrides: dict[str, float] = {}
        signal.signal(signal.SIGALRM, _alarm)

    def budget(self, name: str) -> float:
        return self.overrides.get(name, BUDGETS[name][1 if self.dry else 0])

    def run(self, name: str, fn, *, needs: tuple[str, ...] = ()):
        """Run one part: skipped if a part it needs failed or no time is left; otherwise its result
        or error is recorded, and whatever happens the next part runs."""
        missing = [n for n in needs if not self.report["parts"].get(n, {}).get("ok")]
        left = self.end - time.monotonic()
        if missing:
            return self._record(name, {"ok": False, "skipped": f"needs {', '.join(missing)}"})
        if left < 5:
            return self._record(name, {"ok": False, "skipped": f"out of time ({left:.0f} s left of the overall budget)"})
        budget = min(self.budget(name), left)
        print(f"\n=== {name} (budget {budget:.0f} s, {time.monotonic() - self.t0:.0f} s elapsed)", flush=True)
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
        entry["seconds"] = round(time.monotonic() - start, 1)
        if not entry["ok"]:
            print(f"--- {name} FAILED: {entry.get('error') or 'check did not pass'}", flush=True)
        return self._record(name, entry)

    def _record(self, name: str, entry: dict):
        self.report["parts"][name] = entry
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
    ap.add_argument("--budget-s", type=float, default=None, help="overall time budget (default 360 on a GPU, 900 dry)")
    ap.add_argument("--workdir", default="/tmp/tte_gpu_one_call", help="where the random checkpoints are built")
    ap.add_argument("--decode-batches", default=None, help="default 1,8,32,128,256 (dry: 1,2,4)")
    ap.add_argument("--query-batches", default=None, help="TTE query batches, default 1,32,128 (dry: 1,2)")
    ap.add_argument("--part-budget", action="append", default=[], metavar="PART=SECONDS",
                    help="override one part's time budget (repeatable), e.g. kernel_tests=200")
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

    driver = Driver(args.out, args.budget_s or (900 if dry else 360), dry)
    for item in args.part_budget:
        name, _, seconds = item.partition("=")
        if name not in BUDGETS:
            ap.error(f"--part-budget: unknown part {name!r} (parts: {', '.join(BUDGETS)})")
        driver.overrides[name] = float(seconds)
    rep, st = driver.report, driver.state
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
    torch.manual_seed(0)

    # kernel tests in a child process, overlapping the (CPU-bound) checkpoint build; collected before any timing
    tests = gpu_check.TestRun(timeout=driver.budget("kernel_tests"),
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
        runs = []
        for head in ("last_token", "mhsa"):
            for dt in ("float32", "bfloat16"):
                try:
                    runs.append(e2e.graph_parity(args.workdir, device, dt, head))
                except PartTimeout:  # keep the runs that finished
                    runs.append({"head": head, "dtype": dt, "passed": False, "error": "cut off by the part's time budget"})
                    return {"passed": False, "runs": runs}
                print(f"  graphs vs eager, {head} {dt}: traces equal {runs[-1]['traces_equal']}/{runs[-1]['items']}, "
                      f"cosine min {runs[-1]['cosine_min']} (>= {runs[-1]['cosine_threshold']}), "
                      f"captured {runs[-1]['captured_buckets'] or runs[-1]['eager_reason']}", flush=True)
        return {"passed": all(r["passed"] for r in runs), "runs": runs}

    driver.run("graph_parity", parity)

    def decode_table(graphs: bool, key: str):
        def part(deadline):
            engine, info = e2e.make_engine(st["path"], device, dtype, graphs=graphs, max_num_seqs=max(decode_batches), cache_memory=cache_memory)
            st["engine"] = engine
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
                   "floor_ms": round(floor_ms, 4) if floor_ms else None, **measured,
                   "profile": profile_rows(engine, prompts, deadline, args.out.parent / f"profile_{key}.txt")}
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

    driver.run("decode_graphs", decode_table(True, "graphs"), needs=("checkpoint",))

    def tte_engine(deadline):
        if st.get("engine") is None:  # decode_graphs failed before its engine existed
            st["engine"], _ = e2e.make_engine(st["path"], device, dtype, graphs=cuda, max_num_seqs=max(query_batches), cache_memory=cache_memory)
        engine = st["engine"]

        def one(b):
            row = e2e.engine_embed(engine, e2e.tte_items(b, image), trace, reps=1 if b > 1 else 2)
            print(f"  B={b:3d}: {row['seconds']:.3f} s, {row['queries_per_s']:.2f} queries/s", flush=True)
            return row

        return over_batches(query_batches, deadline, one)

    driver.run("tte_engine", tte_engine, needs=("checkpoint",))

    def varied_traces(_deadline):
        engine = st["engine"]
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
    st["graphed"] = st.pop("engine", None)  # kept: prompts for the naive parts, and the agreement check
    driver.run("decode_eager", decode_table(False, "eager"), needs=("checkpoint",))
    st.pop("engine", None)
    e2e.free()

    def naive_setup():
        """The naive pipeline on the device, and an engine of the same checkpoint for prompts."""
        if st.get("graphed") is None:
            st["graphed"], _ = e2e.make_engine(st["path"], device, dtype, graphs=False, max_num_seqs=8, cache_memory=cache_memory)
        if "naive" not in st:
            st["naive"] = e2e.make_naive(st["graphed"], st["path"], device, dtype)
        return st["naive"], st["graphed"]

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
    st.pop("graphed", None)
    e2e.free()

    def kernel_timings(deadline):
        skipped: list[str] = []
        rows = gpu_check.measure(st["bench"], st["copy_bps"], device=device, impls=("triton", "torch") if cuda else ("torch", "torch"),
                                 quick=not cuda, deadline=deadline - 5, skipped=skipped)
        gpu_check.print_table(rows)
        return {"rows": rows, "left_out": skipped, "passed": all(r["matches_eager"] is not False for r in rows)}

    driver.run("kernel_timings", kernel_timings, needs=("copy_bandwidth",))

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
            "failed_parts": [n for n, p in rep["parts"].items() if not p.get("ok")]}


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
        print(f"  {name:<16} {part.get('seconds', '-')!s:>6} s  {status}")
    print(f"failed: {', '.join(s['failed_parts']) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
