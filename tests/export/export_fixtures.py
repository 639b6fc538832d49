"""Fixtures shared by the export tests, imported by each test module.

Not a conftest.py: a second module named `conftest` would shadow tests/conftest.py for the
suites that `from conftest import ...`. Fixtures imported into several modules are separate
fixtures to pytest, so the expensive ones memoize their result here, once per session.
"""

import os
import subprocess
import sys

import pytest

from tte_engine import Engine

_MEMO: dict = {}


def run_cli(*args, env=None, timeout=300, cwd=None):
    """`tte-export ARGS` in a fresh interpreter (the installed console script's entry point), run in `cwd`."""
    cmd = [sys.executable, "-c", "import sys; from tte_engine.export.cli import main; sys.exit(main())", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def fp8_all_export(tmp_path_factory):
    """`tte-export --checkpoint tiny-random --fp8 --target all` (per-channel TensorRT-LLM FP8), via the CLI."""
    if "fp8_all" not in _MEMO:
        out = tmp_path_factory.mktemp("exports") / "tiny-fp8-all"
        proc = run_cli("--checkpoint", "tiny-random", "--out", out, "--fp8", "--target", "all", "--calibration", "4",
                       "--trtllm-fp8", "per-channel")
        assert proc.returncode == 0, proc.stderr
        _MEMO["fp8_all"] = (out, proc)
    return _MEMO["fp8_all"]


@pytest.fixture(scope="session")
def float_engine():
    """The float32 reference engine on tiny-random (the checkpoint the exports come from)."""
    if "float_engine" not in _MEMO:
        _MEMO["float_engine"] = Engine("tiny-random")
    return _MEMO["float_engine"]
