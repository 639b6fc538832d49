"""Benchmark fixtures (the models are random, built locally; the inputs synthetic and seeded), and
the rule that decides when benchmarks run.

`pyproject.toml` collects `tests/` and `benchmarks/` from the repository root, so:
- `pytest --benchmark-only` runs every benchmark here (and deselects the plain tests, which
  pytest-benchmark would only skip one by one);
- any other invocation (`python -m pytest -q`, the README's test command and CI) deselects every
  benchmark, unless a path inside `benchmarks/` is named on the command line
  (`pytest benchmarks/test_bench_embed.py` runs it as a plain test, every round of it;
  add `--benchmark-disable` to run each timed function once).
A benchmark fails only when the pipelines it compares disagree; speed targets are reported
(printed and in `extra_info`), never asserted.
"""

import statistics
import sys
import time
from pathlib import Path

import pytest

from synthetic import synthetic_image
from tte_engine.random_checkpoint import SPECS, build_random_checkpoint, never_stop

HERE = Path(__file__).resolve().parent
# Benchmark modules `from conftest import ...`; several conftest.py files share that module name
# (tests/, tests/kernels/, tests/serve/), and whichever pytest imported last owns `sys.modules["conftest"]`.
_THIS = sys.modules[__name__]


def _in_benchmarks(path) -> bool:
    return HERE == Path(path).resolve() or HERE in Path(path).resolve().parents


def pytest_collectstart(collector):
    """Before a benchmark module is imported, make `conftest` mean this file again."""
    if isinstance(collector, pytest.Module) and _in_benchmarks(collector.path):
        sys.modules["conftest"] = _THIS


def _benchmark_only(config) -> bool:
    try:
        return bool(config.getoption("benchmark_only"))
    except ValueError:  # pytest-benchmark is not installed
        return False


def _names_benchmarks(config) -> bool:
    """Whether the command line itself (not testpaths) names a path inside benchmarks/."""
    here = config.invocation_params.dir
    return any(_in_benchmarks(here / arg.split("::")[0]) for arg in config.invocation_params.args
               if not str(arg).startswith("-"))


def pytest_collection_modifyitems(config, items):
    if _benchmark_only(config):
        keep = [item for item in items if "benchmark" in getattr(item, "fixturenames", ())]
    elif _names_benchmarks(config):
        return  # a benchmark path was named explicitly: run what was collected
    else:
        keep = [item for item in items if not _in_benchmarks(item.path)]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


_NODE_PREFIX = "benchmarks/"  # node ids are relative to the rootdir (the repository root, pyproject.toml)
_RATIO_LINES: list[tuple[str, str]] = []  # (test id, line) printed by benchmarks, shown again at the end


def pytest_runtest_logreport(report):
    """Keep what a benchmark printed (its times beside its baseline's, and the ratio), even when
    pytest captured it, so the end-of-run summary can show it beside pytest-benchmark's table."""
    if report.when == "call" and report.nodeid.startswith(_NODE_PREFIX):
        for line in report.capstdout.splitlines():
            if line.strip():
                _RATIO_LINES.append((report.nodeid, line.strip()))


def pytest_terminal_summary(terminalreporter):
    if _RATIO_LINES:
        terminalreporter.section("benchmarks: each time beside its baseline's, same run")
        for nodeid, line in _RATIO_LINES:
            terminalreporter.write_line(f"{nodeid.split('::')[-1]}: {line}")


@pytest.fixture(scope="session")
def engine_options(pytestconfig) -> dict:
    """Options for every engine a benchmark builds: `cuda_graphs=False` under `--enforce-eager`,
    else none (each engine's default: graphs on CUDA, off on CPU)."""
    return {"cuda_graphs": False} if pytestconfig.getoption("enforce_eager") else {}


@pytest.fixture(scope="session")
def bench_small(tmp_path_factory):
    """hidden 384, 6 layers, vision depth 4: the CPU benchmark model; traces never stop early."""
    return never_stop(build_random_checkpoint(tmp_path_factory.mktemp("bench-small"), SPECS["bench-small"], seed=0))


def paired_rounds(benchmark, ours, baseline, rounds: int, before=None) -> tuple[float, float, float, int]:
    """Wall seconds of `ours()` (pytest-benchmark's rounds, after one warm-up round) and of
    `baseline()`, run right before each of ours (untimed by pytest-benchmark), so each round's pair
    shares the machine's load of the moment; `before()`: untimed, just before each round of ours
    (e.g. emptying caches). Returns (ours' median, baseline's median, the median of the rounds'
    ratios baseline / ours: the speedup, robust to a shared VM's drift within the run, where timing
    one side's rounds after the other's swung the video ratio 0.85-1.44x in consecutive runs; the
    number of pairs: `rounds`, or 1 under --benchmark-disable)."""
    ours_s, baseline_s = [], []

    def setup():
        start = time.perf_counter()
        baseline()
        baseline_s.append(time.perf_counter() - start)
        if before is not None:
            before()

    def timed():
        start = time.perf_counter()
        ours()
        ours_s.append(time.perf_counter() - start)

    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=1)
    assert len(ours_s) == len(baseline_s), "one baseline run before every round of ours, the warm-up's included"
    if len(ours_s) == rounds + 1:  # the warm-up pair (under --benchmark-disable one pair runs, no warm-up)
        ours_s, baseline_s = ours_s[1:], baseline_s[1:]
    ratios = [b / o for o, b in zip(ours_s, baseline_s)]
    return statistics.median(ours_s), statistics.median(baseline_s), statistics.median(ratios), len(ratios)


def verdict(value: float, target: float, unit: str = "x", most: bool = False) -> str:
    """"target >= 1.5x: NOT met" (most=True: "target <= 50 us: met"), for a benchmark's printed line."""
    met = value <= target if most else value >= target
    return f"target {'<=' if most else '>='} {target:g}{unit}: {'met' if met else 'NOT met'}"


@pytest.fixture(scope="session")
def image_text_items():
    """8 image + text queries, two image sizes, varied text lengths."""
    questions = ["What is in the picture?", "Describe the main object.", "Which animal is this?", "What color is the car?",
                 "Find a caption that describes the photo.", "Is there a person on the left side of the table?",
                 "What does the sign say?", "How many people are in the street?"]
    return [{"text": q, "image": synthetic_image(224 if i % 2 else 160, 224, i)} for i, q in enumerate(questions)]
