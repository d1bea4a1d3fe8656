"""Command-line options that are not settings, shared by several commands.

Settings (anything a YAML config can hold) are NOT declared here: they are fields of the
stage models (``qmag_ray.config``), and ``cli.settings_command`` generates their options. Only
options about where a command runs belong here.
"""

from __future__ import annotations

from typing import Annotated

import typer

RayAddress = Annotated[
    str | None,
    typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
]
