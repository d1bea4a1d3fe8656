"""Typer commands whose options are generated from a settings model (``qmag_ray.config``).

``@settings_command(app, CalibrateConfig)`` gives the decorated function one option per leaf
setting of the model (flag, type, choices and help text from the model; the help states the
model's default and marks required settings), plus ``--config`` (a YAML file of the same
settings) and ``--set KEY=VALUE`` (any setting by its dotted YAML key, what the job scripts
pass on). The function receives a ``GivenSettings`` as its first argument and declares any
options of its own (``--ray-address``...) as ordinary typer parameters after it::

    @settings_command(app, EvaluateConfig)
    def evaluate(given: GivenSettings, ray_address: opts.RayAddress = None) -> None:
        cfg = given.load()          # the whole configuration, validated, or exit 2

To add a setting to a command, add a field (``option(default, "help")``) to the stage model
it belongs to: YAML key, override key and ``--flag`` follow; nothing is restated here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from qmag_ray.config import OptionSpec, format_default, option_specs, to_plain

REQUIRED_MARK = "[required: here or in --config]"
CONFIG_HELP = (
    "YAML file of these settings (nested sections as mappings, e.g. grid: {{n_fmr: 30}}; see "
    "{model}); options given here override it."
)
SET_HELP = (
    "Override one setting of the configuration by its YAML key, dotted for nested sections "
    "(grid.n_fmr=30); the value is YAML; repeatable; an option given by its own flag wins."
)


def help_text(spec: OptionSpec) -> str:
    """The option's help: the field's text, its default as the model has it, required mark."""
    text = spec.help.rstrip()
    if spec.required:
        return f"{text} {REQUIRED_MARK}"
    if spec.is_bool:
        return f"{text} (default: {'--' if spec.default else '--no-'}{spec.flag[2:]})"
    if spec.default is None or spec.default in ("", {}, (), []):
        return text
    return f"{text} (default: {format_default(spec.default)})"


def _annotation(spec: OptionSpec) -> Any:
    panel = "Required" if spec.required else spec.panel
    if spec.is_bool:
        decls = f"{spec.flag}/--no-{spec.flag[2:]}"
        info = typer.Option(decls, help=help_text(spec), rich_help_panel=panel)
        return Annotated[bool | None, info]
    if spec.is_sequence:
        info = typer.Option(spec.flag, help=help_text(spec), rich_help_panel=panel)
        return Annotated[list[str] | None, info]
    if spec.is_mapping:
        info = typer.Option(
            spec.flag, help=help_text(spec), metavar="KEY=VALUE", rich_help_panel=panel
        )
        return Annotated[list[str] | None, info]
    info = typer.Option(spec.flag, help=help_text(spec), rich_help_panel=panel)
    return Annotated[spec.type | None, info]


def _mapping(spec: OptionSpec, items: list[str]) -> dict[str, Any]:
    from qmag_ray.cli._support import fail
    from qmag_ray.config import load_yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            fail(f"{spec.flag} {item!r}: expected KEY=VALUE (YAML key {spec.key})")
        out[key.strip()] = load_yaml(raw)
    return out


def _overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as dotted key -> value, or exit 2 naming the bad one."""
    from qmag_ray.config import ConfigError, parse_override

    out: dict[str, Any] = {}
    for item in items:
        try:
            key, value = parse_override(item)
        except ConfigError as exc:
            from qmag_ray.cli._support import fail

            fail(f"configuration: {exc}")
        out[key] = value
    return out


def setting_option(model: type, key: str) -> Any:
    """The option of one setting of ``model`` (flag, type, help from the model), for a command
    that takes a few settings without a whole model (``tracking_uri: TrackingUri = None``)."""
    for spec in option_specs(model):
        if spec.key == key:
            return _annotation(spec)
    raise KeyError(f"{model.__name__} has no setting {key!r}")


@dataclass(frozen=True)
class GivenSettings:
    """What the command line gave: ``--config`` and the options set (dotted key -> value)."""

    model: type
    config: str | None
    values: Mapping[str, Any]

    def load(self, extra: Mapping[str, Any] | None = None) -> Any:
        """The validated configuration (file < options < ``extra``), or exit 2 naming the
        key and flag of each problem."""
        from qmag_ray.cli._support import load

        merged = {**self.values, **{k: v for k, v in (extra or {}).items() if v is not None}}
        return load(self.model, self.config, merged)


#: Command name -> its settings model (what ``tests/test_settings.py`` walks).
COMMAND_MODELS: dict[str, type] = {}


def settings_command(
    app: typer.Typer, model: type, *, name: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as a command with ``model``'s options (see module)."""
    specs = option_specs(model)

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        taken = {s.param for s in specs} | {"config", "overrides"}
        clash = [p.name for p in own if p.name in taken]
        if clash:
            raise TypeError(f"{fn.__name__}: options {clash} are already settings of {model}")
        ordered = [s for s in specs if s.required] + [s for s in specs if not s.required]
        params = [
            inspect.Parameter(
                s.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_annotation(s)
            )
            for s in ordered
        ]
        config_help = CONFIG_HELP.format(model=model.__name__)
        params.append(
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[str | None, typer.Option("--config", help=config_help)],
            )
        )
        params.append(
            inspect.Parameter(
                "overrides",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    list[str] | None,
                    typer.Option("--set", help=SET_HELP, metavar="KEY=VALUE"),
                ],
            )
        )
        params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            config = kwargs.pop("config", None)
            values = _overrides(kwargs.pop("overrides", None) or [])
            for spec in specs:
                value = kwargs.pop(spec.param, None)
                if value is None or ((spec.is_mapping or spec.is_sequence) and not value):
                    continue
                values[spec.key] = _mapping(spec, value) if spec.is_mapping else to_plain(value)
            return fn(GivenSettings(model, config, values), **kwargs)

        del command.__wrapped__  # typer must see the generated signature, not fn's
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        COMMAND_MODELS[name or fn.__name__.replace("_", "-")] = model
        return app.command(name)(command)

    return wrap


def declared_default(help_line: str) -> str | None:
    """The default a help text states (``(default: X)``), for the consistency test."""
    marker = "(default: "
    if marker not in help_line:
        return None
    return help_line.rsplit(marker, 1)[1].split(")", 1)[0]


__all__ = [
    "COMMAND_MODELS",
    "GivenSettings",
    "setting_option",
    "declared_default",
    "help_text",
    "settings_command",
]
