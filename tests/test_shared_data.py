"""The shared-data gate: a clone without ``../shared`` skips (one line, counted), CI fails.

Runs pytest in a subprocess on a copy of this conftest in a temporary tree, with and without
a ``shared/data`` folder beside the copied repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
from pathlib import Path

def test_uses_folder(shared_data):
    assert (shared_data / "pairs" / "x.txt").read_text() == "ok"

def test_uses_file():
    from shared_gate import need_shared
    assert need_shared("pairs", "x.txt").read_text() == "ok"

def test_plain():
    assert True
"""


def run_probe(root: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    repo = root / "repo"
    (repo / "tests").mkdir(parents=True)
    # the conftest and what it imports
    for helper in ("conftest.py", "proc_guard.py", "shared_gate.py"):
        if Path(__file__).with_name(helper).exists():
            shutil.copy(Path(__file__).with_name(helper), repo / "tests" / helper)
    (repo / "tests" / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "tests"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_shared_the_tests_skip_with_one_line_and_are_counted(tmp_path: Path) -> None:
    result = run_probe(tmp_path, ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = tmp_path / "shared" / "data"
    assert "1 passed, 2 skipped" in result.stdout
    reasons = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(reasons) == 2
    assert all(f"{expected} is missing" in line for line in reasons), reasons
    assert f"2 test(s) skipped: shared test data missing at {expected}" in result.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_missing_shared_data_fails(tmp_path: Path, ci: str) -> None:
    result = run_probe(tmp_path, ci=ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "skipped" not in result.stdout.splitlines()[-1]
    assert "1 passed" in result.stdout and "CI=true: required" in result.stdout


def test_a_missing_file_inside_present_shared_data_is_named(tmp_path: Path) -> None:
    (tmp_path / "shared" / "data" / "pairs").mkdir(parents=True)
    result = run_probe(tmp_path, ci=None)
    assert result.returncode == 1  # the fixture test finds the folder, then the file is absent
    missing = tmp_path / "shared" / "data" / "pairs" / "x.txt"
    assert f"{missing} is missing" in result.stdout
    assert "1 failed, 1 passed, 1 skipped" in result.stdout


def test_with_shared_data_everything_runs(tmp_path: Path) -> None:
    (tmp_path / "shared" / "data" / "pairs").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "pairs" / "x.txt").write_text("ok")
    result = run_probe(tmp_path, ci="true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout and "skipped" not in result.stdout
