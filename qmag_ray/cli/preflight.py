"""Checks made before Ray starts: everything about the inputs that needs no cluster.

An entry point calls these right after loading its configuration, so that a misspelt path,
missing S3 credentials, an unreachable bucket, an images folder given as embeddings or a
malformed pair file ends in one or two lines naming the flag (and YAML key), the URI
(redacted) and the fix, in a second instead of after Ray's start-up. Every failure is a
``PreflightError`` (a ``ValueError``: a user error, exit code 2).
"""

from __future__ import annotations

import os
import re

from qmag_ray import storage

#: Protocols whose credentials come from the environment, never from the URI.
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs")
_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://(?:[^/\s@?#]+|[^/\s@?#:]*:[^\s@]*)@")
_S3_CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL "
    "for an S3-compatible store"
)


class PreflightError(ValueError):
    """An input that cannot be used, found before Ray starts; the message says the fix."""


def option_name(name: str, key: str | None = None) -> str:
    """``--validation-pairs (validation.pairs)`` from a keyword name and its YAML key."""
    flag = "--" + name.replace("_", "-")
    key = key or name
    return flag if key == name else f"{flag} ({key})"


def _s3_problem(exc: BaseException) -> str | None:
    """The fix for an S3 client error, if it is one we can name."""
    name = type(exc).__name__
    text = str(exc)
    if name in ("NoCredentialsError", "PartialCredentialsError") or "locate credentials" in text:
        return f"no S3 credentials: {_S3_CREDENTIALS}"
    if name == "EndpointConnectionError" or "Could not connect to the endpoint" in text:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the AWS endpoint"
        return f"cannot reach {storage.redact(endpoint)} (check AWS_ENDPOINT_URL and the network)"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "the bucket does not exist (check the bucket name)"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return "access denied: the credentials may not read it (check the bucket policy/keys)"
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"the S3 credentials were refused: {_S3_CREDENTIALS}"
    return None


def _have_s3_credentials() -> bool:
    """Whether botocore finds credentials (environment, profile, config, instance role)."""
    try:
        import botocore.session
    except ImportError:  # pragma: no cover - comes with s3fs
        return True
    try:
        return botocore.session.get_session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile: let the store call say what is wrong
        return True


def check_uri(name: str, uri: str, *, key: str | None = None, kind: str = "file") -> None:
    """``uri`` (given as ``name``/``key``) exists and can be read; else ``PreflightError``.

    ``kind`` names what is expected in messages (``file``, ``folder``, ``embeddings``...).
    """
    where = option_name(name, key)
    shown = storage.redact(uri)
    proto = storage.protocol(uri)
    if proto in OBJECT_STORES and _USERINFO.match(uri):
        raise PreflightError(
            f"{where} {shown}: credentials inside an {proto}:// URI are not used (and would be "
            f"shown in logs); remove them and {_S3_CREDENTIALS}"
        )
    if proto in ("s3", "s3a") and not _have_s3_credentials():
        raise PreflightError(f"{where} {shown}: no S3 credentials: {_S3_CREDENTIALS}")
    try:
        found = storage.exists(uri)
    except Exception as exc:  # noqa: BLE001 - every store error becomes one line
        problem = _s3_problem(exc) if proto in OBJECT_STORES else None
        if problem is None:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            problem = f"cannot be checked: {type(exc).__name__}: {first[:200]}"
        raise PreflightError(f"{where} {shown}: {problem}") from None
    if not found:
        bucket_hint = ""
        if proto in OBJECT_STORES:
            bucket = uri.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
            try:
                if not storage.exists(f"{proto}://{bucket}"):
                    bucket_hint = f" (the bucket {bucket} does not exist)"
            except Exception:  # noqa: BLE001 - the hint is optional
                pass
        raise PreflightError(f"{where} not found: {shown} does not exist{bucket_hint}")


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def check_embeddings(name: str, uri: str, *, key: str | None = None) -> None:
    """``uri`` exists and holds an embed job's Parquet parts (not, say, the images)."""
    check_uri(name, uri, key=key, kind="embeddings")
    where, shown = option_name(name, key), storage.redact(uri)
    if uri.lower().endswith((".parquet", ".pq")):
        return
    fs, path = storage.filesystem(uri)
    try:
        if not fs.isdir(path):
            raise PreflightError(
                f"{where} {shown} is a file, not embeddings: pass an embed job's output "
                "folder, its embeddings/ folder or a Parquet file"
            )
        found = fs.find(path, maxdepth=4)
    except PreflightError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PreflightError(f"{where} {shown} cannot be listed: {exc}") from None
    parquet = sorted(
        (p for p in found if p.endswith((".parquet", ".pq"))),
        key=lambda p: ("/embeddings/" not in p, not p.rsplit("/", 1)[-1].startswith("part-")),
    )
    if parquet and _has_embedding_column(fs, parquet[0]):
        return
    images = [p for p in found if p.lower().endswith(_IMAGE_SUFFIXES)]
    if images:
        raise PreflightError(
            f"{where} {shown} holds images, not embeddings: embed them first "
            f"(qmag-ray embed --images {shown} --output OUT) and pass OUT as {where}"
        )
    raise PreflightError(
        f"{where} {shown} holds no Parquet embeddings: pass an embed job's output folder"
    )


def _has_embedding_column(fs, path: str) -> bool:
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            return "embedding" in pq.read_schema(f).names
    except Exception:  # noqa: BLE001 - unreadable: load_embeddings will say why
        return True


def check_pairs(name: str, uri: str, protocol: object = None, *, key: str | None = None) -> int:
    """``uri`` is a readable pair list in ``protocol`` (syntax, columns); returns its size."""
    from qmag_ray.pairs.protocols import read_pairs

    check_uri(name, uri, key=key)
    proto = getattr(protocol, "value", protocol)
    try:
        return len(read_pairs(uri, proto))
    except ValueError as exc:
        raise PreflightError(f"{option_name(name, key)}: {exc}") from None
