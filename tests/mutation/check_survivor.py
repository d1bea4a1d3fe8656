"""Check that named mutmut mutants are now killed by the given fast tests.

    .venv/bin/python tests/mutation/check_survivor.py MUTANT [MUTANT ...] -- TEST [TEST ...]

Each mutant's diff (``mutmut show``) is applied to a copy of the package in a temporary folder
(the work tree is not touched) and the tests run against the copy; prints KILLED or ALIVE per
mutant. Used to confirm the tests added for the survivors listed in survivors.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def killed(mutant: str, tests: list[str]) -> bool:
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    diff = subprocess.run(
        [mutmut, "show", mutant], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    lines = diff.splitlines()
    target = next(line[4:] for line in lines if line.startswith("--- "))
    removed = "\n".join(x[1:] for x in lines if x.startswith("-") and not x.startswith("---"))
    added = "\n".join(x[1:] for x in lines if x.startswith("+") and not x.startswith("+++"))
    with tempfile.TemporaryDirectory(prefix="qmag-survivor-") as tmp:
        shutil.copytree(ROOT / "qmag_ray", Path(tmp) / "qmag_ray")
        path = Path(tmp) / target
        text = path.read_text()
        if text.count(removed) != 1:
            raise SystemExit(f"{mutant}: the mutated lines are not found once in {target}")
        path.write_text(text.replace(removed, added))
        env = {**os.environ, "PYTHONPATH": tmp, "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
        cmd += [str(ROOT / t) for t in tests]
        done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    return done.returncode == 1


def main(argv: list[str]) -> int:
    split = argv.index("--")
    mutants, tests = argv[:split], argv[split + 1 :]
    alive = 0
    for mutant in mutants:
        ok = killed(mutant, tests)
        alive += not ok
        print(f"{'KILLED' if ok else 'ALIVE '} {mutant}")
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
