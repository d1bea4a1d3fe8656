"""The fault-injection suite: every case is marked ``faults``; long ones also ``faults_long``.

``make test`` runs the cases that fit CI's time; the ``faults_long`` ones are deselected
unless QMAG_FAULTS_LONG=1 (``make faults`` sets it and runs only this folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    long_ok = os.environ.get("QMAG_FAULTS_LONG") == "1"
    kept, dropped = [], []
    for item in items:
        if HERE not in Path(str(item.fspath)).resolve().parents:
            kept.append(item)
            continue
        item.add_marker(pytest.mark.faults)
        (dropped if item.get_closest_marker("faults_long") and not long_ok else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
