"""Loading frozen-dataclass configurations from YAML, with overrides and clear errors.

Precedence: command-line overrides > config file > the dataclass defaults. Unknown keys and
values of the wrong type are errors that name the field and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml

from qmag_ray import storage

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field and its source."""


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` (value parsed as YAML, so ``1e-3``, ``true``, ``[1, 2]`` work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _coerce(cls_name: str, name: str, hint: Any, value: Any, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    where = f"{cls_name}.{name} (from {source})"
    if value is None:
        if hint is type(None) or (origin in (typing.Union, types.UnionType) and type(None) in args):
            return None
        raise ConfigError(f"{where} must not be empty")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(cls_name, name, arg, value, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_mapping(hint, value, source=source, prefix=f"{cls_name}.{name}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(cls_name, name, inner, v, source) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if isinstance(hint, type) and issubclass(hint, str):  # str Enums
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in hint)  # type: ignore[attr-defined]
            raise ConfigError(f"{where} must be one of {choices}, got {value!r}") from None
    return value


def from_mapping(
    cls: type[T], data: Mapping[str, Any], *, source: str = "config", prefix: str | None = None
) -> T:
    """Build dataclass ``cls`` from a mapping, checking names and types."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    label = prefix or cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(unknown)} for {label} in {source}; "
            f"known: {', '.join(sorted(fields))}"
        )
    values = {k: _coerce(label, k, hints[k], v, source) for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{label} in {source}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{label} in {source}: {exc}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a mapping")
    node[parts[-1]] = value


def load_config(
    cls: type[T],
    uri: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Load ``cls`` from a YAML file at ``uri`` (optional) with dotted-key ``overrides`` on top."""
    data: dict[str, Any] = {}
    source = "defaults"
    if uri:
        source = uri
        try:
            loaded = yaml.safe_load(storage.read_bytes(uri))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {uri}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {uri} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {uri} must hold a mapping at the top level")
        data = loaded
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    if overrides:
        source = f"{source} + overrides"
    return from_mapping(cls, data, source=source)
