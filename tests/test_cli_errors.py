"""User-facing errors: one or two lines naming the flag and the URI, no traceback unless asked,
no credential anywhere in the output; checks that need no cluster run before Ray starts.

The ``qmag-ray`` console script runs in a subprocess (the real entry point, real environment);
S3 cases use moto's standalone server or no credentials at all.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_fixtures import MlflowServer, mlflow_server  # noqa: F401
from typer.testing import CliRunner

from qmag_ray.cli import app
from qmag_ray.cli.errors import SafeStream

QMAG = str(Path(sys.executable).with_name("qmag-ray"))
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzz"  # an AWS-looking secret key


def bare_env(**extra: str) -> dict[str, str]:
    """The environment without any AWS credential source (and no instance metadata)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "QMAG_RAY_"))}
    env.update(
        AWS_CONFIG_FILE="/nonexistent/aws-config",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
        AWS_EC2_METADATA_DISABLED="true",
        RAY_ADDRESS="",
    )
    env.update(extra)
    return env


def qmag(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QMAG, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]


MODEL = str(Path(__file__).resolve().parents[1] / "qmag_ray" / "assets" / "demo_iresnet.pth")


@pytest.mark.parametrize(
    ("args", "flag", "uri"),
    [
        (
            ["calibrate", "--embeddings", "s3://my-bucket/emb/"],
            "--embeddings",
            "s3://my-bucket/emb/",
        ),
        (
            [
                "evaluate",
                "--embeddings",
                "s3://my-bucket/e",
                "--pairs",
                "p.csv",
                "--alpha",
                "0.1",
                "--beta",
                "0.1",
            ],
            "--embeddings",
            "s3://my-bucket/e",
        ),
        (
            [
                "embed",
                "--images",
                "s3://my-bucket/faces/",
                "--model",
                MODEL,
                "--arch",
                "iresnet-demo",
            ],
            "--images",
            "s3://my-bucket/faces/",
        ),
        (
            [
                "embed",
                "--images",
                ".",
                "--model",
                MODEL,
                "--arch",
                "iresnet-demo",
                "--output",
                "s3://my-bucket/out/",
            ],
            "--output",
            "s3://my-bucket/out/",
        ),
    ],
    ids=["calibrate", "evaluate", "embed-input", "embed-output"],
)
def test_s3_without_credentials_ends_in_one_line_naming_the_uri(
    tmp_path: Path, args: list[str], flag: str, uri: str
) -> None:
    if "--output" not in args:
        args = [*args, "--output", str(tmp_path / "o")]
    result = qmag(args, bare_env(), tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    out = lines(result)
    assert len(out) <= 3, out
    assert out[-1].startswith(f"error: {flag} {uri}: no S3 credentials"), out
    assert "AWS_ACCESS_KEY_ID" in out[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_a_secret_in_an_s3_uri_is_refused_and_never_printed(tmp_path: Path, debug) -> None:
    uri = f"s3://AKIAEXAMPLEKEY:{SECRET[:10]}/{SECRET[10:]}@my-bucket/emb"
    result = qmag(
        [*debug, "calibrate", "--embeddings", uri, "--output", str(tmp_path / "o")],
        bare_env(),
        tmp_path,
    )
    assert result.returncode == 2
    text = result.stdout + result.stderr
    assert SECRET[:10] not in text and SECRET[10:] not in text and "AKIAEXAMPLEKEY" not in text
    assert "--embeddings s3://my-bucket/emb: credentials inside an s3:// URI are not used" in text


@pytest.mark.s3
def test_missing_bucket_and_images_given_as_embeddings_on_moto(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    from qmag_ray import storage

    env = bare_env(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret-value",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=s3_endpoint,
    )
    out = str(tmp_path / "o")
    missing = qmag(
        ["calibrate", "--embeddings", "s3://no-such-bucket/e", "--output", out], env, tmp_path
    )
    assert missing.returncode == 2
    assert lines(missing) == [
        "error: --embeddings not found: s3://no-such-bucket/e does not exist "
        "(the bucket no-such-bucket does not exist)"
    ]
    no_out = qmag(
        [
            "embed",
            "--images",
            ".",
            "--model",
            MODEL,
            "--arch",
            "iresnet-demo",
            "--output",
            "s3://no-such-bucket/out/",
        ],
        env,
        tmp_path,
    )
    assert lines(no_out) == [
        "error: --output: the bucket of s3://no-such-bucket/out/ does not exist"
    ]
    storage.write_bytes(f"{s3_bucket}/faces/id0/0.jpg", b"\xff\xd8 not decoded here")
    images = qmag(
        ["calibrate", "--embeddings", f"{s3_bucket}/faces", "--output", out], env, tmp_path
    )
    assert images.returncode == 2
    assert lines(images) == [
        f"error: --embeddings {s3_bucket}/faces holds images, not embeddings: embed them first "
        f"(qmag-ray embed --images {s3_bucket}/faces --output OUT) and pass OUT as --embeddings"
    ]


def test_bad_pair_file_is_named_with_its_line_before_ray(tmp_path: Path) -> None:
    from workflow_data import synthetic_table, write_table

    emb = write_table(synthetic_table(4, 2, 8), tmp_path / "emb")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("a,b,label\nfaces/id0000/img0.jpg,faces/id0000/img1.jpg,7\n")
    result = qmag(
        ["calibrate", "--embeddings", emb, "--pairs", str(pairs), "--output", str(tmp_path / "o")],
        bare_env(),
        tmp_path,
    )
    assert result.returncode == 2
    assert lines(result) == [
        f"error: --pairs: {pairs}:2: label must be 1 (genuine) or 0 (impostor), got '7'"
    ]


def test_an_unexpected_failure_is_one_line_and_debug_shows_a_redacted_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from qmag_ray.cli import preflight

    def broken(*args, **kwargs):
        raise RuntimeError("store at http://admin:hunter2pass@10.0.0.1:9000/x misbehaved")

    monkeypatch.setattr(preflight, "check_embeddings", broken)
    args = ["calibrate", "--embeddings", str(tmp_path), "--output", str(tmp_path / "o")]
    quiet = CliRunner().invoke(app, args)
    assert quiet.exit_code == 1
    assert quiet.output.strip().splitlines() == [
        "error: RuntimeError: store at http://10.0.0.1:9000/x misbehaved "
        "(--debug or QMAG_RAY_DEBUG=1 shows the traceback)"
    ]
    for how in (["--debug", *args], args):
        env = {"QMAG_RAY_DEBUG": "1"} if how is args else {}
        loud = CliRunner().invoke(app, how, env=env)
        assert loud.exit_code == 1
        assert "Traceback (most recent call last)" in loud.output
        assert "hunter2pass" not in loud.output and "admin:" not in loud.output


def test_safe_stream_redacts_split_writes_drops_ray_noise_and_masks_env_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-0123456789abcdef")
    sink = io.StringIO()
    quiet = SafeStream(sink, quiet=True)
    quiet.write("View run x at: http://user:pa")
    quiet.write("ss-word@127.0.0.1:5000/#/runs/1\n")
    quiet.write("2026 WARNING authentication_token_setup.py:85 -- Token authentication is ")
    quiet.write("enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.\n")
    quiet.write("Registered model 'qmagface' already exists. Creating a new version of this ")
    quiet.write("model...\n")
    quiet.write("header: tok-0123456789abcdef\nno newline yet")
    assert sink.getvalue() == "View run x at: http://127.0.0.1:5000/#/runs/1\nheader: ***\n"
    quiet.flush()
    assert sink.getvalue().endswith("no newline yet")
    loud_sink = io.StringIO()
    loud = SafeStream(loud_sink, quiet=False)
    loud.write("Token authentication is enabled for this Ray cluster.\n")
    assert "Token authentication" in loud_sink.getvalue()


def test_ray_trains_result_and_cleaner_lines_are_dropped_but_the_workers_own_lines_kept() -> None:
    relayed = (
        "(RayTrainWorker pid=4711) Reporting training result 3: TrainingReport(checkpoint=None, "
        "metrics={'loss': 61.2}, validation_spec=None)\n"
        "\x1b[36m(PlacementGroupCleaner pid=4700)\x1b[0m Failed to query Ray Train Controller actor"
        " state. State API may be temporarily unavailable. Continuing to monitor.\n"
        "(RayTrainWorker pid=4711) saved /tmp/out/train/magface_epoch_00001.pth\n"
    )
    quiet_sink, loud_sink = io.StringIO(), io.StringIO()
    SafeStream(quiet_sink, quiet=True).write(relayed)
    SafeStream(loud_sink, quiet=False).write(relayed)
    assert (
        quiet_sink.getvalue()
        == "(RayTrainWorker pid=4711) saved /tmp/out/train/magface_epoch_00001.pth\n"
    )
    assert loud_sink.getvalue() == relayed


NATIVE_SCRIPT = """
import os, sys
from qmag_ray.cli.errors import native_stderr
with native_stderr(quiet=sys.argv[1] == "quiet"):
    # what Ray's C++ core worker does: write to file descriptor 2 itself, below Python
    os.write(2, b"[2026-12-01 22:45:06,033 E 12888 12888] core_worker.cc:2465: Actor with class "
                b"name: 'MapWorker(X)' and ID: '18' has constructor arguments in the object store "
                b"and max_restarts > 0. If the arguments ... See https://github.com/ray-project/ray"
                b"/issues/53727 for more details.\\n")
    os.write(2, b"[2026-12-01 22:45:07,000 E 12888 12890] core_worker.cc:999: a real failure at ")
    os.write(2, b"s3://AKIAEXAMPLE:" + os.environ["SPLIT_SECRET"].encode() + b"@bucket/x\\n")
    print("python line", file=sys.stderr)
os.write(2, b"after the block\\n")
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_native_stderr_drops_rays_core_worker_noise_keeps_real_errors_and_redacts(
    mode: str, tmp_path: Path
) -> None:
    """Lines written to fd 2 below Python (Ray's C++ core) pass the same filter and redaction
    as Python's: the known ``core_worker.cc`` actor-constructor line only with --verbose, a
    real ``E`` line always, a credential in neither."""
    env = {**os.environ, "SPLIT_SECRET": SECRET}
    result = subprocess.run(
        [sys.executable, "-c", NATIVE_SCRIPT, mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=True,
    )
    lines = result.stderr.splitlines()
    real = [ln for ln in lines if "core_worker.cc:999: a real failure at" in ln]
    assert len(real) == 1 and SECRET not in result.stderr, result.stderr
    noise = [ln for ln in lines if "has constructor arguments in the object store" in ln]
    assert len(noise) == (0 if mode == "quiet" else 1), result.stderr
    assert lines[-2:] == ["python line", "after the block"], result.stderr


@pytest.mark.ray
@pytest.mark.mlflow
def test_a_password_in_the_tracking_uri_appears_nowhere(
    ray_cluster: None,
    mlflow_server: MlflowServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """calibrate against a real ``mlflow server`` whose URI carries user:password@: the
    password is in no output (MLflow's "View run at" line included), no MLflow field or file,
    no result file and no Ray log (the command attaches to the session's Ray cluster)."""
    import ray
    from workflow_data import HELPFUL, synthetic_table, write_table

    password = "pw-7Qx93kLmZ"
    host = mlflow_server.uri.removeprefix("http://")
    emb = write_table(synthetic_table(60, 5, 16, **HELPFUL), tmp_path / "emb")
    gcs = ray.get_runtime_context().gcs_address
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    result = qmag(
        [
            "calibrate",
            "--embeddings",
            emb,
            "--output",
            str(tmp_path / "cal"),
            "--fmr-min",
            "1e-2",
            "--fmr-max",
            "1e-1",
            "--n-fmr",
            "5",
            "--tracking-uri",
            f"http://admin:{password}@{host}",
            "--ray-address",
            gcs,
        ],
        bare_env(),
        tmp_path,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "View run" in text and f"at: http://{host}/#/experiments/" in text
    assert password not in text and "admin:" not in text
    leaked = [
        str(p)
        for root in (mlflow_server.root, tmp_path / "cal", session / "logs")
        for p in root.rglob("*")
        if p.is_file() and password.encode() in p.read_bytes()
    ]
    assert leaked == []
