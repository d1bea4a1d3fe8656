"""The one gate to ``../shared/data`` (benchmark pair files, toy faces, KubeRay CRDs).

Its own module (not conftest.py) so that tests can import it by a name no other file in the
suite shares: ``from shared_gate import need_shared``. tests/conftest.py exposes it as the
``shared_data`` fixture and counts its skips in the summary.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"

#: Every skip for missing shared data starts with this, so the summary can count them.
SHARED_SKIP = "needs the shared test data"


def need_shared(*relative: str) -> Path:
    """``../shared/data`` (or ``../shared/data/<relative>``), skipping the test when it is absent.

    The one place tests reach the shared data (benchmark pair files, toy faces): on a user's
    clone without ``../shared`` the test skips with one line naming what is missing and where it
    is expected; under ``CI=true`` (CI always has the data) the test fails instead.
    """
    wanted = SHARED_DATA.joinpath(*relative)
    missing = SHARED_DATA if not SHARED_DATA.is_dir() else wanted
    if not missing.exists():
        message = f"{SHARED_SKIP}: {missing} is missing (clone the shared data beside the repo)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message + " [CI=true: required]", pytrace=False)
        pytest.skip(message)
    return wanted
