"""Storage helpers: atomic writes, object-store behaviour, redaction."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from qmag_ray import storage


def test_local_write_is_atomic_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.json"
    storage.write_bytes(str(target), b"{}")
    assert target.read_bytes() == b"{}"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]
    with pytest.raises(RuntimeError), storage.atomic_open(str(tmp_path / "half.bin")) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert not list(tmp_path.glob("*half*")), "an interrupted write must leave nothing behind"


@pytest.mark.s3
def test_writing_to_a_missing_bucket_fails_and_creates_no_bucket(s3_endpoint: str) -> None:
    """Regression: atomic_open called makedirs on s3://, and s3fs created the misspelt bucket,
    so a job writing to a typo'd bucket 'succeeded'."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    with pytest.raises((FileNotFoundError, OSError)):
        storage.write_bytes("s3://qmag-no-such-bucket/run/calibration.json", b"{}")
    fs.invalidate_cache()
    assert not fs.exists("qmag-no-such-bucket")


@pytest.mark.s3
def test_s3_round_trip_and_sha256(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "x", "y.bin")
    storage.write_bytes(uri, b"abc")
    assert storage.read_bytes(uri) == b"abc" and storage.exists(uri)
    assert storage.sha256(uri) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_redact_removes_user_and_password() -> None:
    assert storage.redact("s3://ak:secret@bucket/k") == "s3://bucket/k"
    assert storage.redact("http://u:p@host:5000/x") == "http://host:5000/x"
    assert storage.redact("/local/path") == "/local/path"


def test_absolute_makes_local_relative_paths_absolute_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `qmag-ray train --init-checkpoint rel/path.pth` failed inside Ray Train's
    workers, whose working directory differs; the trainer now ships absolute local paths."""
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("ckpt/model.pth") == str(tmp_path / "ckpt" / "model.pth")
    assert storage.absolute("/abs/model.pth") == "/abs/model.pth"
    assert storage.absolute("s3://bucket/model.pth") == "s3://bucket/model.pth"
