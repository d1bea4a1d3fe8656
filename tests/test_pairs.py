"""Pair lists: the real benchmark files, generic lists, resolving, listed and generated pairs."""

from __future__ import annotations

import pickle
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from oracle import oracle_cosine

from qmag_ray import storage
from qmag_ray.embeddings import EmbeddingTable
from qmag_ray.pairs.generate import generate_pairs, identity_split
from qmag_ray.pairs.listed import ListedPairSource, score_pairs
from qmag_ray.pairs.protocols import PairFileError, PairProtocol, read_pairs
from qmag_ray.pairs.resolve import ResolvedPairs, ResolveError, resolve_pairs
from qmag_ray.pairs.source import PairSource

# (file, protocol, lines, genuine, {line: (a, b, label)}) checked by hand against the files.
REAL = [
    (
        "lfw_pairs.txt",
        "lfw",
        6000,
        3000,
        {
            1: ("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abel_Pacheco/Abel_Pacheco_0004.jpg", 1),
            301: (
                "Abdel_Madi_Shabneh/Abdel_Madi_Shabneh_0001.jpg",
                "Dean_Barker/Dean_Barker_0001.jpg",
                0,
            ),
            6000: ("Slobodan_Milosevic/Slobodan_Milosevic_0002.jpg", "Sok_An/Sok_An_0001.jpg", 0),
        },
    ),
    (
        "xqlfw_pairs.txt",
        "xqlfw",
        6000,
        3000,
        {
            1: (
                "Marcelo_Ebrard/Marcelo_Ebrard_0003.jpg",
                "Marcelo_Ebrard/Marcelo_Ebrard_0001.jpg",
                1,
            ),
            6000: ("Pete_Rose/Pete_Rose_0002.jpg", "Tom_Welch/Tom_Welch_0001.jpg", 0),
        },
    ),
    (
        "agedb_pairs.txt",
        "agedb",
        6000,
        3000,
        {1: ("0.jpg", "1.jpg", 1), 6000: ("11998.jpg", "11999.jpg", 0)},
    ),
    (
        "cfp_pairs.txt",
        "cfp",
        7000,
        3500,
        {
            1: ("0.jpg", "1.jpg", 1),
            3495: ("6988.jpg", "6989.jpg", 0),
            3501: ("7000.jpg", "7001.jpg", 1),
            7000: ("13998.jpg", "13999.jpg", 0),
        },
    ),
    (
        "calfw_pairs.txt",
        "calfw",
        6000,
        3000,
        {
            1: ("0.jpg", "1.jpg", 1),
            301: ("600.jpg", "601.jpg", 0),
            6000: ("11998.jpg", "11999.jpg", 0),
        },
    ),
    (
        "cplfw_pairs.txt",
        "cplfw",
        6000,
        3000,
        {1: ("0.jpg", "1.jpg", 1), 6000: ("11998.jpg", "11999.jpg", 0)},
    ),
]


@pytest.mark.parametrize(
    ("name", "protocol", "n", "genuine", "lines"), REAL, ids=[r[0] for r in REAL]
)
def test_real_pair_files(shared_data: Path, name, protocol, n, genuine, lines) -> None:
    path = str(shared_data / "pairs" / name)
    pairs = read_pairs(path, protocol)
    assert (len(pairs), pairs.counts()) == (n, (genuine, n - genuine))
    assert pairs.protocol == protocol
    np.testing.assert_array_equal(pairs.line, np.arange(1, n + 1))
    for line, expected in lines.items():
        assert (pairs.a[line - 1], pairs.b[line - 1], int(pairs.label[line - 1])) == expected
    inferred = read_pairs(path)  # protocol guessed from the file name
    assert inferred.protocol == protocol and list(inferred.a) == list(pairs.a)


def test_lfw_file_order_is_kept(shared_data: Path) -> None:
    pairs = read_pairs(str(shared_data / "pairs" / "lfw_pairs.txt"), "lfw")
    expected = ((np.arange(6000) // 300) % 2 == 0).astype(np.int8)  # 10 x (300 gen + 300 imp)
    np.testing.assert_array_equal(pairs.label, expected)


def test_lfw_with_header_gives_identical_pairs(shared_data: Path, tmp_path: Path) -> None:
    text = (shared_data / "pairs" / "lfw_pairs.txt").read_text()
    (tmp_path / "lfw_pairs.txt").write_text("10\t300\n" + text)
    plain = read_pairs(str(shared_data / "pairs" / "lfw_pairs.txt"), "lfw")
    headered = read_pairs(str(tmp_path / "lfw_pairs.txt"), "lfw")
    assert list(headered.a) == list(plain.a) and list(headered.b) == list(plain.b)
    np.testing.assert_array_equal(headered.label, plain.label)
    np.testing.assert_array_equal(headered.line, plain.line + 1)
    (tmp_path / "short.txt").write_text("10\t300\n" + "\n".join(text.splitlines()[:5999]))
    with pytest.raises(PairFileError, match=r"short.txt:1: header says 10 sets.*5999 pairs"):
        read_pairs(str(tmp_path / "short.txt"), "lfw")


@pytest.mark.parametrize(
    ("protocol", "text", "error"),
    [
        ("lfw", "A\t1\t2\nB\t1\nC\t1\t2\n", r"bad.txt:2: expected 'name n1 n2'"),
        ("lfw", "A\t1\tx\n", r"bad.txt:1: image number 'x' is not an integer"),
        ("lfw", "A\t0\t2\n", r"bad.txt:1: image number 0 is below 1"),
        ("agedb", "0 1 1\n2 3 2\n", r"bad.txt:2: label must be 1 or 0, got '2'"),
        ("cfp", "0 1 1\n\n2 3\n", r"bad.txt:3: expected 'i j label'"),
        ("calfw", "00001.jpg 00002.jpg 0\n", r"bad.txt:1: label must be positive .* got 0"),
        ("cplfw", "00000.jpg 00002.jpg 1\n", r"bad.txt:1: file number 0 is below 1"),
        ("calfw", "", r"bad.txt: no pairs found"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, protocol, text, error) -> None:
    (tmp_path / "bad.txt").write_text(text)
    with pytest.raises(PairFileError, match=error):
        read_pairs(str(tmp_path / "bad.txt"), protocol)


def test_protocol_errors(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("0 1 1\n")
    with pytest.raises(PairFileError, match="cannot tell the protocol"):
        read_pairs(str(tmp_path / "mine.txt"))
    with pytest.raises(PairFileError, match="unknown pair protocol 'ijbd'"):
        read_pairs(str(tmp_path / "mine.txt"), "ijbd")
    with pytest.raises(PairFileError, match="ijbc template pair list.*--templates"):
        read_pairs(str(tmp_path / "mine.txt"), "ijbc")
    assert len(read_pairs(str(tmp_path / "mine.txt"), PairProtocol.AGEDB)) == 1
    with pytest.raises(PairFileError, match="not found"):
        read_pairs(str(tmp_path / "none.txt"), "agedb")


def test_generic_csv_and_parquet(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "a": ["x/1.jpg", "x/2.jpg", "y/1.jpg"],
            "b": ["x/3.jpg", "y/1.jpg", "z/9.jpg"],
            "label": [1, 0, 0],
            "note": ["", "", "extra"],
        }
    )
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_parquet(tmp_path / "p.parquet")
    for name in ("p.csv", "p.parquet"):
        pairs = read_pairs(str(tmp_path / name))
        assert pairs.protocol == "generic"
        assert list(pairs.a) == list(frame.a) and list(pairs.b) == list(frame.b)
        np.testing.assert_array_equal(pairs.label, [1, 0, 0])
    assert list(read_pairs(str(tmp_path / "p.csv")).line) == [2, 3, 4]
    assert list(read_pairs(str(tmp_path / "p.parquet")).line) == [1, 2, 3]


def test_generic_errors(tmp_path: Path) -> None:
    (tmp_path / "nolabel.csv").write_text("a,b,y\n1.jpg,2.jpg,1\n")
    with pytest.raises(PairFileError, match=r"missing column\(s\) \['label'\]"):
        read_pairs(str(tmp_path / "nolabel.csv"))
    (tmp_path / "badlabel.csv").write_text("a,b,label\n1.jpg,2.jpg,1\n1.jpg,3.jpg,yes\n")
    with pytest.raises(PairFileError, match=r"badlabel.csv:3: label must be 1 .* got 'yes'"):
        read_pairs(str(tmp_path / "badlabel.csv"))
    (tmp_path / "empty.csv").write_text("a,b,label\n1.jpg,,1\n")
    with pytest.raises(PairFileError, match=r"empty.csv:2: column 'b' is empty"):
        read_pairs(str(tmp_path / "empty.csv"))
    pd.DataFrame({"a": ["1", "2"], "b": ["3", "4"], "label": [1, -1]}).to_parquet(
        tmp_path / "bad.parquet"
    )
    with pytest.raises(PairFileError, match=r"bad.parquet: row 2: label must be 1"):
        read_pairs(str(tmp_path / "bad.parquet"))
    pd.DataFrame({"a": ["1"], "label": [1]}).to_parquet(tmp_path / "nob.parquet")
    with pytest.raises(PairFileError, match=r"missing column\(s\) \['b'\]"):
        read_pairs(str(tmp_path / "nob.parquet"))


@pytest.mark.s3
def test_read_pairs_from_s3(s3_bucket: str, shared_data: Path) -> None:
    uri = storage.join(s3_bucket, "lists", "agedb_pairs.txt")
    storage.write_bytes(uri, (shared_data / "pairs" / "agedb_pairs.txt").read_bytes())
    pairs = read_pairs(uri)
    assert pairs.protocol == "agedb" and pairs.counts() == (3000, 3000)


# --- resolving pairs onto an embeddings table -------------------------------------------------


def table_of(paths: list[str], seed: int = 0, dim: int = 8, identity=None) -> EmbeddingTable:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(len(paths), dim)).astype(np.float32) * 20
    return EmbeddingTable(
        np.asarray(paths, dtype=object), identity, vectors, np.linalg.norm(vectors, axis=1)
    )


def test_real_agedb_resolves_with_prefix(shared_data: Path) -> None:
    pairs = read_pairs(str(shared_data / "pairs" / "agedb_pairs.txt"))
    table = table_of([f"agedb/{i}.jpg" for i in range(12000)])
    with pytest.raises(ResolveError, match=r"6000 pair\(s\) name image\(s\) not in .*'0.jpg'"):
        resolve_pairs(pairs, table)
    resolved = resolve_pairs(pairs, table, prefix="agedb")
    assert resolved.report.kept == 6000 and resolved.report.skipped == 0
    np.testing.assert_array_equal(resolved.idx_a, [int(a[:-4]) for a in pairs.a])
    np.testing.assert_array_equal(resolved.label, pairs.label)

    partial = table.take(np.setdiff1d(np.arange(12000), [5, 7000]))  # drop two images
    with pytest.raises(ResolveError) as err:
        resolve_pairs(pairs, partial, prefix="agedb/")
    assert "2 pair(s) name image(s) not in" in str(err.value)
    assert "'agedb/5.jpg' (line 3)" in str(err.value) and "'agedb/7000.jpg' (line 3501)" in str(
        err.value
    )
    skipped = resolve_pairs(pairs, partial, prefix="agedb/", on_missing="skip")
    assert (skipped.report.missing, skipped.report.missing_images, skipped.report.kept) == (
        2,
        2,
        5998,
    )
    np.testing.assert_array_equal(skipped.position, np.setdiff1d(np.arange(6000), [2, 3500]))
    np.testing.assert_array_equal(skipped.label, pairs.label[skipped.position])


def test_suffix_matching(shared_data: Path) -> None:
    pairs = read_pairs(str(shared_data / "pairs" / "lfw_pairs.txt"))
    names = sorted(set(pairs.a) | set(pairs.b))
    table = table_of([f"/data/lfw-aligned/{n}" for n in names])
    resolved = resolve_pairs(pairs, table, match="suffix")
    assert len(resolved) == 6000
    assert table.path[resolved.idx_b[0]] == "/data/lfw-aligned/Abel_Pacheco/Abel_Pacheco_0004.jpg"
    clash = table_of([*table.path, "/other/Abel_Pacheco/Abel_Pacheco_0001.jpg"])
    with pytest.raises(ResolveError, match="match several table paths by suffix"):
        resolve_pairs(pairs, clash, match="suffix")


def small_list(tmp_path: Path, rows: list[tuple[str, str, int]]):
    pd.DataFrame(rows, columns=["a", "b", "label"]).to_csv(tmp_path / "l.csv", index=False)
    return read_pairs(str(tmp_path / "l.csv"))


def test_problem_pairs_error_or_counted_skip(tmp_path: Path) -> None:
    table = table_of([f"{i}.jpg" for i in range(6)])
    vectors = table.vectors.copy()
    vectors[4] = np.nan
    vectors[5] = 0.0
    table = EmbeddingTable(table.path, table.identity, vectors, table.quality)
    pairs = small_list(
        tmp_path,
        [
            ("0.jpg", "1.jpg", 1),  # ok
            ("0.jpg", "x.jpg", 0),  # missing
            ("2.jpg", "2.jpg", 1),  # self
            ("1.jpg", "0.jpg", 1),  # duplicate (unordered)
            ("0.jpg", "4.jpg", 0),  # NaN embedding
            ("5.jpg", "3.jpg", 0),  # zero embedding
            ("2.jpg", "3.jpg", 0),  # ok
            ("y.jpg", "z.jpg", 0),  # missing (2 images)
        ],
    )
    with pytest.raises(ResolveError) as err:
        resolve_pairs(pairs, table)
    text = str(err.value)
    assert "2 pair(s) name image(s) not in the embeddings table (3 distinct" in text
    assert "'x.jpg' (line 3)" in text and "on_missing='skip'" in text
    assert "2 pair(s) use an embedding with NaN/inf" in text
    assert "1 pair(s) compare an image with itself: 2.jpg / 2.jpg (line 4)" in text
    assert "1 pair(s) repeat an earlier pair: 1.jpg / 0.jpg (line 5)" in text

    with pytest.raises(ResolveError) as err:  # only the categories still set to error
        resolve_pairs(pairs, table, on_missing="skip", on_bad_embedding="skip")
    assert "not in the embeddings" not in str(err.value) and "itself" in str(err.value)

    resolved = resolve_pairs(
        pairs,
        table,
        on_missing="skip",
        on_bad_embedding="skip",
        on_self="skip",
        on_duplicate="skip",
    )
    report = resolved.report
    assert (report.total, report.kept, report.skipped) == (8, 2, 6)
    assert (report.missing, report.missing_images, report.bad_embedding) == (2, 3, 2)
    assert (report.self_pairs, report.duplicates) == (1, 1)
    assert list(resolved.position) == [0, 6]
    assert report.to_dict()["skipped"] == 6 and "2 of 8 pairs kept" in report.summary()
    assert len(ListedPairSource(table, resolved)) == 2
    unchecked = ResolvedPairs(
        np.array([0, 4]), np.array([1, 2]), np.array([1, 0]), np.arange(2), resolved.report
    )
    with pytest.raises(ValueError, match=r"1 image\(s\) used by the pairs have NaN.*'4.jpg'"):
        ListedPairSource(table, unchecked)


def test_conflicting_labels_are_an_error_of_their_own(tmp_path: Path) -> None:
    # Issue 12: a pair listed with 1 and with 0 was reported only as a repeat.
    table = table_of([f"{i}.jpg" for i in range(4)])
    rows = [
        ("0.jpg", "1.jpg", 1),
        ("2.jpg", "3.jpg", 0),
        ("1.jpg", "0.jpg", 0),
        ("2.jpg", "3.jpg", 0),
    ]
    pairs = small_list(tmp_path, rows)
    for policy in ("error", "skip"):  # no policy skips it: neither label is right
        with pytest.raises(ResolveError) as err:
            resolve_pairs(pairs, table, on_duplicate=policy)
        text = str(err.value)
        assert "1 pair(s) are listed both as genuine (1) and as impostor (0)" in text
        assert "0.jpg / 1.jpg (lines 2, 4)" in text and "fix the list" in text
    same = small_list(tmp_path, [rows[0], rows[1], rows[3]])  # a plain repeat stays a repeat
    assert resolve_pairs(same, table, on_duplicate="skip").report.duplicates == 1


def test_listed_source_scores_and_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    paths = [f"{i}.jpg" for i in range(40)]
    table = table_of(paths, seed=3, dim=16)
    rows = []
    for _ in range(500):
        i, j = rng.choice(40, 2, replace=False)
        rows.append((paths[i], paths[j], int((i + j) % 2)))  # a repeated pair keeps its label
    pairs = small_list(tmp_path, rows)
    resolved = resolve_pairs(pairs, table, on_duplicate="skip")
    assert resolved.report.duplicates > 0
    cos, qual, label = score_pairs(table, resolved)
    va, vb = table.vectors[resolved.idx_a], table.vectors[resolved.idx_b]
    np.testing.assert_allclose(cos, oracle_cosine(va, vb), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(
        qual, np.minimum(table.quality[resolved.idx_a], table.quality[resolved.idx_b])
    )
    np.testing.assert_array_equal(label, resolved.label)

    source = ListedPairSource(table, resolved, shards=3, block_size=37)
    assert isinstance(source, PairSource) and source.num_shards() == 3
    shipped = pickle.loads(pickle.dumps(source))
    blocks = [b for k in range(3) for b in shipped.shard_blocks(k)]
    np.testing.assert_array_equal(np.concatenate([b.cosine for b in blocks]), cos)
    np.testing.assert_array_equal(np.concatenate([b.label for b in blocks]), label)
    assert source.counts() == (int(label.sum()), len(label) - int(label.sum()))
    assert source.max_quality() == pytest.approx(qual.max())
    assert source.fingerprint() == ListedPairSource(table, resolved, shards=1).fingerprint()
    other = resolve_pairs(pairs, table, on_duplicate="skip")
    assert ListedPairSource(table, other).fingerprint() == source.fingerprint()
    flipped = type(resolved)(
        resolved.idx_a, resolved.idx_b, 1 - resolved.label, resolved.position, resolved.report
    )
    assert ListedPairSource(table, flipped).fingerprint() != source.fingerprint()


# --- generated pairs ---------------------------------------------------------------------------


def labelled_table(sizes: list[int], seed: int = 0) -> EmbeddingTable:
    identity = [f"id{k}" for k, s in enumerate(sizes) for _ in range(s)]
    order = np.random.default_rng(seed).permutation(len(identity))  # identities interleaved
    identity = np.asarray(identity, dtype=object)[order]
    return table_of([f"img{i}.jpg" for i in range(len(identity))], seed, identity=identity)


def test_generated_pairs_follow_the_formula() -> None:
    sizes = [1, 2, 3, 10, 11, 25, 4]
    table = labelled_table(sizes)
    result = generate_pairs(table, max_per_identity=10, impostors_per_side=5, seed=7)
    n_gen = sum(min(s, 10) * (min(s, 10) - 1) // 2 for s in sizes)
    assert result.counts() == (n_gen, 2 * 5 * n_gen)
    ident = table.identity
    a, b, y = result.idx_a, result.idx_b, result.label
    assert (a != b).all()
    np.testing.assert_array_equal(ident[a] == ident[b], y == 1)  # impostors cross-identity
    for k in range(len(sizes)):  # at most 10 images per identity take part
        used = set(a[ident[a] == f"id{k}"]) | set(b[ident[b] == f"id{k}"])
        assert len(used) == min(sizes[k], 10)
    genuine = list(zip(a[y == 1], b[y == 1], strict=True))
    assert len(set(genuine)) == n_gen  # all combinations, each once
    anchors = a[y == 0].reshape(n_gen, 2, 5)  # five impostors per side of each genuine pair
    np.testing.assert_array_equal(anchors[:, 0, :], np.repeat(a[y == 1][:, None], 5, axis=1))
    np.testing.assert_array_equal(anchors[:, 1, :], np.repeat(b[y == 1][:, None], 5, axis=1))


def test_generation_is_seeded() -> None:
    table = labelled_table([12, 15, 3, 8])
    one = generate_pairs(table, seed=1)
    again = generate_pairs(table, seed=1)
    other = generate_pairs(table, seed=2)
    np.testing.assert_array_equal(one.idx_a, again.idx_a)
    np.testing.assert_array_equal(one.idx_b, again.idx_b)
    assert not np.array_equal(one.idx_b, other.idx_b)
    assert one.counts() == other.counts()


def test_generation_errors() -> None:
    unlabelled = table_of(["a.jpg", "b.jpg", "c.jpg"], identity=["x", None, "y"])
    with pytest.raises(ValueError, match=r"1 of 3 embeddings have no identity label.*'b.jpg'"):
        generate_pairs(unlabelled)
    with pytest.raises(ValueError, match="at least 2 identities"):
        generate_pairs(labelled_table([5]))
    with pytest.raises(ValueError, match="no genuine pairs"):
        generate_pairs(labelled_table([1, 1, 1]))
    table = labelled_table([3, 4])
    vectors = table.vectors.copy()
    vectors[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 embeddings are NaN/inf.*'img2.jpg'"):
        generate_pairs(EmbeddingTable(table.path, table.identity, vectors, table.quality))


def test_identity_split() -> None:
    table = labelled_table([3, 5, 2, 7, 1, 4, 6, 2, 2, 9])
    for sets in (identity_split(table, 0.3, seed=4), identity_split(table, seed=4, folds=4)):
        rows = np.concatenate(sets)
        assert sorted(rows) == list(range(len(table)))  # disjoint cover of all rows
        idents = [set(table.identity[s]) for s in sets]
        assert all(idents) and all(not (x & y) for x, y in combinations(idents, 2))
    two = identity_split(table, 0.3, seed=4)
    assert len(set(table.identity[two[0]])) == 3
    np.testing.assert_array_equal(two[0], identity_split(table, 0.3, seed=4)[0])
    assert len(identity_split(table, folds=4)) == 4
    with pytest.raises(ValueError, match="no identity label"):
        identity_split(table_of(["a", "b"], identity=[None, "x"]))
    with pytest.raises(ValueError, match="leaves one side empty"):
        identity_split(table, 0.01)
