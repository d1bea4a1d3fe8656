"""The inputs of a recalibration: new images embedded into the kept folder, and their digest.

``embed_new_images`` reuses every embedding made by earlier runs and embeds only new images;
``inputs_fingerprint`` digests what determines the fitted scorer, so that a run on unchanged
inputs can find the version already fitted on them and register nothing new.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import TYPE_CHECKING

import numpy as np

from qmag_ray import storage
from qmag_ray.config import to_plain
from qmag_ray.workflows.recalibrate_config import RecalibrateConfig

if TYPE_CHECKING:
    from qmag_ray.embedding.output import EmbedSummary
    from qmag_ray.embeddings import EmbeddingTable

logger = logging.getLogger(__name__)


class RecalibrationError(ValueError):
    """A recalibration that cannot proceed with these inputs; the message says why."""


def embed_new_images(cfg: RecalibrateConfig) -> EmbedSummary:
    """Embed the images of ``cfg.images`` not yet in ``cfg.embeddings``; reuse the others.

    A finished earlier run in the embeddings folder is reopened (its ``summary.json`` is
    replaced at the end): the embed job then resumes, skipping every image already embedded.
    A different model or preprocessing than the folder was built with is an error.
    """
    from qmag_ray.embedding.config import EmbedConfig
    from qmag_ray.embedding.job import run_embed
    from qmag_ray.embedding.output import OutputLayout

    layout = OutputLayout(cfg.embeddings)
    if storage.exists(layout.summary):
        fs, path = storage.filesystem(layout.summary)
        fs.rm(path)  # reopen: the next run resumes the folder and embeds only new inputs
        logger.info("reusing the embeddings in %s", storage.redact(cfg.embeddings))
    resources = {f.name: getattr(cfg.embed, f.name) for f in dataclasses.fields(cfg.embed)}
    return run_embed(
        EmbedConfig(
            **resources, images=cfg.images, model=cfg.model, arch=cfg.arch, output=cfg.embeddings
        )
    )


def parts_folder(cfg: RecalibrateConfig) -> str:
    from qmag_ray.embedding.output import OutputLayout

    return OutputLayout(cfg.embeddings).embeddings


def inputs_fingerprint(cfg: RecalibrateConfig, table: EmbeddingTable, model_sha256: str) -> str:
    """Digest of what determines the fitted scorer: embeddings (order-free), model, settings."""
    order = np.argsort(np.asarray(table.path, dtype=str), kind="stable")
    doc = {
        "embeddings": table.take(order).fingerprint(),
        "identities": hashlib.sha256(
            "\0".join(str(table.identity[i]) for i in order).encode()
        ).hexdigest()[:16],
        "model_sha256": model_sha256,
        "arch": cfg.arch,
        "grid": to_plain(cfg.grid),
        "method": cfg.method.value,
        "pair_mode": cfg.resolved_pair_mode.value,
        "generate": to_plain(cfg.generate),
        "validation": to_plain(cfg.validation),
    }
    if cfg.method.value == "direct":
        doc["direct"] = to_plain(cfg.direct)
    if cfg.resolved_pair_mode.value == "exhaustive":
        doc["exhaustive"] = to_plain(cfg.exhaustive)
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def check_holdout_model(cfg: RecalibrateConfig, model_sha256: str) -> None:
    from qmag_ray.workflows.provenance import embedding_provenance

    assert cfg.holdout is not None
    sha = embedding_provenance(cfg.holdout.embeddings).get("embed_model_sha256")
    if sha and sha != model_sha256:
        raise RecalibrationError(
            f"the held-out embeddings {storage.redact(cfg.holdout.embeddings)} were made with "
            f"a checkpoint of sha256 {sha[:12]}..., not the recalibration model "
            f"({model_sha256[:12]}...); embed the held-out images with the same model"
        )


def check_gate_measurable(cfg: RecalibrateConfig) -> int:
    """Refuse, before anything is embedded, a gate FMR the held-out protocol cannot measure.

    The gate compares FNMR at ``gate.target_fmr`` on ``holdout.pairs``; with N impostor pairs
    no FMR below 1/N is measured (the metric would be empty after embedding, fitting and
    registering a challenger). Returns N.
    """
    from qmag_ray.fmr import measurable
    from qmag_ray.pairs.protocols import read_pairs

    assert cfg.holdout is not None
    _, n_impostor = read_pairs(cfg.holdout.pairs, cfg.holdout.protocol).counts()
    target = cfg.gate.target_fmr
    if not measurable(target, n_impostor):
        smallest = 1.0 / n_impostor if n_impostor else float("inf")
        raise RecalibrationError(
            f"--target-fmr (gate.target_fmr) {target:g} cannot be measured on the held-out "
            f"protocol {storage.redact(cfg.holdout.pairs)}: its {n_impostor} impostor pairs "
            f"measure no FMR below {smallest:.3g}; set --target-fmr >= {smallest:.3g} "
            "(e.g. --set gate.target_fmr=1e-3) or use a larger held-out pair list"
        )
    return n_impostor
