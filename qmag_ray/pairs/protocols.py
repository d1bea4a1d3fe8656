"""Readers for benchmark pair files and generic pair lists (spec: protocols.md).

Every reader returns a ``PairList`` in file order (the 10-fold protocol relies on it), with
image names in the protocol's own naming (``Abel_Pacheco/Abel_Pacheco_0001.jpg``, ``12.jpg``)
and the source line of every pair, so later errors can point back into the file.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from qmag_ray import storage

if TYPE_CHECKING:
    import pyarrow as pa


class PairFileError(ValueError):
    """A pair file that cannot be read; the message names the file and the line."""


class PairProtocol(str, Enum):
    """Pair-file formats: the six benchmarks and the generic ``a, b, label`` list."""

    LFW = "lfw"
    XQLFW = "xqlfw"
    AGEDB = "agedb"
    CFP = "cfp"
    CALFW = "calfw"
    CPLFW = "cplfw"
    GENERIC = "generic"
    IJBB = "ijbb"  # template pairs (t1 t2 label); read with pairs.templates
    IJBC = "ijbc"

    @property
    def is_template(self) -> bool:
        """Whether the protocol's pairs name templates (IJB-B/C), not images."""
        return self in (PairProtocol.IJBB, PairProtocol.IJBC)


@dataclass(frozen=True, eq=False)
class PairList:
    """Labelled pairs of image names, in file order.

    Attributes:
        a, b: (n,) object arrays of image names (relative paths in the protocol's naming).
        label: (n,) int8, 1 genuine, 0 impostor.
        line: (n,) int64 1-based line (CSV/text) or row (Parquet) number of each pair.
        source: where the pairs came from (redacted URI).
        protocol: the format they were read as.
    """

    a: np.ndarray
    b: np.ndarray
    label: np.ndarray
    line: np.ndarray
    source: str = ""
    protocol: str = PairProtocol.GENERIC.value

    def __len__(self) -> int:
        return len(self.label)

    def counts(self) -> tuple[int, int]:
        """(genuine, impostor) pair counts."""
        genuine = int(self.label.sum())
        return genuine, len(self) - genuine


def _pair_list(rows: list[tuple[str, str, int, int]], source: str, protocol: str) -> PairList:
    if not rows:
        raise PairFileError(f"{source}: no pairs found")
    a, b, label, line = zip(*rows, strict=True)
    return PairList(
        a=np.asarray(a, dtype=object),
        b=np.asarray(b, dtype=object),
        label=np.asarray(label, dtype=np.int8),
        line=np.asarray(line, dtype=np.int64),
        source=source,
        protocol=protocol,
    )


def _lines(text: str) -> list[tuple[int, list[str]]]:
    """Non-blank lines as (1-based line number, whitespace-split fields)."""
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if fields:
            out.append((number, fields))
    return out


def _int(text: str, what: str, where: str, minimum: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise PairFileError(f"{where}: {what} {text!r} is not an integer") from None
    if value < minimum:
        raise PairFileError(f"{where}: {what} {value} is below {minimum}")
    return value


def parse_lfw(text: str, source: str = "<text>", protocol: str = "lfw") -> PairList:
    """LFW/XQLFW: ``name n1 n2`` (genuine) or ``name1 n1 name2 n2`` (impostor).

    An optional first line ``sets pairs_per_set`` (``10\\t300``) is accepted and checked
    against the number of pairs (``2 * sets * pairs_per_set``).
    """
    lines = _lines(text)
    header = None
    if lines and len(lines[0][1]) == 2 and all(f.isdigit() for f in lines[0][1]):
        header = lines.pop(0)
    rows = []
    for number, f in lines:
        where = f"{source}:{number}"
        if len(f) == 3:
            n1 = _int(f[1], "image number", where, 1)
            n2 = _int(f[2], "image number", where, 1)
            rows.append((_lfw_name(f[0], n1), _lfw_name(f[0], n2), 1, number))
        elif len(f) == 4:
            n1 = _int(f[1], "image number", where, 1)
            n2 = _int(f[3], "image number", where, 1)
            rows.append((_lfw_name(f[0], n1), _lfw_name(f[2], n2), 0, number))
        else:
            raise PairFileError(
                f"{where}: expected 'name n1 n2' or 'name1 n1 name2 n2', got {' '.join(f)!r}"
            )
    if header is not None:
        sets, per_set = int(header[1][0]), int(header[1][1])
        if 2 * sets * per_set != len(rows):
            raise PairFileError(
                f"{source}:{header[0]}: header says {sets} sets of {per_set} genuine + {per_set} "
                f"impostor pairs ({2 * sets * per_set}), but the file has {len(rows)} pairs"
            )
    return _pair_list(rows, source, protocol)


def _lfw_name(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}.jpg"


def parse_indexed(text: str, source: str = "<text>", protocol: str = "agedb") -> PairList:
    """AgeDB/CFP-FP: ``i j label`` with 0-based image indices and label 1/0 -> ``{i}.jpg``."""
    rows = []
    for number, f in _lines(text):
        where = f"{source}:{number}"
        if len(f) != 3:
            raise PairFileError(f"{where}: expected 'i j label', got {' '.join(f)!r}")
        i = _int(f[0], "image index", where)
        j = _int(f[1], "image index", where)
        if f[2] not in ("0", "1"):
            raise PairFileError(f"{where}: label must be 1 or 0, got {f[2]!r}")
        rows.append((f"{i}.jpg", f"{j}.jpg", int(f[2]), number))
    return _pair_list(rows, source, protocol)


def _numbered_file(text: str, where: str) -> int:
    stem, ext = posixpath.splitext(text)
    if not ext:
        raise PairFileError(f"{where}: expected a file name like '00001.jpg', got {text!r}")
    return _int(stem, "file number", where, 1)


def parse_calfw(text: str, source: str = "<text>", protocol: str = "calfw") -> PairList:
    """CALFW/CPLFW: ``00001.jpg 00002.jpg m``, 1-based file numbers -> ``{n-1}.jpg``.

    Genuine if ``m > 0`` (m is 1 or -1); ``m = 0`` is an error.
    """
    rows = []
    for number, f in _lines(text):
        where = f"{source}:{number}"
        if len(f) != 3:
            raise PairFileError(f"{where}: expected 'NNNNN.jpg NNNNN.jpg m', got {' '.join(f)!r}")
        i = _numbered_file(f[0], where)
        j = _numbered_file(f[1], where)
        m = _int(f[2], "label", where, minimum=-(2**62))
        if m == 0:
            raise PairFileError(f"{where}: label must be positive (genuine) or negative, got 0")
        rows.append((f"{i - 1}.jpg", f"{j - 1}.jpg", int(m > 0), number))
    return _pair_list(rows, source, protocol)


def _label(value: object, where: str) -> int:
    text = str(value).strip()
    if text in ("1", "0", "1.0", "0.0", "True", "False", "true", "false"):
        return int(text in ("1", "1.0", "True", "true"))
    raise PairFileError(f"{where}: label must be 1 (genuine) or 0 (impostor), got {value!r}")


def _name(value: object, column: str, where: str) -> str:
    if value is None or str(value).strip() == "":
        raise PairFileError(f"{where}: column {column!r} is empty")
    return str(value).strip()


def _check_columns(columns: list[str], source: str) -> None:
    missing = [c for c in ("a", "b", "label") if c not in columns]
    if missing:
        raise PairFileError(
            f"{source}: missing column(s) {missing}; a pair list needs columns a, b, label "
            f"(found {columns})"
        )


def parse_csv(text: str, source: str = "<text>", delimiter: str = ",") -> PairList:
    """A CSV pair list with a header naming the columns ``a``, ``b``, ``label`` (others ignored)."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise PairFileError(f"{source}: empty file")
    header = [h.strip() for h in header]
    _check_columns(header, f"{source}:1")
    ia, ib, il = header.index("a"), header.index("b"), header.index("label")
    rows = []
    for record in reader:
        if not record or all(not x.strip() for x in record):
            continue
        where = f"{source}:{reader.line_num}"
        if len(record) < len(header):
            raise PairFileError(f"{where}: expected {len(header)} fields, got {len(record)}")
        rows.append(
            (
                _name(record[ia], "a", where),
                _name(record[ib], "b", where),
                _label(record[il], where),
                reader.line_num,
            )
        )
    return _pair_list(rows, source, PairProtocol.GENERIC.value)


def read_parquet_pairs(uri: str) -> PairList:
    """A Parquet pair list with columns ``a``, ``b``, ``label``; ``line`` holds 1-based rows."""
    import pyarrow as pa  # here, not at import: the command line loads this module
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    source = storage.redact(uri)
    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except Exception as exc:
        raise PairFileError(f"cannot read Parquet pair list {source}: {exc}") from exc
    _check_columns(table.column_names, source)
    names = {}
    for col in ("a", "b"):
        values = table.column(col).cast(pa.string())
        empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
        bad = np.flatnonzero(empty.to_numpy(zero_copy_only=False))
        if bad.size:
            raise PairFileError(
                f"{source}: row {int(bad[0]) + 1}: column {col!r} is empty "
                f"({bad.size} empty value(s) in all)"
            )
        names[col] = np.asarray(values.to_pylist(), dtype=object)
    label = _parquet_labels(table.column("label"), source)
    rows = np.arange(1, len(label) + 1, dtype=np.int64)
    if not len(label):
        raise PairFileError(f"{source}: no pairs found")
    return PairList(names["a"], names["b"], label, rows, source, PairProtocol.GENERIC.value)


def _parquet_labels(column: pa.ChunkedArray, source: str) -> np.ndarray:
    """Labels as int8; booleans and integral numbers 0/1 are accepted."""
    values = column.to_numpy(zero_copy_only=False)
    if values.dtype == object or values.dtype.kind not in "biuf":
        bad = np.arange(len(values))
    else:
        bad = np.flatnonzero(~np.isin(values, (0, 1)))
    if bad.size:
        k = int(bad[0])
        raise PairFileError(
            f"{source}: row {k + 1}: label must be 1 (genuine) or 0 (impostor), got "
            f"{values[k]!r} ({bad.size} bad label(s) in all)"
        )
    return values.astype(np.int8)


_TEXT_PARSERS: dict[PairProtocol, Callable[[str, str, str], PairList]] = {
    PairProtocol.LFW: parse_lfw,
    PairProtocol.XQLFW: parse_lfw,
    PairProtocol.AGEDB: parse_indexed,
    PairProtocol.CFP: parse_indexed,
    PairProtocol.CALFW: parse_calfw,
    PairProtocol.CPLFW: parse_calfw,
}


def infer_protocol(uri: str) -> PairProtocol:
    """Guess the protocol from the file name: ``.csv/.tsv/.parquet`` -> generic, else a prefix."""
    name = posixpath.basename(uri.rstrip("/")).lower()
    if name.endswith((".csv", ".tsv", ".parquet", ".pq")):
        return PairProtocol.GENERIC
    for proto in (PairProtocol.XQLFW, *PairProtocol):  # xqlfw before lfw
        if proto is not PairProtocol.GENERIC and name.startswith(proto.value):
            return proto
    raise PairFileError(
        f"cannot tell the protocol of {storage.redact(uri)!r} from its name; pass one of "
        f"{[p.value for p in PairProtocol]}"
    )


def read_pairs(uri: str, protocol: str | PairProtocol | None = None) -> PairList:
    """Read a pair file in file order.

    Args:
        uri: local path or fsspec URI of the pair file.
        protocol: lfw, xqlfw, agedb, cfp, calfw, cplfw or generic (CSV/TSV/Parquet with columns
            a, b, label); None guesses it from the file name.

    Raises:
        PairFileError: unknown protocol, unreadable file or malformed line (file:line named).
    """
    source = storage.redact(uri)
    if protocol is None:
        proto = infer_protocol(uri)
    else:
        try:
            proto = PairProtocol(protocol)
        except ValueError:
            raise PairFileError(
                f"unknown pair protocol {protocol!r}; expected one of "
                f"{[p.value for p in PairProtocol]}"
            ) from None
    if proto.is_template:
        raise PairFileError(
            f"{source} is a {proto.value} template pair list: its pairs name templates, so give "
            "the template table too (--templates, e.g. the *_face_tid_mid.txt)"
        )
    lower = uri.lower()
    if proto is PairProtocol.GENERIC and lower.endswith((".parquet", ".pq")):
        return read_parquet_pairs(uri)
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except FileNotFoundError:
        raise PairFileError(f"pair file not found: {source}") from None
    except UnicodeDecodeError as exc:
        raise PairFileError(f"{source} is not UTF-8 text: {exc}") from None
    if proto is PairProtocol.GENERIC:
        return parse_csv(text, source, delimiter="\t" if lower.endswith(".tsv") else ",")
    return _TEXT_PARSERS[proto](text, source, proto.value)
