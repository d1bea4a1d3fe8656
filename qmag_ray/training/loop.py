"""The per-worker MagFace training loop, run by Ray Train's TorchTrainer on every worker.

Each worker lists the data, builds the backbone (or loads ``init_checkpoint``) and a MagFace
head, and trains with DDP through ``ray.train.torch``. Metrics averaged over workers go to
``ray.train.report`` every ``log_every`` steps; rank 0 writes the checkpoints in MagFace's
layout with :func:`qmag_ray.model.save_checkpoint` and the metric history as ``history.json``
beside them.

At every saved epoch the full training state (network with its margin head, optimizer,
learning-rate schedule, step, history) is also reported to Ray Train as a checkpoint. When a
worker dies, Ray Train restarts the worker group (``TrainConfig.max_failures`` times) and the
loop resumes from the latest reported state instead of starting over; the state file holds
tensors and plain values only and is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from qmag_ray import storage
from qmag_ray.model import create_backbone, load_backbone, read_checkpoint
from qmag_ray.training.config import TrainConfig, backbone_kwargs
from qmag_ray.training.data import FaceDataset, collate, list_labelled_images
from qmag_ray.training.magface import MagFaceHead

logger = logging.getLogger(__name__)

HISTORY = "history.json"
STATE_FILE = "train_state.pt"  # inside a Ray Train checkpoint directory
HEAD_KEY = "fc.weight"  # the margin head's key in MagFace training checkpoints


def checkpoint_name(epoch: int) -> str:
    """MagFace's checkpoint file name for ``epoch``."""
    return f"magface_epoch_{epoch:05d}.pth"


class MagFaceNet(nn.Module):
    """Backbone plus margin head; ``forward`` returns the loss and its parts."""

    def __init__(self, backbone: nn.Module, head: MagFaceHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        return self.head(self.backbone(x), labels)


def build_net(cfg: TrainConfig, num_classes: int) -> MagFaceNet:
    """Backbone (fresh or from ``init_checkpoint``) and a MagFace head for ``num_classes``."""
    kwargs: dict[str, Any] = backbone_kwargs(cfg)
    if cfg.init_checkpoint:
        backbone = load_backbone(cfg.init_checkpoint, cfg.arch, **kwargs).train()
    else:
        backbone = create_backbone(cfg.arch, **kwargs)
    size = int(getattr(backbone, "embedding_size", 0)) or int(
        backbone.eval()(torch.zeros(2, 3, 112, 112)).shape[1]
    )
    head = MagFaceHead(size, num_classes, cfg.magface)
    if cfg.init_checkpoint:
        state = read_checkpoint(cfg.init_checkpoint).get("state_dict", {})
        weight = state.get(HEAD_KEY) if isinstance(state, dict) else None
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == tuple(head.weight.shape):
            with torch.no_grad():
                head.weight.copy_(weight)
            logger.info("margin head restored from %s", storage.redact(cfg.init_checkpoint))
    return MagFaceNet(backbone.train(), head)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, float]:
    """One optimisation step on a batch; returns the loss and its parts as floats."""
    loss, parts = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _all_mean(values: dict[str, float], count: float) -> dict[str, float]:
    """Sample-weighted means of ``values`` (sums) over all workers."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [count], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    n = max(float(t[-1]), 1.0)
    return {k: float(v) / n for k, v in zip(keys, t[:-1].tolist(), strict=True)}


def progress_line(metrics: dict[str, float], total: int) -> str:
    """The worker's line every ``log_every`` steps (Ray Train's own report line is filtered)."""
    return (
        f"step {int(metrics['step'])}/{total} (epoch {int(metrics['epoch'])}): "
        f"loss {metrics['loss']:.3f}, accuracy {metrics['acc']:.3f}, "
        f"mean norm {metrics['norm']:.1f}, {metrics['images_per_s']:.0f} images/s"
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: train one worker's share; ``config`` is ``TrainConfig.to_dict()``."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.cpus_per_worker)
    images = list_labelled_images(cfg.data)
    loader = DataLoader(
        FaceDataset(images, flip=cfg.flip, seed=cfg.seed + rank),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(images) >= cfg.batch_size * cfg.num_workers,
        collate_fn=collate,
        num_workers=cfg.loader_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    loader = ray.train.torch.prepare_data_loader(loader)
    net = build_net(cfg, images.num_classes)
    head_weight = net.head.weight
    model = ray.train.torch.prepare_model(net)
    optimizer = make_optimizer(cfg, model.parameters())
    total = cfg.max_steps or cfg.epochs * max(len(loader), 1)
    if cfg.max_steps:
        total = min(total, cfg.epochs * max(len(loader), 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total)
    )
    history: list[dict[str, float]] = []
    step, skipped, first_epoch, resumes = 0, 0, 1, 0
    restored = _restore(model, optimizer, sched)
    if restored is not None:
        history, step, skipped, resumes = (
            restored["history"],
            restored["step"],
            restored["skipped"],
            restored["resumes"] + 1,
        )
        first_epoch = restored["epoch"] + 1
        logger.warning(
            "resuming training after epoch %d (step %d): restart %d",
            restored["epoch"],
            step,
            resumes,
        )
    start, start_step = time.perf_counter(), step
    if step >= total or first_epoch > cfg.epochs:
        return
    for epoch in range(first_epoch, cfg.epochs + 1):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        window: dict[str, float] = {"loss": 0.0, "id": 0.0, "g": 0.0, "acc": 0.0, "norm": 0.0}
        seen = 0
        for x, y, n_bad in loader:
            skipped += n_bad
            if len(y) == 0:
                continue
            parts = train_step(model, optimizer, sched, x, y)
            step += 1
            for key, value in parts.items():
                window[key] += value * len(y)
            seen += len(y)
            last = step >= total
            if step % cfg.log_every == 0 or last:
                metrics = _all_mean(window, seen)
                metrics.update(
                    step=step,
                    epoch=epoch,
                    lr=sched.get_last_lr()[0],
                    skipped=skipped,
                    resumes=resumes,
                    images_per_s=(step - start_step)
                    * cfg.batch_size
                    * cfg.num_workers
                    / (time.perf_counter() - start),
                )
                history.append(metrics)
                ray.train.report(metrics)
                if rank == 0:
                    logger.info("%s", progress_line(metrics, total))
                window = dict.fromkeys(window, 0.0)
                seen = 0
            if last:
                break
        done = step >= total or epoch == cfg.epochs
        if done or epoch % cfg.checkpoint_every == 0:
            if rank == 0:
                _save(cfg, model, head_weight, epoch, history, resumes)
            _report_state(
                rank,
                model,
                optimizer,
                sched,
                {"epoch": epoch, "step": step, "skipped": skipped, "resumes": resumes},
                history,
            )
        if done:
            break


def _report_state(
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    counters: dict[str, int],
    history: list[dict[str, float]],
) -> None:
    """Report the resumable state of the run to Ray Train (every rank calls this together)."""
    import tempfile

    import ray.train

    metrics = {"epoch_done": counters["epoch"], "step": counters["step"]}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    net = model.module if hasattr(model, "module") else model
    state = {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": sched.state_dict(),
        "history": history,
        **counters,
    }
    with tempfile.TemporaryDirectory(prefix="qmag-train-") as folder:
        torch.save(state, f"{folder}/{STATE_FILE}")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any] | None:
    """Load the latest state Ray Train kept for this run (after a restart), else ``None``."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = torch.load(f"{folder}/{STATE_FILE}", map_location="cpu", weights_only=True)
    net = model.module if hasattr(model, "module") else model
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return state


def _save(
    cfg: TrainConfig,
    model: nn.Module,
    head_weight: torch.Tensor,
    epoch: int,
    history: list[dict[str, float]],
    resumes: int = 0,
) -> None:
    from qmag_ray.model import save_checkpoint

    net = model.module if hasattr(model, "module") else model
    uri = storage.join(cfg.output, checkpoint_name(epoch))
    save_checkpoint(
        net.backbone, uri, cfg.arch, epoch=epoch, extra_state={HEAD_KEY: head_weight.detach()}
    )
    payload = {"checkpoint": uri, "epoch": epoch, "history": history, "resumes": resumes}
    storage.write_bytes(storage.join(cfg.output, HISTORY), json.dumps(payload, indent=1).encode())
    logger.info("saved %s", storage.redact(uri))
