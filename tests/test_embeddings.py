"""The embeddings table: reading and writing the ``embeddings/`` Parquet layout, checks."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qmag_ray import storage
from qmag_ray.embeddings import EmbeddingsError, EmbeddingTable, load_embeddings, write_embeddings


def make_table(n: int = 30, dim: int = 16, seed: int = 0, prefix: str = "img") -> EmbeddingTable:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32) * rng.uniform(5, 30, (n, 1))
    identity = np.asarray([f"person{i % 7}" if i % 11 else None for i in range(n)], dtype=object)
    return EmbeddingTable(
        path=np.asarray([f"{prefix}/{i:03d}.jpg" for i in range(n)], dtype=object),
        identity=identity,
        vectors=vectors,
        quality=np.linalg.norm(vectors, axis=1),
    )


def assert_same(a: EmbeddingTable, b: EmbeddingTable) -> None:
    assert list(a.path) == list(b.path)
    assert list(a.identity) == list(b.identity)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.quality, b.quality)
    assert a.vectors.dtype == np.float32 and a.quality.dtype == np.float32


def test_roundtrip_local_parts_and_ignored_files(tmp_path: Path) -> None:
    table = make_table(n=25)
    out = tmp_path / "OUTPUT"
    written = write_embeddings(table, str(out / "embeddings"), rows_per_file=10)
    assert len(written) == 3
    (out / "embeddings" / "_SUCCESS").write_text("")
    (out / "embeddings" / ".part-00009.parquet.tmp").write_text("half written")
    (out / "embeddings" / "_temporary").mkdir()
    (out / "embeddings" / "_temporary" / "junk.parquet").write_text("junk")
    for uri in (str(out / "embeddings"), str(out), str(out / "embeddings") + "/"):
        assert_same(load_embeddings(uri), table)
    assert_same(load_embeddings(written[0]), table.take(np.arange(10)))


def test_output_folder_named_embeddings_reads_its_parts_not_summary(tmp_path: Path) -> None:
    """Regression: an embed OUTPUT folder itself called ``embeddings`` made the loader read
    ``summary.json`` and ``failures/`` as Parquet instead of the ``embeddings/`` parts below."""
    table = make_table(n=12)
    out = tmp_path / "embeddings"
    write_embeddings(table, str(out / "embeddings"), rows_per_file=5)
    (out / "summary.json").write_text('{"status": "complete"}')
    (out / "failures").mkdir()
    (out / "failures" / "notes.txt").write_text("not parquet")
    assert_same(load_embeddings(str(out)), table)


def test_schema_is_the_embedding_job_layout(tmp_path: Path) -> None:
    table = make_table(n=5, dim=8)
    (path,) = write_embeddings(table, str(tmp_path))
    schema = pq.read_schema(path)
    assert schema.field("path").type == pa.string()
    assert schema.field("identity").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert schema.field("quality").type == pa.float32()


@pytest.mark.s3
def test_roundtrip_s3(s3_bucket: str) -> None:
    table = make_table(n=21)
    write_embeddings(table, storage.join(s3_bucket, "run", "embeddings"), rows_per_file=8)
    storage.write_bytes(storage.join(s3_bucket, "run", "embeddings", "_SUCCESS"), b"")
    loaded = load_embeddings(storage.join(s3_bucket, "run"))
    assert_same(loaded, table)
    assert loaded.fingerprint() == table.fingerprint()


def test_variable_list_column_and_missing_quality(tmp_path: Path) -> None:
    vectors = np.arange(12, dtype=np.float64).reshape(4, 3) + 1
    arrow = pa.table(
        {
            "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
            "embedding": pa.array(vectors.tolist(), type=pa.list_(pa.float64())),
        }
    )
    pq.write_table(arrow, tmp_path / "part-0.parquet")
    table = load_embeddings(str(tmp_path))
    np.testing.assert_allclose(table.vectors, vectors)
    np.testing.assert_allclose(table.quality, np.linalg.norm(vectors, axis=1), rtol=1e-6)
    assert list(table.identity) == [None] * 4
    assert not table.has_identities()


def test_duplicate_paths_across_parts_are_named(tmp_path: Path) -> None:
    write_embeddings(make_table(n=6, seed=1), str(tmp_path / "x"))
    write_embeddings(make_table(n=4, seed=2), str(tmp_path / "y"))
    (tmp_path / "x" / "part-00000.parquet").rename(tmp_path / "y" / "part-00001.parquet")
    with pytest.raises(EmbeddingsError, match=r"4 path\(s\) occur more than once.*img/000.jpg"):
        load_embeddings(str(tmp_path / "y"))


def test_bad_files_are_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"path": ["a"], "vector": [[1.0]]}), tmp_path / "p.parquet")
    with pytest.raises(EmbeddingsError, match=r"p\.parquet has no column 'embedding'"):
        load_embeddings(str(tmp_path))
    (tmp_path / "p.parquet").write_text("not parquet")
    with pytest.raises(EmbeddingsError, match=r"cannot read Parquet file .*p\.parquet"):
        load_embeddings(str(tmp_path))
    with pytest.raises(EmbeddingsError, match="does not exist"):
        load_embeddings(str(tmp_path / "nowhere"))
    (tmp_path / "p.parquet").unlink()
    with pytest.raises(EmbeddingsError, match="no Parquet part files"):
        load_embeddings(str(tmp_path))


def test_differing_dimensions_are_an_error(tmp_path: Path) -> None:
    write_embeddings(make_table(n=3, dim=4), str(tmp_path / "a"))
    write_embeddings(make_table(n=3, dim=5, prefix="other"), str(tmp_path / "b"))
    (tmp_path / "b" / "part-00000.parquet").rename(tmp_path / "a" / "part-00001.parquet")
    with pytest.raises(EmbeddingsError, match="dimensions differ.*D=4.*D=5"):
        load_embeddings(str(tmp_path / "a"))


def test_validate_error_and_skip() -> None:
    table = make_table(n=12)
    vectors = table.vectors.copy()
    vectors[2, 3] = np.nan
    vectors[5] = 0.0
    vectors[9, 0] = np.inf
    bad = EmbeddingTable(table.path, table.identity, vectors, table.quality)
    assert list(bad.bad_rows()) == [2, 5, 9]
    with pytest.raises(EmbeddingsError, match=r"3 of 12 .*img/002.jpg.*img/005.jpg.*img/009.jpg"):
        bad.validate()
    kept, skipped = bad.validate(policy="skip")
    assert skipped == 3 and len(kept) == 9
    assert "img/005.jpg" not in set(kept.path)
    assert table.validate() == (table, 0)


def test_index_of_and_fingerprint() -> None:
    table = make_table(n=10)
    np.testing.assert_array_equal(table.index_of(["img/007.jpg", "img/000.jpg"]), [7, 0])
    np.testing.assert_array_equal(table.index_of(["img/007.jpg", "nope"], missing=-1), [7, -1])
    with pytest.raises(KeyError, match="nope"):
        table.index_of(["nope"])
    copy = pickle.loads(pickle.dumps(table))
    assert copy.fingerprint() == table.fingerprint() == make_table(n=10).fingerprint()
    changed = table.vectors.copy()
    changed[4, 1] += 1e-3
    other = EmbeddingTable(table.path, table.identity, changed, table.quality)
    assert other.fingerprint() != table.fingerprint()
    renamed = EmbeddingTable(table.path[::-1], table.identity, table.vectors, table.quality)
    assert renamed.fingerprint() != table.fingerprint()


def test_mismatched_columns_rejected() -> None:
    with pytest.raises(EmbeddingsError, match="differ in length"):
        EmbeddingTable(np.array(["a", "b"], object), None, np.zeros((3, 2)), np.zeros(3))
