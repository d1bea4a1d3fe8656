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
@pytest.mark.mlflow
def test_cli_identify_scface_layout_end_to_end(ray_cluster: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(4, 16))
    ident = [int(Path(p).name.split("_")[0]) for p in SCFACE]
    vec = (centers[ident] + 0.1 * rng.normal(size=(len(SCFACE), 16))).astype(np.float32)
    table = EmbeddingTable(np.array(SCFACE, dtype=object), None, vec, np.linalg.norm(vec, axis=1))
    write_embeddings(table, str(tmp_path / "emb"))
    from mlflow_fixtures import tracking_at

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_at(store):
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
                "--tracking-uri",
                store,
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


def dyadic_unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors with four entries of +-0.5 (norm exactly 1): every dot product is a
    multiple of 1/4, exact in float32 whatever the summation order, so scores tie a lot."""
    out = np.zeros((n, dim), np.float32)
    for i in range(n):
        out[i, rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return out


@pytest.mark.parametrize("shards", [1, 2, 5])
def test_sharded_search_with_given_qualities_is_exact_with_ties(shards: int) -> None:
    # a quality that is not the norm (every norm is 1 here), exact arithmetic, many ties:
    # the lists must equal the reference sorted by (-score, gallery index) exactly
    rng = np.random.default_rng(11)
    g = dyadic_unit_vectors(700, 12, rng)
    p = dyadic_unit_vectors(90, 12, rng)
    qg = rng.integers(1, 9, len(g)).astype(np.float32)
    qp = rng.integers(1, 9, len(p)).astype(np.float32)
    alpha, beta = 0.5, 0.25  # dyadic: QMagFace scores exact too
    cos = p.astype(np.float64) @ g.astype(np.float64).T
    qmag = cos + np.minimum(0.0, beta * cos - alpha) * np.minimum(qp[:, None], qg[None, :])
    out = search_sharded(
        p, g, 20, alpha, beta, shards=shards, q_probes=qp, q_gallery=qg, use_ray=False,
        probe_block=32, gallery_block=64,
    )  # fmt: skip
    for name, ref in (("cosine", cos), ("qmagface", qmag)):
        for r in range(len(p)):
            expected = sorted(range(len(g)), key=lambda j: (-ref[r, j], j))[:20]
            assert list(out[name].index[r]) == expected, (name, r)
            np.testing.assert_array_equal(out[name].score[r], ref[r, expected])
    # by the norms (all 1) QMagFace would rank exactly as cosine does; by these qualities not
    assert (out["qmagface"].index != out["cosine"].index).any()
    by_norm = search_sharded(p, g, 20, alpha, beta, shards=shards, use_ray=False)
    assert np.array_equal(by_norm["qmagface"].index, by_norm["cosine"].index)


@pytest.mark.ray
@pytest.mark.mlflow
def test_cli_identify_ranks_by_a_quality_column_and_records_mlflow(
    ray_cluster: None, generated, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq
    from mlflow import MlflowClient
    from mlflow_fixtures import tracking_at

    emb = pq.read_table(generated["embeddings"]).to_pandas()
    # an external quality that disagrees with the norms: reversed order, another scale
    norms = np.linalg.norm(np.stack(emb["embedding"].to_numpy()), axis=1)
    ext = pd.DataFrame({"path": emb["path"], "ext_q": 3.0 + (norms.max() - norms) * 0.5})
    ext.to_csv(tmp_path / "quality.csv", index=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["identify", "--embeddings", generated["embeddings"], "--gallery"]
    args += [generated["gallery"], "--probes", generated["probes"], "--alpha", str(ALPHA)]
    args += ["--beta", str(BETA), "--output", str(tmp_path / "o"), "--tracking-uri", store]
    args += ["--quality-column", "ext_q", "--quality-file", str(tmp_path / "quality.csv")]
    args += ["--experiment", "ident"]
    with tracking_at(store):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        doc = json.loads((tmp_path / "o" / "metrics.json").read_text())
        # independent reference: the full score matrices with the file's quality
        e = emb.set_index("path")
        q_of = dict(zip(ext["path"], ext["ext_q"], strict=True))
        gal = pd.read_csv(generated["gallery"], keep_default_na=False)
        pro = pd.read_csv(generated["probes"], keep_default_na=False)
        gv = np.stack(e.loc[gal["path"], "embedding"].to_numpy()).astype(np.float64)
        pv = np.stack(e.loc[pro["path"], "embedding"].to_numpy()).astype(np.float64)
        cos = (pv / np.linalg.norm(pv, axis=1)[:, None]) @ (
            gv / np.linalg.norm(gv, axis=1)[:, None]
        ).T
        qg = np.array([q_of[x] for x in gal["path"]])
        qp = np.array([q_of[x] for x in pro["path"]])
        qmag = cos + np.minimum(0.0, BETA * cos - ALPHA) * np.minimum(qp[:, None], qg[None, :])
        g_id = [x or None for x in gal["identity"]]
        cmc, dirs = reference_report(qmag, g_id, list(pro["identity"]))
        got = doc["results"]["overall"]["qmagface"]
        for k, v in cmc.items():
            assert got["cmc"][k] == pytest.approx(v, abs=1e-12), k
        for f, v in dirs.items():
            d = got["dir_at_fpir"][f"{f:.0e}"]["dir"]
            assert (v is None and d is None) or d == pytest.approx(v, abs=1e-12)
        # the norm's ranking gives other lists: the column was really used
        _, qmag_norm = reference_scores(pv, gv)
        assert (np.argmax(qmag, axis=1) != np.argmax(qmag_norm, axis=1)).any()
        assert doc["quality"]["column"] == "ext_q"
        # the MLflow run: settings, metrics as in metrics.json, the result files and plots
        client = MlflowClient(store)
        exp = client.get_experiment_by_name("ident")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.data.tags["qmag_ray.kind"] == "identify"
        assert run.data.params["quality_column"] == "ext_q"
        m = run.data.metrics
        assert m["overall.qmagface.rank_1"] == pytest.approx(got["cmc"]["1"])
        cos_dir = doc["results"]["overall"]["cosine"]["dir_at_fpir"]["1e-01"]["dir"]
        assert m["overall.cosine.dir_at_fpir_1e-01"] == pytest.approx(cos_dir)
        assert m["d1.cosine.rank_5"] == pytest.approx(doc["results"]["d1"]["cosine"]["cmc"]["5"])
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "candidates.parquet", "cmc.png", "dir_fpir.png"} <= files
        assert (tmp_path / "o" / "cmc.png").read_bytes()[:4] == b"\x89PNG"
