"""qmag-ray: quality-aware face recognition (QMagFace) as a distributed Ray job.

Importing the package starts nothing and imports no heavy dependency; the public names below
are resolved on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "fit_qmagface": "qmag_ray.calibration.fit",
    "QMagFaceCalibration": "qmag_ray.calibration.result",
    "CalibrationGrid": "qmag_ray.calibration.result",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qmag_ray' has no attribute {name!r}")
