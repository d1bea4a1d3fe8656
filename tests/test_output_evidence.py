"""Reports state their evidence: false matches behind each held-out FNMR, plot titles that say
which pairs they show, EDC curves that stop where too few false matches remain, and a warning
for a label-sorted generic pair list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qmag_ray import plots
from qmag_ray.validation import FmrRow, Guard, HeldOutComparison
from qmag_ray.workflows.evaluate import sorted_by_label_note


def validation(n_impostor: int, fmrs: list[float]) -> HeldOutComparison:
    rows = tuple(FmrRow(f, True, 0.5, 0.4) for f in fmrs)
    return HeldOutComparison(100, n_impostor, rows, None, None, Guard(True, ()))


def test_held_out_table_shows_the_false_matches_and_marks_fewer_than_ten() -> None:
    text = validation(90_000, [1.12e-5, 1e-4, 1e-3]).table()
    lines = text.splitlines()
    assert lines[1].split()[-2:] == ["false", "matches"]
    # by hand: floor(1.12e-5 * 90000) = 1, floor(1e-4 * 90000) = 9, floor(1e-3 * 90000) = 90
    assert lines[3].split() == ["1.12e-05", "50.000", "40.000", "1*"]
    assert lines[4].split() == ["1e-04", "50.000", "40.000", "9*"]
    assert lines[5].split() == ["1e-03", "50.000", "40.000", "90"]
    assert "* fewer than 10 false matches" in text
    assert "*" not in validation(90_000, [1e-3, 1e-2]).table()


@pytest.fixture()
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The matplotlib figures the plot functions would save (kept open for inspection)."""
    kept: list = []
    monkeypatch.setattr(plots, "_save", lambda fig, uri: kept.append(fig) or uri)
    return kept


def test_plot_titles_name_the_subset_and_the_pair_counts(figures: list, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30, int), np.zeros(270, int)]
    cos = rng.normal(size=300) + y
    q = rng.uniform(10, 30, 300)
    plots.write_plots(str(tmp_path), labels=y, quality=q, scores={"cosine": cos}, subset="held-out")
    titles = [fig.axes[0].get_title() for fig in figures]
    assert titles == [
        "DET (held-out, 30 genuine / 270 impostor pairs)",
        "Pair quality (held-out, 30 genuine / 270 impostor pairs)",
    ]


def test_edc_stops_where_fewer_than_ten_false_matches_remain(figures: list) -> None:
    curve = {
        "fmr": 1e-2,
        "discard": [0.0, 0.1, 0.2, 0.4],
        "kept_genuine": [50, 45, 40, 30],
        "kept_impostor": [2000, 1500, 999, 400],  # x 1e-2: 20, 15, 9.99, 4 false matches
        "fnmr_rederived": [0.3, 0.25, 0.2, 0.1],
        "fnmr_fixed_threshold": [0.3, 0.26, 0.21, 0.12],
    }
    plots.edc("unused.png", {"cosine": curve}, subset="in-sample")
    ax = figures[0].axes[0]
    assert ax.get_title() == "Error versus discard (in-sample, 50 genuine / 2000 impostor pairs)"
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), float)
        assert np.isfinite(y[:2]).all() and np.isnan(y[2:]).all()
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["stops before 20% discarded: fewer than 10 false matches at FMR 0.01 remain"]


def test_a_label_sorted_generic_list_is_warned_about() -> None:
    sorted_y = np.r_[np.ones(50, int), np.zeros(50, int)]
    note = sorted_by_label_note(sorted_y, "generic")
    assert note is not None and "sorted by label" in note and "shuffle" in note
    assert sorted_by_label_note(sorted_y[::-1], "generic") is not None
    mixed = np.random.default_rng(1).permutation(sorted_y)
    assert sorted_by_label_note(mixed, "generic") is None
    assert sorted_by_label_note(sorted_y, "lfw") is None  # benchmark files define their folds


def test_report_table_states_the_false_matches_of_each_fnmr() -> None:
    from qmag_ray import metrics

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(300, int), np.zeros(3000, int)]
    s = rng.normal(size=3300) + 2 * y
    table = metrics.format_table(metrics.verification_report(s, s, y, rng.uniform(10, 30, 3300)))
    rows = {ln.split(" [")[0]: ln for ln in table.splitlines() if ln.startswith("FNMR % @ FMR")}
    # by hand: 3000 impostors x 1e-1, 1e-2, 1e-3 = 300, 30, 3 false matches; 1e-4 unmeasured
    assert "[300 false matches]" in rows["FNMR % @ FMR 1e-01"]
    assert "[30 false matches]" in rows["FNMR % @ FMR 1e-02"]
    assert "[3* false matches]" in rows["FNMR % @ FMR 1e-03"]
    unmeasured = [ln for ln in table.splitlines() if ln.startswith("FNMR % @ FMR 1e-04")]
    assert len(unmeasured) == 1 and "false matches" not in unmeasured[0]
    assert table.splitlines()[-1] == "* fewer than 10 false matches: that FNMR is a rough figure"
