"""Loading the registered scorer in a face recognition service and scoring with it.

    from qmag_ray.tracking.consumer import load_scorer

    scorer = load_scorer("models:/qmagface@champion", tracking_uri="http://mlflow:5000")
    result = scorer.score(embeddings_a, embeddings_b)          # (n, d) arrays, unnormalised
    result.score, result.match                                  # QMagFace scores, decisions

An alias is resolved to a version number once, at load time, so a service keeps scoring with
the version it loaded (``scorer.version``) even when the alias moves; reload to follow it.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from qmag_ray.calibration.result import QMagFaceCalibration
from qmag_ray.tracking.scorer import (
    DEFAULT_FMR,
    QMagFaceScorerModel,
    apply_threshold,
    check_fmr,
    cosine_scores,
    embedding_scores,
)

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")


@dataclass(frozen=True)
class Scores:
    """Scores of n comparisons at one operating point."""

    score: np.ndarray
    cosine: np.ndarray
    quality: np.ndarray
    match: np.ndarray
    fmr: float
    threshold: float


class Scorer:
    """A loaded QMagFace scorer: the calibration plus where it came from."""

    def __init__(
        self,
        calibration: QMagFaceCalibration,
        *,
        model_uri: str | None = None,
        version: str | None = None,
    ) -> None:
        self.calibration = calibration
        self.model_uri = model_uri
        self.version = version

    def score(self, embedding_a: Any, embedding_b: Any, *, fmr: float = DEFAULT_FMR) -> Scores:
        """Score row-wise pairs of unnormalised embeddings ((n, d) arrays, or one pair (d,))."""
        fmr, threshold = check_fmr(self.calibration, fmr)  # fail before any work
        a = np.asarray(embedding_a, dtype=np.float64)
        b = np.asarray(embedding_b, dtype=np.float64)
        if a.ndim == 1 and b.ndim == 1:
            a, b = a[None, :], b[None, :]
        cos, quality = embedding_scores(self.calibration, a, b)
        return Scores(
            **apply_threshold(self.calibration, cos, quality, threshold),
            fmr=fmr,
            threshold=threshold,
        )

    def score_cosine(
        self, cosine: Any, quality_a: Any, quality_b: Any, *, fmr: float = DEFAULT_FMR
    ) -> Scores:
        """Score comparisons given as cosine scores and the two faces' qualities (norms)."""
        fmr, threshold = check_fmr(self.calibration, fmr)
        cos, quality = cosine_scores(cosine, quality_a, quality_b)
        return Scores(
            **apply_threshold(self.calibration, cos, quality, threshold),
            fmr=fmr,
            threshold=threshold,
        )

    def __repr__(self) -> str:
        c = self.calibration
        return (
            f"Scorer(model_uri={self.model_uri!r}, version={self.version!r}, "
            f"alpha={c.alpha:.6g}, beta={c.beta:.6g})"
        )


def resolve_model_uri(
    model_uri: str, *, tracking_uri: str | None = None, registry_uri: str | None = None
) -> tuple[str, str | None]:
    """``models:/name@alias`` -> (``models:/name/<version>``, version); other URIs unchanged."""
    match = _ALIAS_URI.match(model_uri)
    if not match:
        version = model_uri.rsplit("/", 1)[-1] if model_uri.startswith("models:/") else None
        return model_uri, version if version and version.isdigit() else None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias = match["name"], match["alias"]
    mlflow_client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    try:
        version = mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise LookupError(
            f"no version of registered model {name!r} has alias {alias!r}: {exc.message}"
        ) from None
    return f"models:/{name}/{version.version}", str(version.version)


def load_scorer(
    model_uri: str, *, tracking_uri: str | None = None, registry_uri: str | None = None
) -> Scorer:
    """Load a registered (or logged) scorer: ``models:/qmagface@champion``, ``models:/x/3``...

    ``tracking_uri`` defaults to MLflow's own configuration (``MLFLOW_TRACKING_URI``). The
    model is loaded through ``mlflow.pyfunc`` like any consumer would, then unwrapped.
    """
    import mlflow.artifacts
    import mlflow.pyfunc

    registry_uri = registry_uri or tracking_uri
    resolved, version = resolve_model_uri(
        model_uri, tracking_uri=tracking_uri, registry_uri=registry_uri
    )
    if version is not None and tracking_uri is not None:
        # MLflow resolves a models:/ URI with its default client, which ignores the tracking
        # URI given here; ask the named registry for the version's artifact location instead.
        from mlflow import MlflowClient

        name = resolved.removeprefix("models:/").rsplit("/", 1)[0]
        named = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        resolved = named.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory(prefix="qmag-scorer-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=resolved,
            dst_path=tmp,
            tracking_uri=tracking_uri,
            registry_uri=registry_uri,
        )
        model = mlflow.pyfunc.load_model(local).unwrap_python_model()
    if not isinstance(model, QMagFaceScorerModel) or model.calibration is None:
        raise TypeError(f"{model_uri} is not a qmag-ray QMagFace scorer ({type(model).__name__})")
    return Scorer(model.calibration, model_uri=model_uri, version=version)
