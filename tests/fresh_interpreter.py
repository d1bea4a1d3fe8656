"""Which modules a snippet of code imports, measured in a fresh interpreter.

This test session has long imported Ray, torch and MLflow, so ``sys.modules`` here says
nothing about what an import costs a user; a subprocess starts from nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Sequence


def modules_loaded_after(code: str, modules: Sequence[str]) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; for each of ``modules``, whether it was imported."""
    probe = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        print(json.dumps({{m: m in sys.modules for m in {tuple(modules)!r}}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
