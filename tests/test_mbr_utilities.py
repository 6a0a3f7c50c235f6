"""Utility matrices against independent oracles (sacreBLEU, brute-force loops, hand cases)."""

import random
import sys
import types
from collections import Counter

import numpy as np
import pytest
from sacrebleu.metrics import BLEU, CHRF

from ivon_lora.mbr.utilities import (
    BertScore,
    Bleu,
    ChrF,
    ExactMatch,
    MatrixUtility,
    PairwiseUtility,
    RougeL,
    TokenF1,
    available_utilities,
    clipped_overlap,
    get_utility,
    lcs_length,
    ngram_counts,
    normalize_answer,
    register_utility,
)

_WORDS = [
    *("the", "a", "cat", "dog", "sat", "on", "mat", "Paris", "is", "capital", "of"),
    *("France.", ",", "!", "(hi)", "it's", "1984", "über", "naïve"),
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 12))) for _ in range(n)]
    # Edge cases: empty, shorter than the n-gram orders, whitespace only, a repeated string.
    return [*texts, "", "a", "ab", "  ", "The cat sat.", "The cat sat."]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"word_order": 2},
        {"eps_smoothing": True},
        {"beta": 1, "char_order": 4, "lowercase": True},
        {"whitespace": True},
    ],
)
def test_chrf_matches_sacrebleu_sentence_chrf(kwargs):
    strings = _random_strings(30)
    oracle = CHRF(**kwargs)
    expected = np.array([[oracle.sentence_score(h, [r]).score for r in strings] for h in strings])
    np.testing.assert_allclose(ChrF(**kwargs).matrix(strings, strings) * 100, expected, atol=1e-9)


def test_chrf_rectangular_matches_sacrebleu_and_is_asymmetric():
    hyps, refs = _random_strings(7, seed=1), _random_strings(4, seed=2)
    oracle = CHRF()
    expected = np.array([[oracle.sentence_score(h, [r]).score for r in refs] for h in hyps]) / 100
    got = ChrF().matrix(hyps, refs)
    assert got.shape == (len(hyps), len(refs))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # beta = 2 weighs recall more, so swapping a short and a long string changes the score.
    pair = ChrF().matrix(["cat", "the cat sat"], ["cat", "the cat sat"])
    assert pair[0, 1] != pytest.approx(pair[1, 0])


@pytest.mark.parametrize(("lowercase", "max_order"), [(False, 4), (True, 4), (False, 2)])
def test_bleu_matches_sacrebleu_sentence_bleu(lowercase, max_order):
    strings = _random_strings(30, seed=3)
    oracle = BLEU(effective_order=True, max_ngram_order=max_order, lowercase=lowercase)
    expected = np.array([[oracle.sentence_score(h, [r]).score for r in strings] for h in strings])
    got = Bleu(max_order=max_order, lowercase=lowercase).matrix(strings, strings) * 100
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_ngram_counts_and_clipped_overlap_equal_counter_oracle():
    rng = random.Random(4)
    sequences = [rng.choices(range(5), k=rng.randint(0, 9)) for _ in range(12)]
    counts = ngram_counts([np.array(q) for q in sequences], max_order=3)
    rows, cols = np.array([0, 3, 5, 11]), np.arange(12)
    for n, matrix in enumerate(counts, start=1):
        bags = [Counter(tuple(q[i : i + n]) for i in range(len(q) - n + 1)) for q in sequences]
        np.testing.assert_array_equal(matrix.sum(axis=1), [sum(b.values()) for b in bags])
        expected = [[sum((bags[i] & bags[j]).values()) for j in cols] for i in rows]
        np.testing.assert_array_equal(clipped_overlap(matrix, rows, cols), expected)


def test_exact_match_normalizes_like_squad():
    assert normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    hyps = ["The Cat!", "a cat", "dog", "an"]
    refs = ["cat", "Dog.", ""]
    expected = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    np.testing.assert_array_equal(ExactMatch().matrix(hyps, refs), expected)


def _squad_f1(hyp: str, ref: str) -> float:
    """Plain SQuAD-style token F1, the oracle for the vectorised version."""
    h, r = normalize_answer(hyp).split(), normalize_answer(ref).split()
    if not h or not r:
        return float(h == r)
    common = sum((Counter(h) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(h), common / len(r)
    return 2 * precision * recall / (precision + recall)


def test_token_f1_hand_case_and_oracle():
    # [cat, sat] vs [cat, sat, down]: precision 1, recall 2/3, F1 = 0.8.
    assert TokenF1().matrix(["the cat sat"], ["Cat sat down"])[0, 0] == pytest.approx(0.8)
    strings = [*_random_strings(25, seed=5), "the", "cat cat cat", "cat"]
    expected = [[_squad_f1(h, r) for r in strings] for h in strings]
    np.testing.assert_allclose(TokenF1().matrix(strings, strings), expected, atol=1e-12)


def _lcs_dp(a, b) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            if x == y:
                table[i + 1][j + 1] = table[i][j] + 1
            else:
                table[i + 1][j + 1] = max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_bit_parallel_equals_dynamic_programming():
    rng = random.Random(6)
    for _ in range(300):
        a = rng.choices("abcd", k=rng.randint(0, 15))
        b = rng.choices("abcd", k=rng.randint(0, 70))  # longer than one machine word
        assert lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l_hand_cases():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides: F1 = 5/6.
    got = RougeL().matrix(["The cat sat on the mat."], ["the cat is on the mat", "", "dog"])
    np.testing.assert_allclose(got, [[5 / 6, 0.0, 0.0]])
    # LCS 2 with |hyp| = 2, |ref| = 4: P = 1, R = 0.5, F1 = 2/3.
    assert RougeL().matrix(["a c"], ["a b c d"])[0, 0] == pytest.approx(2 / 3)


def test_each_distinct_pair_is_computed_once_and_expanded():
    calls = Counter()

    def overlap(hyp: str, ref: str) -> float:
        calls[(hyp, ref)] += 1
        return len(set(hyp) & set(ref)) / 10

    hyps = ["ab", "cd", "ab", "ab"]
    refs = ["abc", "ab", "abc"]
    got = get_utility(overlap).matrix(hyps, refs)
    expected = [[overlap(h, r) for r in refs] for h in hyps]
    np.testing.assert_allclose(got, expected)
    # The matrix call above saw every distinct pair exactly once (the loop added one more each).
    assert set(calls) == {(h, r) for h in hyps for r in refs}
    assert calls[("ab", "abc")] == 1 + 6


def test_matrix_utility_sees_distinct_strings_and_shape_is_checked():
    seen = []

    def lengths(hyps, refs):
        seen.append((list(hyps), list(refs)))
        return np.subtract.outer([len(h) for h in hyps], [len(r) for r in refs])

    got = MatrixUtility(lengths).matrix(["a", "bb", "a"], ["ccc", "ccc"])
    np.testing.assert_array_equal(got, [[-2, -2], [-1, -1], [-2, -2]])
    assert seen == [(["a", "bb"], ["ccc"])]
    with pytest.raises(ValueError, match="shape"):
        MatrixUtility(lambda h, r: np.zeros(3)).matrix(["a"], ["b"])


def test_registry_resolves_names_objects_and_callables():
    assert {"chrf", "chrf++", "bleu", "rouge_l", "exact_match", "f1", "bertscore"} <= set(
        available_utilities()
    )
    assert get_utility("chrf++").word_order == 2
    assert get_utility("chrf", beta=1).beta == 1
    chrf = ChrF()
    assert get_utility(chrf) is chrf
    assert isinstance(get_utility(lambda h, r: 1.0), PairwiseUtility)
    with pytest.raises(ValueError, match=r"unknown utility 'chfr'.*chrf"):
        get_utility("chfr")
    with pytest.raises(TypeError, match="keyword arguments"):
        get_utility(chrf, beta=1)
    with pytest.raises(TypeError, match="expected a utility name"):
        get_utility(3)
    with pytest.raises(ValueError, match="already registered"):
        register_utility("chrf", ChrF)


def test_register_custom_utility_by_name():
    register_utility("length_ratio_test", lambda: PairwiseUtility(lambda h, r: len(h) / len(r)))
    got = get_utility("length_ratio_test").matrix(["ab"], ["abcd"])
    np.testing.assert_allclose(got, [[0.5]])


def test_inputs_are_validated():
    with pytest.raises(TypeError, match=r"hyps\[1\] is NoneType"):
        ChrF().matrix(["a", None], ["b"])
    with pytest.raises(TypeError, match="not a single string"):
        ChrF().matrix("abc", ["b"])
    assert ChrF().matrix([], ["a"]).shape == (0, 1)


def test_builtin_utilities_are_in_unit_range_with_self_utility_one():
    strings = [s for s in _random_strings(15, seed=7) if s.strip() and s not in {"a"}]
    for name in ["chrf", "chrf++", "bleu", "rouge_l", "exact_match", "f1"]:
        matrix = get_utility(name).matrix(strings, strings)
        assert matrix.min() >= 0 and matrix.max() <= 1 + 1e-12, name
        np.testing.assert_allclose(np.diag(matrix), 1.0, err_msg=name)


def test_bertscore_is_optional_with_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bert_score", None)
    with pytest.raises(ImportError, match="pip install bert-score"):
        get_utility("bertscore")


def test_bertscore_pairs_map_back_to_the_matrix(monkeypatch):
    class FakeScorer:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def score(self, cands, refs):
            f1 = np.array(
                [len(c) * 10 + len(r) for c, r in zip(cands, refs, strict=True)], dtype=float
            )
            return f1, f1, f1

    monkeypatch.setitem(sys.modules, "bert_score", types.SimpleNamespace(BERTScorer=FakeScorer))
    utility = BertScore()
    assert utility._scorer.kwargs == {"lang": "en"}
    got = utility.matrix(["a", "bbb", "a"], ["cc", "d"])
    np.testing.assert_array_equal(got, [[12, 11], [32, 31], [12, 11]])
