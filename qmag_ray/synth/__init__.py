"""Synthetic face sets with controlled degradation, for demos, tests and training."""

from qmag_ray.synth.dataset import (
    MANIFEST,
    SynthImage,
    SynthSpec,
    iter_images,
    make_identity,
    make_image,
    write_dataset,
)
from qmag_ray.synth.degrade import degrade
from qmag_ray.synth.faces import Identity, render_face, sample_identity

__all__ = [
    "MANIFEST",
    "Identity",
    "SynthImage",
    "SynthSpec",
    "degrade",
    "iter_images",
    "make_identity",
    "make_image",
    "render_face",
    "sample_identity",
    "write_dataset",
]
