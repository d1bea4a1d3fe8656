"""The comparison score (spec section 2) against values worked by hand.

``s_hat = min(0, beta * s - alpha) * q + s`` with ``q`` the lower of the two faces' qualities.
Every number below is a dyadic fraction, so float64 gives it exactly and the tests compare
with ``==``. alpha = 0.25, beta = 0.5 throughout, so ``omega = 0`` exactly at ``s = 0.5``:

    s       q_a  q_b   q   beta*s - alpha   omega     omega*q + s
    0.75    20   30    20      0.125         0          0.75      (above the knee: unchanged)
    0.5     12    6     6      0             0          0.5       (the knee itself)
    0.375   10   10    10     -0.0625       -0.0625    -0.25
    0.25    16   24    16     -0.125        -0.125     -1.75      (q_a is the lower)
    -0.5     8    4     4     -0.5          -0.5       -2.5       (negative cosine, q_b lower)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from qmag_ray.calibration.result import QMagFaceCalibration
from qmag_ray.calibration.search import sigmoid, weighted_logits, weighted_scores
from qmag_ray.scores import cosine, norms, omega, pair_quality, qmagface_score
from qmag_ray.tracking.scorer import score_frame

ALPHA, BETA = 0.25, 0.5
S = np.array([0.75, 0.5, 0.375, 0.25, -0.5])
QA = np.array([20.0, 12.0, 10.0, 16.0, 8.0])
QB = np.array([30.0, 6.0, 10.0, 24.0, 4.0])
Q = np.array([20.0, 6.0, 10.0, 16.0, 4.0])
OMEGA = np.array([0.0, 0.0, -0.0625, -0.125, -0.5])
S_HAT = np.array([0.75, 0.5, -0.25, -1.75, -2.5])


def test_pair_quality_is_the_lower_of_the_two() -> None:
    np.testing.assert_array_equal(pair_quality(QA, QB), Q)
    np.testing.assert_array_equal(pair_quality(QB, QA), Q)


def test_omega_on_both_sides_of_zero() -> None:
    np.testing.assert_array_equal(omega(S, ALPHA, BETA), OMEGA)
    assert (omega(S, ALPHA, BETA) <= 0).all()


def test_qmagface_score_worked_by_hand() -> None:
    np.testing.assert_array_equal(qmagface_score(S, Q, ALPHA, BETA), S_HAT)
    # Above the knee the quality does not matter at all; below it, it does.
    np.testing.assert_array_equal(qmagface_score(S[:2], Q[:2] * 7, ALPHA, BETA), S[:2])
    assert qmagface_score(S[3:4], Q[3:4] * 2, ALPHA, BETA)[0] == 2 * -0.125 * 16 + 0.25
    # With alpha = beta = 0 it is the cosine.
    np.testing.assert_array_equal(qmagface_score(S, Q, 0.0, 0.0), S)


def test_calibration_scores_with_the_same_formula() -> None:
    cal = QMagFaceCalibration(alpha=ALPHA, beta=BETA)
    np.testing.assert_array_equal(cal.score(S, Q), S_HAT)


def test_cosine_and_norms_worked_by_hand() -> None:
    a = np.array([[3.0, 4.0, 0.0], [1.0, 2.0, 2.0], [1.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    b = np.array([[4.0, 3.0, 0.0], [2.0, -1.0, -2.0], [-2.0, 0.0, 0.0], [8.0, -6.0, 0.0]])
    np.testing.assert_array_equal(norms(a), [5.0, 3.0, 1.0, 5.0])
    np.testing.assert_array_equal(norms(b), [5.0, 3.0, 2.0, 10.0])
    got = cosine(a, b)
    np.testing.assert_allclose(got, [24 / 25, -4 / 9, -1.0, 0.0], rtol=0, atol=1e-15)
    # Scale does not change the cosine (embeddings are unnormalised).
    np.testing.assert_allclose(cosine(a * 7.0, b * 0.5), got, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="one shape"):
        cosine(a, b[:, :2])


def test_scorer_from_embeddings_worked_by_hand() -> None:
    """The served scorer: [3, 4] vs [8, -6] is orthogonal (cos 0), norms 5 and 10, so q = 5
    and s_hat = min(0, 0.5 * 0 - 0.25) * 5 + 0 = -1.25; [3, 4] vs [6, 8] is cos 1, unchanged."""
    cal = QMagFaceCalibration(alpha=ALPHA, beta=BETA, thresholds={"1e-03": -1.0})
    frame = pd.DataFrame(
        {"embedding_a": [[3.0, 4.0], [3.0, 4.0]], "embedding_b": [[8.0, -6.0], [6.0, 8.0]]}
    )
    out = score_frame(cal, frame, fmr=1e-3)
    assert out["score"].tolist() == [-1.25, 1.0]
    assert out["cosine"].tolist() == [0.0, 1.0]
    assert out["quality"].tolist() == [5.0, 5.0]
    assert out["match"].tolist() == [False, True]  # -1.25 < -1.0 <= 1.0
    # The same from scores and the two qualities.
    frame = pd.DataFrame({"cosine": S, "quality_a": QA, "quality_b": QB})
    out = score_frame(cal, frame, fmr=1e-3)
    assert out["score"].tolist() == S_HAT.tolist() and out["quality"].tolist() == Q.tolist()
    assert out["match"].tolist() == [True, True, True, False, False]


def test_sigmoid_and_weighted_scores_worked_by_hand() -> None:
    # sigmoid(ln 3) = 1 / (1 + 1/3) = 3/4; sigmoid(-ln 3) = 1/4; sigmoid(0) = 1/2.
    x = np.array([0.0, math.log(3.0), -math.log(3.0)])
    np.testing.assert_allclose(sigmoid(x), [0.5, 0.75, 0.25], rtol=0, atol=1e-15)
    # w * q + s with w = -0.125: 0.25 - 0.125 * 16 = -1.75 (the omega * q + s of row 4).
    assert weighted_logits(np.array([0.25]), np.array([16.0]), -0.125)[0] == -1.75
    got = weighted_scores(np.array([0.25, 1.0]), np.array([16.0, 0.0]), -0.125)
    np.testing.assert_allclose(got, [1 / (1 + math.exp(1.75)), 1 / (1 + math.exp(-1))], rtol=1e-15)


def test_float32_embeddings_are_scored_in_float64() -> None:
    """Embeddings arrive as float32 (Parquet); norms and cosines are computed in float64, so
    they equal the float64 computation on the same values to the last bits."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 512)).astype(np.float32) * np.float32(20.0)
    b = (a + rng.normal(size=(200, 512)).astype(np.float32)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    n = norms(a)
    assert n.dtype == np.float64
    np.testing.assert_allclose(n, np.sqrt((a64 * a64).sum(axis=1)), rtol=1e-15, atol=0)
    got = cosine(a, b)
    assert got.dtype == np.float64
    want = (a64 * b64).sum(axis=1) / (np.sqrt((a64**2).sum(1)) * np.sqrt((b64**2).sum(1)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    assert pair_quality(np.float32([1.5, 3.0]), [2, 2]).dtype == np.float64


def test_omega_of_float32_cosines_is_computed_in_float64() -> None:
    """float32 0.1 is 0.100000001490116...; in float64, 0.5 * that - 0.25 keeps those bits
    (-0.19999999925494194), where float32 arithmetic would round to float32(-0.2)."""
    s32 = np.array([0.1], np.float32)
    want = 0.5 * float(s32[0]) - 0.25  # Python floats: float64
    got = omega(s32, 0.25, 0.5)
    assert got.dtype == np.float64 and got[0] == want and want != float(np.float32(-0.2))
