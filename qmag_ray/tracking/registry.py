"""Registered scorer versions and their aliases (MLflow 3: ``champion``, ``challenger``).

Services load ``models:/<name>@champion``; recalibration registers new versions, tags them with
their figures and moves aliases. ``move_alias`` re-reads the alias right before setting it, so
a concurrent recalibration that moved it meanwhile is noticed instead of overwritten.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qmag_ray.tracking.sanitize import sanitize

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from qmag_ray.calibration.result import QMagFaceCalibration

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "qmagface"
CHAMPION = "champion"
CHALLENGER = "challenger"
TAG_FINGERPRINT = "qmag_ray.data_fingerprint"
TAG_RUN_KIND = "qmag_ray.kind"
TAG_COMPLETE = "qmag_ray.registration"


def client() -> MlflowClient:
    """A client on the configured tracking and registry URIs."""
    from mlflow import MlflowClient

    return MlflowClient()


def calibration_tags(calibration: QMagFaceCalibration) -> dict[str, str]:
    """Version tags describing a calibration: alpha, beta, pair counts, thresholds, data."""
    return {
        "alpha": repr(calibration.alpha),
        "beta": repr(calibration.beta),
        "method": calibration.method,
        "n_genuine": str(calibration.n_genuine),
        "n_impostor": str(calibration.n_impostor),
        "thresholds": json.dumps(calibration.thresholds, sort_keys=True),
        TAG_FINGERPRINT: calibration.fingerprint or "unknown",
    }


def tag_version(model_name: str, version: str, tags: Mapping[str, Any]) -> None:
    """Set (sanitised) tags on a model version; non-string values are JSON-encoded."""
    mlflow_client = client()
    for key, value in sanitize(dict(tags)).items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        mlflow_client.set_model_version_tag(model_name, version, key, text)


def register_scorer(
    calibration: QMagFaceCalibration,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    artifact_name: str = "scorer",
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> ModelVersion:
    """Log the scorer in the active run and register it as a new version of ``model_name``.

    The version is created in ONE request that carries all its tags (``calibration_tags``,
    ``tags`` and ``TAG_COMPLETE``), so an outage never leaves a version without them: either it
    exists with every tag or it does not exist. Assigns no alias: that is the caller's decision.
    """
    import mlflow

    from qmag_ray.tracking.scorer import log_scorer

    info = log_scorer(calibration, name=artifact_name)
    all_tags = {**calibration_tags(calibration), **dict(tags or {})}
    text = {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        for k, v in sanitize(all_tags).items()
        if v is not None
    }
    text[TAG_COMPLETE] = "true"  # versions without it were made by older code or by hand
    made = mlflow.register_model(info.model_uri, model_name, tags=text)
    version = str(made.version)
    if description:
        try:
            client().update_model_version(model_name, version, description=description)
        except Exception as exc:  # noqa: BLE001 - cosmetic; the version is complete without it
            logger.warning("could not set the description of %s %s: %s", model_name, version, exc)
    # debug: the commands report it (`registry: qmagface version N`); once is enough
    logger.debug("registered %s version %s", model_name, version)
    return made if not description else client().get_model_version(model_name, version)


def alias_version(model_name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or ``None`` when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(model_name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` unconditionally (used for ``challenger``)."""
    client().set_registered_model_alias(model_name, alias, str(version))
    logger.debug("alias %s@%s -> version %s", model_name, alias, version)  # reported, as above


def move_alias(model_name: str, alias: str, version: str, *, expected: str | None) -> bool:
    """Point ``alias`` at ``version`` only if it still points at ``expected`` (None: unset).

    Returns False, leaving the alias alone, when another process moved it since ``expected``
    was read: the caller must re-decide against the new holder. MLflow has no atomic
    compare-and-set, so a window of one request remains; callers only ever move an alias to
    versions that passed their gate, so whichever write lands last is a version that passed.
    """
    current = alias_version(model_name, alias)
    current_version = None if current is None else str(current.version)
    if current_version != (None if expected is None else str(expected)):
        logger.warning(
            "%s@%s moved to version %s meanwhile (expected %s); not moving it to %s",
            model_name,
            alias,
            current_version,
            expected,
            version,
        )
        return False
    set_alias(model_name, alias, version)
    return True


def find_versions(model_name: str, tag: str, value: str) -> list[ModelVersion]:
    """Versions of ``model_name`` whose tag ``tag`` equals ``value``, newest first."""
    from mlflow.exceptions import MlflowException

    quoted = value.replace("'", "\\'")
    try:
        query = f"name = '{model_name}' AND tags.`{tag}` = '{quoted}'"
        found = client().search_model_versions(query)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted(found, key=lambda v: int(v.version), reverse=True)
