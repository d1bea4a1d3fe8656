"""Shared entry-point logic of the Ray job scripts in this folder.

Every ``jobs/<command>.py`` takes ``--config URI`` (a YAML file, local or ``s3://``) plus
``--set key=value`` overrides and hands both over, in the same process, to the ``qmag-ray
<command>`` command of the library, which reads the file, applies the overrides and names the
user's file (or the override) in any error: the job scripts hold no logic of their own.
Inside a submitted Ray job ``RAY_ADDRESS`` is set, so the command attaches to the cluster the
job runs on (``qmag_ray.runtime.connect_ray``) and never starts a second one.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("qmag_ray.jobs")

EPILOG = """\
Options after a lone `--` go to `qmag-ray {command}` unchanged (see `qmag-ray {command} --help`).
Overrides use dotted keys for nested settings (`--set gate.tolerance=0.002`); values are parsed
as YAML (`1e-3`, `true`, `[1, 2]`). Inside a Ray job RAY_ADDRESS is set and the job attaches to
that cluster; run outside a cluster without --ray-address, the command starts a local Ray.
"""


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


def cli_arguments(command: str, config_path: str, args: argparse.Namespace) -> list[str]:
    """The argument list handed to the ``qmag-ray`` application."""
    argv = ["--verbose"] if args.verbose else []
    argv += [command, "--config", config_path]
    for override in args.overrides:
        argv += ["--set", override]
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
    if args.overrides:
        keys = ", ".join(o.partition("=")[0].strip() for o in args.overrides)
        logger.info("config %s with overrides of: %s", args.config, keys)
    return app(args=cli_arguments(command, args.config, args), prog_name="qmag-ray")
