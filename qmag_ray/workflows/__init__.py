"""Workflows behind ``qmag-ray calibrate``, ``evaluate`` and ``recalibrate``: library functions
that load embeddings and pairs, fit or score, validate and write result files.

They never read argv or the environment or connect to Ray: entry points do (``qmag_ray.cli``).
Calibrate and evaluate do not record to MLflow either (their commands do); ``recalibrate`` exists
to drive the registry (challenger, gate, champion) and does so through ``qmag_ray.tracking``.
Public names resolve on first use, so importing this package is cheap.
"""

from __future__ import annotations

from qmag_ray._lazy import lazy_exports

_LAZY = {
    "CalibrateConfig": "qmag_ray.workflows.config",
    "EvaluateConfig": "qmag_ray.workflows.config",
    "CalibrationOutcome": "qmag_ray.workflows.calibrate",
    "run_calibration": "qmag_ray.workflows.calibrate",
    "EvaluationOutcome": "qmag_ray.workflows.evaluate",
    "run_evaluation": "qmag_ray.workflows.evaluate",
    "WorkflowError": "qmag_ray.errors",
    "RecalibrateConfig": "qmag_ray.workflows.recalibrate_config",
    "run_recalibration": "qmag_ray.workflows.recalibrate",
}

__all__ = list(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
