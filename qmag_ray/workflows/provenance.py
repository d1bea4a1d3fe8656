"""Where embeddings came from: the embed job's ``summary.json`` beside its ``embeddings/``.

Recorded with calibrations and evaluations (MLflow parameters, ``calibration.json``), so a
fitted scorer can be traced to the network that produced its embeddings.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
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


SHA_KEY = b"qmag_ray.model_sha256"


class IncompleteEmbeddingsError(ValueError):
    """An embedding output that is not a finished run, or that mixes models."""


@dataclass(frozen=True)
class EmbeddingInput:
    """What an embeddings input is: an embed job's output (complete or not) or a plain table.

    ``model_sha256`` is the one model every part names (None when no part or summary names
    one); ``complete`` is False for an interrupted or failed run used with ``allow_incomplete``.
    """

    uri: str
    job_output: bool
    complete: bool
    status: str
    model_sha256: str | None
    parts: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "embed_job_output": self.job_output,
            "embed_complete": self.complete,
            "embed_status": self.status,
            "embed_parts": self.parts,
        }


def _job_root(uri: str) -> str | None:
    """The embed job's output folder ``uri`` belongs to, or None for a plain table."""
    base = uri.rstrip("/")
    # The embed job writes its run marker first and summary.json last; a folder of parts
    # without either was written by a tool (write_embeddings) and is taken as a table.
    markers = ("summary.json", "_embed_run.json")
    if any(storage.exists(storage.join(base, m)) for m in markers):
        return base
    if posixpath.basename(base) == "embeddings" and "/" in base:
        parent = base.rsplit("/", 1)[0]
        if any(storage.exists(storage.join(parent, m)) for m in markers):
            return parent
    return None


def _part_models(root_uri: str) -> dict[str | None, list[str]]:
    """Part files by the model sha256 in their Parquet metadata (None: not recorded)."""
    import pyarrow.parquet as pq

    fs, root = storage.filesystem(root_uri)
    found: dict[str | None, list[str]] = {}
    if not fs.isdir(root):
        return found
    for path in sorted(fs.find(root)):
        rel = storage.relative(root.rstrip("/"), path)
        if not path.endswith(".parquet") or any(p.startswith((".", "_")) for p in rel.split("/")):
            continue
        with fs.open(path, "rb") as f:
            meta = pq.read_metadata(f).metadata or {}
        sha = meta.get(SHA_KEY)
        found.setdefault(sha.decode() if sha else None, []).append(rel)
    return found


def check_embedding_input(
    uri: str, *, allow_incomplete: bool = False, flag: str = "--embeddings"
) -> EmbeddingInput:
    """Refuse an embed output that is not finished (unless ``allow_incomplete``) or mixes models.

    A finished run has a ``summary.json`` with status ``succeeded``. Every part's
    ``qmag_ray.model_sha256`` metadata (and the summary's ``model_sha256``) must agree. A
    plain Parquet table (no embed job output around it) is taken as it is.

    Raises:
        IncompleteEmbeddingsError: with the output named and the fix.
    """
    where = storage.redact(uri)
    root = _job_root(uri)
    if root is None:
        return EmbeddingInput(uri, False, True, "table", None, 0, "not an embed job output")
    summary_uri = storage.join(root, "summary.json")
    summary: dict[str, Any] = {}
    if storage.exists(summary_uri):
        try:
            summary = json.loads(storage.read_bytes(summary_uri))
        except ValueError:
            summary = {"status": "unreadable"}
    status = str(summary.get("status", "interrupted")) if summary else "interrupted"
    models = _part_models(storage.join(root, "embeddings"))
    parts = sum(len(v) for v in models.values())
    named = {sha: files for sha, files in models.items() if sha}
    if summary.get("model_sha256"):
        named.setdefault(str(summary["model_sha256"]), []).append("summary.json")
    if len(named) > 1:
        detail = "; ".join(
            f"sha256 {sha[:12]}... in {len(files)} file(s), e.g. {files[0]}"
            for sha, files in sorted(named.items(), key=lambda kv: -len(kv[1]))
        )
        raise IncompleteEmbeddingsError(
            f"{flag} {where} mixes embeddings of {len(named)} different models ({detail}); "
            "embed the images again with one model into a fresh output"
        )
    sha = next(iter(named), None)
    complete = status == "succeeded"
    note = ""
    if not complete:
        why = (
            "has no summary.json: its embed run was interrupted"
            if status == "interrupted"
            else f"is a finished but {status} embed run (summary.json status {status!r})"
        )
        note = f"{flag} {where} {why} ({parts} part file(s) so far)"
        if not allow_incomplete:
            raise IncompleteEmbeddingsError(
                f"{note}; run the same embed command again to complete it, or pass "
                "--allow-incomplete to use the rows that exist"
            )
        note += "; used anyway (--allow-incomplete)"
        logger.warning("%s", note)
    return EmbeddingInput(uri, True, complete, status, sha, parts, note)
