"""Command-line options shared by several commands, declared once.

Typer names each option after the parameter it annotates, so ``on_missing: OnMissing = None``
is ``--on-missing`` in every command that uses it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from qmag_ray.pairs.resolve import Policy
from qmag_ray.pairs.templates import Pooling

_POLICY = "error (default) or skip (skipped items are counted and reported)"

OnMissing = Annotated[
    Policy | None, typer.Option(help=f"Pairs naming images not in the embeddings: {_POLICY}.")
]
OnBad = Annotated[Policy | None, typer.Option(help=f"NaN/inf/all-zero embeddings: {_POLICY}.")]
OnSelf = Annotated[Policy | None, typer.Option(help=f"Self-pairs: {_POLICY}.")]
OnDuplicate = Annotated[Policy | None, typer.Option(help=f"Repeated pairs: {_POLICY}.")]
TrackingUri = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."
    ),
]
Experiment = Annotated[str | None, typer.Option(help="MLflow experiment (default qmag-ray).")]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
]
QualityColumn = Annotated[
    str | None,
    typer.Option(
        help="Per-image quality QMagFace uses: 'quality' (the MagFace norm, default), another "
        "column of the embeddings (e.g. serfiq) or of --quality-file."
    ),
]
QualityFile = Annotated[
    str | None,
    typer.Option(
        help="CSV/Parquet file with 'path' (as in the embeddings) and the --quality-column; "
        "images without a value count as missing images."
    ),
]
Templates = Annotated[
    str | None,
    typer.Option(
        help="Template table (IJB *_face_tid_mid.txt, or CSV path, template, media): pool the "
        "embeddings into templates; --pairs then names templates."
    ),
]
PoolingRule = Annotated[
    Pooling | None,
    typer.Option(
        "--pooling",
        help="Template pooling, per media then per template: quality (default, "
        "quality-weighted) or mean.",
    ),
]
AllowIncomplete = Annotated[
    bool | None,
    typer.Option(
        "--allow-incomplete/--no-allow-incomplete",
        help="Use an embedding output without a finished summary.json (interrupted or failed "
        "run); counted and reported. Default: refused.",
    ),
]
AllowOtherModel = Annotated[
    bool | None,
    typer.Option(
        "--allow-other-model/--no-allow-other-model",
        help="Apply a calibration fitted on embeddings of another model. Default: refused.",
    ),
]
