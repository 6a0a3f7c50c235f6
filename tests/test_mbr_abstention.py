"""Selective-prediction metrics on constructed cases and against brute-force oracles."""

import itertools

import numpy as np
import pytest

from ivon_lora.mbr.abstention import (
    abstain,
    aurc,
    auroc,
    calibrate_threshold,
    plot_risk_coverage,
    prediction_rejection_ratio,
    quality_at_coverage,
    risk_coverage_curve,
)


def test_abstain_keeps_scores_equal_to_the_threshold():
    assert abstain(0.2, 0.5) is True
    assert abstain(0.5, 0.5) is False
    np.testing.assert_array_equal(abstain([0.1, 0.5, 0.9], 0.5), [True, False, False])


def test_calibrate_threshold_gives_exact_coverage_without_ties():
    scores = np.random.default_rng(0).permutation(np.arange(10) / 10)
    threshold = calibrate_threshold(scores, 0.7)
    assert threshold == pytest.approx(0.3)  # the 7th largest of 0.0 .. 0.9
    assert np.mean(~abstain(scores, threshold)) == 0.7
    assert calibrate_threshold(scores, 1.0) == 0.0
    # 0.25 * 10 = 2.5 answers are impossible: round up to 3.
    assert np.mean(~abstain(scores, calibrate_threshold(scores, 0.25))) == 0.3


def test_calibrate_threshold_ties_give_coverage_at_least_target():
    scores = [0.9, 0.5, 0.5, 0.5, 0.1]
    threshold = calibrate_threshold(scores, 0.4)
    assert threshold == 0.5
    assert np.mean(~abstain(scores, threshold)) == 0.8
    with pytest.raises(ValueError, match="target_coverage"):
        calibrate_threshold(scores, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        calibrate_threshold([0.1, float("nan")], 0.5)


def test_risk_coverage_curve_hand_case():
    scores = [0.9, 0.1, 0.5, 0.7]
    quality = [1.0, 0.0, 0.0, 0.5]
    # Order by score: losses 0, 0.5, 1, 1 -> running means 0, 0.25, 0.5, 0.625.
    coverage, risk = risk_coverage_curve(scores, quality)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.25, 0.5, 0.625])
    assert aurc(scores, quality) == pytest.approx(1.375 / 4)
    assert quality_at_coverage(scores, quality, 0.5) == pytest.approx(0.75)
    assert quality_at_coverage(scores, quality, 0.6) == pytest.approx(0.5)  # ceil(2.4) = 3


def test_ties_are_the_expectation_over_random_orders():
    scores = np.array([0.3, 0.8, 0.3, 0.3, 0.8, 0.1])
    quality = np.array([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    curves = []
    for perm in itertools.permutations(range(scores.size)):
        perm = np.array(perm)
        order = perm[np.argsort(-scores[perm], kind="stable")]
        losses = 1.0 - quality[order]
        curves.append(np.cumsum(losses) / np.arange(1, scores.size + 1))
    _, risk = risk_coverage_curve(scores, quality)
    np.testing.assert_allclose(risk, np.mean(curves, axis=0), atol=1e-12)


def _auroc_pairwise(scores, correct):
    pos = [s for s, c in zip(scores, correct, strict=True) if c]
    neg = [s for s, c in zip(scores, correct, strict=True) if not c]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_oracle_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores = rng.integers(0, 5, size=30).astype(float)  # many ties
        correct = rng.random(30) < 0.4
        if correct.all() or not correct.any():
            continue
        assert auroc(scores, correct) == pytest.approx(_auroc_pairwise(scores, correct))
    assert auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    with pytest.raises(ValueError, match="at least one correct and one wrong"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2], [0.5, 1])


def test_prediction_rejection_ratio_constructed_case():
    quality = np.array([1.0, 0.0, 1.0, 0.0])
    # Random: AURC = 0.5. Oracle order (losses 0, 0, 1, 1): risks 0, 0, 1/3, 1/2 -> AURC = 5/24.
    assert prediction_rejection_ratio(quality, quality) == pytest.approx(1.0)
    # Worst order (losses 1, 1, 0, 0): risks 1, 1, 2/3, 1/2 -> AURC = 19/24,
    # PRR = (12/24 - 19/24) / (12/24 - 5/24) = -1.
    assert prediction_rejection_ratio(-quality, quality) == pytest.approx(-1.0)
    # Losses 0, 1, 0, 1: risks 0, 1/2, 1/3, 1/2 -> AURC = 8/24, PRR = 4/7.
    assert prediction_rejection_ratio([4, 3, 2, 1], quality) == pytest.approx(4 / 7)
    # One tie group = random order: PRR exactly 0.
    assert prediction_rejection_ratio(np.zeros(4), quality) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same quality"):
        prediction_rejection_ratio([1, 2, 3], [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prediction_rejection_ratio([1, 2], [0, 100])


def test_plot_risk_coverage_writes_a_png(tmp_path):
    rng = np.random.default_rng(2)
    quality = (rng.random(200) < 0.6).astype(float)
    informative = quality + rng.normal(0, 0.7, size=200)
    curves = {
        "informative score": risk_coverage_curve(informative, quality),
        "random score": risk_coverage_curve(rng.random(200), quality),
        "oracle": risk_coverage_curve(quality, quality),
    }
    path = plot_risk_coverage(curves, tmp_path / "plots" / "rc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty"):
        plot_risk_coverage({}, tmp_path / "empty.png")
