"""Command-line entry point: ``qmag-ray <command>``. Each command is a module of this package."""

from qmag_ray.cli.app import app

__all__ = ["app"]
