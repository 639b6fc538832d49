"""The README's commands are the ones CI and users run: keep them in sync."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(command) == 1 and command[0] in (ROOT / "README.md").read_text()
    assert "pytest" in command[0] and "torch==2.13.0" in command[0]


def test_package_imports_from_a_checkout_without_the_install_mapping():
    """kernels/ and export/ are installed as tte_engine.kernels / tte_engine.export by setuptools'
    package-dir mapping. Run from a checkout whose root comes first on sys.path without that
    mapping (PYTHONPATH=., a plain `pip install .` used from the root, or another interpreter's
    pip, as on the GPU machine), the package must still import: it failed there with a
    circular-import error naming `kernels`."""
    import site
    import subprocess
    import sys

    code = ("import sys; sys.path[:0] = sys.argv[1:2]; sys.path += sys.argv[2:]; import tte_engine.kernels, tte_engine.export; "
            "from tte_engine.kernels import attention; print(tte_engine.kernels.__file__)")
    # -S: no site-packages .pth files, so no editable-install finder; the dependencies stay importable
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT), *site.getsitepackages()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == ROOT / "kernels" / "__init__.py"


def test_benchmarks_take_enforce_eager():
    """`pytest --benchmark-only --enforce-eager` (README, Benchmarks) parses from the repository
    root, also with the root named (`pytest .`: only a root conftest.py is loaded before the
    command line is parsed; the option lived in benchmarks/conftest.py and that form failed), and
    every engine a benchmark builds takes the benchmarks' `engine_options` (which carry the flag) or
    says `cuda_graphs` itself: a new benchmark cannot silently ignore the flag."""
    import ast
    import subprocess
    import sys

    assert "pytest --benchmark-only --enforce-eager" in (ROOT / "README.md").read_text()
    for named in ([], ["."]):
        out = subprocess.run([sys.executable, "-m", "pytest", *named, "--benchmark-only", "--enforce-eager", "--collect-only", "-q", "-p", "no:cacheprovider"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "test_bench_decode_host_cost" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    for path in sorted((ROOT / "benchmarks").glob("test_bench_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Engine", "EngineConfig"):
                names = {k.arg for k in node.keywords} | {getattr(k.value, "id", None) for k in node.keywords if k.arg is None}
                nested = any(isinstance(a, ast.Call) and getattr(a.func, "id", None) == "EngineConfig" for a in ast.walk(node) if a is not node)
                assert nested or names & {"cuda_graphs", "engine_options", "options"}, f"{path.name}:{node.lineno} builds an engine without engine_options"
