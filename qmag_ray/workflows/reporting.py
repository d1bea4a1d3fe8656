"""A workflow's reports and result files: the verification report of scored pairs, its flat
MLflow metrics, and writers that put JSON, CSV and PNG files under an output URI through
``qmag_ray.storage``. Pairs are scored by ``qmag_ray.pairs.scoring``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from qmag_ray import metrics, plots, storage
from qmag_ray.calibration.result import QMagFaceCalibration

logger = logging.getLogger(__name__)


def report(
    cosine: np.ndarray,
    quality: np.ndarray,
    label: np.ndarray,
    calibration: QMagFaceCalibration,
    *,
    edc_fmr: float = 1e-3,
) -> dict[str, Any]:
    """``metrics.verification_report`` of cosine against the calibration's QMagFace score."""
    qmag = calibration.score(cosine, quality)
    return metrics.verification_report(cosine, qmag, label, quality, edc_fmr=edc_fmr)


def flat_metrics(rep: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric figures of a verification report as flat keys for MLflow.

    Keys follow ``tracking.gate.fnmr_metric_name``: ``qmagface.fnmr_at_fmr_1e-03``,
    ``cosine.eer``, ``qmagface.accuracy``...; ``prefix`` is prepended with a dot.
    """
    out: dict[str, float] = {
        "n_genuine": float(rep["n_genuine"]),
        "n_impostor": float(rep["n_impostor"]),
    }
    for name, m in rep["scores"].items():
        for key, value in m["fnmr_at_fmr"].items():
            out[f"{name}.fnmr_at_fmr_{key}"] = float(value)
        for key in ("eer", "auc", "accuracy", "accuracy_std"):
            if m.get(key) is not None and math.isfinite(m[key]):
                out[f"{name}.{key}"] = float(m[key])
    return {f"{prefix}.{k}" if prefix else k: v for k, v in out.items()}


def write_json(uri: str, data: Any) -> str:
    """Pretty JSON (numpy values converted) written atomically; returns ``uri``."""

    def default(value: Any) -> Any:
        if hasattr(value, "tolist"):
            return value.tolist()
        return str(value)

    storage.write_bytes(uri, json.dumps(data, indent=2, sort_keys=True, default=default).encode())
    return uri


def write_csv(uri: str, frame: Any) -> str:
    """A pandas DataFrame as CSV; returns ``uri``."""
    storage.write_bytes(uri, frame.to_csv(index=False).encode())
    return uri


def write_figures(
    folder: str,
    cosine: np.ndarray,
    quality: np.ndarray,
    label: np.ndarray,
    calibration: QMagFaceCalibration,
    rep: Mapping[str, Any] | None,
    *,
    with_calibration_plot: bool,
    subset: str = "",
) -> list[str]:
    """DET, quality histograms, EDC (and the weight-threshold plot) as PNG under ``folder``;
    ``subset`` (``in-sample``, ``held-out``) and the pair counts head every title."""
    scores = {"cosine": cosine, "QMagFace": calibration.score(cosine, quality)}
    return plots.write_plots(
        folder,
        labels=label,
        quality=quality,
        scores=scores,
        report=rep,
        calibration=calibration if with_calibration_plot else None,
        subset=subset,
    )
