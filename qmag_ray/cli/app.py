"""The ``qmag-ray`` command-line application object; commands live in sibling modules."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup


class QmagGroup(TyperGroup):
    """Runs every command inside ``errors.handled``: 1-2 line errors, redacted output."""

    def invoke(self, ctx: Any) -> Any:
        from qmag_ray.cli.errors import handled

        debug = bool(ctx.params.get("debug"))
        with handled(debug=debug, quiet=not ctx.params.get("verbose")):
            return super().invoke(ctx)


app = typer.Typer(
    cls=QmagGroup,
    name="qmag-ray",
    help="Quality-aware face recognition (QMagFace) on Ray: embed, calibrate, evaluate, register.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"qmag-ray {version('qmag-ray')}")
        except PackageNotFoundError:  # a source tree that is not installed
            typer.echo("qmag-ray (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Everything: debug logging, Ray Data progress, Ray notices."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the traceback of an error (also QMAG_RAY_DEBUG=1)."
    ),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Print the installed qmag-ray version and exit.",
    ),
) -> None:
    """Set up logging for every command."""
    from qmag_ray.cli.console import configure_logging

    configure_logging(verbose)
