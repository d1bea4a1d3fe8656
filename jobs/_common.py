"""Shared entry-point logic of the Ray job scripts in this folder.

Every ``jobs/<command>.py`` takes ``--config URI`` (a YAML file, local or ``s3://``) plus
``--set key=value`` overrides, merges them into one YAML file and hands over, in the same
process, to the ``qmag-ray <command>`` command of the library: the job scripts hold no logic of
their own. Inside a submitted Ray job ``RAY_ADDRESS`` is set, so the command attaches to the
cluster the job runs on (``qmag_ray.runtime.connect_ray``) and never starts a second one.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("qmag_ray.jobs")

EPILOG = """\
Options after a lone `--` go to `qmag-ray {command}` unchanged (see `qmag-ray {command} --help`).
Overrides use dotted keys for nested settings (`--set gate.tolerance=0.002`); values are parsed
as YAML (`1e-3`, `true`, `[1, 2]`). Inside a Ray job RAY_ADDRESS is set and the job attaches to
that cluster; run outside a cluster without --ray-address, the command starts a local Ray.
"""


class _Loader(yaml.SafeLoader):
    """YAML loader that also reads ``1e-3`` as a number (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str | bytes) -> Any:
    """Parse YAML safely, with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: plain data only


class JobConfigError(ValueError):
    """A job configuration or override that cannot be used; the message names it."""


def build_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of ``jobs/<command>.py``; it needs nothing of the library."""
    parser = argparse.ArgumentParser(
        prog=f"jobs/{command}.py",
        description=description,
        epilog=EPILOG.format(command=command),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="URI",
        help="YAML configuration of the command (local path or s3://...).",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one configuration key; repeatable; dotted keys for nested values.",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="Ray cluster to use; default: RAY_ADDRESS of the job, else a local Ray.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    parser.add_argument(
        "passthrough",
        nargs="*",
        metavar="-- OPTION",
        help=f"Further options of `qmag-ray {command}`, after a lone `--`.",
    )
    return parser


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise JobConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise JobConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``key=value`` override set (dotted keys nest)."""
    merged: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        parts, value = parse_override(text)
        node = merged
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise JobConfigError(f"override {text!r}: {where} is not a mapping")
            node = child
        node[parts[-1]] = value
    return merged


def load_config_mapping(uri: str) -> dict[str, Any]:
    """Read the YAML mapping at ``uri`` (any fsspec URI) with errors that name the file."""
    from qmag_ray import storage

    try:
        loaded = load_yaml(storage.read_bytes(uri))
    except FileNotFoundError:
        raise JobConfigError(f"config file not found: {uri}") from None
    except yaml.YAMLError as exc:
        raise JobConfigError(f"config file {uri} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise JobConfigError(f"config file {uri} must hold a mapping at the top level")
    return loaded


def cli_arguments(command: str, config_path: str, args: argparse.Namespace) -> list[str]:
    """The argument list handed to the ``qmag-ray`` application."""
    argv = ["--verbose"] if args.verbose else []
    argv += [command, "--config", config_path]
    if args.ray_address:
        argv += ["--ray-address", args.ray_address]
    return argv + list(args.passthrough)


def run(
    command: str,
    description: str,
    argv: Sequence[str] | None = None,
    app: Callable[..., Any] | None = None,
) -> Any:
    """Parse the job's arguments and run ``qmag-ray <command>`` in this process.

    ``app`` is the typer application (default: ``qmag_ray.cli.app``), imported only after the
    arguments are parsed so that ``--help`` works on its own. With ``standalone_mode`` (the
    default of typer) the command ends the process with its exit code, which Ray reports as
    the job's status.
    """
    args = build_parser(command, description).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.ray_address is None:
        if os.environ.get("RAY_ADDRESS"):
            logger.info("running inside a Ray job: attaching to the cluster of RAY_ADDRESS")
        else:
            logger.info("no RAY_ADDRESS and no --ray-address: the command starts a local Ray")
    if app is None:
        from qmag_ray.cli import app as qmag_app

        app = qmag_app
    if not args.overrides:
        return app(args=cli_arguments(command, args.config, args), prog_name="qmag-ray")
    merged = apply_overrides(load_config_mapping(args.config), args.overrides)
    keys = ", ".join(o.partition("=")[0].strip() for o in args.overrides)
    logger.info("config %s with overrides of: %s", args.config, keys)
    with tempfile.TemporaryDirectory(prefix=f"qmag-ray-{command}-") as tmp:
        path = Path(tmp) / f"{Path(args.config).stem}+overrides.yaml"
        path.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
        return app(args=cli_arguments(command, str(path), args), prog_name="qmag-ray")
