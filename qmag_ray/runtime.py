"""Connecting to Ray from entry points (the CLI and jobs), never from library code."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

#: How Ray 2.60 says that a node it started missed its hard-coded 30 s registration window
#: (``ray/_private/node.py``); on a loaded machine a local ``ray.init`` can end so.
STARTUP_TIMEOUT = "timed out during startup"


class RayStartError(RuntimeError):
    """A local Ray that did not come up; the message says what to do (a failed run, exit 1)."""


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Connect to the Ray cluster at ``address``, or start a local one when there is none.

    Inside a submitted Ray job ``RAY_ADDRESS`` is set and ``ray.init()`` attaches to that
    cluster: a job never starts a second cluster of its own. Without an address and without
    ``RAY_ADDRESS`` a new local cluster is started (``address="local"``): a bare
    ``ray.init()`` would attach to whichever cluster ``ray start`` last started on this
    machine, someone else's included. Returns the address connected to.
    """
    import ray

    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, object] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    elif not os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = "local"
        kwargs["include_dashboard"] = False
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except Exception as exc:
        if kwargs.get("address") != "local" or STARTUP_TIMEOUT not in str(exc):
            raise
        raise RayStartError(
            "the local Ray did not start within Ray's fixed 30 s start-up window (a busy "
            f"machine: load average {_load()}); run the same command again, or start Ray "
            "once with `ray start --head` and pass its address (--ray-address or RAY_ADDRESS)"
        ) from exc
    import sys

    if "ray.data" in sys.modules:  # never import it here: it pulls in torch and pandas
        from qmag_ray.cli.console import quiet_ray_data  # (~280 MB for a calibration)

        quiet_ray_data()
    gcs = str(ray.get_runtime_context().gcs_address)
    logger.info("connected to Ray at %s", gcs)
    return gcs
