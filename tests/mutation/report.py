"""The kill ratio of the last ``mutmut run`` (last step of `make mutants`).

    .venv/bin/python tests/mutation/report.py

Reads ``mutmut results --all true`` and ``tests/mutation/survivors.md``, where every surviving
mutant is listed, either as ``- `<mutant name>`: equivalent: why`` (no test can tell it from
the original) or as ``- `<mutant name>`: open: why`` (a real difference no fast test sees yet).
Ratio = killed / (checked mutants - listed equivalents); a timeout counts as killed (the mutant
made the tests hang, which mutmut reports as detected). Exit status 1 when a survivor is not
listed, a mutant was not checked (an interrupted run) or the ratio is below 90 %.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SURVIVORS = Path(__file__).with_name("survivors.md")
TARGET = 0.90


def main() -> int:
    out = subprocess.run(
        [str(Path(sys.executable).with_name("mutmut")), "results", "--all", "true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    status = {}
    for line in out.splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            status[name] = state.strip()
    if not status:
        print("no mutmut results: run `make mutants` (or `mutmut run`) first")
        return 1
    text = SURVIVORS.read_text()
    equivalents = set(re.findall(r"^- `([^`]+__mutmut_\d+)`: equivalent", text, re.MULTILINE))
    listed = set(
        re.findall(r"^- `([^`]+__mutmut_\d+)`: (?:equivalent|open|killed now)", text, re.MULTILINE)
    )
    counts = Counter(status.values())
    alive = sorted(n for n, s in status.items() if s in ("survived", "no tests", "suspicious"))
    equivalent = [n for n in alive if n in equivalents]
    unexplained = [n for n in alive if n not in listed]
    stale = sorted(listed - set(alive))
    killed = counts["killed"] + counts["timeout"]
    unchecked = counts["not checked"]  # a run stopped before it reached them
    considered = len(status) - unchecked - len(equivalent)
    ratio = killed / considered if considered else 0.0
    print(f"mutants: {len(status)}  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    if unchecked:
        print(f"INCOMPLETE: {unchecked} mutants not checked; the ratio covers the checked ones")
    killed_now = set(re.findall(r"^- `([^`]+__mutmut_\d+)`: killed now", text, re.MULTILINE))
    later = len([n for n in alive if n in killed_now])
    n_open = len([n for n in alive if n in listed]) - len(equivalent) - later
    print(
        f"alive: {len(alive)}, of them listed in tests/mutation/survivors.md as equivalent: "
        f"{len(equivalent)}, as killed by a test added since (not re-checked): {later}, "
        f"as open: {n_open}"
    )
    print(
        f"killed {killed} of {considered} non-equivalent mutants: {100 * ratio:.1f}% "
        f"(target {100 * TARGET:.0f}%)"
    )
    for name in unexplained:
        print(f"  ALIVE, not explained: {name} ({status[name]})")
    for name in stale:
        print(f"  listed but no longer alive (remove from survivors.md): {name}")
    if later:
        print(
            f"with the {later} survivors listed as killed by tests added after the run: "
            f"{100 * (killed + later) / considered:.1f}% (not measured until they are re-run)"
        )
    return 0 if ratio >= TARGET and not unexplained and not unchecked else 1


if __name__ == "__main__":
    sys.exit(main())
