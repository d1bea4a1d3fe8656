"""End to end on a real cluster: ``ray start --head``, ``ray job submit`` of the scripts in
``jobs/``, a moto S3 server process and an ``mlflow server`` process, all on 127.0.0.1.

The data are small on purpose (two shared cores): 40 synthetic identities x 6 images of 112x112
(``qmag_ray.synth``) and the tiny ``iresnet-demo`` backbone with seeded random weights. That
exercises every service and hand-over a user's run goes through; accuracy is not the point.
Every job is submitted with the ``ray job`` CLI, as users do, from the repository root with
``--working-dir`` and the shipped ``jobs/runtime_env.yaml`` (plus test-only env_vars: the moto
endpoint and its test credentials, and MLflow's URI, as a cluster's ConfigMap would supply).
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from e2e_support import JobRun, RayHead, run_on_cluster, runtime_env_file

from qmag_ray import storage
from qmag_ray.embeddings import load_embeddings
from qmag_ray.model import create_backbone, save_checkpoint
from qmag_ray.synth import SynthSpec, write_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUCKET = "qmag-e2e"
IDENTITIES = 40
IMAGES_PER_IDENTITY = 6


# ----------------------------------------------------------------------------- inputs in S3


@pytest.fixture(scope="module")
def bucket(e2e_s3) -> str:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    return f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def faces(bucket: str) -> tuple[str, pd.DataFrame]:
    """The face set in S3 (``<identity>/<n>.jpg``) and its manifest."""
    prefix = f"{bucket}/faces/"
    spec = SynthSpec(identities=IDENTITIES, images_per_identity=IMAGES_PER_IDENTITY, seed=7)
    return prefix, write_dataset(prefix, spec, workers=1)


@pytest.fixture(scope="module")
def checkpoint(bucket: str) -> str:
    """A MagFace-layout checkpoint of the seeded ``iresnet-demo`` backbone, in S3."""
    torch.manual_seed(0)
    uri = f"{bucket}/models/iresnet-demo.pth"
    save_checkpoint(create_backbone("iresnet-demo").eval(), uri, arch="iresnet-demo")
    return uri


@pytest.fixture(scope="module")
def runtime_env(e2e_s3, tmp_path_factory: pytest.TempPathFactory):
    """``jobs/runtime_env.yaml`` plus the moto endpoint and its test credentials."""
    return runtime_env_file(tmp_path_factory.mktemp("jobs") / "runtime_env.yaml", e2e_s3.env)


def put_yaml(uri: str, data: dict) -> str:
    storage.write_bytes(uri, yaml.safe_dump(data, sort_keys=False).encode())
    return uri


# ----------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def embed_run(
    ray_head: RayHead, runtime_env, faces: tuple[str, pd.DataFrame], checkpoint: str, bucket: str
) -> tuple[JobRun, str]:
    """The embed job, submitted once; its config is a YAML file in S3 plus one override."""
    output = f"{bucket}/embeddings/run-001/"
    config = put_yaml(
        f"{bucket}/configs/embed.yaml",
        {
            "images": faces[0],
            "model": checkpoint,
            "arch": "iresnet-demo",
            "output": output,
            "actors": 1,
            "gpus_per_actor": 0,
            "cpus_per_actor": 1,
            "threads_per_actor": 1,
            "batch_size": 32,
            "read_block_rows": 64,
            "rows_per_part": 100,
        },
    )
    run = run_on_cluster(
        ray_head,
        ["python", "jobs/embed.py", "--config", config, "--set", "max_failure_fraction=0"],
        runtime_env,
        name="embed",
    )
    return run, output


def test_embed_job_reads_and_writes_s3_on_the_cluster(
    embed_run: tuple[JobRun, str], faces: tuple[str, pd.DataFrame], checkpoint: str
) -> None:
    run, output = embed_run
    assert run.status == "SUCCEEDED", run.describe()
    assert run.returncode == 0, run.describe()
    # the job attached to the cluster it was submitted to instead of starting its own
    assert "attaching to the cluster of RAY_ADDRESS" in run.logs, run.describe()

    manifest = faces[1]
    summary = json.loads(storage.read_bytes(f"{output}summary.json"))
    assert summary["counts"]["inputs"] == len(manifest) == IDENTITIES * IMAGES_PER_IDENTITY
    assert summary["counts"]["embedded"] == len(manifest)
    assert summary["counts"]["failed"] == 0
    assert summary["arch"] == "iresnet-demo"
    assert summary["embedding_size"] == 128
    assert summary["model_sha256"] == storage.sha256(checkpoint)

    table = load_embeddings(output)
    assert sorted(table.path) == sorted(manifest["path"])
    expected = dict(zip(manifest["path"], manifest["identity"], strict=True))
    assert [expected[p] for p in table.path] == list(table.identity)
    assert table.vectors.shape == (len(manifest), 128)
    assert np.isfinite(table.vectors).all()
    np.testing.assert_allclose(table.quality, np.linalg.norm(table.vectors, axis=1), rtol=1e-4)
    assert len({tuple(np.round(v, 4)) for v in table.vectors}) == len(manifest)
