"""The one-call GPU check (`benchmarks/gpu_one_call.py`, issue 8) dry-runs on CPU: every part that
does not need CUDA runs on a tiny model and must pass. A GPU is lent rarely and for minutes, so a
part broken by a change elsewhere (say, a benchmark reading engine state the engine stopped
keeping up to date) must fail here, not on the device."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_one_call_dry_run_passes(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_one_call.py"), "--dry-run", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    failed = {name: part.get("error") or part.get("skipped") or part.get("result") for name, part in report["parts"].items() if not part["ok"]}
    assert proc.returncode == 0 and not failed, f"{failed}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert {"decode_graphs", "graph_parity", "varied_traces"} <= set(report["parts"])
