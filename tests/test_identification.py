"""1:N identification: exact sharded top-k, CMC rank-k and DIR at FPIR, subsets and layouts.

References are written here in plain numpy on the full score matrix (float64): sort every
probe's row, find the mate, brute-force the open-set thresholds. Nothing is imported from
qmag_ray for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from qmag_ray import identification
from qmag_ray.cli import app
from qmag_ray.embeddings import EmbeddingTable, write_embeddings
from qmag_ray.pairs.resolve import ResolveError
from qmag_ray.search.distributed import search_sharded
from qmag_ray.search.sets import SetError, scface_sets, tinyface_sets
from qmag_ray.search.topk import merge_topk, select_topk
from qmag_ray.synth.protocols import identification_like, write_identification_like
from qmag_ray.workflows.config import IdentifyConfig
from qmag_ray.workflows.identify import run_identification

ALPHA, BETA = 0.05, 0.12


def reference_scores(probes: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and QMagFace score matrices in float64, from the spec's formulas."""
    p = probes.astype(np.float64)
    g = gallery.astype(np.float64)
    qp, qg = np.linalg.norm(p, axis=1), np.linalg.norm(g, axis=1)
    cos = (p / qp[:, None]) @ (g / qg[:, None]).T
    q = np.minimum(qp[:, None], qg[None, :])
    return cos, cos + np.minimum(0.0, BETA * cos - ALPHA) * q


def reference_report(s: np.ndarray, g_id: list, p_id: list, ks=(1, 5, 10, 20), fpirs=(1e-2, 1e-1)):
    enrolled = {x for x in g_id if x is not None}
    ranks, top1, correct, mated = [], [], [], []
    for i, who in enumerate(p_id):
        order = sorted(range(s.shape[1]), key=lambda j: (-s[i, j], j))
        top1.append(s[i, order[0]])
        if who in enrolled:
            mated.append(True)
            r = next(n + 1 for n, j in enumerate(order) if g_id[j] == who)
            ranks.append(r)
            correct.append(r == 1)
        else:
            mated.append(False)
    mated = np.array(mated)
    top1 = np.array(top1)
    cmc = {str(k): float(np.mean(np.array(ranks) <= k)) for k in ks}
    nm, m = top1[~mated], top1[mated]
    correct = np.array(correct)
    dirs = {}
    for f in fpirs:
        if f * len(nm) < 1:
            dirs[f] = None
            continue
        best = 0.0
        for t in np.r_[np.unique(top1), np.inf]:
            if np.mean(nm >= t) <= f:
                best = max(best, float(np.mean(correct & (m >= t))))
        dirs[f] = best
    return cmc, dirs


def test_select_and_merge_topk_are_exact_with_ties() -> None:
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=(40, 300)), 1).astype(np.float32)  # many ties
    cols = np.arange(300)
    whole = select_topk(s, cols, 7)
    parts = [select_topk(s[:, a:b], cols[a:b], 7) for a, b in ((0, 64), (64, 200), (200, 300))]
    merged = merge_topk(parts, 7)
    for r in range(40):
        ref = sorted(range(300), key=lambda j: (-s[r, j], j))[:7]
        assert list(whole.index[r]) == ref == list(merged.index[r])
    short = select_topk(s[:, :3], cols[:3], 5)  # fewer candidates than k: padded
    assert (short.index[:, 3:] == -1).all() and np.isneginf(short.score[:, 3:]).all()


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_sharded_search_equals_brute_force_for_any_shard_count(shards: int) -> None:
    data = identification_like(enrolled=60, distractors=200, unenrolled=20, seed=1)
    g = data.embeddings.take(np.arange(len(data.gallery)))
    p = data.embeddings.take(np.arange(len(data.gallery), len(data.embeddings)))
    out = search_sharded(
        p.vectors,
        g.vectors,
        20,
        ALPHA,
        BETA,
        shards=shards,
        use_ray=False,
        probe_block=50,
        gallery_block=16,
    )
    base = search_sharded(
        p.vectors,
        g.vectors,
        20,
        ALPHA,
        BETA,
        shards=1,
        use_ray=False,
        probe_block=50,
        gallery_block=16,
    )
    cos, qmag = reference_scores(p.vectors, g.vectors)
    for name, ref in (("cosine", cos), ("qmagface", qmag)):
        assert np.array_equal(out[name].index, base[name].index)  # shard count changes nothing
        assert np.array_equal(out[name].score, base[name].score)
        top = np.argsort(-ref, axis=1, kind="stable")[:, :5]
        # float32 block products against the float64 reference: equal lists except exact near-ties
        agree = (out[name].index[:, :5] == top).mean()
        assert agree > 0.995
        np.testing.assert_allclose(
            out[name].score, np.take_along_axis(ref, out[name].index, 1), atol=2e-6
        )
    # QMagFace ranks differently from cosine: the quality term differs per candidate
    assert (out["cosine"].index[:, 0] != out["qmagface"].index[:, 0]).any()


@pytest.mark.ray
def test_ray_shards_give_the_single_process_lists(ray_cluster: None) -> None:
    data = identification_like(enrolled=50, distractors=150, unenrolled=10, seed=2)
    g = data.embeddings.take(np.arange(len(data.gallery)))
    p = data.embeddings.take(np.arange(len(data.gallery), len(data.embeddings)))
    kw = {"probe_block": 64, "gallery_block": 32}
    one = search_sharded(p.vectors, g.vectors, 20, ALPHA, BETA, shards=1, use_ray=False, **kw)
    four = search_sharded(p.vectors, g.vectors, 20, ALPHA, BETA, shards=4, use_ray=True, **kw)
    for m in one:
        assert np.array_equal(one[m].index, four[m].index)
        assert np.array_equal(one[m].score, four[m].score)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data = identification_like(
        enrolled=80, distractors=300, unenrolled=40, probes_per_identity=2, seed=5
    )
    return write_identification_like(data, str(tmp_path_factory.mktemp("ident")))


def test_identify_metrics_match_the_brute_force_reference(generated, tmp_path: Path) -> None:
    cfg = IdentifyConfig(
        embeddings=generated["embeddings"],
        gallery=generated["gallery"],
        probes=generated["probes"],
        alpha=ALPHA,
        beta=BETA,
        output=str(tmp_path / "o"),
    )
    out = run_identification(cfg, use_ray=False)
    import pyarrow.parquet as pq

    emb = pq.read_table(generated["embeddings"]).to_pandas().set_index("path")
    gal = pd.read_csv(generated["gallery"], keep_default_na=False)
    pro = pd.read_csv(generated["probes"], keep_default_na=False)
    gv = np.stack(emb.loc[gal["path"], "embedding"].to_numpy())
    g_id = [x or None for x in gal["identity"]]
    for subset in ("overall", "d1", "d3"):
        rows = pro if subset == "overall" else pro[pro["subset"] == subset]
        pv = np.stack(emb.loc[rows["path"], "embedding"].to_numpy())
        cos, qmag = reference_scores(pv, gv)
        for name, s in (("cosine", cos), ("qmagface", qmag)):
            cmc, dirs = reference_report(s, g_id, list(rows["identity"]))
            got = out.reports[subset][name]
            assert got["n_mated"] == int(rows["identity"].isin(set(gal["identity"]) - {""}).sum())
            for k, v in cmc.items():
                assert got["cmc"][k] == pytest.approx(v, abs=1e-12), (subset, name, k)
            for f, v in dirs.items():
                d = got["dir_at_fpir"][f"{f:.0e}"]["dir"]
                assert (v is None and d is None) or d == pytest.approx(v, abs=1e-12)
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["counts"]["distractors"] == 300 and set(doc["results"]) == {
        "overall",
        "d1",
        "d2",
        "d3",
    }
    cands = pd.read_parquet(tmp_path / "o" / "candidates.parquet")
    assert set(cands["method"]) == {"cosine", "qmagface"} and cands["rank"].max() == 20


def test_dir_at_fpir_worked_by_hand() -> None:
    # non-mated top-1 scores 0.9, 0.5, 0.4, ... (10); FPIR 0.1 allows one: accept > 0.5
    nm = np.array([0.9, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0])
    mated = np.array([0.95, 0.6, 0.5, 0.8])
    rank1 = np.array([True, True, True, False])
    out = identification.dir_at_fpir(mated, rank1, nm, (0.1, 1e-2))
    assert out["1e-01"]["dir"] == pytest.approx(0.5) and out["1e-01"]["fpir"] == pytest.approx(0.1)
    assert out["1e-02"]["dir"] is None  # 10 non-mated searches cannot measure 1 %


def test_unlabelled_probes_and_missing_images_fail_or_are_counted(
    generated, tmp_path: Path
) -> None:
    probes = pd.read_csv(generated["probes"], keep_default_na=False)
    probes.loc[:2, "identity"] = ""
    probes.loc[len(probes)] = ["probes/d1/never_embedded.jpg", "id00001", "d1"]
    path = tmp_path / "probes.csv"
    probes.to_csv(path, index=False)
    base = {
        "embeddings": generated["embeddings"],
        "gallery": generated["gallery"],
        "probes": str(path),
        "alpha": ALPHA,
        "beta": BETA,
        "output": str(tmp_path / "o"),
    }
    with pytest.raises(ResolveError, match=r"1 probe image\(s\).*never_embedded"):
        run_identification(IdentifyConfig(**base), use_ray=False)
    with pytest.raises(ResolveError, match=r"3 probe\(s\) have no identity"):
        run_identification(IdentifyConfig(**base, on_missing="skip"), use_ray=False)
    out = run_identification(
        IdentifyConfig(**base, on_missing="skip", on_unlabelled="skip"), use_ray=False
    )
    assert out.counts["skipped"] == {
        "gallery_missing_images": 0,
        "probe_missing_images": 1,
        "unlabelled_probes": 3,
    }
    assert out.counts["probes"] == len(probes) - 4


def test_template_gallery_pools_each_identity(generated, tmp_path: Path) -> None:
    gal = pd.read_csv(generated["gallery"], keep_default_na=False)
    gal["template"] = [i if i else p for p, i in zip(gal["path"], gal["identity"], strict=True)]
    gal.to_csv(tmp_path / "g.csv", index=False)
    cfg = IdentifyConfig(
        embeddings=generated["embeddings"],
        gallery=str(tmp_path / "g.csv"),
        probes=generated["probes"],
        alpha=ALPHA,
        beta=BETA,
        output=str(tmp_path / "o"),
    )
    out = run_identification(cfg, use_ray=False)
    assert out.counts["gallery_entries"] == 80 + 300  # one template per identity (one image each)


SCFACE = [
    "SCface_database/mugshot_frontal_cropped_all/001_frontal.JPG",
    "SCface_database/mugshot_frontal_cropped_all/002_frontal.JPG",
    "SCface_database/surveillance_cameras_distance_1/cam_1/001_cam1_1.jpg",
    "SCface_database/surveillance_cameras_distance_3/cam_5/002_cam5_3.jpg",
    "SCface_database/surveillance_cameras_distance_2/cam_6/001_cam6_2.jpg",  # infrared: left out
    "SCface_database/surveillance_cameras_distance_2/cam_2/003_cam2_2.jpg",  # not enrolled
]
TINYFACE = [
    "tinyface/Testing_Set/Gallery_Match/1_1.jpg",
    "tinyface/Testing_Set/Gallery_Match/2_4.jpg",
    "tinyface/Testing_Set/Gallery_Distractor/000017.jpg",
    "tinyface/Testing_Set/Probe/1_7.jpg",
    "tinyface/Testing_Set/Probe/5_1.jpg",
]


def test_scface_and_tinyface_layouts() -> None:
    g, p = scface_sets(np.array(SCFACE, dtype=object))
    assert list(g.table["identity"]) == ["1", "2"]
    assert list(zip(p.table["identity"], p.table["subset"], strict=True)) == [
        ("1", "d1"),
        ("2", "d3"),
        ("3", "d2"),
    ]
    g, p = tinyface_sets(np.array(TINYFACE, dtype=object))
    assert list(g.table["identity"]) == ["1", "2", None]
    assert list(p.table["identity"]) == ["1", "5"]
    with pytest.raises(SetError, match="embed the SCface_database folder"):
        scface_sets(np.array(TINYFACE, dtype=object))


@pytest.mark.ray
def test_cli_identify_scface_layout_end_to_end(ray_cluster: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(4, 16))
    ident = [int(Path(p).name.split("_")[0]) for p in SCFACE]
    vec = (centers[ident] + 0.1 * rng.normal(size=(len(SCFACE), 16))).astype(np.float32)
    table = EmbeddingTable(np.array(SCFACE, dtype=object), None, vec, np.linalg.norm(vec, axis=1))
    write_embeddings(table, str(tmp_path / "emb"))
    res = CliRunner().invoke(
        app,
        [
            "identify",
            "--embeddings",
            str(tmp_path / "emb"),
            "--layout",
            "scface",
            "--alpha",
            "0.05",
            "--beta",
            "0.1",
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "[d1]" in res.output and "[d3]" in res.output
    doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert doc["results"]["d1"]["cosine"]["cmc"]["1"] == 1.0
    assert doc["results"]["d2"]["cosine"]["n_nonmated"] == 1
    res = CliRunner().invoke(
        app,
        [
            "identify",
            "--embeddings",
            str(tmp_path / "emb"),
            "--layout",
            "scface",
            "--output",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2 and "alpha (--alpha) and beta (--beta)" in res.output
