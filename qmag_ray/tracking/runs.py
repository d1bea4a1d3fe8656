"""Recording a calibrate / evaluate / recalibrate run in MLflow, from the driver only.

``tracked_run`` opens a run in the configured tracking store (``uri.configure_tracking``, done
by the entry point) and yields a ``TrackedRun`` that logs parameters, metrics, JSON/CSV/PNG
artifacts and tags. Everything passes through ``sanitize`` first, so no credential reaches
the store; the names of redacted keys are recorded in the ``qmag_ray.redacted_keys`` tag.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qmag_ray import __version__
from qmag_ray.tracking.sanitize import flatten, metric_key, numeric_items, sanitize

if TYPE_CHECKING:
    import pandas as pd

    from qmag_ray.calibration.result import QMagFaceCalibration

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "qmag-ray"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
TAG_GIT_COMMIT = "qmag_ray.git_commit"
TAG_GIT_DIRTY = "qmag_ray.git_dirty"
TAG_RAY_ADDRESS = "qmag_ray.ray_address"
TAG_KIND = "qmag_ray.kind"
TAG_VERSION = "qmag_ray.version"
TAG_REDACTED = "qmag_ray.redacted_keys"
TAG_DRIVER_HOST = "qmag_ray.driver_host"
TAG_DRIVER = "qmag_ray.driver"
END_ATTEMPTS = 4  # each through MLflow's own HTTP retries


def git_commit(source_dir: Path | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the git checkout holding the package source, or ("unknown", None).

    The package directory must be tracked by that checkout: a wheel installed in a virtual
    environment that happens to sit inside some repository reports "unknown".
    """
    pkg = (source_dir or Path(__file__).resolve().parents[1]).resolve()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit or git("ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return "unknown", None
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit, bool(status) if status is not None else None


def _assert_driver() -> None:
    """Ray workers never write to the tracking store: only the driver records."""
    ray = sys.modules.get("ray")
    in_worker = (
        ray is not None
        and ray.is_initialized()
        and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    )
    if in_worker:
        raise RuntimeError("MLflow logging is done by the driver only, not in Ray workers")


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created when missing (artifacts beside a SQLite store)."""
    import mlflow

    from qmag_ray.tracking.uri import default_artifact_location

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = default_artifact_location(mlflow.get_tracking_uri())
    try:
        return str(mlflow.create_experiment(name, artifact_location=location))
    except mlflow.exceptions.MlflowException:
        experiment = mlflow.get_experiment_by_name(name)  # created concurrently
        if experiment is None:
            raise
        return str(experiment.experiment_id)


class TrackedRun:
    """The active MLflow run of one job; every value is sanitised before it is recorded."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.redacted: list[str] = []

    def _clean(self, data: Any) -> Any:
        found: list[str] = []
        out = sanitize(data, redacted=found)
        if found:
            logger.warning("not recording credential-like value(s) of: %s", ", ".join(found))
            self.redacted.extend(k for k in found if k not in self.redacted)
            import mlflow

            mlflow.set_tag(TAG_REDACTED, ",".join(self.redacted))
        return out

    def log_params(self, params: Mapping[str, Any], *, prefix: str = "") -> dict[str, str]:
        """Log (nested) parameters as flat dotted keys; returns what was recorded."""
        import mlflow

        flat = flatten(self._clean(dict(params)), prefix=prefix)
        recorded = {}
        for key, value in flat.items():
            if value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if len(text) > MAX_PARAM_LENGTH:
                text = text[: MAX_PARAM_LENGTH - 3] + "..."
            recorded[metric_key(key)] = text
        if recorded:
            mlflow.log_params(recorded)
        return recorded

    def log_metrics(self, metrics: Mapping[str, Any], *, prefix: str = "") -> dict[str, float]:
        """Log the numeric leaves of a (nested) metrics mapping; returns what was recorded."""
        import mlflow

        values = numeric_items(metrics, prefix=prefix)
        if values:
            mlflow.log_metrics(values)
        return values

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        clean = self._clean({k: v for k, v in tags.items() if v is not None})
        mlflow.set_tags({k: str(v) for k, v in clean.items()})

    def log_json(self, artifact_file: str, data: Any) -> None:
        """A JSON artifact (e.g. ``metrics.json``), sanitised."""
        import mlflow

        text = json.dumps(self._clean(data), indent=2, sort_keys=True, default=_json_default)
        mlflow.log_text(text, artifact_file)

    def log_table(self, artifact_file: str, frame: pd.DataFrame) -> None:
        """A table as a CSV artifact."""
        import mlflow

        mlflow.log_text(frame.to_csv(index=False), artifact_file)

    def log_figure(self, artifact_file: str, figure: Any) -> None:
        """A matplotlib figure as a PNG artifact."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        self.log_bytes(artifact_file, buffer.getvalue())

    def log_bytes(self, artifact_file: str, data: bytes) -> None:
        """Raw bytes (e.g. an already rendered PNG) as an artifact."""
        import tempfile

        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            mlflow.log_artifact(str(path), None if parent == "." else parent)

    def log_calibration(self, calibration: QMagFaceCalibration) -> None:
        """``calibration.json``, the per-FMR grid table, the grid as params, alpha/beta/counts."""
        self.log_json("calibration.json", calibration.to_dict())
        self.log_params({"grid": calibration.to_dict()["grid"], "method": calibration.method})
        self.log_metrics(
            {
                "alpha": calibration.alpha,
                "beta": calibration.beta,
                "n_genuine": calibration.n_genuine,
                "n_impostor": calibration.n_impostor,
            }
        )
        table = grid_table(calibration)
        if len(table):
            self.log_table("grid_table.csv", table)


def grid_table(calibration: QMagFaceCalibration) -> pd.DataFrame:
    """Per-FMR rows of the calibration search: optimal weight and threshold, FNMR per weight."""
    import numpy as np
    import pandas as pd

    n = len(calibration.fmrs)
    columns: dict[str, Any] = {"fmr": calibration.fmrs}
    for name in ("optimal_weights", "optimal_thresholds"):
        values = getattr(calibration, name)
        if len(values) == n:
            columns[name.removesuffix("s")] = values
    table = np.asarray(calibration.fnmr_table, dtype=np.float64)
    if table.ndim == 2 and table.shape[1] == n and table.shape[0] == len(calibration.weights):
        columns["fnmr_optimal"] = table.min(axis=0) if len(table) else []
        for w, row in zip(calibration.weights, table, strict=True):
            columns[f"fnmr_w={w:.6g}"] = row
    return pd.DataFrame(columns)


def _driver_id() -> str:
    from qmag_ray.lease import _process_start

    return json.dumps({"pid": os.getpid(), "pid_start": _process_start(os.getpid())})


def _end(run_id: str, status: str, attempts: int = END_ATTEMPTS) -> None:
    """End the run as ``status``, retrying an unreachable store; the active run is popped
    whatever happens, so a failed end never leaves this process inside a dead run."""
    import mlflow

    try:
        for attempt in range(1, attempts + 1):
            try:
                mlflow.MlflowClient().set_terminated(run_id, status)
                return
            except Exception as exc:  # noqa: BLE001 - an outage: retried, then reported
                if attempt == attempts:
                    logger.error(
                        "could not mark MLflow run %s %s (%s); the next qmag-ray run on this "
                        "host marks it FAILED",
                        run_id,
                        status,
                        exc,
                    )
                    return
                time.sleep(min(8.0, 0.5 * 2**attempt))
    finally:
        while mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
            _pop_active_run()


def _pop_active_run() -> None:
    """Drop the active run locally without contacting the store (it may be unreachable)."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack:
        stack.pop()


def _fail_orphans(experiment_id: str) -> None:
    """Mark FAILED the RUNNING runs of this experiment whose driver ran on this host and is
    gone (killed, or its store was down when it ended): no run stays RUNNING forever."""
    import mlflow

    from qmag_ray.lease import _process_start

    host = socket.gethostname().replace("'", "")
    try:
        found = mlflow.MlflowClient().search_runs(
            [experiment_id],
            f"attributes.status = 'RUNNING' and tags.`{TAG_DRIVER_HOST}` = '{host}'",
            max_results=200,
        )
    except Exception as exc:  # noqa: BLE001 - best effort; the run itself reports errors
        logger.debug("looking for orphaned runs failed: %s", exc)
        return
    for orphan in found:
        try:
            driver = json.loads(orphan.data.tags.get(TAG_DRIVER, "{}"))
            pid = int(driver["pid"])
        except (ValueError, KeyError, TypeError):
            continue
        if pid == os.getpid() or _process_start(pid) == driver.get("pid_start"):
            continue  # alive
        logger.warning(
            "marking run %s FAILED: its driver (pid %d) is gone", orphan.info.run_id, pid
        )
        client = mlflow.MlflowClient()
        client.set_tag(orphan.info.run_id, "qmag_ray.ended_by", "orphan cleanup (driver gone)")
        client.set_terminated(orphan.info.run_id, "FAILED")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@contextmanager
def tracked_run(
    *,
    kind: str,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    ray_address: str | None = None,
    tags: Mapping[str, Any] | None = None,
    source_dir: Path | None = None,
) -> Iterator[TrackedRun]:
    """Open a run of job ``kind`` ("calibrate", "evaluate", "recalibrate") and tag it.

    Tags: the code's git commit (or "unknown"), whether the checkout was dirty, the Ray
    cluster address, the qmag-ray version, the driver (host, pid). The run ends FAILED when
    the block raises, retried through an outage; a run that still could not be ended (the store
    stayed down) is marked FAILED by the next ``tracked_run`` on the same host.
    """
    import mlflow

    _assert_driver()
    experiment_id = ensure_experiment(experiment)
    commit, dirty = git_commit(source_dir)
    _fail_orphans(experiment_id)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
    try:
        tracked = TrackedRun(run.info.run_id)
        tracked.set_tags(
            {
                TAG_KIND: kind,
                TAG_VERSION: __version__,
                TAG_GIT_COMMIT: commit,
                TAG_GIT_DIRTY: "unknown" if dirty is None else str(dirty).lower(),
                TAG_RAY_ADDRESS: ray_address or "none",
                TAG_DRIVER_HOST: socket.gethostname(),
                TAG_DRIVER: _driver_id(),
                **dict(tags or {}),
            }
        )
        logger.info("recording %s run %s in experiment %r", kind, run.info.run_id, experiment)
        yield tracked
    except BaseException:
        _end(run.info.run_id, "FAILED")
        raise
    else:
        _end(run.info.run_id, "FINISHED")
