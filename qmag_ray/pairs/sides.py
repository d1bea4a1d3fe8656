"""Pair assembly for a calibration: the pairs alpha and beta are fitted on, and held-out pairs.

``build_sides`` turns the embeddings and a ``CalibrateConfig`` into a fit side (a
``PairSource`` for the fit, plus listed pairs for in-sample metrics) and an optional held-out
side, identity-disjoint from the fit side in ``split`` mode. Exhaustive sets are never
materialised for metrics: both sides' metrics come from pairs generated from the same
identities (a sample), and ``notes`` says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from qmag_ray import storage
from qmag_ray.embeddings import EmbeddingTable, load_embeddings
from qmag_ray.errors import WorkflowError
from qmag_ray.pairs.exhaustive import ExhaustiveSource
from qmag_ray.pairs.generate import generate_pairs, identity_split
from qmag_ray.pairs.generated import GeneratedPairSource
from qmag_ray.pairs.listed import ListedPairSource
from qmag_ray.pairs.protocols import PairProtocol, read_pairs
from qmag_ray.pairs.resolve import Match, Policy, ResolvedPairs, resolve_pairs
from qmag_ray.pairs.settings import PairMode, ValidationMode
from qmag_ray.pairs.source import PairSource
from qmag_ray.pairs.templates import (
    PoolReport,
    pool_templates,
    read_template_pairs,
    read_template_table,
    resolve_template_pairs,
)

if TYPE_CHECKING:  # the calibrate command's settings; this module only reads them
    from qmag_ray.workflows.config import CalibrateConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PairSide:
    """One side of a calibration.

    Attributes:
        name: "fit" or "held_out".
        source: the pairs as a ``PairSource`` (what the fit runs on).
        listed: pairs for metrics (``arrays()``): the same pairs, or a generated sample of the
            same identities when ``source`` is exhaustive.
        identities: the distinct identity labels on this side (empty when unknown).
        info: JSON-ready description (mode, counts, skips).
    """

    name: str
    source: PairSource
    listed: ListedPairSource | GeneratedPairSource
    identities: frozenset[str] = frozenset()
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Sides:
    """The fit side, the held-out side (None without validation) and notes for the user."""

    fit: PairSide
    held_out: PairSide | None
    validation_mode: ValidationMode
    table_info: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _resolve_kwargs(cfg: Any) -> dict[str, Any]:
    return {
        "prefix": cfg.prefix,
        "match": Match(cfg.match),
        "on_missing": Policy(cfg.on_missing),
        "on_bad_embedding": Policy(cfg.on_bad),
        "on_self": Policy(cfg.on_self),
        "on_duplicate": Policy(cfg.on_duplicate),
    }


def read_listed(
    table: EmbeddingTable, uri: str, protocol: PairProtocol | str | None, cfg: Any
) -> tuple[ResolvedPairs, str]:
    """Read a pair list, map it onto ``table`` with the configured policies.

    Returns:
        The resolved pairs and the protocol they were read as (guessed when ``protocol`` is
        None).
    """
    if getattr(cfg, "templates", None):  # ``table`` holds pooled templates
        tpairs = read_template_pairs(uri)
        resolved = resolve_template_pairs(
            tpairs, table, on_missing=Policy(cfg.on_missing), on_self=Policy(cfg.on_self)
        )
        name = PairProtocol(protocol).value if protocol is not None else "template pairs"
        logger.info("template pairs %s: %s", storage.redact(uri), resolved.report.summary())
        return resolved, name
    pairs = read_pairs(uri, None if protocol is None else PairProtocol(protocol))
    resolved = resolve_pairs(pairs, table, **_resolve_kwargs(cfg))
    logger.info("pairs %s (%s): %s", storage.redact(uri), pairs.protocol, resolved.report.summary())
    return resolved, pairs.protocol


def templates_table(table: EmbeddingTable, cfg: Any) -> tuple[EmbeddingTable, PoolReport | None]:
    """The embeddings pooled into ``cfg.templates`` (unchanged without a template table)."""
    if not getattr(cfg, "templates", None):
        return table, None
    templates = read_template_table(cfg.templates)
    return pool_templates(
        table,
        templates,
        cfg.pooling,
        prefix=cfg.prefix,
        match=Match(cfg.match),
        on_missing=Policy(cfg.on_missing),
    )


def _identities(table: EmbeddingTable, rows: np.ndarray | None = None) -> frozenset[str]:
    ids = table.identity if rows is None else table.identity[rows]
    return frozenset(str(x) for x in ids if x is not None)


def _subset(resolved: ResolvedPairs, mask: np.ndarray) -> ResolvedPairs:
    return ResolvedPairs(
        resolved.idx_a[mask],
        resolved.idx_b[mask],
        resolved.label[mask],
        resolved.position[mask],
        resolved.report,
    )


def _counts(resolved: ResolvedPairs) -> dict[str, int]:
    genuine, impostor = resolved.counts()
    return {"n_genuine": genuine, "n_impostor": impostor}


def _generated(table: EmbeddingTable, cfg: CalibrateConfig, side: str) -> ResolvedPairs:
    gen = cfg.generate
    try:
        return generate_pairs(table, gen.max_per_identity, gen.impostors_per_side, gen.seed)
    except ValueError as exc:
        raise WorkflowError(f"cannot generate the {side} pairs: {exc}") from None


def _generated_side(
    name: str, table: EmbeddingTable, cfg: CalibrateConfig, shards: int
) -> PairSide:
    # Each shard draws its own identities' pairs: the fit never holds the pair list.
    gen = cfg.generate
    try:
        source = GeneratedPairSource(
            table, gen.max_per_identity, gen.impostors_per_side, gen.seed, shards=shards
        )
    except ValueError as exc:
        raise WorkflowError(f"cannot generate the {name} pairs: {exc}") from None
    genuine, impostor = source.counts()
    info = {
        "pairs": "generated",
        "n_genuine": genuine,
        "n_impostor": impostor,
        "n_images": len(table),
    }
    return PairSide(name, source, source, _identities(table), info)


def _exhaustive_side(
    name: str, table: EmbeddingTable, cfg: CalibrateConfig, shards: int
) -> PairSide:
    try:
        source = ExhaustiveSource(table, cfg.exhaustive.block_size, shards)
    except ValueError as exc:
        raise WorkflowError(f"cannot form the exhaustive {name} pairs: {exc}") from None
    sample = _generated(table, cfg, f"{name} metrics-sample")
    genuine, impostor = source.counts()
    info = {
        "pairs": "exhaustive",
        "n_genuine": genuine,
        "n_impostor": impostor,
        "n_images": len(table),
        "metrics_sample": {"pairs": "generated", **_counts(sample)},
    }
    listed = ListedPairSource(table, sample, shards=shards)
    return PairSide(name, source, listed, _identities(table), info)


def validation_mode(table: EmbeddingTable, cfg: CalibrateConfig) -> ValidationMode:
    """The effective validation mode (``auto`` decided from the config and the labels)."""
    mode = ValidationMode(cfg.validation.mode)
    if mode is ValidationMode.AUTO:
        if cfg.validation.pairs:
            return ValidationMode.PAIRS
        return ValidationMode.SPLIT if table.has_identities() else ValidationMode.NONE
    if mode is ValidationMode.SPLIT and not table.has_identities():
        unlabelled = sum(x is None for x in table.identity)
        raise WorkflowError(
            f"validation mode 'split' needs an identity label on every embedding, but {unlabelled} "
            f"of {len(table)} have none; give a validation pair list (validation.pairs) or use "
            "validation mode 'none'"
        )
    return mode


def _split_rows(table: EmbeddingTable, rows: np.ndarray, cfg: CalibrateConfig) -> list[np.ndarray]:
    """Identity-disjoint (fit rows, held-out rows) among ``rows`` of ``table``."""
    try:
        sets = identity_split(table.take(rows), cfg.validation.fraction, cfg.validation.seed)
    except ValueError as exc:
        raise WorkflowError(f"cannot split the identities for validation: {exc}") from None
    return [rows[s] for s in sets]


def _listed_sides(
    table: EmbeddingTable, cfg: CalibrateConfig, mode: ValidationMode, shards: int
) -> tuple[PairSide, PairSide | None, list[str]]:
    assert cfg.pairs is not None
    resolved, protocol = read_listed(table, cfg.pairs, cfg.protocol, cfg)
    base = {
        "pairs": "listed",
        "uri": storage.redact(cfg.pairs),
        "protocol": protocol,
        "resolve": resolved.report.to_dict(),
    }
    if mode is not ValidationMode.SPLIT:
        listed = ListedPairSource(table, resolved, shards=shards)
        used = np.unique(np.concatenate([resolved.idx_a, resolved.idx_b]))
        info = {**base, **_counts(resolved)}
        return PairSide("fit", listed, listed, _identities(table, used), info), None, []
    used = np.unique(np.concatenate([resolved.idx_a, resolved.idx_b]))
    fit_rows, held_rows = _split_rows(table, used, cfg)
    side_of = np.full(len(table), -1, dtype=np.int8)
    side_of[fit_rows], side_of[held_rows] = 0, 1
    sa, sb = side_of[resolved.idx_a], side_of[resolved.idx_b]
    cross = int((sa != sb).sum())
    notes = []
    if cross:
        notes.append(
            f"{cross} listed pair(s) join a fit-side and a held-out identity and are used on "
            "neither side of the identity split"
        )
    sides = []
    for name, k, rows in (("fit", 0, fit_rows), ("held_out", 1, held_rows)):
        part = _subset(resolved, (sa == k) & (sb == k))
        listed = ListedPairSource(table, part, shards=shards)
        info = {**base, **_counts(part), "cross_pairs_left_out": cross}
        sides.append(PairSide(name, listed, listed, _identities(table, rows), info))
    return sides[0], sides[1], notes


def _label_sides(
    table: EmbeddingTable, cfg: CalibrateConfig, mode: ValidationMode, shards: int
) -> tuple[PairSide, PairSide | None, list[str]]:
    """Generated or exhaustive pairs from identity labels, split by identity when asked."""
    exhaustive = cfg.resolved_pair_mode is PairMode.EXHAUSTIVE
    make = _exhaustive_side if exhaustive else _generated_side
    notes = []
    if exhaustive:
        notes.append(
            "exhaustive pairs are not materialised for metrics: in-sample and held-out metrics "
            "are measured on pairs generated from the same identities (a sample; seed "
            f"{cfg.generate.seed}, max_per_identity {cfg.generate.max_per_identity}, "
            f"impostors_per_side {cfg.generate.impostors_per_side})"
        )
    if not table.has_identities():
        unlabelled = sum(x is None for x in table.identity)
        raise WorkflowError(
            f"{cfg.resolved_pair_mode.value} pairs need an identity label on every embedding, "
            f"but {unlabelled} of {len(table)} have none; give a pair list (pairs) instead"
        )
    if mode is not ValidationMode.SPLIT:
        return make("fit", table, cfg, shards), None, notes
    fit_rows, held_rows = _split_rows(table, np.arange(len(table)), cfg)
    fit = make("fit", table.take(fit_rows), cfg, shards)
    held = make("held_out", table.take(held_rows), cfg, shards)
    return fit, held, notes


def _pairs_held_out(
    table: EmbeddingTable, cfg: CalibrateConfig, fit: PairSide, shards: int
) -> tuple[PairSide, list[str]]:
    """The user's validation pair list (on the calibration's embeddings unless told otherwise)."""
    val = cfg.validation
    assert val.pairs is not None
    val_table = table
    if val.embeddings:
        from qmag_ray.quality.columns import with_chosen_quality

        val_table, _ = with_chosen_quality(
            load_embeddings(val.embeddings), val.embeddings, cfg.quality
        )
    resolved, protocol = read_listed(val_table, val.pairs, val.protocol, cfg)
    listed = ListedPairSource(val_table, resolved, shards=shards)
    used = np.unique(np.concatenate([resolved.idx_a, resolved.idx_b]))
    info = {
        "pairs": "listed",
        "uri": storage.redact(val.pairs),
        "protocol": protocol,
        "embeddings": storage.redact(val.embeddings or cfg.embeddings),
        "resolve": resolved.report.to_dict(),
        **_counts(resolved),
    }
    held = PairSide("held_out", listed, listed, _identities(val_table, used), info)
    notes = []
    shared = fit.identities & held.identities
    if shared:
        notes.append(
            f"{len(shared)} identities occur in both the calibration and the validation pairs: "
            "the held-out figures are not identity-disjoint"
        )
    return held, notes


def build_sides(table: EmbeddingTable, cfg: CalibrateConfig, shards: int) -> Sides:
    """The fit and held-out sides for ``cfg`` on ``table`` (see the module docstring)."""
    mode = validation_mode(table, cfg)
    notes: list[str] = []
    n_bad = 0
    if cfg.resolved_pair_mode is PairMode.LISTED:
        fit, held, more = _listed_sides(table, cfg, mode, shards)
    else:
        table, n_bad = table.validate(Policy(cfg.on_bad).value)
        if n_bad:
            notes.append(f"{n_bad} unusable embedding(s) (NaN/inf/zero) were skipped")
        fit, held, more = _label_sides(table, cfg, mode, shards)
    notes += more
    if mode is ValidationMode.PAIRS:
        held, more = _pairs_held_out(table, cfg, fit, shards)
        notes += more
    if mode is ValidationMode.NONE:
        notes.append(
            "no held-out validation: the embeddings have no identity labels for a split and no "
            "validation pair list was given; the fitted scorer is not checked against cosine"
            if cfg.validation.mode is ValidationMode.AUTO
            else "held-out validation is switched off; the scorer is not checked against cosine"
        )
    table_info = {
        "uri": storage.redact(cfg.embeddings),
        "n_images": len(table),
        "dim": table.dim,
        "fingerprint": table.fingerprint(),
        "skipped_bad_embeddings": n_bad,
    }
    return Sides(fit, held, mode, table_info, notes)
