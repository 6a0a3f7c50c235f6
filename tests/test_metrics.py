"""Metrics against hand-computed values, the bin-edge conventions, input checks, and the `evaluate` module."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ivon_lora.evaluation.metrics import (
    accuracy,
    brier_score,
    compute_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)

# Worked on paper:
#   example  p                    label  argmax  correct  confidence  bin
#   1        (0.7, 0.2, 0.1)      0      0       yes      0.7         (0.6, 0.7]
#   2        (0.5, 0.25, 0.25)    1      0       no       0.5         (0.4, 0.5]
#   3        (0.2, 0.6, 0.2)      1      1       yes      0.6         (0.5, 0.6]
#   4        (0.1, 0.3, 0.6)      2      2       yes      0.6         (0.5, 0.6]
# ACC = 3/4. ECE = (1·|0 − 0.5| + 2·|1 − 0.6| + 1·|1 − 0.7|) / 4 = 0.4.
# NLL = −(ln 0.7 + ln 0.25 + 2 ln 0.6) / 4. Brier = (0.14 + 0.875 + 0.24 + 0.26) / 4 = 0.37875.
PROBS = [[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]]
LABELS = [0, 1, 1, 2]
EXPECTED = {
    "acc": 75.0,
    "ece": 40.0,
    "nll": -(math.log(0.7) + math.log(0.25) + 2 * math.log(0.6)) / 4,
    "brier": 0.37875,
    "n": 4,
}


@pytest.mark.parametrize(
    "convert",
    [lambda x: x, np.asarray, torch.tensor, lambda x: torch.tensor(x, dtype=torch.float32)],
    ids=["lists", "numpy", "torch-float64", "torch-float32"],
)
def test_hand_computed_example(convert) -> None:
    probs = convert(PROBS)
    labels = torch.tensor(LABELS) if isinstance(probs, torch.Tensor) else LABELS
    result = compute_metrics(probs, labels)
    assert result.keys() == EXPECTED.keys()
    for key, value in EXPECTED.items():
        assert result[key] == pytest.approx(value, rel=1e-6)
    assert accuracy(probs, labels) == pytest.approx(75.0)
    assert expected_calibration_error(probs, labels) == pytest.approx(40.0, rel=1e-6)
    assert negative_log_likelihood(probs, labels) == pytest.approx(EXPECTED["nll"], rel=1e-6)
    assert brier_score(probs, labels) == pytest.approx(0.37875, rel=1e-6)


def test_reliability_bins_of_the_hand_computed_example() -> None:
    bins = reliability_bins(PROBS, LABELS)
    np.testing.assert_array_equal(bins.counts, [0, 0, 0, 0, 1, 2, 1, 0, 0, 0])
    np.testing.assert_allclose(bins.accuracy[4:7], [0.0, 1.0, 1.0])
    np.testing.assert_allclose(bins.confidence[4:7], [0.5, 0.6, 0.7])
    assert np.isnan(bins.accuracy[[0, 1, 2, 3, 7, 8, 9]]).all()  # empty bins have no accuracy
    np.testing.assert_allclose(bins.edges, np.linspace(0, 1, 11))


@pytest.mark.parametrize(
    ("confidence", "expected_bin"),
    [(0.5, 4), (0.7, 6), (0.3, 2), (1.0, 9), (0.1, 0), (0.1000001, 1), (0.55, 5)],
)
def test_bins_are_right_closed(confidence: float, expected_bin: int) -> None:
    # Two classes can't be less confident than 0.5, so pad with zero-probability classes.
    n_classes = 10
    probs = np.zeros((1, n_classes))
    probs[0, 0] = confidence
    probs[0, 1:] = (1 - confidence) / (n_classes - 1)
    counts = reliability_bins(probs, [0]).counts
    assert counts[expected_bin] == 1 and counts.sum() == 1


def test_perfect_calibration_has_zero_ece_and_fewer_bins_change_nothing_here() -> None:
    probs = [[0.75, 0.25]] * 4
    labels = [0, 0, 0, 1]  # 75% right at 75% confidence
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(probs, labels, n_bins=3) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error([[0.75, 0.25]] * 4, [1, 1, 1, 1]) == pytest.approx(75.0)


def test_brier_extremes_and_nll_of_a_zero_probability_stays_finite() -> None:
    assert brier_score([[1.0, 0.0]], [0]) == 0.0
    assert brier_score([[1.0, 0.0]], [1]) == pytest.approx(2.0)  # not divided by the number of classes
    assert brier_score([[0.25] * 4], [0]) == pytest.approx(0.75)
    nll = negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(nll) and nll == pytest.approx(-math.log(torch.finfo(torch.float32).tiny))


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        ([[2.0, -1.0]], [0], "softmax"),
        ([[0.2, 0.2]], [0], "softmax"),
        ([0.5, 0.5], [0], "shape"),
        ([[0.5, 0.5]], [0, 1], "labels must have shape"),
        ([[0.5, 0.5]], [2], "labels must lie in"),
        ([[0.5, 0.5]], [0.0], "integer"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "shape"),
    ],
)
def test_input_mistakes_are_refused_with_a_hint(probs, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(probs, labels)


def test_n_bins_must_be_positive() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(PROBS, LABELS, n_bins=0)


def test_evaluate_module_shares_the_implementation() -> None:
    evaluate = pytest.importorskip("evaluate")
    module = evaluate.load(str(Path(__file__).resolve().parents[1] / "eval" / "metrics" / "calibration"))
    result = module.compute(predictions=PROBS, references=LABELS)
    for key, value in EXPECTED.items():
        assert result[key] == pytest.approx(value, rel=1e-9)
    module.add_batch(predictions=PROBS[:2], references=LABELS[:2])
    module.add_batch(predictions=PROBS[2:], references=LABELS[2:])
    assert module.compute(n_bins=2) == pytest.approx(compute_metrics(PROBS, LABELS, n_bins=2))


def test_reliability_diagrams_are_written_as_png(tmp_path: Path) -> None:
    from matplotlib import image

    from ivon_lora.evaluation.plots import plot_reliability_diagram, plot_reliability_diagrams

    single = plot_reliability_diagram(torch.tensor(PROBS), torch.tensor(LABELS), tmp_path / "one.png", title="AdamW")
    pair = plot_reliability_diagrams(
        {"AdamW": (PROBS, LABELS), "IVON": ([[0.75, 0.25]] * 4, [0, 0, 0, 1])}, tmp_path / "sub" / "two.png"
    )
    assert single.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_panel, two_panels = image.imread(single), image.imread(pair)
    assert two_panels.shape[1] > 1.8 * one_panel.shape[1]  # side by side
    with pytest.raises(ValueError, match="at least one"):
        plot_reliability_diagrams({}, tmp_path / "none.png")
