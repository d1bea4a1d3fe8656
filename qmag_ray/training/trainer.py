"""Driver side of MagFace training: validate, run Ray Train's TorchTrainer, collect results.

The caller connects to Ray first (entry points use :func:`qmag_ray.runtime.connect_ray`).
Everything that can be checked on the driver (data listing, backbone name, init checkpoint)
is checked before any worker starts, so a wrong path fails in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from qmag_ray import storage
from qmag_ray.training.config import TrainConfig
from qmag_ray.training.data import list_labelled_images
from qmag_ray.training.loop import HISTORY, train_loop_per_worker

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A training run that failed; the message names the run and the cause."""


@dataclass(frozen=True)
class TrainResult:
    """Outcome of a run: the last checkpoint (MagFace layout) and the reported metrics."""

    checkpoint: str
    epoch: int
    history: list[dict[str, float]]
    num_classes: int
    num_images: int
    resumes: int = 0

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def _validate(config: TrainConfig) -> tuple[int, int]:
    from qmag_ray.model import canonical_name, describe_checkpoint

    canonical_name(config.arch)
    images = list_labelled_images(config.data)
    if config.init_checkpoint:
        info = describe_checkpoint(config.init_checkpoint, config.arch)
        logger.info("fine-tuning from %s (epoch %s)", info["uri"], info["epoch"])
    return images.num_classes, len(images)


def _ray_storage(output: str) -> str:
    return storage.absolute(storage.join(output, "_ray"))


def train(
    config: TrainConfig, *, run_name: str | None = None, ray_train_log_level: str = "INFO"
) -> TrainResult:
    """Train ``config.arch`` with the MagFace loss on Ray Train; returns the last checkpoint.

    ``ray_train_log_level``: the level of Ray Train's own lines (worker group start-up, one
    line per reported result); the command line passes WARNING unless ``--verbose``.

    Raises:
        TrainingError: the run failed on a worker (the worker's error is chained).
    """
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    # Workers run in other working directories: ship absolute local paths.
    config = dataclasses.replace(
        config,
        data=storage.absolute(config.data),
        output=storage.absolute(config.output),
        init_checkpoint=storage.absolute(config.init_checkpoint)
        if config.init_checkpoint
        else None,
    )
    num_classes, num_images = _validate(config)
    logger.info(
        "training %s on %d images of %d identities with %d worker(s)",
        config.arch,
        num_images,
        num_classes,
        config.num_workers,
    )
    name = run_name or f"magface-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=_ray_storage(config.output),
            # a lost worker restarts the group from the latest reported training state
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level=ray_train_log_level),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        raise TrainingError(f"training run {name} failed: {exc}") from exc
    return read_result(config.output, num_classes=num_classes, num_images=num_images)


def read_result(output: str, *, num_classes: int = 0, num_images: int = 0) -> TrainResult:
    """The result recorded in ``output/history.json`` by a finished run."""
    uri = storage.join(output, HISTORY)
    if not storage.exists(uri):
        raise TrainingError(f"no {HISTORY} under {storage.redact(output)}: the run saved nothing")
    payload: dict[str, Any] = json.loads(storage.read_bytes(uri))
    return TrainResult(
        checkpoint=payload["checkpoint"],
        epoch=int(payload["epoch"]),
        history=list(payload["history"]),
        num_classes=num_classes,
        num_images=num_images,
        resumes=int(payload.get("resumes", 0)),
    )
