"""Object-storage access through fsspec: one place that turns a URI into files.

Every reader and writer in the package goes through these helpers, so local paths, ``s3://``,
``gs://`` and anything else fsspec understands behave the same. Credentials and endpoints come
from the usual provider chain (environment, config files, instance roles); nothing here reads
or logs them.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs


def filesystem(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the filesystem for ``uri`` and the path inside it (protocol stripped)."""
    fs, path = url_to_fs(uri, **storage_options)
    return fs, path


def protocol(uri: str) -> str:
    """The URI's scheme (``file`` for plain paths)."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (also for local paths)."""
    if not parts:
        return uri
    return posixpath.join(uri.rstrip("/") if uri not in ("/",) else uri, *parts)


def relative(root: str, path: str) -> str:
    """``path`` (a filesystem path, protocol stripped) relative to ``root``, with ``/``."""
    root = root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{path!r} is not under {root!r}")
    return path[len(root) + 1 :]


def unstrip(uri: str, fs_path: str) -> str:
    """Turn a protocol-stripped path of ``uri``'s filesystem back into a full URI."""
    proto = protocol(uri)
    return fs_path if proto == "file" else f"{proto}://{fs_path}"


def absolute(uri: str) -> str:
    """``uri`` with a local relative path made absolute (for work shipped to other processes,
    whose working directory differs); other URIs unchanged."""
    if protocol(uri) != "file":
        return uri
    return os.path.abspath(uri.removeprefix("file://"))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers never see a half-written file.

    Local files are written under a temporary name and renamed; object stores publish an
    object only when its upload completes, so they are written directly.
    """
    with atomic_open(uri) as f:
        f.write(data)


@contextmanager
def atomic_open(uri: str) -> Iterator[IO[bytes]]:
    """Open ``uri`` for binary writing; the file appears under its name only when complete."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if protocol(uri) == "file":
        # Only local folders are created: on object stores "folders" are implicit, and s3fs's
        # makedirs would create a missing (say, misspelt) bucket instead of failing.
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with fs.open(tmp, "wb") as f:
                yield f
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
    else:
        with fs.open(path, "wb") as f:
            yield f


def sha256(uri: str, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of the object at ``uri``, streamed in chunks."""
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def remove_tree(uri: str) -> None:
    """Delete ``uri`` and everything below it, if it exists."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def redact(uri: str) -> str:
    """``uri`` with any ``user:password@`` part removed, safe to log or record."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    # user-info up to the "@"; a secret after ":" may hold "/" (AWS secret keys do)
    found = re.match(r"(?:[^/\s@?#]+|[^/\s@?#:]*:[^\s@]*)@", rest)
    if found:
        rest = rest[found.end() :]
    return f"{scheme}://{rest}"
