"""The ``qmag-ray`` command-line application object; commands live in sibling modules."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Print the installed qmag-ray version and exit.",
    ),
) -> None:
    """Set up logging for every command."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
