"""Keeping credentials out of what is recorded: parameters, tags and JSON artifacts.

Everything written to MLflow passes through ``sanitize``: ``user:password@`` parts of URIs are
removed, query parameters that look like credentials (signatures, tokens) are blanked, and
values stored under keys that look like secrets (``aws_secret_access_key``, ``token``,
``password``...) are replaced by ``REDACTED``. What was redacted is reported by key name only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "REDACTED"

_SECRET_KEY = re.compile(
    r"(secret|passw(or)?d|passwd|pwd|token|credential|api[_-]?key|access[_-]?key|"
    r"private[_-]?key|auth(orization|_header)?$|signature|session[_-]?key|cookie)",
    re.IGNORECASE,
)
# scheme://user[:password]@host -> scheme://host, anywhere in a string.
# (a secret may hold "/", as AWS secret keys do: after a ":" anything up to the "@" goes)
_URI_USERINFO = re.compile(
    r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?:[^/\s@?#]+|[^/\s@?#:]*:[^\s@'\"]*)@"
)
# user:secret@host without a scheme (libraries quote bucket names without "s3://").
_BARE_USERINFO = re.compile(r"(?<![\w/:.%~+-])[\w.~%+-]+:[^\s@'\"/:][^\s@'\"]*@(?=[\w.-])")
# ?X-Amz-Signature=...&token=... -> value blanked.
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&][^=&\s#]*(?:signature|token|secret|password|credential|key)[^=&\s#]*=)"
    r"[^&\s#]*",
    re.IGNORECASE,
)
# key=value / key: value inside free text (command lines, connection strings).
_INLINE_SECRET = re.compile(
    r"(?P<key>\b[\w.-]*(?:secret|password|passwd|token|api[_-]?key)[\w.-]*\s*[=:]\s*)"
    r"(?P<value>[^\s,;&'\"]+)",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """Whether a parameter, tag or JSON key name looks like it holds a credential."""
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    """``text`` with URI user-info, credential query values and ``key=secret`` pairs removed."""
    text = _URI_USERINFO.sub(lambda m: m.group("scheme"), text)
    text = _BARE_USERINFO.sub("", text)
    text = _QUERY_SECRET.sub(lambda m: m.group("key") + REDACTED, text)
    return _INLINE_SECRET.sub(lambda m: m.group("key") + REDACTED, text)


def sanitize(value: Any, *, key: str = "", redacted: list[str] | None = None) -> Any:
    """A copy of ``value`` (JSON-like: dicts, lists, scalars) safe to record.

    Keys that look secret get ``REDACTED`` as value (their names are appended to
    ``redacted`` when a list is given); strings have credentials in URIs removed.
    """
    if key and is_secret_key(key) and value not in (None, "", {}, []):
        if redacted is not None:
            redacted.append(key)
        return REDACTED
    if isinstance(value, Mapping):
        return {
            str(k): sanitize(v, key=str(k), redacted=redacted)
            for k, v in value.items()  # keys themselves are names, not secrets
        }
    if isinstance(value, (list, tuple)):
        return [sanitize(v, key=key, redacted=redacted) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def flatten(data: Mapping[str, Any], *, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys (``grid.n_fmr``)."""
    flat: dict[str, Any] = {}
    for k, v in data.items():
        name = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flat.update(flatten(v, prefix=name, sep=sep))
        else:
            flat[name] = v
    return flat


_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")


def metric_key(name: str) -> str:
    """``name`` with characters MLflow refuses in metric/param keys replaced (``@`` -> ``_at_``)."""
    name = name.replace("@", "_at_").replace("=", "_")
    return _BAD_KEY_CHARS.sub("_", name)


def numeric_items(data: Mapping[str, Any], *, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metrics mapping, flattened, as floats.

    Booleans count as 0/1; strings, lists and ``None`` are not metrics and are left out
    (they belong in ``metrics.json``, which keeps the whole report).
    """
    out: dict[str, float] = {}
    for k, v in flatten(data, prefix=prefix).items():
        if isinstance(v, (bool, int, float)):
            out[metric_key(k)] = float(v)
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy scalars
            out[metric_key(k)] = float(v.item())
    return out
