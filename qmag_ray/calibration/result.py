"""The fitted QMagFace scorer: alpha, beta and the evidence behind them, as JSON (never pickle).

``QMagFaceCalibration`` is what calibration produces, what MLflow stores as the registered
model's artifact, and what services load to score comparisons.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qmag_ray import storage
from qmag_ray.config import Settings, option, settings
from qmag_ray.fmr import fmr_key

FORMAT = "qmag-ray/calibration"
FORMAT_VERSION = 1


#: The paper's smallest grid FMR: the floor of a grid whose ``fmr_min`` is not given.
PAPER_FMR_MIN = 1e-5


@settings
class CalibrationGrid(Settings):
    """The search grid of spec section 3; every value settable, the paper's as defaults.

    ``fmr_min=None`` (the default) means the paper's 1e-5 *unless the data cannot measure it*:
    calibration then raises the floor to the smallest FMR its impostor pairs support and says
    so (``qmag_ray.calibration.fit.resolve_grid``). A given ``fmr_min`` is kept or refused.
    """

    n_fmr: int = option(50, "FMR grid points (log-spaced; at least 2 to fit a line).", ge=2)
    fmr_min: float | None = option(
        None,
        "Smallest FMR of the grid (default: the paper's 1e-5, raised with a note to what the "
        "impostor pairs can measure; a given value that they cannot measure is an error).",
        gt=0,
        lt=1,
    )
    fmr_max: float = option(1e-2, "Largest FMR of the grid.", gt=0, lt=1)
    n_weights: int = option(20, "Candidate quality weights per FMR.", ge=1)
    max_ratio: float = option(
        0.5, "Candidate weights span +-max_ratio / (largest pair quality).", gt=0
    )

    def check(self) -> None:
        if not self.floor < self.fmr_max:
            raise ValueError(
                f"the grid needs `fmr_min` < `fmr_max`, got fmr_min={self.floor}, "
                f"fmr_max={self.fmr_max}"
            )

    @property
    def floor(self) -> float:
        """The smallest FMR: ``fmr_min``, or the paper's 1e-5 when it is not given."""
        return PAPER_FMR_MIN if self.fmr_min is None else float(self.fmr_min)

    def fmrs(self) -> np.ndarray:
        """The FMR values, log-spaced from the floor to fmr_max."""
        return np.logspace(math.log10(self.floor), math.log10(self.fmr_max), self.n_fmr)

    def weights(self, max_quality: float) -> np.ndarray:
        """The candidate weights, linear in [-m, m] with m = max_ratio / max_quality."""
        if not max_quality > 0 or not math.isfinite(max_quality):
            raise ValueError(f"the largest pair quality must be positive, got {max_quality}")
        m = self.max_ratio / max_quality
        return np.linspace(-m, m, self.n_weights)


@dataclass(frozen=True)
class QMagFaceCalibration:
    """A fitted quality-aware scorer: ``s_hat = min(0, beta * s - alpha) * q + s``.

    ``thresholds`` maps FMR keys (``fmr_key``) to decision thresholds on the QMagFace score
    measured on the calibration data: a comparison is a match when ``score >= threshold``,
    and the threshold for FMR ``f`` is the one with the lowest FNMR among those whose FMR is
    at most ``f`` (ISO/IEC 19795-1). Only FMRs the data supports are present.
    """

    alpha: float
    beta: float
    method: str = "paper"
    grid: CalibrationGrid = field(default_factory=CalibrationGrid)
    weights: list[float] = field(default_factory=list)
    fmrs: list[float] = field(default_factory=list)
    optimal_weights: list[float] = field(default_factory=list)
    optimal_thresholds: list[float] = field(default_factory=list)
    fnmr_table: list[list[float]] = field(default_factory=list)  # [weight][fmr]
    n_genuine: int = 0
    n_impostor: int = 0
    fingerprint: str = ""
    thresholds: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"calibration {name} must be finite, got {value}")

    # --- scoring -------------------------------------------------------------------------
    def score(self, cosine: np.ndarray, quality: np.ndarray) -> np.ndarray:
        """QMagFace scores from cosine scores and pair qualities (min of the two norms)."""
        from qmag_ray.scores import qmagface_score

        return qmagface_score(cosine, quality, self.alpha, self.beta)

    def threshold_at(self, fmr: float) -> float:
        """The stored operating threshold for ``fmr``; a clear error when there is none."""
        key = fmr_key(fmr)
        if key not in self.thresholds:
            have = ", ".join(sorted(self.thresholds, key=float)) or "none"
            raise KeyError(
                f"this calibration has no threshold for FMR {fmr:g}; it has thresholds for: {have}"
            )
        return float(self.thresholds[key])

    # --- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = FORMAT
        data["format_version"] = FORMAT_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QMagFaceCalibration:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a qmag-ray calibration (format is {data.get('format')!r})")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"calibration format version {data['format_version']} is newer than this "
                f"qmag-ray understands ({FORMAT_VERSION}); upgrade qmag-ray"
            )
        body = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        body["grid"] = CalibrationGrid(**body.get("grid", {}))
        return cls(**body)

    def save(self, uri: str) -> None:
        """Write the calibration as JSON to ``uri`` (any fsspec URI), atomically."""
        storage.write_bytes(uri, self.to_json().encode())

    @classmethod
    def from_file(cls, uri: str) -> QMagFaceCalibration:
        try:
            data = json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            raise FileNotFoundError(f"calibration file not found: {uri}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration file {uri} is not valid JSON: {exc}") from None
        return cls.from_dict(data)
