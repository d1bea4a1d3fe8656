"""The embedding job end to end: real local Ray, real moto S3, real checkpoints and images.

Each ``run_embed`` costs an actor start-up, so the Ray tests are few and each checks a lot.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from model_oracle import magface_input
from PIL import Image
from typer.testing import CliRunner

from qmag_ray import storage
from qmag_ray.cli import app
from qmag_ray.config import ConfigError, load_config
from qmag_ray.embedding import EmbedConfig, EmbedError, run_embed
from qmag_ray.embedding.inputs import list_tree, read_manifest
from qmag_ray.images import decode_face, to_input
from qmag_ray.model import CheckpointError, create_backbone, save_checkpoint

TOY = [f"{i}.jpg" for i in range(10)]


# ----------------------------------------------------------------------------- helpers


def demo_model(seed: int = 0) -> torch.nn.Module:
    """The tiny backbone with random weights *and* random BatchNorm statistics, so that a
    checkpoint that loads only part of the state gives different embeddings."""
    torch.manual_seed(seed)
    model = create_backbone("iresnet-demo")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return model.eval()


def reference(model: torch.nn.Module, blobs: list[bytes]) -> np.ndarray:
    """The in-memory model's embeddings of the images, decoded by the spec's plain recipe
    (``model_oracle.magface_input``: BGR, / 255, NCHW; nothing from the product's decoder)."""
    batch = np.stack([magface_input(b) for b in blobs])
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).numpy()


def png(mode: str, size: tuple[int, int], colour: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def read_parts(folder: str) -> pa.Table:
    """All finished parts under ``folder`` (skipping temporary and private files)."""
    fs, path = storage.filesystem(folder)
    fs.invalidate_cache()
    names = [p for p in sorted(fs.find(path)) if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
    tables = []
    for name in names:
        with fs.open(name, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def config(**kwargs: object) -> EmbedConfig:
    base: dict[str, object] = {"arch": "iresnet-demo", "batch_size": 4, "read_block_rows": 4}
    base.update(kwargs)
    return EmbedConfig(**base)  # type: ignore[arg-type]


class Never:
    """A ``connect`` hook that records whether Ray work was about to start."""

    called = False

    def __call__(self) -> None:
        self.called = True
        raise AssertionError("Ray work started although the run should have been refused")


# ----------------------------------------------------------------------------- without Ray


def test_tree_listing_takes_identity_from_first_folder(tmp_path: Path) -> None:
    (tmp_path / "alice" / "extra").mkdir(parents=True)
    (tmp_path / "bob").mkdir()
    for rel in ("alice/1.jpg", "alice/extra/2.PNG", "bob/3.jpeg", "loose.jpg", "bob/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "bob" / ".hidden.jpg").write_bytes(b"x")
    inputs = list_tree(str(tmp_path))
    rows = dict(zip(inputs.table["path"], inputs.table["identity"], strict=True))
    assert rows == {
        "alice/1.jpg": "alice",
        "alice/extra/2.PNG": "alice",
        "bob/3.jpeg": "bob",
        "loose.jpg": None,
    }
    assert sorted(inputs.ignored) == ["bob/.hidden.jpg", "bob/notes.txt"]
    with pytest.raises(EmbedError, match="images folder not found"):
        list_tree(str(tmp_path / "nope"))


def test_manifest_csv_and_parquet_and_their_errors(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path,identity\n./a/1.jpg,a\nb/2.jpg,\nc/NA.jpg,NA\n")
    table = read_manifest(str(csv))
    assert table["path"].tolist() == ["a/1.jpg", "b/2.jpg", "c/NA.jpg"]
    assert table["identity"].tolist() == ["a", None, "NA"]
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["x.jpg", "y/z.png"]}), parquet)
    assert read_manifest(str(parquet))["identity"].tolist() == [None, None]
    bad = {
        "path,identity\na.jpg,1\na.jpg,2\n": "repeated paths",
        "file,identity\na.jpg,1\n": "no 'path' column",
        "path\n/etc/passwd\n": "row 2: path '/etc/passwd' must be relative",
        "path\nok.jpg\n../up.jpg\n": "row 3: path '../up.jpg' must be relative",
    }
    for text, message in bad.items():
        csv.write_text(text)
        with pytest.raises(EmbedError, match=message):
            read_manifest(str(csv))
    with pytest.raises(EmbedError, match="manifest not found"):
        read_manifest(str(tmp_path / "missing.csv"))


def test_config_needs_exactly_one_input_and_checks_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of .images."):
        EmbedConfig(model="m", arch="a", output="o")
    with pytest.raises(ValueError, match="exactly one of .images."):
        EmbedConfig(images="i", manifest="m", model="m", arch="a", output="o")
    with pytest.raises(ValueError, match="max_failure_fraction"):
        EmbedConfig(images="i", model="m", arch="a", output="o", max_failure_fraction=2.0)
    path = tmp_path / "embed.yaml"
    path.write_text(yaml.safe_dump({"images": "i", "model": "m", "arch": "a", "batch_size": 0}))
    with pytest.raises(ConfigError, match=r"batch_size \(--batch-size\) must be >= 1, got 0"):
        load_config(EmbedConfig, str(path), {"output": "o"})
    cfg = load_config(EmbedConfig, str(path), {"output": "o", "batch_size": 8})
    assert cfg.batch_size == 8 and cfg.images == "i"


def test_bad_checkpoints_fail_before_any_ray_work(tmp_path: Path, shared_data: Path) -> None:
    images = tmp_path / "imgs" / "id"
    images.mkdir(parents=True)
    shutil.copy(shared_data / "magface_toy" / "0.jpg", images / "0.jpg")
    model = demo_model()
    good = str(tmp_path / "demo.pth")
    save_checkpoint(model, good, "iresnet-demo")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(Path(good).read_bytes()[:5000])
    pickled = tmp_path / "callable.pth"
    payload = {"epoch": 0, "arch": "iresnet-demo", "state_dict": model.state_dict()}
    payload["hook"] = os.system  # a reference to a callable: weights_only loading refuses it
    torch.save(payload, pickled)
    cases = [
        (good, "iresnet18", CheckpointError, "iresnet18"),
        (str(truncated), "iresnet-demo", CheckpointError, "truncated"),
        (str(pickled), "iresnet-demo", CheckpointError, "execute code"),
        (str(tmp_path / "absent.pth"), "iresnet-demo", CheckpointError, "not found"),
        (good, "resnet-nope", ValueError, "unknown backbone"),
    ]
    for uri, arch, error, message in cases:
        hook = Never()
        out = str(tmp_path / "o")
        cfg = config(images=str(tmp_path / "imgs"), model=uri, arch=arch, output=out)
        with pytest.raises(error, match=message):
            run_embed(cfg, connect=hook)
        assert not hook.called
        assert not (tmp_path / "o").exists()


def test_finished_output_is_refused_without_overwrite(tmp_path: Path, shared_data: Path) -> None:
    (tmp_path / "imgs" / "id").mkdir(parents=True)
    shutil.copy(shared_data / "magface_toy" / "0.jpg", tmp_path / "imgs" / "id" / "0.jpg")
    save_checkpoint(demo_model(), str(tmp_path / "demo.pth"), "iresnet-demo")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"status": "succeeded"}))
    hook = Never()
    cfg = config(images=str(tmp_path / "imgs"), model=str(tmp_path / "demo.pth"), output=str(out))
    with pytest.raises(EmbedError, match="already holds a finished embedding run.*--overwrite"):
        run_embed(cfg, connect=hook)
    assert not hook.called
    # parts without the run marker are not resumed blindly either
    (out / "summary.json").unlink()
    (out / "embeddings").mkdir()
    (out / "embeddings" / "part-00000-x.parquet").write_bytes(b"PAR1")
    with pytest.raises(EmbedError, match="no run marker"):
        run_embed(cfg, connect=hook)


def test_cli_help_documents_every_option() -> None:
    result = CliRunner().invoke(app, ["embed", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for field in EmbedConfig.__dataclass_fields__:
        assert f"--{field.replace('_', '-')}" in result.output, field
    for option in ("--ray-address", "--config", "--no-mixed-precision"):
        assert option in result.output


def test_cli_reports_user_errors_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    args = ["embed", "--images", str(tmp_path), "--model", str(tmp_path / "bad.pth")]
    args += ["--arch", "iresnet18", "--output", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2  # a user error
    assert "error: checkpoint" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["embed", "--model", "m", "--arch", "a", "--output", "o"])
    assert result.exit_code == 2 and "exactly one of images (--images)" in result.output


# ----------------------------------------------------------------------------- with Ray


@pytest.mark.ray
def test_mixed_good_and_bad_files_reconcile_and_fail_loudly(
    ray_cluster: None, tmp_path: Path, shared_data: Path
) -> None:
    root = tmp_path / "images"
    good: dict[str, bytes] = {}
    for i, name in enumerate(TOY):
        good[f"p{i % 3}/{name}"] = (shared_data / "magface_toy" / name).read_bytes()
    good["p0/gray.png"] = png("L", (112, 112), 90)
    good["p1/rgba.png"] = png("RGBA", (112, 112), (200, 100, 50, 128))
    jpeg = (shared_data / "magface_toy" / "4.jpg").read_bytes()
    bad = {
        "p2/truncated.jpg": (jpeg[: len(jpeg) // 2], "JPEG data is truncated or corrupt"),
        "p2/zero.jpg": (b"", "empty file"),
        "p2/text.jpg": (b"name,age\nbob,3\n", "not an image in a supported format"),
        "p2/small.png": (png("RGB", (100, 100), (1, 2, 3)), "image is 100x100, expected 112x112"),
        "p2/missing.jpg": (None, "file not found"),
    }
    for rel, data in [*good.items(), *((k, v[0]) for k, v in bad.items())]:
        if data is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    paths = [*good, *bad]
    identities = [p.split("/")[0] for p in paths]
    identities[paths.index("p0/gray.png")] = None  # unknown identity -> null
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": paths, "identity": identities}), manifest)
    model = demo_model()
    save_checkpoint(model, str(tmp_path / "demo.pth"), "iresnet-demo", layout="module.features.")
    out = tmp_path / "out"
    cfg = config(
        manifest=str(manifest),
        images_root=str(root),
        model=str(tmp_path / "demo.pth"),
        output=str(out),
        rows_per_part=5,
    )  # default max_failure_fraction 0.01: 5 failures of 17 must fail the run

    with pytest.raises(EmbedError, match=r"5 of 17 inputs failed .*p2/") as info:
        run_embed(cfg)
    assert "failures" in str(info.value)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["counts"]["inputs"] == 17
    assert summary["counts"]["embedded"] == 12 and summary["counts"]["failed"] == 5
    assert summary["preprocessing"] == "BGR, [0,1], NCHW, 112x112"
    assert summary["model_sha256"] == storage.sha256(str(tmp_path / "demo.pth"))
    assert summary["arch"] == "iresnet-demo" and summary["embedding_size"] == 128
    assert {"ray", "torch", "numpy", "pyarrow", "qmag-ray"} <= set(summary["versions"])

    failures = read_parts(str(out / "failures")).to_pylist()
    assert sorted(f["path"] for f in failures) == sorted(bad)
    for row in failures:
        assert bad[row["path"]][1] in row["error"], row

    table = read_parts(str(out / "embeddings"))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    assert table.schema.field("quality").type == pa.float32()
    assert table.schema.field("identity").type == pa.string()
    assert sorted(table["path"].to_pylist()) == sorted(good)  # each good image exactly once
    order = table["path"].to_pylist()
    ident = dict(zip(order, table["identity"].to_pylist(), strict=True))
    assert ident["p0/gray.png"] is None and ident["p1/rgba.png"] == "p1"
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    expected = reference(model, [good[p] for p in order])
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)
    quality = table["quality"].to_numpy()
    np.testing.assert_array_equal(quality, np.linalg.norm(emb, axis=1).astype(np.float32))
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") and p.suffix == ".tmp"]
    assert not leftovers  # no temporary files left
    lease_record = json.loads((out / ".lease.json").read_text())
    assert lease_record["released_utc"] is not None  # released; kept for its fencing generation

    from qmag_ray.embeddings import load_embeddings  # the loader reads what the job writes

    loaded = load_embeddings(str(out))
    assert len(loaded) == 12 and loaded.dim == 128


@pytest.mark.ray
def test_interrupted_run_resumes_and_overwrite_starts_afresh(
    ray_cluster: None, tmp_path: Path, shared_data: Path
) -> None:
    root = tmp_path / "faces"
    for i, name in enumerate(TOY):
        (root / f"id{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "magface_toy" / name, root / f"id{i % 2}" / name)
    (root / "id1" / "empty.jpg").write_bytes(b"")
    small = Image.open(shared_data / "magface_toy" / "9.jpg").resize((96, 96))
    small.save(root / "id0" / "small.png")  # embedded after a logged resize (resize=True)
    model = demo_model(seed=1)
    save_checkpoint(model, str(tmp_path / "m.pth"), "iresnet-demo", layout="features.")
    out = tmp_path / "out"
    cfg = config(
        images=str(root),
        model=str(tmp_path / "m.pth"),
        output=str(out),
        rows_per_part=3,
        max_failure_fraction=0.2,
        resize=True,
    )
    first = run_embed(cfg)
    assert (first.inputs, first.embedded, first.failed, first.resized) == (12, 11, 1, 1)
    parts = sorted((out / "embeddings").rglob("part-*.parquet"))
    assert len(parts) >= 2

    # Simulate a run that died: no summary, one part lost, a temporary file left behind.
    (out / "summary.json").unlink()
    lost = pq.read_table(parts[0])["path"].to_pylist()
    parts[0].unlink()
    (parts[0].parent / ".part-00009-x.parquet.tmp").write_bytes(b"half")
    second = run_embed(cfg)
    assert second.skipped_existing == 11 - len(lost)
    assert second.embedded_this_run == len(lost)
    assert (second.inputs, second.embedded, second.failed) == (12, 11, 1)
    table = read_parts(str(out / "embeddings"))
    expected_paths = [f"id{i % 2}/{n}" for i, n in enumerate(TOY)] + ["id0/small.png"]
    assert sorted(table["path"].to_pylist()) == sorted(expected_paths)
    assert read_parts(str(out / "failures"))["path"].to_pylist() == ["id1/empty.jpg"]
    faces = np.stack(
        [decode_face((root / p).read_bytes(), resize=True) for p in table["path"].to_pylist()]
    )
    with torch.inference_mode():
        expected = model(torch.from_numpy(to_input(faces))).numpy()
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)

    # Finished now: refused without overwrite, rewritten from scratch with it.
    with pytest.raises(EmbedError, match="already holds a finished"):
        run_embed(cfg, connect=Never())
    third = run_embed(EmbedConfig(**{**cfg.__dict__, "overwrite": True}))
    assert (third.skipped_existing, third.embedded_this_run, third.failed) == (0, 11, 1)
    names = [p.name for p in (out / "embeddings").rglob("*.parquet")]
    assert names and all(third.run_id in n for n in names)


@pytest.mark.ray
@pytest.mark.s3
def test_real_faces_from_s3_with_iresnet18_via_cli(
    ray_cluster: None, s3_bucket: str, tmp_path: Path, shared_data: Path
) -> None:
    fs, _ = storage.filesystem(s3_bucket)
    for i, name in enumerate(TOY):
        storage.write_bytes(
            f"{s3_bucket}/faces/person{i // 5}/{name}",
            (shared_data / "magface_toy" / name).read_bytes(),
        )
    torch.manual_seed(18)
    model = create_backbone("iresnet18").eval()
    save_checkpoint(model, f"{s3_bucket}/models/magface_epoch_00025.pth", "iresnet18")
    settings = {
        "images": f"{s3_bucket}/faces",
        "model": f"{s3_bucket}/models/magface_epoch_00025.pth",
        "arch": "iresnet18",
        "batch_size": 4,
        "output": f"{s3_bucket}/wrong-place",  # overridden on the command line
    }
    cfg_file = tmp_path / "embed.yaml"
    cfg_file.write_text(yaml.safe_dump(settings))
    out = f"{s3_bucket}/runs/toy"
    args = ["embed", "--config", str(cfg_file), "--output", out, "--threads-per-actor", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "succeeded: 10/10 embedded, 0 failed" in result.output

    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert summary["counts"]["inputs"] == 10 and summary["embedding_size"] == 512
    assert summary["model_uri"].startswith("s3://") and summary["settings"]["batch_size"] == 4
    assert not storage.exists(f"{s3_bucket}/wrong-place")
    table = read_parts(f"{out}/embeddings")
    paths = table["path"].to_pylist()
    assert sorted(paths) == sorted(f"person{i // 5}/{n}" for i, n in enumerate(TOY))
    assert table["identity"].to_pylist() == [p.split("/")[0] for p in paths]
    emb = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert emb.shape == (10, 512)
    quality = table["quality"].to_numpy()
    assert np.isfinite(quality).all() and (quality > 0).all()
    blobs = [(shared_data / "magface_toy" / p.split("/")[1]).read_bytes() for p in paths]
    np.testing.assert_allclose(emb, reference(model, blobs), rtol=1e-4, atol=1e-4)

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already holds a finished embedding run" in again.output


@pytest.mark.ray
def test_actor_pool_that_would_starve_decoding_is_refused(
    ray_cluster: None, tmp_path: Path, shared_data: Path
) -> None:
    (tmp_path / "imgs" / "id").mkdir(parents=True)
    shutil.copy(shared_data / "magface_toy" / "0.jpg", tmp_path / "imgs" / "id" / "0.jpg")
    save_checkpoint(demo_model(), str(tmp_path / "m.pth"), "iresnet-demo")
    base = {"images": str(tmp_path / "imgs"), "model": str(tmp_path / "m.pth")}
    cases = [
        ({"actors": 2}, r"2 actor\(s\) x 1 CPU plus 1 CPU for reading need 3 CPUs"),
        ({"gpus_per_actor": 1.0}, r"need 1 GPUs but the Ray cluster has 0"),
    ]
    for extra, message in cases:
        out = tmp_path / f"out{len(extra)}{next(iter(extra))}"
        with pytest.raises(EmbedError, match=message):
            run_embed(config(**base, **extra, output=str(out)))
        assert not (out / "summary.json").exists()


@pytest.mark.ray
def test_decoding_runs_in_read_tasks_not_inside_the_model_actors(
    ray_cluster: None, tmp_path: Path
) -> None:
    """With the CPU defaults (``read_cpus`` = ``cpus_per_actor`` = 1, no GPU) Ray Data would
    fuse read-and-decode into the actor operator; the optimized physical plan must keep a task
    operator for decoding in front of the actor pool."""
    import contextlib

    import ray

    from qmag_ray.embedding.pipeline import build_dataset
    from qmag_ray.embedding.writer import PartSpec

    todo = pa.table(
        {
            "path": ["id/0.jpg"],
            "identity": ["id"],
            "listed_error": [None],
            "shard": pa.array([0], pa.int64()),
            "pos": pa.array([0], pa.int64()),
        }
    )
    cfg = config(images=str(tmp_path), model=str(tmp_path / "m.pth"), output=str(tmp_path / "o"))
    assert cfg.read_cpus == cfg.cpus_per_actor and cfg.gpus_per_actor == 0  # the fusing case
    spec = PartSpec(str(tmp_path / "o"), "run", "sha", "iresnet-demo", 512)
    ds = build_dataset(cfg, [ray.put(todo)], str(tmp_path), spec, monitor=None)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ds.explain()
    optimized = text.getvalue().split("Physical Plan (Optimized)")[1]
    operators = [line.strip("+- ").strip() for line in optimized.splitlines() if "[" in line]
    assert any(
        op.startswith("ActorPoolMapOperator[") and op.endswith("[MapBatches(PartWritingActor)]")
        for op in operators
    ), optimized
    assert "TaskPoolMapOperator[MapBatches(read_and_decode)]" in operators, optimized
