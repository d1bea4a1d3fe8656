"""The mutants a review found alive, each of which the fast tests must now kill.

    .venv/bin/python tests/mutation/review_mutants.py        (first step of `make mutants`)

Each mutant is one textual change of the package, applied to a copy in a temporary folder
(the work tree is never touched); the named fast tests run against the copy and must FAIL.
Exit status 0 when every mutant is killed, 1 otherwise (or when a pattern is no longer found:
update this list with the code).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (name, file, original text, mutated text, fast tests that must fail)
MUTANTS = [
    (
        "score: 0.9 * omega * q + s",
        "qmag_ray/scores.py",
        "    x *= np.asarray(quality, np.float64)\n",
        "    x *= 0.9 * np.asarray(quality, np.float64)\n",
        ["tests/test_scores.py"],
    ),
    (
        "iResNet block: PReLU before BatchNorm",
        "qmag_ray/model/iresnet.py",
        "self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))",
        "self.bn3(self.conv2(self.bn2(self.prelu(self.conv1(self.bn1(x))))))",
        ["tests/test_model_oracle.py"],
    ),
    (
        "calibration: the line fitted the other way round (polyfit(w, t))",
        "qmag_ray/calibration/search.py",
        "beta, intercept = np.polyfit(t, w, 1)",
        "beta, intercept = np.polyfit(w, t, 1)",
        ["tests/test_calibration.py"],
    ),
    (
        "wrong sigmoid: 1 / (1 + exp(-2x))",
        "qmag_ray/calibration/search.py",
        "return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))",
        "return 1.0 / (1.0 + np.exp(-2.0 * np.asarray(x, dtype=np.float64)))",
        ["tests/test_calibration.py"],
    ),
]


def run_one(
    name: str, rel: str, old: str, new: str, tests: list[str], *, control: bool = False
) -> bool:
    """True when the mutant is killed (the tests fail on it)."""
    with tempfile.TemporaryDirectory(prefix="qmag-mutant-") as tmp:
        shutil.copytree(ROOT / "qmag_ray", Path(tmp) / "qmag_ray")
        target = Path(tmp) / rel
        text = target.read_text()
        if text.count(old) != 1:
            print(f"STALE   {name}: {rel} no longer contains the original text once")
            return False
        target.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
        # Run from the copy: it comes first on sys.path, before the work tree's editable install.
        probe = subprocess.run(
            [sys.executable, "-c", "import qmag_ray; print(qmag_ray.__file__)"],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert probe.stdout.startswith(tmp), probe.stdout
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            *map(str, map(ROOT.joinpath, tests)),
        ]
        result = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    killed = result.returncode == 1  # tests failed (not: crashed, nothing collected)
    print(
        f"{'KILLED ' if killed else 'ALIVE  '} {name}  ({' '.join(tests)}: rc {result.returncode})"
    )
    if killed == control:
        print(result.stdout[-2000:])
    return killed


def main() -> int:
    # Control: the same tests on an unmutated copy must pass, or a "kill" would mean nothing.
    tests = sorted({t for m in MUTANTS for t in m[4]})
    if run_one(
        "control (no mutation)", MUTANTS[0][1], MUTANTS[0][2], MUTANTS[0][2], tests, control=True
    ):
        print("the fast tests fail on the unmutated copy: fix them first")
        return 1
    killed = [run_one(*m) for m in MUTANTS]
    print(f"{sum(killed)}/{len(killed)} review mutants killed")
    return 0 if all(killed) else 1


if __name__ == "__main__":
    sys.exit(main())
