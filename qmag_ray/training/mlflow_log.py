"""Recording a finished training run in MLflow: parameters, metric curves, the checkpoint."""

from __future__ import annotations

from typing import Any

from qmag_ray import storage
from qmag_ray.training.config import TrainConfig
from qmag_ray.training.trainer import TrainResult

CURVES = ("loss", "id", "g", "acc", "norm", "lr", "images_per_s")


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(f"{prefix}{key}.", value))
        else:
            out[f"{prefix}{key}"] = value
    return out


def log_training(
    result: TrainResult,
    config: TrainConfig,
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str | None = None,
) -> str:
    """Log ``config`` as params and the reported curves as step metrics; returns the run id.

    URIs are recorded redacted; the checkpoint is referenced by URI, not copied.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    params = _flat("", {k: v for k, v in config.to_dict().items() if k != "tracking"})
    for key in ("data", "output", "init_checkpoint"):
        if params.get(key):
            params[key] = storage.redact(str(params[key]))
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})
        mlflow.log_params({"num_classes": result.num_classes, "num_images": result.num_images})
        for row in result.history:
            step = int(row["step"])
            mlflow.log_metrics({f"train_{k}": float(row[k]) for k in CURVES if k in row}, step=step)
        mlflow.set_tags({"qmag_ray.job": "train", "checkpoint": storage.redact(result.checkpoint)})
        return str(run.info.run_id)
