"""Scoring listed pairs for metrics and writing a workflow's result files.

``pair_arrays`` scores the pairs of a ``ListedPairSource`` into arrays, one Ray task per shard
when asked (the numpy code of ``ListedPairSource`` runs in the tasks), else in this process.
The writers put JSON, CSV and PNG files under an output URI through ``qmag_ray.storage``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from qmag_ray import metrics, plots, storage
from qmag_ray.calibration.result import QMagFaceCalibration, fmr_key
from qmag_ray.pairs.generated import GeneratedPairSource, list_order
from qmag_ray.pairs.listed import ListedPairSource

logger = logging.getLogger(__name__)


def _score_shard(source: ListedPairSource, index: int) -> tuple[np.ndarray, ...]:
    blocks = list(source.shard_blocks(index))
    if not blocks:
        return np.empty(0), np.empty(0), np.empty(0, dtype=np.int8)
    return tuple(
        np.concatenate([getattr(b, k) for b in blocks]) for k in ("cosine", "quality", "label")
    )


def pair_arrays(
    source: ListedPairSource | GeneratedPairSource, *, use_ray: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine, pair quality, label) of every pair, in list order."""
    if not use_ray or source.num_shards() == 1:
        return source.arrays()
    import ray

    task = ray.remote(_score_shard)
    ref = ray.put(source)
    parts = ray.get([task.remote(ref, i) for i in range(source.num_shards())])
    cos, q, y = (np.concatenate([p[k] for p in parts]) for k in range(3))
    if isinstance(source, GeneratedPairSource):
        return list_order(cos, q, y)
    return cos, q, y


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


def validation_metrics(validation: Mapping[str, Any], prefix: str = "held_out") -> dict[str, float]:
    """Held-out FNMR at the target FMRs, EERs and the guard verdict as flat MLflow metrics."""
    out: dict[str, float] = {}
    for row in validation.get("rows", []):
        if not row["target"]:
            continue
        for name in ("cosine", "qmagface"):
            value = row[f"{name}_fnmr"]
            if value is not None:
                out[f"{prefix}.{name}.fnmr_at_fmr_{fmr_key(row['fmr'])}"] = float(value)
    for name, value in validation.get("eer", {}).items():
        if value is not None:
            out[f"{prefix}.{name}.eer"] = float(value)
    passed = validation.get("guard", {}).get("passed")
    if passed is not None:
        out["guard_passed"] = float(bool(passed))
    out.update(method_metrics(validation.get("methods"), prefix))
    return out


def method_metrics(
    comparison: Mapping[str, Any] | None, prefix: str = "held_out"
) -> dict[str, float]:
    """Every method's alpha, beta and held-out figures (``--compare-methods``) as metrics:
    ``methods.<m>.alpha``, ``<prefix>.methods.<m>.fnmr_at_fmr_<key>`` (target FMRs),
    ``<prefix>.methods.<m>.eer`` and ``<prefix>.methods.<m>.guard_passed``."""
    if not comparison:
        return {}
    out: dict[str, float] = {}
    for method, fit in comparison["fits"].items():
        out[f"methods.{method}.alpha"] = float(fit["alpha"])
        out[f"methods.{method}.beta"] = float(fit["beta"])
    for row in comparison.get("rows", []):
        if row["target"]:
            for method in comparison["methods"]:
                if row[method] is not None:
                    key = f"{prefix}.methods.{method}.fnmr_at_fmr_{fmr_key(row['fmr'])}"
                    out[key] = float(row[method])
    for method in comparison["methods"]:
        value = comparison.get("eer", {}).get(method)
        if value is not None:
            out[f"{prefix}.methods.{method}.eer"] = float(value)
        passed = comparison.get("guard", {}).get(method)
        if passed is not None:
            out[f"{prefix}.methods.{method}.guard_passed"] = float(bool(passed))
    return out


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


def shuffled_for_folds(
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generated pairs come genuine-first; a seeded permutation makes 10-fold splits mixed."""
    perm = np.random.default_rng(seed).permutation(len(arrays[0]))
    return arrays[0][perm], arrays[1][perm], arrays[2][perm]
