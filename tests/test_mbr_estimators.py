"""MBR estimators on hand-made utility tables, against brute-force (non-deduplicated) oracles."""

import random

import numpy as np
import pytest

from ivon_lora.mbr.estimators import mbr, mbr_per_model, mbr_pooled
from ivon_lora.mbr.utilities import ChrF, PairwiseUtility

# u(hyp, ref) on three strings; deliberately asymmetric, self-utility 1.
_TABLE = {
    ("a", "a"): 1.0, ("a", "b"): 0.5, ("a", "c"): 0.0,
    ("b", "a"): 0.4, ("b", "b"): 1.0, ("b", "c"): 0.9,
    ("c", "a"): 0.1, ("c", "b"): 0.8, ("c", "c"): 1.0,
}  # fmt: skip
TABLE = PairwiseUtility(lambda h, r: _TABLE[(h, r)], name="table")


def test_plain_mbr_hand_case_with_and_without_self():
    samples = ["a", "a", "b", "c"]
    # a: (1 + 1 + 0.5 + 0) / 4 = 0.625; b: (0.4 + 0.4 + 1 + 0.9) / 4 = 0.675;
    # c: (0.1 + 0.1 + 0.8 + 1) / 4 = 0.5.
    result = mbr(samples, utility=TABLE)
    assert result.candidates == ("a", "b", "c")
    np.testing.assert_allclose(result.scores, [0.625, 0.675, 0.5])
    assert (result.best, result.score) == ("b", pytest.approx(0.675))
    # Leave one occurrence out: a: (1 + 0.5 + 0) / 3 = 0.5; b: (0.4 + 0.4 + 0.9) / 3;
    # c: (0.1 + 0.1 + 0.8) / 3.
    loo = mbr(samples, utility=TABLE, include_self=False)
    np.testing.assert_allclose(loo.scores, [0.5, 1.7 / 3, 1.0 / 3])
    assert loo.best == "b"


def test_explicit_references():
    result = mbr(["c", "a", "c"], references=["b", "b", "a"], utility=TABLE)
    # c: (0.8 + 0.8 + 0.1) / 3; a: (0.5 + 0.5 + 1) / 3.
    assert result.candidates == ("c", "a")
    np.testing.assert_allclose(result.scores, [1.7 / 3, 2.0 / 3])
    assert result.best == "a"
    with pytest.raises(ValueError, match="include_self=False only applies"):
        mbr(["a"], references=["b"], utility=TABLE, include_self=False)


def test_pooled_hand_case_equals_mbr_on_the_pool():
    samples = [["a", "b"], ["a", "c"]]
    # Pool {a, a, b, c}: the plain hand case above.
    result = mbr_pooled(samples, utility=TABLE)
    np.testing.assert_allclose(result.scores, [0.625, 0.675, 0.5])
    assert result.best == "b"


def test_per_model_hand_case():
    samples = [["a", "b"], ["a", "c"]]
    # Model 0 on {a, b}: EU(a) = 0.75, EU(b) = 0.7. Model 1 on {a, c}: EU(a) = 0.5, EU(c) = 0.55.
    # Scores with weights 1/2 over the producing models: a = (0.75 + 0.5) / 2, b = 0.35, c = 0.275.
    result = mbr_per_model(samples, utility=TABLE)
    assert result.candidates == ("a", "b", "c")
    np.testing.assert_allclose(result.scores, [0.625, 0.35, 0.275])
    assert (result.best, result.score) == ("a", pytest.approx(0.625))
    # Pooling prefers b (high utility against everything); per-model prefers a (both models
    # sampled it).
    assert mbr_pooled(samples, utility=TABLE).best == "b"
    # Leave-one-out: model 0 a -> u(a, b) = 0.5, b -> 0.4; model 1 a -> 0.0, c -> 0.1.
    loo = mbr_per_model(samples, utility=TABLE, include_self=False)
    np.testing.assert_allclose(loo.scores, [0.25, 0.2, 0.05])


def _random_model_samples(m: int, n: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    pool = ["the cat sat", "a cat sat", "the dog sat", "cat", "the cat sat on the mat", ""]
    return [[rng.choice(pool) for _ in range(n)] for _ in range(m)]


@pytest.mark.parametrize("include_self", [True, False])
def test_single_model_reduces_exactly_to_plain_mbr(include_self):
    samples = _random_model_samples(1, 9, seed=0)
    plain = mbr(samples[0], include_self=include_self)
    for estimator in (mbr_pooled, mbr_per_model):
        result = estimator(samples, include_self=include_self)
        assert result.candidates == plain.candidates
        np.testing.assert_array_equal(result.scores, plain.scores)
        assert (result.best, result.score) == (plain.best, plain.score)


def _brute_force_pooled(samples, utility, include_self):
    """Eq. 9 over the raw multiset, one utility call per (hypothesis, reference) occurrence."""
    flat = [s for model in samples for s in model]
    scores = {}
    for i, hyp in enumerate(flat):
        refs = [r for j, r in enumerate(flat) if include_self or j != i]
        scores[hyp] = np.mean([utility(hyp, r) for r in refs])
    return scores


def _brute_force_per_model(samples, utility, include_self):
    """Eq. 10 over the raw samples: sum over producing models of EU_m, weights 1/M."""
    scores = {}
    for model in samples:
        per_model = {}
        for i, hyp in enumerate(model):
            refs = [r for j, r in enumerate(model) if include_self or j != i]
            per_model[hyp] = np.mean([utility(hyp, r) for r in refs])
        for hyp, value in per_model.items():
            scores[hyp] = scores.get(hyp, 0.0) + value / len(samples)
    return scores


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize(
    ("estimator", "oracle"),
    [(mbr_pooled, _brute_force_pooled), (mbr_per_model, _brute_force_per_model)],
)
def test_deduplicated_equals_raw_multiset_computation(estimator, oracle, include_self):
    samples = _random_model_samples(4, 6, seed=1)
    samples[2][3] = samples[2][4] = "only in model two"
    chrf = ChrF()

    def pair(hyp: str, ref: str) -> float:
        return float(chrf.matrix([hyp], [ref])[0, 0])

    expected = oracle(samples, pair, include_self)
    result = estimator(samples, utility=chrf, include_self=include_self)
    assert set(result.candidates) == set(expected)
    np.testing.assert_allclose(
        result.scores, [expected[c] for c in result.candidates], rtol=0, atol=1e-12
    )
    assert result.score == pytest.approx(max(expected.values()), abs=1e-12)


def test_unequal_sample_counts_per_model():
    samples = [["a", "a", "a", "b"], ["c"]]
    # Model 0: EU(a) = (3 + 0.5) / 4, EU(b) = (3 * 0.4 + 1) / 4; model 1: EU(c) = 1.
    result = mbr_per_model(samples, utility=TABLE)
    np.testing.assert_allclose(result.scores, [3.5 / 8, 2.2 / 8, 0.5])
    with pytest.raises(ValueError, match="N >= 2"):
        mbr_per_model(samples, utility=TABLE, include_self=False)


def test_ties_go_to_the_first_sampled_candidate():
    result = mbr_pooled([["y", "x"], ["x", "y"]], utility=lambda h, r: 1.0)
    assert result.best == "y"


def test_input_errors_are_clear():
    with pytest.raises(TypeError, match="nested"):
        mbr_pooled(["a", "b"])
    with pytest.raises(ValueError, match="non-empty"):
        mbr_per_model([])
    with pytest.raises(ValueError, match="model 1 has no samples"):
        mbr_pooled([["a"], []])
    with pytest.raises(TypeError, match=r"samples\[0\]\[1\] is NoneType"):
        mbr(["a", None])
    with pytest.raises(TypeError, match="single string"):
        mbr("abc")
