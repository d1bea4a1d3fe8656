"""Per-pair score files in bob.bio's CSV score layout, and reading them back.

bob.bio.base (``bob bio metrics``, ``bob bio det``; its ``CSVScoreWriter`` and
``score.load.split_csv_scores``) reads a comma-separated file with a header whose columns
include ``probe_subject_id``, ``bio_ref_subject_id`` and ``score``; a row is genuine iff the
two subject ids are equal. Its writer puts ``probe_template_id`` and ``bio_ref_template_id``
(the samples) beside them and metadata as further ``probe_*`` / ``bio_ref_*`` columns. The
files here follow that layout, one row per pair::

    probe_template_id, probe_subject_id, bio_ref_template_id, bio_ref_subject_id, score,
    label, cosine, qmagface, probe_quality, bio_ref_quality

``probe`` is side a of the pair, ``bio_ref`` side b, ``score`` is the file's system (cosine
in ``cosine.csv``, QMagFace in ``qmagface.csv``), ``label`` 1 genuine / 0 impostor. Where an
identity is unknown the subject id is written so that bob's reader still splits the pairs by
``label``: ``unknown:<template>`` (and, for a genuine pair, side a's id on both sides).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from qmag_ray import storage

BOB_COLUMNS = (
    "probe_template_id",
    "probe_subject_id",
    "bio_ref_template_id",
    "bio_ref_subject_id",
    "score",
)
EXTRA_COLUMNS = ("label", "cosine", "qmagface", "probe_quality", "bio_ref_quality")


class ScoreFileError(ValueError):
    """A score file that cannot be read; the message names the file and the column."""


def _subjects(
    path_a: np.ndarray, id_a: np.ndarray, path_b: np.ndarray, id_b: np.ndarray, label: np.ndarray
) -> tuple[list[str], list[str]]:
    sa, sb = [], []
    for pa, ia, pb, ib, y in zip(path_a, id_a, path_b, id_b, label, strict=True):
        a = f"unknown:{pa}" if ia is None else str(ia)
        b = f"unknown:{pb}" if ib is None else str(ib)
        if ia is None or ib is None:
            b = a if y == 1 else (b if b != a else f"unknown:{pb}")
        sa.append(a)
        sb.append(b)
    return sa, sb


def score_file_frame(
    *,
    path_a: np.ndarray,
    id_a: np.ndarray,
    path_b: np.ndarray,
    id_b: np.ndarray,
    label: np.ndarray,
    cosine: np.ndarray,
    qmagface: np.ndarray,
    quality_a: np.ndarray,
    quality_b: np.ndarray,
    system: str,
) -> pd.DataFrame:
    """The score table of one system (``cosine`` or ``qmagface``) in bob's CSV layout."""
    if system not in ("cosine", "qmagface"):
        raise ValueError(f"system must be 'cosine' or 'qmagface', got {system!r}")
    sa, sb = _subjects(path_a, id_a, path_b, id_b, np.asarray(label))
    frame = pd.DataFrame(
        {
            "probe_template_id": [str(p) for p in path_a],
            "probe_subject_id": sa,
            "bio_ref_template_id": [str(p) for p in path_b],
            "bio_ref_subject_id": sb,
            "score": np.asarray(cosine if system == "cosine" else qmagface, np.float64),
            "label": np.asarray(label, np.int8),
            "cosine": np.asarray(cosine, np.float64),
            "qmagface": np.asarray(qmagface, np.float64),
            "probe_quality": np.asarray(quality_a, np.float64),
            "bio_ref_quality": np.asarray(quality_b, np.float64),
        }
    )
    return frame


def write_score_file(uri: str, frame: pd.DataFrame) -> str:
    """Write a score table as CSV (atomically); returns ``uri``."""
    storage.write_bytes(uri, frame.to_csv(index=False, float_format="%.9g").encode())
    return uri


@dataclass(frozen=True, eq=False)
class ScoreSet:
    """The scores of one system read from a score file: what ``compare`` needs."""

    name: str
    scores: np.ndarray
    labels: np.ndarray
    id_a: np.ndarray
    id_b: np.ndarray
    source: str


def read_score_file(uri: str, name: str | None = None) -> ScoreSet:
    """Read a bob-layout CSV score file (ours or bob's own).

    The label is the ``label`` column when there is one, else subject equality (bob's rule).

    Raises:
        ScoreFileError: unreadable file, missing columns or non-numeric scores.
    """
    where = storage.redact(uri)
    try:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
    except FileNotFoundError:
        raise ScoreFileError(f"score file not found: {where}") from None
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ScoreFileError(f"cannot read score file {where}: {exc}") from None
    missing = [c for c in ("probe_subject_id", "bio_ref_subject_id", "score") if c not in frame]
    if missing:
        raise ScoreFileError(
            f"{where} lacks column(s) {', '.join(missing)}: not a bob CSV score file "
            f"(columns: {', '.join(map(str, frame.columns))})"
        )
    score = pd.to_numeric(frame["score"], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(score).all():
        raise ScoreFileError(f"{where}: column 'score' has empty or non-numeric values")
    pa_, pb_ = frame["probe_subject_id"].astype(str), frame["bio_ref_subject_id"].astype(str)
    if "label" in frame:
        label = frame["label"].to_numpy().astype(np.int8)
    else:
        label = (pa_ == pb_).to_numpy().astype(np.int8)
    label_name = name or storage.redact(uri).rstrip("/").rsplit("/", 1)[-1].removesuffix(".csv")
    return ScoreSet(label_name, score, label, pa_.to_numpy(object), pb_.to_numpy(object), where)
