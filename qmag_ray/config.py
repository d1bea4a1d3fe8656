"""Settings: one declarative model per stage, composed into each command's settings.

Every setting is declared once, as a field of a frozen pydantic dataclass made with
``@settings`` (unknown keys are errors). A field carries its help text (``option(...)``); a
nested stage is a ``section(...)``. The same model gives

- the YAML layout of ``--config`` (a nested section is a nested mapping: ``grid: {n_fmr: 30}``),
- the dotted override keys of ``--set`` (``--set grid.n_fmr=30``, on every command and job
  script; ``parse_override``),
- the command-line options (``option_specs``: ``grid.n_fmr`` is ``--n-fmr``; a section may put
  a prefix before its fields' flags, a field may name its flag outright), built by
  ``qmag_ray.cli.settings_command``.

``load_config(cls, uri, overrides)`` validates a whole configuration at once: precedence
command line > file > model defaults; a problem raises ``ConfigError`` naming the YAML key, the
``--flag`` and what to do. Checks that involve several fields live in a ``check(self)`` method
of the class that declares the fields; they name fields in backquotes (`` `fmr_min` ``), which
the error message turns into ``grid.fmr_min (--fmr-min)``. Constructing a settings class in
Python validates the same way (a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic import dataclasses as pydantic_dataclasses

from qmag_ray import storage

T = TypeVar("T")

_META = "qmag_ray"  # key of our metadata in a field's json_schema_extra


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key, the flag and the fix."""


class Settings:
    """Base of every settings class: runs the ``check`` of each class in the hierarchy.

    Subclasses are made with ``@settings``; a class that needs checks across its own fields
    defines ``check(self)`` and raises ``ValueError`` (fields named in backquotes).
    """

    def __post_init__(self) -> None:
        for klass in reversed(type(self).__mro__):
            check = klass.__dict__.get("check")
            if check is not None:
                check(self)


def settings(cls: type[T]) -> type[T]:
    """Make ``cls`` (a subclass of ``Settings``) a frozen, keyword-only pydantic dataclass."""
    return pydantic_dataclasses.dataclass(  # type: ignore[no-any-return]
        frozen=True,
        kw_only=True,
        config=ConfigDict(extra="forbid", arbitrary_types_allowed=False),
    )(cls)


_REQUIRED = ...


def option(
    default: Any = _REQUIRED,
    help: str = "",  # noqa: A002 - the name typer and click use
    *,
    flag: str | None = None,
    **constraints: Any,
) -> Any:
    """A setting: its default (none: required), help text, optional flag, pydantic bounds.

    ``flag`` names the command-line option outright (``"guard-tolerance"`` for
    ``validation.tolerance``); otherwise it is the section's prefix + the field name.
    """
    if not help:
        raise TypeError("every setting needs a help text")
    extra = {_META: {"flag": flag}}
    if isinstance(default, (dict, list)):
        value = dict(default) if isinstance(default, dict) else list(default)
        return Field(
            default_factory=lambda: value.copy(),
            description=help,
            json_schema_extra=extra,
            **constraints,
        )
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def section(cls: type, help: str, *, prefix: str = "", required: bool = False) -> Any:  # noqa: A002
    """A nested stage (its own YAML mapping); its fields' flags start with ``prefix``."""
    extra = {_META: {"prefix": prefix}}
    if required:
        return Field(description=help, json_schema_extra=extra)
    return Field(default_factory=cls, description=help, json_schema_extra=extra)


# --------------------------------------------------------------------------- introspection


def is_settings(tp: Any) -> bool:
    """A ``@settings`` class."""
    return isinstance(tp, type) and issubclass(tp, Settings) and dataclasses.is_dataclass(tp)


def _meta(info: Any) -> dict[str, Any]:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return dict(extra.get(_META) or {})


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


@dataclass(frozen=True)
class OptionSpec:
    """One leaf setting as the command line sees it.

    Attributes:
        key: the dotted YAML key (``grid.n_fmr``).
        flag: the option (``--n-fmr``).
        param: the Python parameter name of the option (``n_fmr``).
        type: the value type, without ``None`` (``int``, an ``Enum``, ``dict``...).
        optional: ``None`` is a valid value.
        required: the model has no default (give it here or in ``--config``).
        default: the model's default (``None`` when required).
        help: the field's help text.
        panel: the help section it is listed under (its settings section, else "Options").
    """

    key: str
    flag: str
    param: str
    type: Any
    optional: bool
    required: bool
    default: Any
    help: str
    panel: str = "Options"

    @property
    def is_bool(self) -> bool:
        return self.type is bool

    @property
    def is_sequence(self) -> bool:
        return typing.get_origin(self.type) in (list, tuple)

    @property
    def is_mapping(self) -> bool:
        return self.type is dict or typing.get_origin(self.type) is dict

    @property
    def choices(self) -> list[str] | None:
        if isinstance(self.type, type) and issubclass(self.type, Enum):
            return [str(m.value) for m in self.type]
        if typing.get_origin(self.type) is typing.Literal:
            return [str(v) for v in typing.get_args(self.type)]
        return None


def _default_of(info: Any) -> tuple[bool, Any]:
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        return False, info.default_factory()
    if info.default is PydanticUndefined:
        return True, None
    return False, info.default


def option_specs(
    cls: type, *, _key: str = "", _prefix: str = "", _outer: str = "", _panel: str = "Options"
) -> list[OptionSpec]:
    """Every leaf setting of ``cls`` (sections flattened), in declaration order.

    A field's flag is the section prefixes + its name; a field that names its flag keeps the
    prefixes of the enclosing sections but not its own section's (``holdout.quality.compare``
    with flag ``edc-quality`` is ``--holdout-edc-quality``).
    """
    hints = typing.get_type_hints(cls)
    out: list[OptionSpec] = []
    for name, info in cls.__pydantic_fields__.items():  # type: ignore[attr-defined]
        tp, optional = _strip_optional(hints[name])
        meta = _meta(info)
        key = f"{_key}{name}"
        if is_settings(tp):
            prefix = _prefix + meta.get("prefix", "")
            panel = f"{key}: {(info.description or '').split(':')[0].rstrip('.')}"
            out += option_specs(tp, _key=f"{key}.", _prefix=prefix, _outer=_prefix, _panel=panel)
            continue
        flag = "--" + (
            _outer + meta["flag"] if meta.get("flag") else _prefix + name.replace("_", "-")
        )
        required, default = _default_of(info)
        param = flag[2:].replace("-", "_")
        text = info.description or ""
        out.append(OptionSpec(key, flag, param, tp, optional, required, default, text, _panel))
    return out


def sections_of(cls: type, *, _key: str = "") -> dict[str, type]:
    """Dotted key -> settings class of every nested section ("" is ``cls`` itself)."""
    out = {_key.rstrip("."): cls}
    hints = typing.get_type_hints(cls)
    for name in cls.__pydantic_fields__:  # type: ignore[attr-defined]
        tp, _ = _strip_optional(hints[name])
        if is_settings(tp):
            out.update(sections_of(tp, _key=f"{_key}{name}."))
    return out


def flags_of(cls: type) -> dict[str, str]:
    """Dotted key -> ``--flag`` of every leaf setting."""
    return {s.key: s.flag for s in option_specs(cls)}


def format_default(value: Any) -> str:
    """A default as help texts state it."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a number (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str | bytes) -> Any:
    """Parse YAML safely (plain data only), with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``grid.n_fmr=30`` -> ``("grid.n_fmr", 30)``: a dotted key and its value parsed as YAML
    (``1e-3``, ``true``, ``[1, 2]``; nothing after ``=`` is null). The one parser of the
    ``--set`` overrides of the commands and the job scripts.

    Raises:
        ConfigError: not ``key=value``, an empty key part, or a value that is not YAML.
    """
    key, sep, raw = text.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"--set {text!r} is not of the form key=value (dotted keys nest)")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {exc}") from None
    return ".".join(parts), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section ({key})")
        node = child
    node[parts[-1]] = value


def read_config_file(uri: str) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (local or any storage URI)."""
    shown = storage.redact(uri)
    try:
        loaded = load_yaml(storage.read_bytes(uri))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {shown} (--config)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {shown} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {shown} must hold a mapping of settings at the top level")
    return loaded


def load_config(
    cls: type[T],
    uri: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Validate ``cls`` from a YAML file at ``uri`` (optional) with dotted-key ``overrides``.

    Raises:
        ConfigError: every problem found, each naming its YAML key and ``--flag``.
    """
    data: dict[str, Any] = read_config_file(uri) if uri else {}
    given = dict(overrides or {})
    for key, value in given.items():
        _set_dotted(data, key, value)
    return validate_config(cls, data, source=storage.redact(uri) if uri else None, given=given)


def validate_config(
    cls: type[T],
    data: Mapping[str, Any],
    *,
    source: str | None = None,
    given: Mapping[str, Any] | None = None,
) -> T:
    """``cls`` from a nested mapping; ``ConfigError`` naming keys and flags on failure."""
    try:
        return TypeAdapter(cls).validate_python(dict(data))
    except ValidationError as exc:
        raise ConfigError(
            describe_errors(cls, exc, source=source, given=set(given or ()))
        ) from None


# --------------------------------------------------------------------------- messages

_BACKQUOTED = re.compile(r"`([A-Za-z_][A-Za-z0-9_.]*)`")


def _name(key: str, flags: Mapping[str, str]) -> str:
    flag = flags.get(key)
    return f"{key} ({flag})" if flag else key


def _resolve_refs(text: str, section: str, flags: Mapping[str, str]) -> str:
    """`` `fmr_min` `` inside section ``grid`` -> ``grid.fmr_min (--fmr-min)``."""

    def sub(m: re.Match[str]) -> str:
        ref = m.group(1)
        for key in (f"{section}.{ref}" if section else ref, ref):
            if key in flags:
                return _name(key, flags)
        return ref

    return _BACKQUOTED.sub(sub, text)


def _suggest(cls: type, section: str, name: str) -> str:
    """A hint for an unknown key: where that name lives, or a close spelling."""
    keys = [s.key for s in option_specs(cls)]
    sections = sections_of(cls)
    elsewhere = [k for k in [*keys, *sections] if k and k.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return f"; did you mean {' or '.join(elsewhere)}?"
    known = sections_of(cls).get(section)
    fields = list(known.__pydantic_fields__) if known else []  # type: ignore[attr-defined]
    close = difflib.get_close_matches(name, fields, n=1)
    if close:
        return f"; did you mean {'.'.join(filter(None, [section, close[0]]))}?"
    if fields:
        return f"; known keys{' of ' + section if section else ''}: {', '.join(fields)}"
    return ""


def _message(kind: str, msg: str, ctx: Mapping[str, Any], value: Any) -> str:
    shown = f", got {value!r}" if value is not None and not isinstance(value, dict) else ""
    bounds = {
        "greater_than": "must be > {gt}",
        "greater_than_equal": "must be >= {ge}",
        "less_than": "must be < {lt}",
        "less_than_equal": "must be <= {le}",
    }
    if kind in bounds:
        return bounds[kind].format(**ctx) + shown
    if kind == "enum":
        return f"must be one of {ctx.get('expected', '').replace(chr(39), '')}" + shown
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number" + shown
    if kind in ("float_parsing", "float_type"):
        return "must be a number" + shown
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false" + shown
    if kind in ("string_type",):
        return "must be text" + shown
    if kind in ("dict_type", "dataclass_type", "dataclass_args_type", "model_type"):
        return "must be a mapping of settings" + shown
    return msg.removeprefix("Value error, ") + shown


def describe_errors(
    cls: type, exc: ValidationError, *, source: str | None = None, given: set[str] | None = None
) -> str:
    """One line per problem: the dotted key, its flag, what is wrong, where it came from."""
    flags = flags_of(cls)
    sections = sections_of(cls)
    given = given or set()
    lines: list[str] = []
    missing: list[str] = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        key = ".".join(loc)
        kind = err["type"]
        origin = "the command line" if key in given else (source or "the defaults")
        if kind == "unexpected_keyword_argument":
            section = ".".join(loc[:-1])
            hint = _suggest(cls, section, loc[-1])
            lines.append(f"unknown setting {key} in {origin}{hint}")
            continue
        if kind == "missing":
            if key in sections:
                parent = sections[".".join(loc[:-1])]
                info = parent.__pydantic_fields__[loc[-1]]  # type: ignore[attr-defined]
                lines.append(f"section {key} is required: {info.description}")
            else:
                missing.append(_name(key, flags))
            continue
        if kind == "value_error" and (key in sections or not key):
            text = _resolve_refs(err["msg"].removeprefix("Value error, "), key, flags)
            lines.append(f"{text} (in {source})" if source else text)
            continue
        text = _message(kind, err["msg"], err.get("ctx") or {}, err.get("input"))
        text = _resolve_refs(text, ".".join(loc[:-1]), flags)
        where = f" (from {origin})" if source or key in given else ""
        lines.append(f"{_name(key, flags)} {text}{where}")
    if missing:
        lines.insert(
            0,
            f"missing required setting{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            "give {0} on the command line or in the --config file".format(
                "them" if len(missing) > 1 else "it"
            ),
        )
    return "; ".join(dict.fromkeys(lines))


def to_plain(value: Any) -> Any:
    """A settings value as YAML/JSON data (enums as their text, sections as mappings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
