"""qmag-ray: quality-aware face recognition (QMagFace) as a distributed Ray job.

Importing the package starts nothing and imports no heavy dependency; the public names below
are resolved on first use.
"""

from __future__ import annotations

from qmag_ray._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "fit_qmagface": "qmag_ray.calibration.fit",
    "QMagFaceCalibration": "qmag_ray.calibration.result",
    "CalibrationGrid": "qmag_ray.calibration.result",
}

__all__ = ["__version__", *_LAZY]

__getattr__ = lazy_exports(__name__, _LAZY)
