"""Which per-image quality (or group label) a command uses: a column of the embeddings or of
a joined file.

The embeddings table carries ``quality`` (the MagFace norm) and may carry more per-image
columns (``serfiq`` from ``embed --quality serfiq``, group labels, anything a tool wrote). A
joined file is CSV or Parquet with a ``path`` column (the embeddings' ``path``, relative to
the images root) and the named column, e.g. quality scores from OFIQ, CR-FIQA or a vendor SDK.

``with_quality`` returns the embeddings table with its ``quality`` replaced by the chosen
column, so every stage downstream (pairs, calibration, scoring, evaluation) works unchanged.
``quality`` always names the embeddings' own column (the norm); other names are read from the
joined file when one is given, else from the embeddings. Images without a value (absent from
the joined file, or empty/NaN) are dropped from the table
and counted: for listed pairs they then count as missing images (``--on-missing`` decides),
generated pairs simply do not use them. Negative values are refused: QMagFace's weight grid,
its guard and pair quality (the lower of two) assume a non-negative scale where higher is
better.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from qmag_ray import storage
from qmag_ray.embeddings import SHOW, EmbeddingTable, _part_files
from qmag_ray.errors import WorkflowError

logger = logging.getLogger(__name__)

NORM = "quality"
#: Columns of the embeddings layout that are never a quality or a group.
RESERVED = ("path", "identity", "embedding")


class QualityColumnError(WorkflowError):
    """A quality or group column that cannot be used; the message names flag, file and fix."""


class QualityChoiceLike(Protocol):
    """The quality settings of a command (``workflows.config.QualityChoice``)."""

    column: str
    file: str | None
    allow_norm: bool


@dataclass(frozen=True)
class QualityInfo:
    """Which quality was used and what happened to images without one."""

    column: str
    source: str
    n_images: int
    n_missing: int
    missing_examples: list[str] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "source": self.source,
            "n_images": self.n_images,
            "n_missing": self.n_missing,
            "missing_examples": list(self.missing_examples),
            "min": self.minimum,
            "max": self.maximum,
        }

    def note(self) -> str | None:
        if not self.n_missing:
            return None
        shown = ", ".join(repr(p) for p in self.missing_examples)
        return (
            f"{self.n_missing} of {self.n_images} image(s) have no {self.column!r} value in "
            f"{self.source} and are left out like missing images ({shown}"
            f"{', ...' if self.n_missing > len(self.missing_examples) else ''})"
        )


def _read_frame(uri: str, columns: list[str], flag: str) -> pd.DataFrame:
    """``path`` plus ``columns`` of a CSV or Parquet file."""
    where = storage.redact(uri)
    lower = uri.lower()
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise QualityColumnError(f"{flag}: file not found: {where}") from None
    try:
        if lower.endswith((".parquet", ".pq")):
            frame = pq.read_table(io.BytesIO(data)).to_pandas()
        elif lower.endswith((".csv", ".tsv")):
            frame = pd.read_csv(io.BytesIO(data), sep="\t" if lower.endswith(".tsv") else ",")
        else:
            raise QualityColumnError(
                f"{flag}: {where} must be a .csv, .tsv or .parquet file with a 'path' column"
            )
    except QualityColumnError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise QualityColumnError(f"{flag}: cannot read {where}: {exc}") from None
    need = ["path", *columns]
    absent = [c for c in need if c not in frame.columns]
    if absent:
        raise QualityColumnError(
            f"{flag}: {where} has no column {', '.join(map(repr, absent))} (columns: "
            f"{', '.join(map(str, frame.columns))})"
        )
    frame = frame[need]
    dup = frame["path"][frame["path"].duplicated()]
    if len(dup):
        raise QualityColumnError(
            f"{flag}: {len(dup)} path(s) occur more than once in {where}: "
            f"{', '.join(repr(str(p)) for p in dup[:SHOW])}"
        )
    return frame


def _embedding_columns(uri: str, columns: list[str], flag: str) -> pd.DataFrame:
    """``path`` plus ``columns`` read from the embeddings' Parquet parts."""
    fs, files, _ = _part_files(uri)
    parts = []
    for p in files:
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            absent = [c for c in columns if c not in names]
            if absent:
                usable = sorted(names - set(RESERVED))
                raise QualityColumnError(
                    f"{flag}: the embeddings {storage.redact(uri)} have no column "
                    f"{', '.join(map(repr, absent))} (per-image columns there: "
                    f"{', '.join(usable) or 'none'}); give a joined file with --quality-file "
                    "(CSV/Parquet with 'path' and the column), or embed with --quality serfiq"
                )
            parts.append(pf.read(columns=["path", *columns]).to_pandas())
    return pd.concat(parts, ignore_index=True)


def image_values(
    table: EmbeddingTable,
    embeddings_uri: str,
    column: str,
    file: str | None = None,
    *,
    flag: str = "--quality-column",
) -> tuple[np.ndarray, str]:
    """One value per table row from ``column`` (object array, None where absent) and where
    it was read from."""
    if column in ("path", "identity", "embedding"):
        raise QualityColumnError(f"{flag}: {column!r} is not a per-image value column")
    if file:
        frame, source = _read_frame(file, [column], "--quality-file"), storage.redact(file)
    else:
        frame = _embedding_columns(embeddings_uri, [column], flag)
        source = f"the embeddings {storage.redact(embeddings_uri)}"
    lookup = dict(zip(frame["path"].astype(str), frame[column], strict=True))
    values = np.array([lookup.get(str(p)) for p in table.path], dtype=object)
    return values, source


def with_quality(
    table: EmbeddingTable,
    embeddings_uri: str,
    column: str = NORM,
    file: str | None = None,
    *,
    allow_norm: bool = False,
) -> tuple[EmbeddingTable, QualityInfo]:
    """The table with ``quality`` taken from ``column`` (rows without a value dropped).

    Raises:
        QualityColumnError: unknown column, unreadable file, non-numeric or negative values,
            or no image with a value at all.
    """
    if column == NORM:  # the norm always comes from the embeddings themselves
        from qmag_ray.workflows.provenance import embedding_provenance

        if (
            not allow_norm
            and embedding_provenance(embeddings_uri).get("embed_norm_is_quality", True) is False
        ):
            raise QualityColumnError(
                f"the embeddings {storage.redact(embeddings_uri)} come from a model that is not "
                "MagFace-trained (summary.json: norm_is_quality false): its embedding norm does "
                "not measure quality. Give --quality-column/--quality-file from a quality tool, "
                "or --norm-quality to use the norm anyway"
            )
        q = table.quality
        return table, QualityInfo(
            NORM,
            "the embeddings (L2 norm)",
            len(table),
            0,
            [],
            float(q.min()) if len(q) else None,
            float(q.max()) if len(q) else None,
        )
    raw, source = image_values(table, embeddings_uri, column, file)
    numeric = pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(np.float64)
    bad_text = [
        str(v)
        for v, x in zip(raw, numeric, strict=True)
        if v is not None and not (isinstance(v, float) and np.isnan(v)) and np.isnan(x)
    ]
    if bad_text:
        raise QualityColumnError(
            f"--quality-column {column!r} in {source} has non-numeric values "
            f"({', '.join(map(repr, bad_text[:SHOW]))})"
        )
    have = np.isfinite(numeric)
    negative = have & (numeric < 0)
    if negative.any():
        raise QualityColumnError(
            f"--quality-column {column!r} in {source} has {int(negative.sum())} negative "
            f"value(s) (first: {table.path[np.argmax(negative)]!r} = "
            f"{numeric[np.argmax(negative)]:g}); QMagFace needs a quality >= 0 where higher is "
            "better: rescale it (e.g. shift by its minimum) before using it"
        )
    if not have.any():
        raise QualityColumnError(
            f"--quality-column {column!r}: none of the {len(table)} embeddings has a value in "
            f"{source} (are the 'path' values relative to the same images root?)"
        )
    missing = np.flatnonzero(~have)
    kept = np.flatnonzero(have)
    out = EmbeddingTable(
        table.path[kept],
        table.identity[kept],
        table.vectors[kept],
        numeric[kept].astype(np.float32),
    )
    info = QualityInfo(
        column,
        source,
        len(table),
        int(missing.size),
        [str(p) for p in table.path[missing[:SHOW]]],
        float(numeric[kept].min()),
        float(numeric[kept].max()),
    )
    if info.n_missing:
        logger.warning("%s", info.note())
    return out, info


def with_chosen_quality(
    table: EmbeddingTable, embeddings_uri: str, choice: QualityChoiceLike
) -> tuple[EmbeddingTable, QualityInfo]:
    """``with_quality`` with a command's quality settings (column, file, ``--norm-quality``):
    the one way calibrate, evaluate and a validation side attach the chosen quality."""
    return with_quality(
        table, embeddings_uri, choice.column, choice.file, allow_norm=choice.allow_norm
    )
