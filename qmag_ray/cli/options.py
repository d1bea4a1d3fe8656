"""Command-line options that are not settings, shared by several commands.

Settings (anything a YAML config can hold) are NOT declared here: they are fields of the
stage models (``qmag_ray.config``), and ``cli.settings_command`` generates their options. Only
options about where a command runs belong here.
"""

from __future__ import annotations

from typing import Annotated

import typer

from qmag_ray.cli.settings_command import setting_option
from qmag_ray.tracking.settings import TrackingConfig

#: ``--tracking-uri`` of ``TrackingConfig`` (for commands without a settings model).
TrackingUri = setting_option(TrackingConfig, "tracking_uri")

RayAddress = Annotated[
    str | None,
    typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
]
