"""Galleries and probe sets: generic CSV lists and the SCface and TinyFace layouts.

A set is a table of ``path`` (as in the embeddings' ``path`` column, after ``prefix``),
``identity`` (None: a gallery distractor, or an unlabelled probe) and ``subset`` (the probe's
protocol subset, e.g. SCface's distance ``d1``; None when there is none). A CSV may instead
list templates (columns ``path, template[, media], identity``): its entries are then pooled
templates (see ``pairs.templates``).

The layouts read the embeddings' own paths (the embed job records them relative to the images
root), so pointing ``qmag-ray embed`` at the unpacked release and ``identify --layout`` at its
output is enough:

- SCface (``SCface_database/``): gallery ``mugshot_frontal_cropped_all/<sid>_frontal.JPG``;
  probes ``surveillance_cameras_distance_<d>/cam_<c>/<sid>_cam<c>_<d>.jpg`` for the visible-light
  cameras 1-5 (6 and 7 are infrared), subset ``d<d>`` (d1 is the farthest, 4.20 m; d3 1.00 m).
- TinyFace (``tinyface/Testing_Set/``): gallery ``Gallery_Match/<id>_<n>.jpg`` plus every image
  of ``Gallery_Distractor/`` (no identity); probes ``Probe/<id>_<n>.jpg``; the identity is the
  file name up to the first ``_``.
"""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from qmag_ray import storage

if TYPE_CHECKING:
    import pandas as pd


class SetError(ValueError):
    """A gallery or probe list that cannot be used; the message says what and where."""


class Layout(str, Enum):
    """Distributed data set layouts that ``identify --layout`` understands."""

    SCFACE = "scface"
    TINYFACE = "tinyface"


@dataclass(frozen=True, eq=False)
class SearchSet:
    """A gallery or probe list.

    Attributes:
        table: columns ``path``, ``identity`` (None allowed), ``subset`` (None allowed) and,
            for template lists, ``template`` and ``media``.
        source: where it came from (redacted URI or layout name).
    """

    table: pd.DataFrame
    source: str

    @property
    def is_templates(self) -> bool:
        return "template" in self.table.columns

    def __len__(self) -> int:
        return len(self.table)


def _none(v: object) -> str | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    text = str(v).strip()
    return text or None


def read_set(uri: str, what: str) -> SearchSet:
    """A CSV/TSV/Parquet list with ``path`` and ``identity`` (optional ``subset``, ``template``,
    ``media``); IJB's 1:N lists (``TEMPLATE_ID, SUBJECT_ID, FILENAME``) are read as templates."""
    import pandas as pd  # here, not at import: the command line loads this module

    where = storage.redact(uri)
    try:
        if uri.lower().endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as f:
                frame = pq.read_table(f).to_pandas().astype(str)
        else:
            sep = "\t" if uri.lower().endswith(".tsv") else ","
            text = storage.read_bytes(uri).decode("utf-8-sig")
            frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise SetError(f"{what} list not found: {where}") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise SetError(f"{what} list {where} is not a CSV file: {exc}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if {"TEMPLATE_ID", "SUBJECT_ID", "FILENAME"} <= set(frame.columns):  # IJB 1:N
        media = frame["SIGHTING_ID"] if "SIGHTING_ID" in frame.columns else frame["FILENAME"]
        frame = pd.DataFrame(
            {
                "path": frame["FILENAME"],
                "identity": frame["SUBJECT_ID"],
                "template": frame["TEMPLATE_ID"],
                "media": media,
            }
        )
    missing = [c for c in ("path", "identity") if c not in frame.columns]
    if missing:
        raise SetError(
            f"{what} list {where}: missing column(s) {missing}; expected path, identity "
            f"[, subset] or path, template, media, identity (found {', '.join(frame.columns)})"
        )
    if frame.empty:
        raise SetError(f"{what} list {where} has no rows")
    table = pd.DataFrame(
        {
            "path": frame["path"].astype(str).str.strip(),
            "identity": [_none(v) for v in frame["identity"]],
            "subset": [_none(v) for v in frame["subset"]]
            if "subset" in frame.columns
            else [None] * len(frame),
        }
    )
    empty = np.flatnonzero(table["path"].to_numpy() == "")
    if empty.size:
        raise SetError(f"{what} list {where} row {int(empty[0]) + 2}: empty path")
    if "template" in frame.columns:
        table["template"] = frame["template"].astype(str).str.strip()
        table["media"] = frame["media"].astype(str) if "media" in frame.columns else table["path"]
    return SearchSet(table, where)


_SCFACE_MUG = re.compile(r"(?:^|/)mugshot_frontal_cropped_all/(\d+)_frontal\.[A-Za-z]+$")
_SCFACE_CAM = re.compile(
    r"(?:^|/)surveillance_cameras_distance_([123])/cam_([1-7])/(\d+)_cam\2_\1\.[A-Za-z]+$"
)


def scface_sets(
    paths: np.ndarray, cameras: tuple[int, ...] = (1, 2, 3, 4, 5)
) -> tuple[SearchSet, SearchSet]:
    """SCface's mugshot gallery and its surveillance probes by distance (subsets d1, d2, d3)."""
    import pandas as pd  # here, not at import: the command line loads this module

    gallery, probes = [], []
    for p in map(str, paths):
        m = _SCFACE_MUG.search(p)
        if m:
            gallery.append((p, str(int(m.group(1))), None))
            continue
        m = _SCFACE_CAM.search(p)
        if m and int(m.group(2)) in cameras:
            probes.append((p, str(int(m.group(3))), f"d{m.group(1)}"))
    if not gallery or not probes:
        raise SetError(
            f"the embeddings hold {len(gallery)} SCface mugshots and {len(probes)} surveillance "
            "images: embed the SCface_database folder (mugshot_frontal_cropped_all/, "
            "surveillance_cameras_distance_1..3/cam_1..5/)"
        )
    cols = ["path", "identity", "subset"]
    return (
        SearchSet(pd.DataFrame(gallery, columns=cols), "scface gallery (mugshots)"),
        SearchSet(pd.DataFrame(probes, columns=cols), "scface probes"),
    )


def _tinyface_identity(path: str) -> str:
    return posixpath.basename(path).split("_", 1)[0]


def tinyface_sets(paths: np.ndarray) -> tuple[SearchSet, SearchSet]:
    """TinyFace's gallery (matches + distractors, subset None) and probes."""
    import pandas as pd  # here, not at import: the command line loads this module

    gallery, probes = [], []
    for p in map(str, paths):
        parts = p.split("/")
        if "Gallery_Match" in parts:
            gallery.append((p, _tinyface_identity(p), None))
        elif "Gallery_Distractor" in parts:
            gallery.append((p, None, None))
        elif "Probe" in parts:
            probes.append((p, _tinyface_identity(p), None))
    if not gallery or not probes:
        raise SetError(
            f"the embeddings hold {len(gallery)} TinyFace gallery and {len(probes)} probe images: "
            "embed tinyface/Testing_Set (Probe/, Gallery_Match/, Gallery_Distractor/)"
        )
    cols = ["path", "identity", "subset"]
    return (
        SearchSet(pd.DataFrame(gallery, columns=cols), "tinyface gallery (match + distractors)"),
        SearchSet(pd.DataFrame(probes, columns=cols), "tinyface probes"),
    )


def layout_sets(layout: Layout | str, paths: np.ndarray) -> tuple[SearchSet, SearchSet]:
    """Gallery and probes of ``layout`` found among the embeddings' ``paths``."""
    layout = Layout(layout)
    return scface_sets(paths) if layout is Layout.SCFACE else tinyface_sets(paths)
