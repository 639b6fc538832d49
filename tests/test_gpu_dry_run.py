"""The one-call GPU check (`benchmarks/gpu_one_call.py`, issue 8) dry-runs on CPU: every part that
does not need CUDA runs on a tiny model and must pass. A GPU is lent rarely and for minutes, so a
part broken by a change elsewhere (say, a benchmark reading engine state the engine stopped
keeping up to date) must fail here, not on the device.

Also its plan: the device call has a hard 6-minute limit that the pip install before the script
shares, so the budgets must fit the script's cap, and the parts issue 8 requires beside their
baselines (the naive pipeline's, the eager engine's, graph parity) must run before the optional
ones, which a slow run then loses instead."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_BESIDE_BASELINES = ["graph_parity", "decode_graphs", "decode_eager", "naive_decode", "tte_engine", "tte_naive", "agreement"]


def _plan(dry: bool) -> dict:
    """The driver's plan, read in a child process (the benchmarks' imports stay out of this one)
    where pytest and hypothesis cannot be imported: a lent GPU machine may lack them, and then only
    the kernel tests may fail, not the driver's import."""
    code = ("import json, sys; sys.modules.update(pytest=None, hypothesis=None); sys.path.insert(0, 'benchmarks'); import gpu_one_call as g; "
            f"print(json.dumps({{'parts': g.PARTS, 'order': g.ORDER, 'optional': g.OPTIONAL, 'cap': g.CAP_S[{int(dry)}], "
            f"'startup': g.STARTUP_S[{int(dry)}], 'planned': g.planned_s({dry})}}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gpu_one_call_plan_fits_the_device_call_and_runs_baselines_first():
    gpu, dry = _plan(False), _plan(True)
    order, optional = gpu["order"], gpu["optional"]
    # 6 minutes, less the pip install (~20-40 s) that runs first in the same call, less the exit
    assert 300 <= gpu["cap"] <= 320 and gpu["cap"] + 40 <= 360
    assert gpu["planned"] <= gpu["cap"], gpu
    assert dry["planned"] <= dry["cap"], dry
    # the worst case: startup, the overlapping checkpoint/kernel_tests pair as the longer one, the rest added up
    budgets = {name: b for name, b, _, _ in gpu["parts"]}
    rest = sum(b for n, b in budgets.items() if n not in ("checkpoint", "kernel_tests"))
    assert gpu["planned"] == gpu["startup"] + max(budgets["checkpoint"], budgets["kernel_tests"]) + rest
    # every required part before every optional one; varied_traces is optional
    assert "varied_traces" in optional and not set(REQUIRED_BESIDE_BASELINES) & set(optional)
    assert max(order.index(n) for n in order if n not in optional) < min(order.index(n) for n in optional)
    # each baseline right after its counterpart
    for part, baselines in (("decode_graphs", ["decode_eager", "naive_decode"]), ("tte_engine", ["tte_naive", "agreement"])):
        i = order.index(part)
        assert order[i + 1 : i + 1 + len(baselines)] == baselines, order


def test_gpu_one_call_dry_run_passes(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_one_call.py"), "--dry-run", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    report = json.loads(out.read_text())
    failed = {name: part.get("error") or part.get("skipped") or part.get("result") for name, part in report["parts"].items() if not part["ok"]}
    assert proc.returncode == 0 and not failed, f"{failed}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert {"decode_graphs", "graph_parity", "varied_traces"} <= set(report["parts"])
    # every part ran, in the planned order, and the clock started before the imports
    assert list(report["parts"]) == report["plan"]["order"]
    assert report["startup_s"] > 0 and report["plan"]["planned_s"] <= report["budget_s"]
    assert [n for n, p in report["parts"].items() if p["optional"]] == report["plan"]["optional"]
    # graph parity keeps a strict fp32 comparison; bf16 trace equality is reported, not required
    runs = report["parts"]["graph_parity"]["result"]["runs"]
    strict = [r for r in runs if r["strict_traces"]]
    assert strict and all(r["dtype"] == "float32" and r["traces_identical"] and r["cosine_threshold"] == 0.99999 for r in strict)
    assert [r for r in runs if r["dtype"] == "bfloat16" and not r["strict_traces"] and "first_divergence" in r]


def test_bf16_graph_parity_allows_a_flipped_token_but_not_all():
    """In bf16 a near-tie may flip a token between the eager and the graphed step, so the check
    allows some traces to differ, but a graph path wrong only in bf16 (every trace differs) must
    fail it: at least half the items' traces identical, cosine bound on those."""
    code = """
import json, sys
sys.path.insert(0, 'benchmarks')
import gpu_e2e as e2e
real, run = e2e.make_engine, e2e._run_budgets
graphed = set()
def make(path, device, dtype, graphs, **kw):
    engine, info = real(path, device, dtype, graphs=graphs, **kw)
    (graphed.add if graphs else graphed.discard)(id(engine))  # ids of freed engines are reused
    return engine, info
def differing(engine, *a, **k):  # the graphed engine's traces are made to differ in FLIPPED items
    ids, embeddings = run(engine, *a, **k)
    if id(engine) in graphed:
        ids = [[t + 1 for t in t_ids] if i < FLIPPED else t_ids for i, t_ids in enumerate(ids)]
    return ids, embeddings
e2e.make_engine, e2e._run_budgets = make, differing
out = {}
for FLIPPED in (1, 5):
    r = e2e.graph_parity(sys.argv[1], 'cpu', 'bfloat16', 'last_token', budgets=(4, 2, 3, 1, 4))
    out[FLIPPED] = [r['passed'], r['traces_equal'], r['strict_traces']]
print(json.dumps(out))
"""
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", code, work], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"1": [True, 4, False], "5": [False, 0, False]}


def test_a_timed_out_test_run_is_stopped_with_every_process_it_started(tmp_path):
    """The kernel tests' child runs pytest-xdist workers on a GPU: a timeout must stop them too, or
    they keep compiling and running kernels beside every part timed after it (it killed only the
    pytest parent)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    pid_file = tmp_path / "worker.pid"
    (tmp_path / "test_hangs.py").write_text(
        "import subprocess, sys, time\n"
        "def test_hangs():\n"
        "    worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(worker.pid))\n"
        "    time.sleep(120)\n")
    run = gpu_check.TestRun(tests=[str(tmp_path / "test_hangs.py")], timeout=8)
    result = run.result()
    assert result["passed"] is False and "timed out" in result["summary"]
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # killed, then reaped by init as an orphan
        try:
            state = Path(f"/proc/{worker}/status").read_text()
        except FileNotFoundError:
            break
        if "\nState:\tZ" in state:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the test run's own child {worker} still runs after the timeout")


def test_a_part_may_use_what_the_parts_before_it_left_unspent(tmp_path):
    """A slow required part (the 2B engine's graph capture compiling its Triton variants) gets the
    time that faster parts before it saved; the plan still bounds the run: never more than the
    plan's time to the part less the time taken, never any for the overlapping first two."""
    code = ("import json, sys, time; sys.modules.update(pytest=None, hypothesis=None); sys.path.insert(0, 'benchmarks'); "
            "import gpu_one_call as g; from pathlib import Path; "
            f"d = g.Driver(Path({str(tmp_path / 'r.json')!r}), 310, dry=False); d.t0 = time.monotonic() - 100; "
            "print(json.dumps({n: round(d.unspent_s(n)) for n in g.ORDER} | {'through': g.planned_s(through='graph_parity')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    unspent = json.loads(out.stdout.strip().splitlines()[-1])
    budgets = {name: b for name, b, _, _ in _plan(False)["parts"]}
    assert unspent["checkpoint"] == unspent["kernel_tests"] == 0
    # 100 s taken: through kernel_tests the plan had 15 + 80 s (nothing left over), through copy_bandwidth 10 s more
    assert unspent["copy_bandwidth"] == 0 and unspent["graph_parity"] == 15 + 80 + budgets["copy_bandwidth"] - 100
    assert unspent["decode_graphs"] == unspent["graph_parity"] + budgets["graph_parity"] == unspent["through"] - 100
