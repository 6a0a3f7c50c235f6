"""Minimum Bayes risk estimators, plain and uncertainty-aware (Daheim et al., ICLR 2025).

Input is only strings: ``samples[m]`` holds the N outputs sampled from posterior sample θ_m
(M = 1 for ordinary MBR). Generation is done elsewhere.

Conventions shared by all estimators:

* **Deduplication.** Identical strings are merged with counts; the utility matrix is computed
  over distinct strings only and expected utilities are count-weighted means, which equals the
  computation over the raw multiset.
* **Self-utility.** With ``include_self=True`` (default, the estimators as written in the paper)
  a hypothesis is also scored against its own occurrence among the pseudo-references, so the
  references are exactly the sampled multiset. With ``include_self=False`` one occurrence of the
  hypothesis is left out (a leave-one-out mean over the other N - 1 samples), which removes the
  u(y, y) bonus that lifts every score by about 1/N; this needs N >= 2.
* **Ties** between candidates go to the one sampled first (model 0's samples first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .utilities import UtilitySpec, get_utility, unique_with_inverse


@dataclass(frozen=True)
class MBRResult:
    """Outcome of an MBR estimator.

    ``score`` is the chosen candidate's expected utility, the confidence used for abstention.
    ``candidates`` are the distinct candidate strings in first-seen order with their scores.
    """

    best: str
    score: float
    candidates: tuple[str, ...]
    scores: np.ndarray


def _dedupe_models(samples: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Distinct strings over all models and the (M, U) count of each string per model."""
    if isinstance(samples, str) or not samples:
        raise ValueError("samples must be a non-empty list with one list of strings per model")
    flat: list[str] = []
    owners: list[int] = []
    for m, model_samples in enumerate(samples):
        if isinstance(model_samples, str):
            raise TypeError(
                "samples must be nested: one list of strings per posterior sample "
                "(wrap a single model's samples as [samples], or call mbr())"
            )
        if not model_samples:
            raise ValueError(f"model {m} has no samples")
        for i, text in enumerate(model_samples):
            if not isinstance(text, str):
                raise TypeError(f"samples[{m}][{i}] is {type(text).__name__}, expected str")
        flat.extend(model_samples)
        owners.extend([m] * len(model_samples))
    strings, inverse = unique_with_inverse(flat)
    counts = np.zeros((len(samples), len(strings)))
    np.add.at(counts, (np.asarray(owners), inverse), 1.0)
    return strings, counts


def _expected_utilities(
    matrix: np.ndarray, ref_counts: np.ndarray, include_self: bool
) -> np.ndarray:
    """Count-weighted mean utility of every candidate against each reference multiset.

    ``matrix`` is (C, U) over distinct strings and ``ref_counts`` is (K, U); returns (C, K).
    Leaving self out assumes candidate i is distinct string i and occurs in every multiset it is
    scored against (callers mask the other entries).
    """
    totals = ref_counts.sum(axis=1)
    sums = matrix @ ref_counts.T
    if include_self:
        return sums / totals
    if np.any(totals < 2):
        raise ValueError("include_self=False leaves one sample out, so it needs N >= 2 per model")
    return (sums - np.diag(matrix)[:, None]) / (totals - 1)


def _result(strings: Sequence[str], scores: np.ndarray) -> MBRResult:
    best = int(np.argmax(scores))
    return MBRResult(
        best=strings[best], score=float(scores[best]), candidates=tuple(strings), scores=scores
    )


def mbr_pooled(
    samples: Sequence[Sequence[str]], utility: UtilitySpec = "chrf", include_self: bool = True
) -> MBRResult:
    """Sequence-level pooling (Eq. 9): MBR over the multiset of all M·N samples.

    Every pooled sample is a candidate and is scored by its mean utility against all pooled
    pseudo-references. With unequal sample counts each model is weighted by its count.
    """
    strings, counts = _dedupe_models(samples)
    matrix = get_utility(utility).matrix(strings, strings)
    pooled = counts.sum(axis=0, keepdims=True)
    return _result(strings, _expected_utilities(matrix, pooled, include_self)[:, 0])


def mbr_per_model(
    samples: Sequence[Sequence[str]], utility: UtilitySpec = "chrf", include_self: bool = True
) -> MBRResult:
    """Per-model expected utility (Eq. 10).

    Model m scores each of its own samples y by the mean utility against its own N samples,
    EU_m(y). The candidates are all strings any model produced, and a string's score is
    (1/M) · Σ_{m produced y} EU_m(y): the paper's equal model weights 1/M, summed over the
    producing models only. Summing (rather than averaging over the producers) rewards strings
    that several posterior samples agree on, which is what carries the epistemic uncertainty;
    the constant 1/M keeps scores on the utility's scale, so one abstention threshold works for
    any M, and makes M = 1 exactly plain MBR.
    """
    strings, counts = _dedupe_models(samples)
    matrix = get_utility(utility).matrix(strings, strings)
    per_model = _expected_utilities(matrix, counts, include_self)  # (U, M)
    produced = (counts > 0).T
    scores = np.where(produced, per_model, 0.0).sum(axis=1) / counts.shape[0]
    return _result(strings, scores)


def mbr(
    hypotheses: Sequence[str],
    references: Sequence[str] | None = None,
    utility: UtilitySpec = "chrf",
    include_self: bool = True,
) -> MBRResult:
    """Ordinary MBR: pick the hypothesis with the highest mean utility against the references.

    Without ``references`` the hypotheses double as pseudo-references (the usual sampling-based
    MBR, identical to :func:`mbr_pooled` and :func:`mbr_per_model` with M = 1). Separate
    references (e.g. beam candidates scored against samples) keep all hypothesis-reference
    pairs, so ``include_self=False`` is only meaningful without them.
    """
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a list of strings, not a single string")
    if references is None:
        return mbr_pooled([hypotheses], utility, include_self)
    if not include_self:
        raise ValueError(
            "include_self=False only applies when the hypotheses are also the references"
        )
    hyp_strings, _ = _dedupe_models([hypotheses])
    ref_strings, ref_counts = _dedupe_models([references])
    matrix = get_utility(utility).matrix(hyp_strings, ref_strings)
    return _result(hyp_strings, _expected_utilities(matrix, ref_counts, True)[:, 0])
