"""Where embeddings came from: the embed job's ``summary.json`` beside its ``embeddings/``.

Recorded with calibrations and evaluations (MLflow parameters, ``calibration.json``), so a
fitted scorer can be traced to the network that produced its embeddings.
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

from qmag_ray import storage

logger = logging.getLogger(__name__)

_FIELDS = ("model_uri", "model_sha256", "arch", "embedding_size", "preprocessing", "run_id")


def _candidates(uri: str) -> list[str]:
    base = uri.rstrip("/")
    out = [storage.join(base, "summary.json")]
    if posixpath.basename(base) == "embeddings" or base.endswith(".parquet"):
        parent = base.rsplit("/", 1)[0] if "/" in base else "."
        out.append(storage.join(parent, "summary.json"))
        if base.endswith(".parquet") and posixpath.basename(parent) == "embeddings":
            out.append(storage.join(parent.rsplit("/", 1)[0], "summary.json"))
    return out


def embedding_provenance(uri: str) -> dict[str, Any]:
    """Model URI (redacted), sha256, architecture... of the embed run, or ``{}`` if unknown."""
    for candidate in _candidates(uri):
        try:
            if not storage.exists(candidate):
                continue
            data = json.loads(storage.read_bytes(candidate))
        except (OSError, ValueError) as exc:
            logger.warning("cannot read embedding summary %s: %s", storage.redact(candidate), exc)
            continue
        if not isinstance(data, dict):
            continue
        found = {f"embed_{k}": data[k] for k in _FIELDS if k in data}
        settings = data.get("settings") or {}
        if isinstance(settings, dict) and "norm_is_quality" in settings:
            found["embed_norm_is_quality"] = bool(settings["norm_is_quality"])
        if "model_uri" in data:
            found["embed_model_uri"] = storage.redact(str(data["model_uri"]))
        return found
    return {}
