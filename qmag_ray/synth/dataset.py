"""Writing a synthetic face set: ``<identity>/<n>.jpg`` files plus ``manifest.parquet``.

Every image is a pure function of ``(seed, identity, n)``, so a set is reproducible image by
image whatever the order or parallelism of generation. The manifest lists ``path`` (relative
to the set's root), ``identity``, ``degradation``, the in-plane rotation ``pose`` (radians)
and its band ``pose_band`` (``upright`` |pose| < 0.04, ``tilted`` < 0.08, ``strong`` beyond: a
group attribute for per-group reports); ``synth.json`` records the parameters.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from PIL import Image

from qmag_ray import storage
from qmag_ray.synth.degrade import degrade
from qmag_ray.synth.faces import Identity, render_face, sample_identity

logger = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
PARAMS = "synth.json"
FORMATS = {"jpg": "JPEG", "png": "PNG"}
GENERATOR = "qmag_ray.synth/1"


@dataclass(frozen=True)
class SynthSpec:
    """What to generate: ``identities`` x ``images_per_identity`` images from ``seed``."""

    identities: int
    images_per_identity: int
    seed: int = 0
    first_identity: int = 0
    max_degradation: float = 1.0
    image_format: str = "jpg"

    def __post_init__(self) -> None:
        if self.identities < 1 or self.images_per_identity < 1:
            raise ValueError("identities and images_per_identity must be at least 1")
        if not 0.0 <= self.max_degradation <= 1.0:
            raise ValueError(f"max_degradation must be in [0, 1], got {self.max_degradation}")
        if self.image_format not in FORMATS:
            raise ValueError(f"image_format must be one of {sorted(FORMATS)}")


@dataclass(frozen=True)
class SynthImage:
    """One generated image and its labels."""

    identity: str
    index: int
    degradation: float
    image: np.ndarray  # uint8 RGB, 112x112x3


def identity_name(number: int) -> str:
    return f"id{number:05d}"


def make_identity(seed: int, number: int) -> Identity:
    """The identity ``number`` of the family of sets generated with ``seed``."""
    return sample_identity(np.random.default_rng([seed, 0, number]))


def make_image(
    ident: Identity,
    seed: int,
    number: int,
    index: int,
    max_d: float = 1.0,
    info: dict | None = None,
):
    """The ``index``-th image of identity ``number``: ``(degradation, uint8 RGB image)``;
    ``info`` (optional) receives the pose (see ``render_face``)."""
    rng = np.random.default_rng([seed, 1, number, index])
    d = float(rng.uniform(0.0, max_d))
    return d, degrade(render_face(ident, rng, info), d, rng)


def pose_band(roll: float) -> str:
    """The pose group of an in-plane rotation (radians)."""
    r = abs(roll)
    return "upright" if r < 0.04 else "tilted" if r < 0.08 else "strong"


def iter_images(spec: SynthSpec) -> Iterator[SynthImage]:
    """Generate the images of ``spec`` in identity-major order, without writing anything."""
    for number in range(spec.first_identity, spec.first_identity + spec.identities):
        ident = make_identity(spec.seed, number)
        for index in range(spec.images_per_identity):
            d, img = make_image(ident, spec.seed, number, index, spec.max_degradation)
            yield SynthImage(identity_name(number), index, d, img)


def encode(image: np.ndarray, image_format: str = "jpg") -> bytes:
    """Encode a uint8 RGB image (JPEG quality 95, or PNG)."""
    buf = io.BytesIO()
    kwargs = {"quality": 95} if image_format == "jpg" else {"compress_level": 1}
    Image.fromarray(image).save(buf, format=FORMATS[image_format], **kwargs)
    return buf.getvalue()


def _write_identities(
    output: str, spec: SynthSpec, numbers: list[int], io_threads: int
) -> list[dict[str, object]]:
    """Generate, encode and write the images of some identities; return their manifest rows."""
    fs, root = storage.filesystem(output)
    local = storage.protocol(output) == "file"
    rows: list[dict[str, object]] = []
    with ThreadPoolExecutor(max_workers=io_threads) as pool:
        pending: list[Future[None]] = []
        for number in numbers:
            ident = make_identity(spec.seed, number)
            name = identity_name(number)
            if local:
                fs.makedirs(storage.join(root, name), exist_ok=True)
            for index in range(spec.images_per_identity):
                info: dict = {}
                d, img = make_image(ident, spec.seed, number, index, spec.max_degradation, info)
                rel = f"{name}/{index:04d}.{spec.image_format}"
                data = encode(img, spec.image_format)
                pending.append(pool.submit(fs.pipe_file, storage.join(root, rel), data))
                rows.append(
                    {
                        "path": rel,
                        "identity": name,
                        "degradation": d,
                        "pose": info["roll"],
                        "pose_band": pose_band(info["roll"]),
                    }
                )
        for fut in pending:
            fut.result()
    return rows


def write_dataset(
    output: str, spec: SynthSpec, *, workers: int = 1, io_threads: int = 4, chunk: int = 16
) -> pd.DataFrame:
    """Generate ``spec`` under ``output`` (any fsspec URI) and return the manifest written.

    ``workers`` processes generate ``chunk`` identities at a time, each writing through a few
    I/O threads; the result does not depend on ``workers``. The manifest is written last (and
    atomically), so a set with a manifest is complete.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    total = spec.identities * spec.images_per_identity
    numbers = list(range(spec.first_identity, spec.first_identity + spec.identities))
    chunks = [numbers[i : i + chunk] for i in range(0, len(numbers), chunk)]
    results: dict[int, list[dict[str, object]]] = {}
    start = time.perf_counter()
    done = 0
    last = start

    def progress(n_rows: int) -> None:  # one INFO line per 10 s at most, every chunk at DEBUG
        nonlocal done, last
        done += n_rows
        now = time.perf_counter()
        rate = done / max(now - start, 1e-9)
        steady = now - last >= 10.0 and done < total
        last = now if steady else last
        logger.log(
            logging.INFO if steady else logging.DEBUG,
            "synth: %d/%d images (%.0f images/s)",
            done,
            total,
            rate,
        )

    if workers == 1:
        for i, part in enumerate(chunks):
            results[i] = _write_identities(output, spec, part, io_threads)
            progress(len(results[i]))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as procs:
            futures = {
                procs.submit(_write_identities, output, spec, part, io_threads): i
                for i, part in enumerate(chunks)
            }
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                progress(len(results[futures[fut]]))
    rows = [row for i in range(len(chunks)) for row in results[i]]
    manifest = pd.DataFrame(rows, columns=["path", "identity", "degradation", "pose", "pose_band"])
    buf = io.BytesIO()
    manifest.to_parquet(buf, index=False)
    storage.write_bytes(storage.join(output, MANIFEST), buf.getvalue())
    elapsed = time.perf_counter() - start
    params = {**asdict(spec), "images": total, "generator": GENERATOR}
    storage.write_bytes(storage.join(output, PARAMS), json.dumps(params, indent=2).encode())
    logger.debug(  # `qmag-ray synth` prints its own summary line
        "synth: wrote %d images and %s under %s in %.1f s (%.0f images/s)",
        total,
        MANIFEST,
        storage.redact(output),
        elapsed,
        total / max(elapsed, 1e-9),
    )
    return manifest
