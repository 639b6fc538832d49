"""The README's commands are the ones CI and users run: keep them in sync."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(command) == 1 and command[0] in (ROOT / "README.md").read_text()
    assert "pytest" in command[0] and "torch==2.13.0" in command[0]
