"""Template protocols (IJB-B / IJB-C 1:1): images -> media -> templates, and template pairs.

A template table maps images to ``(template, media)``: IJB's ``*_face_tid_mid.txt`` (lines
``image template_id media_id``, space-separated, no header) or a CSV/Parquet with columns
``path, template, media`` (optional ``identity``). ``pool_templates`` turns an embeddings table
into a table of templates: features are pooled per media, then the media features per template,
so a template of 40 frames of one video and 2 photos counts as 3 media. Two rules:

- ``quality`` (the published quality-weighted rule, spec protocols.md): with raw features
  ``f_i`` and qualities ``q_i = ||f_i||``, ``f = sum(q_i f_i)``, ``q = sum(q_i^2) / sum(q_i)``,
  pooled feature ``q * f / ||f||``; applied per media, then per template;
- ``mean``: the mean of the raw features, per media then per template.

The template quality is the pooled quality ``q = sum(q_i^2) / sum(q_i)`` (per media, then per
template) under both rules, of whichever quality the table carries (the MagFace norm, or the
``--quality-column`` chosen): the rule picks how features combine, not the quality's scale, so
alpha and beta fitted on that quality apply. Under ``quality`` with the norm it is the pooled
feature's norm; a ``mean`` feature's norm is not the quality. Template pairs come
from IJB's ``*_template_pair_label.txt`` (``t1 t2 label``) or a CSV/Parquet ``a, b, label``
naming template ids; they are resolved onto the pooled table vectorised (15.6M IJB-C pairs
in seconds), with templates that are not in the table an error or a counted skip.
"""

from __future__ import annotations

import io
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from qmag_ray import storage
from qmag_ray.embeddings import SHOW, EmbeddingTable
from qmag_ray.pairs.resolve import (
    Match,
    Policy,
    ResolvedPairs,
    ResolveError,
    ResolveReport,
    lookup_names,
)
from qmag_ray.pairs.settings import Pooling

logger = logging.getLogger(__name__)


class TemplateError(ValueError):
    """A template table or template pair list that cannot be used; says what and where."""


@dataclass(frozen=True, eq=False)
class TemplateTable:
    """Which image belongs to which media and template.

    Attributes:
        image: (n,) object array of image names (as the file names them).
        template: (n,) object array of template ids (str).
        media: (n,) object array of media ids (str), unique within the whole table.
        identity: (n,) object array of subject ids, or None where unknown.
        source: where the table was read from (redacted).
    """

    image: np.ndarray
    template: np.ndarray
    media: np.ndarray
    identity: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.image)


def _read_text_table(uri: str, **read_csv: Any) -> pd.DataFrame:
    """``pd.read_csv`` of a UTF-8 text file (a leading BOM dropped), parsed from its bytes.

    Bytes, not a decoded ``str`` in a ``StringIO``: that holds 4 bytes a character, 0.8 GB for
    IJB-C's 204 MB pair file; pandas decodes while it parses.
    """
    where = storage.redact(uri)
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise TemplateError(f"file not found: {where}") from None
    try:
        return pd.read_csv(io.BytesIO(raw), encoding="utf-8-sig", **read_csv)
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{where} is not UTF-8 text: {exc}") from None


def _is_table(uri: str) -> bool:
    return uri.lower().endswith((".csv", ".tsv", ".parquet", ".pq"))


def _frame(uri: str, required: tuple[str, ...]) -> pd.DataFrame:
    """A CSV/TSV/Parquet table with at least ``required`` columns, as strings."""
    where = storage.redact(uri)
    if uri.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            with storage.filesystem(uri)[0].open(storage.filesystem(uri)[1], "rb") as f:
                frame = pq.read_table(f).to_pandas()
        except FileNotFoundError:
            raise TemplateError(f"file not found: {where}") from None
        frame = frame.astype({c: str for c in frame.columns if c in required})
    else:
        sep = "\t" if uri.lower().endswith(".tsv") else ","
        frame = _read_text_table(uri, sep=sep, dtype=str, keep_default_na=False)
        frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise TemplateError(
            f"{where}: missing column(s) {missing}; expected {', '.join(required)} "
            f"(found {', '.join(map(str, frame.columns))})"
        )
    for col in required:
        empty = np.flatnonzero(frame[col].astype(str).str.strip().to_numpy() == "")
        if empty.size:
            raise TemplateError(f"{where} row {int(empty[0]) + 2}: empty {col!r}")
    return frame


def _whitespace_columns(uri: str, ncols: int, what: str) -> list[np.ndarray]:
    """Columns of a whitespace-separated text file with ``ncols`` fields per line."""
    where = storage.redact(uri)
    try:
        frame = _read_text_table(uri, sep=r"\s+", header=None, dtype=str, engine="c", comment=None)
    except pd.errors.EmptyDataError:
        raise TemplateError(f"{where}: empty file") from None
    except pd.errors.ParserError as exc:
        raise TemplateError(f"{where}: not a {what} file ({exc})") from None
    if frame.shape[1] != ncols or frame.isna().any().any():
        bad = np.flatnonzero(frame.isna().any(axis=1).to_numpy())
        line = int(bad[0]) + 1 if bad.size else 1
        raise TemplateError(
            f"{where}:{line}: expected {ncols} fields per line ({what}), got {frame.shape[1]}"
        )
    return [frame[c].to_numpy(dtype=object) for c in frame.columns]


def read_template_table(uri: str) -> TemplateTable:
    """Read IJB ``*_face_tid_mid.txt`` or a CSV/Parquet ``path, template, media[, identity]``.

    Raises:
        TemplateError: unreadable file, missing columns, a line with the wrong number of
            fields, or a media id shared by two templates.
    """
    where = storage.redact(uri)
    if _is_table(uri):
        frame = _frame(uri, ("path", "template", "media"))
        image = frame["path"].astype(str).to_numpy(dtype=object)
        template = frame["template"].astype(str).to_numpy(dtype=object)
        media = frame["media"].astype(str).to_numpy(dtype=object)
        if "identity" in frame.columns:
            identity = np.array(
                [None if str(v) in ("", "nan", "None") else str(v) for v in frame["identity"]],
                dtype=object,
            )
        else:
            identity = np.full(len(image), None, dtype=object)
    else:
        image, template, media = _whitespace_columns(uri, 3, "image template_id media_id")
        identity = np.full(len(image), None, dtype=object)
    if len(image) == 0:
        raise TemplateError(f"{where}: no rows")
    # A media id in two templates would mix the templates' frames into one media feature,
    # so media are keyed by (template, media), as IJB's media ids are only unique per subject.
    keys = pd.Series(template).astype(str) + "\0" + pd.Series(media).astype(str)
    media = keys.to_numpy(dtype=object)
    table = TemplateTable(image, template, media, identity, where)
    _check_identities(table)
    return table


def _check_identities(table: TemplateTable) -> None:
    known = np.array([x is not None for x in table.identity])
    if not known.any():
        return
    frame = pd.DataFrame({"t": table.template[known], "i": table.identity[known]})
    n = frame.groupby("t")["i"].nunique()
    bad = n[n > 1]
    if len(bad):
        raise TemplateError(
            f"{table.source}: {len(bad)} template(s) hold images of several identities "
            f"(e.g. {', '.join(map(repr, bad.index[:SHOW]))}); a template is one subject"
        )


def pool_groups(
    vectors: np.ndarray,
    quality: np.ndarray,
    groups: np.ndarray,
    pooling: Pooling | str,
    chunk_rows: int = 16_384,
) -> tuple[np.ndarray, np.ndarray]:
    """Pool rows of ``vectors`` by integer group ``0..G-1``: (G, D) features, (G,) qualities.

    The pooled quality is ``q_g = sum(q_i^2) / sum(q_i)`` under both rules (0 where every
    ``q_i`` is 0). ``quality`` pooling: feature ``q_g * f / ||f||`` with ``f = sum(q_i f_i)``
    (the returned quality is that feature's norm, ``q_g`` up to rounding); ``mean``: the mean
    feature. Every group must have at least one row. Accumulates in float64.
    """
    pooling = Pooling(pooling)
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    q = np.asarray(quality, dtype=np.float64)
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    if len(starts) != n_groups:
        raise ValueError("every group 0..G-1 needs at least one row")
    # whole groups at a time, about ``chunk_rows`` rows each: no float64 copy of all the
    # vectors (sums run row by row within a group, so the chunking changes no bit)
    sums = np.empty((n_groups, np.shape(vectors)[1] if n_groups else 0), np.float64)
    cuts = np.unique(
        np.r_[np.searchsorted(starts, np.arange(0, len(groups), chunk_rows)), n_groups]
    )
    for g0, g1 in zip(cuts[:-1], cuts[1:], strict=True):
        r0 = starts[g0]
        r1 = starts[g1] if g1 < n_groups else len(groups)
        rows = order[r0:r1]
        x = np.asarray(vectors[rows], dtype=np.float64)
        if pooling is Pooling.QUALITY:
            x *= q[rows, None]
        sums[g0:g1] = np.add.reduceat(x, starts[g0:g1] - r0, axis=0)
    if not n_groups:
        return sums, np.empty(0, np.float64)
    q_sum = np.add.reduceat(q[order], starts)
    q_sq = np.add.reduceat(q[order] ** 2, starts)
    q_pool = np.divide(q_sq, q_sum, out=np.zeros_like(q_sum), where=q_sum > 0)
    if pooling is Pooling.QUALITY:
        norm = np.linalg.norm(sums, axis=1)
        scale = np.divide(q_pool, norm, out=np.zeros_like(norm), where=norm > 0)
        feats = sums * scale[:, None]
        return feats, np.linalg.norm(feats, axis=1)
    counts = np.diff(np.r_[starts, len(groups)])
    return sums / counts[:, None], q_pool


@dataclass(frozen=True)
class PoolReport:
    """What pooling used and skipped (counted)."""

    templates: int
    media: int
    images: int
    missing_images: int = 0
    examples: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "templates": self.templates,
            "media": self.media,
            "images": self.images,
            "missing_images": self.missing_images,
            "examples": list(self.examples),
        }


def pool_templates(
    embeddings: EmbeddingTable,
    templates: TemplateTable,
    pooling: Pooling | str = Pooling.QUALITY,
    *,
    prefix: str = "",
    match: Match | str = Match.EXACT,
    on_missing: Policy | str = Policy.ERROR,
) -> tuple[EmbeddingTable, PoolReport]:
    """The templates as an embeddings table: ``path`` = template id, pooled feature, quality.

    Images of the template table that are not in ``embeddings`` (or have unusable embeddings)
    are an error listing them, or with ``on_missing="skip"`` left out and counted; a template
    left with no image then does not exist, and pairs naming it are handled by
    ``resolve_template_pairs``.
    """
    rows = lookup_names(templates.image, embeddings, prefix, match)
    bad = np.zeros(len(embeddings), dtype=bool)
    bad[embeddings.bad_rows()] = True
    missing = (rows < 0) | bad[np.maximum(rows, 0)]
    if missing.any():
        names = [str(x) for x in templates.image[missing][:SHOW]]
        n_missing = int(missing.sum())
        if Policy(on_missing) is Policy.ERROR:
            more = " ..." if n_missing > SHOW else ""
            raise ResolveError(
                f"{n_missing} image(s) of the template table {templates.source} are not in the "
                f"embeddings (or have unusable embeddings): {', '.join(map(repr, names))}{more} "
                f"(matched {Match(match).value} with prefix {prefix!r}); pass --on-missing skip "
                "to leave them out and count them"
            )
        logger.warning(
            "template table %s: %d image(s) not in the embeddings left out",
            templates.source,
            n_missing,
        )
    else:
        names, n_missing = [], 0
    keep = ~missing
    rows = rows[keep]
    media_codes, media_ids = pd.factorize(templates.media[keep], sort=False)
    m_feat, m_q = pool_groups(
        embeddings.vectors[rows], embeddings.quality[rows], media_codes, pooling
    )
    # the template of each media (media keys are unique per template by construction)
    media_template = np.empty(len(media_ids), dtype=object)
    media_template[media_codes] = templates.template[keep]
    t_codes, t_ids = pd.factorize(media_template, sort=False)
    t_feat, t_q = pool_groups(m_feat, m_q, t_codes, pooling)
    identity = np.full(len(t_ids), None, dtype=object)
    ident = templates.identity[keep]
    img_t = np.asarray(t_codes)[media_codes]
    known = np.flatnonzero(np.array([x is not None for x in ident], dtype=bool))
    identity[img_t[known]] = ident[known]
    table = EmbeddingTable(
        path=np.asarray([str(t) for t in t_ids], dtype=object),
        identity=identity,
        vectors=t_feat.astype(np.float32),
        quality=t_q.astype(np.float32),
    )
    report = PoolReport(len(t_ids), len(media_ids), int(keep.sum()), n_missing, tuple(names))
    logger.info(
        "pooled %d images into %d media and %d templates (%s pooling)",
        report.images,
        report.media,
        report.templates,
        Pooling(pooling).value,
    )
    return table, report


@dataclass(frozen=True, eq=False)
class TemplatePairs:
    """Template pairs as named in the file, in file order (``line`` 1-based)."""

    a: np.ndarray
    b: np.ndarray
    label: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.label)


def _labels(values: np.ndarray, where: str) -> np.ndarray:
    text = pd.Series(values).astype(str).str.strip()
    ok = text.isin(["0", "1"]).to_numpy()
    if not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        raise TemplateError(
            f"{where}:{first + 1}: label must be 1 (genuine) or 0 (impostor), got "
            f"{text.iloc[first]!r}"
        )
    return (text.to_numpy() == "1").astype(np.int8)


def read_template_pairs(uri: str) -> TemplatePairs:
    """IJB ``*_template_pair_label.txt`` (``t1 t2 label``) or a CSV/Parquet ``a, b, label``."""
    where = storage.redact(uri)
    if _is_table(uri):
        frame = _frame(uri, ("a", "b", "label"))
        a = frame["a"].astype(str).to_numpy(dtype=object)
        b = frame["b"].astype(str).to_numpy(dtype=object)
        label = _labels(frame["label"].to_numpy(), where)
    else:
        a, b, lab = _whitespace_columns(uri, 3, "t1 t2 label")
        label = _labels(lab, where)
    if len(label) == 0:
        raise TemplateError(f"{where}: no pairs")
    return TemplatePairs(a, b, label, where)


def _rows(names: np.ndarray, index: pd.Index) -> np.ndarray:
    """Row of each name in ``index`` (-1 where absent), looked up once per distinct name.

    IJB-C names 23k templates in 15.6M pairs: a lookup per pair would first copy every name.
    """
    codes, distinct = pd.factorize(names)
    return index.get_indexer(pd.Index(np.asarray(distinct).astype(str)))[codes]


def resolve_template_pairs(
    pairs: TemplatePairs,
    templates: EmbeddingTable,
    *,
    on_missing: Policy | str = Policy.ERROR,
    on_self: Policy | str = Policy.ERROR,
) -> ResolvedPairs:
    """Map template pairs onto the pooled table's rows; unknown templates fail or are counted.

    Vectorised (a hash index over template ids), so IJB-C's 15.6M pairs resolve in seconds.
    Duplicated pairs are kept (IJB lists each pair once; a list that repeats one counts it
    twice, as a metric over the list would).
    """
    index = pd.Index(templates.path.astype(str))
    if not index.is_unique:
        raise TemplateError("template ids must be unique in the pooled table")
    ia, ib = _rows(pairs.a, index), _rows(pairs.b, index)
    missing = (ia < 0) | (ib < 0)
    selfp = ~missing & (ia == ib)
    n_missing, n_self = int(missing.sum()), int(selfp.sum())
    unknown = np.unique(np.concatenate([pairs.a[ia < 0], pairs.b[ib < 0]]).astype(str))
    examples: dict[str, list[str]] = {}
    if n_missing:
        first = np.flatnonzero(missing)[:SHOW]
        examples["missing"] = [f"{pairs.a[r]} / {pairs.b[r]} (line {int(r) + 1})" for r in first]
        if Policy(on_missing) is Policy.ERROR:
            raise ResolveError(
                f"{n_missing} of {len(pairs)} template pairs of {pairs.source} name "
                f"{len(unknown)} template(s) that are not in the template table or have no "
                f"embedded image: {', '.join(map(repr, unknown[:SHOW]))}"
                f"{' ...' if len(unknown) > SHOW else ''}; pass --on-missing skip to skip and "
                "count them"
            )
    if n_self:
        first = np.flatnonzero(selfp)[:SHOW]
        examples["self_pairs"] = [f"{pairs.a[r]} (line {int(r) + 1})" for r in first]
        if Policy(on_self) is Policy.ERROR:
            raise ResolveError(
                f"{n_self} template pair(s) of {pairs.source} compare a template with itself "
                f"({'; '.join(examples['self_pairs'])}); pass --on-self skip to skip them"
            )
    keep = np.flatnonzero(~missing & ~selfp)
    report = ResolveReport(
        total=len(pairs),
        kept=len(keep),
        missing=n_missing,
        missing_images=len(unknown),
        self_pairs=n_self,
        examples=examples,
    )
    if report.skipped:
        logger.warning("%s: %s", pairs.source, report.summary())
    return ResolvedPairs(ia[keep], ib[keep], pairs.label[keep], keep, report)


def is_template_pair_file(uri: str) -> bool:
    """Whether ``uri`` names an IJB template pair file (``*_template_pair_label.txt``)."""
    return posixpath.basename(uri.rstrip("/")).lower().endswith("template_pair_label.txt")


__all__ = [
    "PoolReport",
    "Pooling",
    "TemplateError",
    "TemplatePairs",
    "TemplateTable",
    "is_template_pair_file",
    "pool_groups",
    "pool_templates",
    "read_template_pairs",
    "read_template_table",
    "resolve_template_pairs",
]
