"""``qmag-ray synth-protocols``: synthetic embeddings and metadata for templates and 1:N."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from qmag_ray.cli.app import app


class ProtocolKind(str, Enum):
    IJB = "ijb"
    IDENTIFICATION = "identification"


@app.command("synth-protocols")
def synth_protocols(
    output: Annotated[str, typer.Option(help="Folder or URI to write to.")],
    kind: Annotated[
        ProtocolKind,
        typer.Option(help="ijb: IJB-C-like templates and pairs; identification: gallery/probes."),
    ] = ProtocolKind.IJB,
    subjects: Annotated[
        int, typer.Option(min=2, help="Subjects (ijb) or enrolled subjects.")
    ] = 300,
    impostor_pairs: Annotated[
        int, typer.Option(min=0, help="Impostor template pairs (ijb).")
    ] = 50_000,
    distractors: Annotated[
        int, typer.Option(min=0, help="Gallery distractors (identification).")
    ] = 2_000,
    unenrolled: Annotated[
        int, typer.Option(min=0, help="Probe subjects not in the gallery (identification).")
    ] = 150,
    dim: Annotated[int, typer.Option(min=2, help="Embedding dimension.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same files.")] = 0,
) -> None:
    """Write synthetic MagFace-like embeddings with IJB-style or gallery/probe metadata."""
    from qmag_ray import storage
    from qmag_ray.synth.protocols import (
        EmbeddingModel,
        identification_like,
        ijb_like,
        write_identification_like,
        write_ijb_like,
    )

    model = EmbeddingModel(dim=dim)
    if kind is ProtocolKind.IJB:
        data = ijb_like(subjects=subjects, impostor_pairs=impostor_pairs, seed=seed, model=model)
        files = write_ijb_like(data, output)
        typer.echo(
            f"{len(data.embeddings)} images, {len(data.subject_of_template)} templates, "
            f"{len(data.pairs)} template pairs ({int(data.pairs['label'].sum())} genuine)"
        )
    else:
        data = identification_like(
            enrolled=subjects,
            distractors=distractors,
            unenrolled=unenrolled,
            seed=seed,
            model=model,
        )
        files = write_identification_like(data, output)
        typer.echo(
            f"gallery {len(data.gallery)} images ({distractors} distractors), "
            f"probes {len(data.probes)} (subsets d1, d2, d3; {unenrolled} subjects not enrolled)"
        )
    for name, uri in files.items():
        typer.echo(f"  {name}: {storage.redact(uri)}")
