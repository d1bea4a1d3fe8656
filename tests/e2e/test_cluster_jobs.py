"""End to end on a real cluster: ``ray start --head``, ``ray job submit`` of the scripts in
``jobs/``, a moto S3 server process and an ``mlflow server`` process, all on 127.0.0.1.

The data are small on purpose (two shared cores): 40 synthetic identities x 6 images of 112x112
(``qmag_ray.synth``) and the tiny ``iresnet-demo`` backbone with seeded random weights. That
exercises every service and hand-over a user's run goes through; accuracy is not the point.
Every job is submitted with the ``ray job`` CLI, as users do, from the repository root with
``--working-dir`` and the shipped ``jobs/runtime_env.yaml`` (plus test-only env_vars: the moto
endpoint and its test credentials, and MLflow's URI, as a cluster's ConfigMap would supply).
Job configs are generated YAML files put in S3, as a cluster would read them.

What is realistic on 240 images: the calibration pairs are generated from identities (600
genuine, 6000 impostor pairs), so the FMR grid starts at 1e-3 (about 6 impostors above the
threshold there) instead of the paper's 1e-5, with 10 FMR points and 10 weights. The held-out
guard is switched off (``validation.mode: none``): with an untrained backbone whether
QMagFace beats cosine is chance, and the guard's decision is tested elsewhere
(tests/test_cli_calibrate.py); here the scorer must be registered so that the registry's copy
can be checked against the job's calibration.json.
"""

from __future__ import annotations

import json
import subprocess

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from e2e_support import (
    CLI_TIMEOUT,
    RAY,
    JobRun,
    RayHead,
    base_env,
    cli_job_logs,
    run_on_cluster,
    runtime_env_file,
)
from mlflow_fixtures import MlflowServer, tracking_at

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


def test_cluster_refuses_a_submitter_without_its_token(ray_head: RayHead) -> None:
    """Token authentication is on, as on users' clusters: a wrong token is turned away (the
    jobs below are submitted with the right one)."""
    result = subprocess.run(
        [RAY, "job", "list", "--address", ray_head.address],
        env=base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert result.returncode != 0
    assert "invalid authentication token" in (result.stdout + result.stderr).lower()


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


# ----------------------------------------------------------------------------- calibrate


def calibrate_config(embeddings: str, output: str, register_as: str) -> dict:
    return {
        "embeddings": embeddings,
        "output": output,
        "pair_mode": "generate",
        "generate": {"seed": 0, "max_per_identity": IMAGES_PER_IDENTITY, "impostors_per_side": 5},
        "grid": {"n_fmr": 10, "fmr_min": 1e-3, "fmr_max": 1e-1, "n_weights": 10},
        "validation": {"mode": "none"},
        "tracking": {"experiment": "qmag-ray-e2e", "register_as": register_as},
    }


@pytest.fixture(scope="module")
def mlflow_runtime_env(e2e_s3, mlflow_server: MlflowServer, tmp_path_factory):
    """The runtime environment of jobs that record in MLflow (its URI as a ConfigMap gives it)."""
    env = {**e2e_s3.env, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    return runtime_env_file(tmp_path_factory.mktemp("jobs") / "runtime_env.yaml", env)


def client(server: MlflowServer):
    """A client of the test server for tracking *and* registry (no global MLflow state)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def load_from_registry(model_uri: str, server: MlflowServer):
    """``load_scorer`` as a service configured with MLFLOW_TRACKING_URI does it.

    MLflow's own configuration is pointed at the server for the call: given only
    ``tracking_uri=``, MLflow 3.17 resolves ``models:/`` downloads through its default
    registry (``sqlite:///mlflow.db`` in the working directory) instead.
    """
    from qmag_ray.tracking.consumer import load_scorer

    with tracking_at(server.uri):
        return load_scorer(model_uri, tracking_uri=server.uri)


def versions(server: MlflowServer, name: str) -> list:
    return client(server).search_model_versions(f"name = '{name}'")


def test_calibrate_job_logs_to_mlflow_and_registers_the_scorer(
    ray_head: RayHead,
    mlflow_runtime_env,
    mlflow_server: MlflowServer,
    embed_run: tuple[JobRun, str],
    bucket: str,
) -> None:
    """The calibrate job on the embed job's output: alpha and beta fitted in Ray tasks of the
    cluster, the run recorded in the MLflow server and the scorer registered there, which a
    consumer then loads from the registry and scores with."""
    from qmag_ray.calibration.result import QMagFaceCalibration

    assert embed_run[0].status == "SUCCEEDED", embed_run[0].describe()
    output = f"{bucket}/calibration/run-001/"
    config = put_yaml(
        f"{bucket}/configs/calibrate.yaml",
        calibrate_config(embed_run[1], output, register_as="qmagface"),
    )
    run = run_on_cluster(
        ray_head,
        ["python", "jobs/calibrate.py", "--config", config, "--set", "shards=3"],
        mlflow_runtime_env,
        name="calibrate",
    )
    assert run.status == "SUCCEEDED", run.describe()
    assert run.returncode == 0, run.describe()
    assert "attaching to the cluster of RAY_ADDRESS" in run.logs, run.describe()

    written = QMagFaceCalibration.from_file(f"{output}calibration.json")
    # 40 identities x C(6, 2) genuine pairs, 5 impostors per side of each
    assert (written.n_genuine, written.n_impostor) == (600, 6000)
    (version,) = versions(mlflow_server, "qmagface")
    mlflow_run = client(mlflow_server).get_run(version.run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["qmag_ray.kind"] == "calibrate"
    assert mlflow_run.data.tags["qmag_ray.registered"] == f"qmagface/{version.version}"
    assert mlflow_run.data.params["shards"] == "3"
    assert mlflow_run.data.metrics["alpha"] == written.alpha

    # A consumer loads the registered scorer from the registry (calibrate sets no alias; the
    # recalibration test below loads by alias) and gets the job's calibration.
    scorer = load_from_registry(f"models:/qmagface/{version.version}", mlflow_server)
    assert scorer.calibration.to_dict() == written.to_dict()
    table = load_embeddings(embed_run[1])
    fmr = float(min(written.thresholds, key=float))  # an operating point it stores
    scores = scorer.score(table.vectors[:20], table.vectors[20:40], fmr=fmr)
    cos = (table.vectors[:20] * table.vectors[20:40]).sum(1) / (
        table.quality[:20] * table.quality[20:40]
    )
    quality = np.minimum(table.quality[:20], table.quality[20:40])
    np.testing.assert_allclose(scores.score, written.score(cos, quality), rtol=1e-5, atol=1e-6)
    assert (scores.match == (scores.score >= written.threshold_at(fmr))).all()


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("bad-key", "unknown setting grid.fmr_minimum in "),
        ("no-bucket", "not found: s3://qmag-e2e-no-such-bucket/embeddings/ does not exist"),
    ],
    ids=["bad-key", "no-bucket"],
)
def test_failing_job_ends_failed_with_the_reason_and_registers_nothing(
    case: str,
    expected: str,
    ray_head: RayHead,
    mlflow_runtime_env,
    mlflow_server: MlflowServer,
    embed_run: tuple[JobRun, str],
    bucket: str,
) -> None:
    """A calibrate job with a misspelt config key, and one whose embeddings are in a bucket
    that does not exist: the job ends FAILED, its logs say why (one error line, no
    traceback), and it leaves neither a registered version nor an output behind."""
    name = f"qmagface-{case}"
    output = f"{bucket}/calibration/{case}/"
    embeddings, overrides = embed_run[1], ["--set", "grid.fmr_minimum=1e-3"]
    if case == "no-bucket":
        embeddings, overrides = "s3://qmag-e2e-no-such-bucket/embeddings/", []
    config = put_yaml(
        f"{bucket}/configs/calibrate-{case}.yaml",
        calibrate_config(embeddings, output, register_as=name),
    )
    run = run_on_cluster(
        ray_head,
        ["python", "jobs/calibrate.py", "--config", config, *overrides],
        mlflow_runtime_env,
        name=f"fail-{case}",
    )
    assert run.status == "FAILED", run.describe()
    assert run.returncode != 0, run.describe()
    logs = cli_job_logs(ray_head, run.submission_id)  # what the user reads
    assert expected in logs, logs[-6000:]
    assert "error:" in logs and "Traceback" not in logs, logs[-6000:]
    assert versions(mlflow_server, name) == []
    assert not storage.exists(output)


# ----------------------------------------------------------------------------- recalibrate

HOLDOUT_FROM = 30  # identities id00030.. of the embed job's output are the held-out protocol


@pytest.fixture(scope="module")
def holdout(embed_run: tuple[JobRun, str], bucket: str) -> tuple[str, str]:
    """A held-out protocol on the embed job's output: every pair of its last 10 identities
    (``a, b, label`` CSV in S3). Its embeddings carry the checkpoint's sha256 in their
    summary, which recalibrate checks against its own model."""
    assert embed_run[0].status == "SUCCEEDED", embed_run[0].describe()
    table = load_embeddings(embed_run[1])
    keep = [i for i, ident in enumerate(table.identity) if int(ident[2:]) >= HOLDOUT_FROM]
    rows = [
        (table.path[i], table.path[j], int(table.identity[i] == table.identity[j]))
        for n, i in enumerate(keep)
        for j in keep[n + 1 :]
    ]
    uri = f"{bucket}/holdout/pairs.csv"
    frame = pd.DataFrame(rows, columns=["a", "b", "label"])
    storage.write_bytes(uri, frame.to_csv(index=False).encode())
    return embed_run[1], uri


def test_recalibration_twice_registers_once_and_loads_by_alias(
    ray_head: RayHead,
    mlflow_runtime_env,
    mlflow_server: MlflowServer,
    holdout: tuple[str, str],
    checkpoint: str,
    bucket: str,
) -> None:
    """The scheduled job, run twice on unchanged images: the first embeds the images (the
    first 30 identities, the same files as the embed test's, disjoint from the held-out ones),
    calibrates, registers version 1 as challenger and, with no champion yet, champion; the
    second reuses every embedding, finds the inputs fingerprint registered and registers
    nothing."""
    import re

    from qmag_ray.calibration.result import QMagFaceCalibration

    spec = SynthSpec(identities=HOLDOUT_FROM, images_per_identity=IMAGES_PER_IDENTITY, seed=7)
    images = write_dataset(f"{bucket}/recal-faces/", spec, workers=1)
    name = "qmagface-recal"
    config = put_yaml(
        f"{bucket}/configs/recalibrate.yaml",
        {
            "images": f"{bucket}/recal-faces/",
            "embeddings": f"{bucket}/recal/embeddings/",
            "model": checkpoint,
            "arch": "iresnet-demo",
            "output": f"{bucket}/recal/runs/",
            "holdout": {"embeddings": holdout[0], "pairs": holdout[1]},
            "register_as": name,
            "gate": {"target_fmr": 1e-2, "max_fnmr_increase": 0.0},
            "grid": {"n_fmr": 5, "fmr_min": 1e-2, "fmr_max": 1e-1, "n_weights": 5},
            "validation": {"mode": "none"},
            "embed": {"batch_size": 32},
            "tracking": {"experiment": "qmag-ray-e2e"},
        },
    )
    entrypoint = ["python", "jobs/recalibrate.py", "--config", config]
    registry = client(mlflow_server)

    def mlflow_run_of(run: JobRun):
        found = re.search(r"mlflow: run (\w+) in experiment", run.logs)
        assert found, run.describe()
        return registry.get_run(found.group(1))

    first = run_on_cluster(ray_head, entrypoint, mlflow_runtime_env, name="recal-1")
    assert first.status == "SUCCEEDED", first.describe()
    (version,) = versions(mlflow_server, name)
    assert registry.get_model_version_by_alias(name, "challenger").version == version.version
    assert registry.get_model_version_by_alias(name, "champion").version == version.version
    run1 = mlflow_run_of(first)
    assert run1.data.tags["qmag_ray.outcome"] == "registered"
    assert run1.data.metrics["embed.embedded_this_run"] == len(images)
    output = run1.data.tags["qmag_ray.output"]
    written = QMagFaceCalibration.from_file(f"{output}/calibration/calibration.json")

    # what a face recognition service does: load the champion by alias from the registry
    scorer = load_from_registry(f"models:/{name}@champion", mlflow_server)
    assert scorer.version == version.version
    assert scorer.calibration.to_dict() == written.to_dict()

    second = run_on_cluster(ray_head, entrypoint, mlflow_runtime_env, name="recal-2")
    assert second.status == "SUCCEEDED", second.describe()
    assert "nothing new registered" in second.logs, second.describe()
    assert [v.version for v in versions(mlflow_server, name)] == [version.version]
    assert registry.get_model_version_by_alias(name, "champion").version == version.version
    run2 = mlflow_run_of(second)
    assert run2.info.run_id != run1.info.run_id
    assert run2.data.tags["qmag_ray.outcome"] == "unchanged"
    assert run2.data.tags["qmag_ray.existing_version"] == version.version
    assert run2.data.metrics["embed.embedded_this_run"] == 0
    assert run2.data.metrics["embed.skipped_existing"] == len(images)
