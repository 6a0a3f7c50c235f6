"""Selective prediction: abstain on low-confidence outputs, and metrics to evaluate that.

Every function takes a confidence ``score`` per example where **higher means more confident**:
the MBR expected utility of the chosen output, a sequence log-likelihood, or a negated mean
token entropy all fit. ``quality`` is the per-example quality of the prediction in [0, 1]
(correctness 0/1, exact match, token F1, chrF / 100); risk is 1 - quality.

Ties in the score cannot be split by any threshold. The curve metrics therefore take the
expectation over a random order within tied scores, which makes them independent of the input
order; AUROC counts tied positive/negative pairs as 1/2.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)


def _as_scores(scores: ArrayLike) -> np.ndarray:
    """1-D float array of finite scores (NaN would silently sort to one end)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values; replace them before evaluating")
    return scores


def _as_quality(quality: ArrayLike, n: int) -> np.ndarray:
    quality = np.asarray(quality, dtype=np.float64)
    if quality.shape != (n,):
        raise ValueError(f"quality must have shape ({n},) like scores, got {quality.shape}")
    if np.any(~np.isfinite(quality)) or np.any(quality < 0) or np.any(quality > 1):
        raise ValueError(
            "quality must lie in [0, 1] (correctness, exact match, F1, chrF / 100, ...)"
        )
    return quality


def _kept_count(coverage: float, n: int, name: str) -> int:
    """Smallest number of kept examples k with k / n >= coverage."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {coverage}")
    # Round away float noise (0.7 * 10 = 7.000000000000001) before taking the ceiling.
    return max(1, math.ceil(round(coverage * n, 9)))


def abstain(score: ArrayLike, threshold: float) -> np.ndarray | bool:
    """True where the model should abstain: ``score < threshold`` (a score equal to it is kept)."""
    decision = np.asarray(score, dtype=np.float64) < threshold
    return bool(decision) if decision.ndim == 0 else decision


def calibrate_threshold(scores: ArrayLike, target_coverage: float) -> float:
    """Largest threshold whose coverage on held-out ``scores`` is at least ``target_coverage``.

    The threshold is the k-th largest score with k = ceil(target_coverage · n), so
    :func:`abstain` keeps exactly k of the n held-out examples when that score is not tied with
    a lower-ranked one. Tied scores are kept or rejected together, so ties at the boundary give
    coverage above the target (never below).
    """
    scores = _as_scores(scores)
    k = _kept_count(target_coverage, scores.size, "target_coverage")
    return float(np.sort(scores)[::-1][k - 1])


def risk_coverage_curve(scores: ArrayLike, quality: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Selective risk when keeping the k most confident of n examples, for k = 1..n.

    Returns ``coverage[k-1] = k / n`` and ``risk[k-1]`` = mean of (1 - quality) over the kept
    examples. Within a group of tied scores the kept members are taken in expectation over a
    random order, i.e. the group's mean loss fills the kept slots.
    """
    scores = _as_scores(scores)
    loss = 1.0 - _as_quality(quality, scores.size)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_loss = scores[order], loss[order]
    # Replace every loss by the mean loss of its tie group (expected loss under random order).
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    sizes = np.diff(np.r_[starts, scores.size])
    group_mean = np.add.reduceat(sorted_loss, starts) / sizes
    k = np.arange(1, scores.size + 1)
    risk = np.cumsum(np.repeat(group_mean, sizes)) / k
    return k / scores.size, risk


def aurc(scores: ArrayLike, quality: ArrayLike) -> float:
    """Area under the risk-coverage curve: mean selective risk over k = 1..n (lower is better)."""
    return float(np.mean(risk_coverage_curve(scores, quality)[1]))


def quality_at_coverage(scores: ArrayLike, quality: ArrayLike, coverage: float = 0.8) -> float:
    """Mean quality of the ceil(coverage · n) most confident examples (ties in expectation)."""
    _, risk = risk_coverage_curve(scores, quality)
    k = _kept_count(coverage, risk.size, "coverage")
    return float(1.0 - risk[k - 1])


def auroc(scores: ArrayLike, correct: ArrayLike) -> float:
    """Probability that a random correct example scores above a random wrong one (ties count 1/2).

    Computed from mid-ranks (Mann-Whitney U), O(n log n).
    """
    scores = _as_scores(scores)
    correct = np.asarray(correct)
    if correct.shape != scores.shape or not np.isin(correct, (0, 1)).all():
        raise ValueError("correct must be a 0/1 or boolean array with the same shape as scores")
    correct = correct.astype(bool)
    n_pos = int(correct.sum())
    n_neg = correct.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one correct and one wrong example")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    # Ranks are 1-based; a tie group spanning positions [s, e) gets the mid-rank (s + 1 + e) / 2.
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    u = ranks[correct].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def prediction_rejection_ratio(scores: ArrayLike, quality: ArrayLike) -> float:
    """How much of the oracle's risk reduction the scores achieve when rejecting examples.

    PRR = (AURC_random - AURC(scores)) / (AURC_random - AURC_oracle), where AURC is
    :func:`aurc`, AURC_random = mean(1 - quality) is the expected AURC of a random order (every
    coverage then has the overall risk), and AURC_oracle is the AURC of ordering by the true
    quality. PRR is 1 for an oracle ranking, 0 for a random one, and negative when worse than
    random. This is the selective-risk form (risk over kept examples, as in LM-Polygraph);
    Malinin's original divides the errors by all n examples, which weights coverages differently.
    """
    scores = _as_scores(scores)
    quality = _as_quality(quality, scores.size)
    random_aurc = float(np.mean(1.0 - quality))
    oracle_aurc = aurc(quality, quality)
    if math.isclose(random_aurc, oracle_aurc, abs_tol=1e-12):
        raise ValueError("PRR is undefined when every example has the same quality")
    return (random_aurc - aurc(scores, quality)) / (random_aurc - oracle_aurc)


def plot_risk_coverage(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | Path,
    title: str = "Risk-coverage",
) -> Path:
    """Draw named curves from :func:`risk_coverage_curve` into one PNG.

    The legend shows each curve's AURC as the mean risk over its points, which is :func:`aurc`
    for curves on the k / n coverage grid that :func:`risk_coverage_curve` returns.

    Uses matplotlib's object API with the Agg canvas, so it works headless and leaves the global
    pyplot state alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("curves is empty; pass {name: (coverage, risk)}")
    fig = Figure(figsize=(5.5, 4.5), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (coverage, risk) in curves.items():
        coverage, risk = np.asarray(coverage), np.asarray(risk)
        if coverage.shape != risk.shape:
            raise ValueError(f"curve {name!r}: coverage and risk differ in shape")
        ax.plot(coverage, risk, label=f"{name} (AURC {np.mean(risk):.3f})", linewidth=1.5)
    ax.set_xlabel("coverage (fraction answered)")
    ax.set_ylabel("risk (1 - quality) of answered")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    # Below the axes: risk curves fill every corner of the plot between them.
    fig.legend(loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    logger.info("wrote risk-coverage plot to %s", path)
    return path
