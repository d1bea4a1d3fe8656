"""Per-group report on the held-out side of a calibration (what ``qmag-ray demo`` prints).

``held_out_group_report`` splits the identities as ``calibrate --validation split`` does
(same fraction and seed), generates the held-out side's pairs with the same defaults, scores
them with the calibration and reports FNMR/FMR per group of a column from a joined file (the
synthetic set's ``manifest.parquet`` has ``pose_band``).
"""

from __future__ import annotations

import numpy as np

from qmag_ray.calibration.result import QMagFaceCalibration
from qmag_ray.embeddings import load_embeddings
from qmag_ray.pairs.generate import generate_pairs, identity_split
from qmag_ray.pairs.listed import score_pairs
from qmag_ray.quality.columns import image_values
from qmag_ray.reports.groups import GroupReport, group_report
from qmag_ray.workflows.config import GenerateConfig, ValidationConfig


def held_out_group_report(
    embeddings: str,
    calibration: str,
    column: str,
    group_file: str | None = None,
    *,
    fmr: float = 1e-3,
    validation: ValidationConfig | None = None,
    generate: GenerateConfig | None = None,
) -> GroupReport:
    """The per-``column`` report of cosine and QMagFace on the held-out identities."""
    val = validation or ValidationConfig()
    gen = generate or GenerateConfig()
    table = load_embeddings(embeddings)
    _, held_rows = identity_split(table, val.fraction, val.seed)
    held = table.take(held_rows)
    resolved = generate_pairs(held, gen.max_per_identity, gen.impostors_per_side, gen.seed)
    cos, q, y = score_pairs(held, resolved)
    cal = QMagFaceCalibration.from_file(calibration)
    values, _ = image_values(held, embeddings, column, group_file, flag="group column")
    groups = np.array([None if v is None else str(v) for v in values], dtype=object)
    return group_report(
        column,
        groups[resolved.idx_a],
        groups[resolved.idx_b],
        y,
        {"cosine": cos, "qmagface": cal.score(cos, q)},
        groups,
        held.quality,
        fmr=fmr,
        quality_measure="quality",
    )
