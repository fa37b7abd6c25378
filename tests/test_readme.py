"""The README's test command is exactly what CI runs, and its demo command is the documented one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    """The last command of .ci/run is the README's test command; any line before it only
    prepares the machine (a guarded `if ...; fi` that cannot fail the run), so CI tests
    nothing the README's command does not."""
    readme = (ROOT / "README.md").read_text()
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    *setup, test = ci_lines
    assert test in readme and "pytest" in test
    for line in setup:
        assert line.startswith("if ") and line.endswith("; fi") and "|| " in line and "pytest" not in line, line


def test_readme_demo_command_sets_up_and_runs_the_demo():
    readme = (ROOT / "README.md").read_text()
    assert "-c constraints.txt -e . && .venv/bin/saelab demo" in readme
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
