"""Accuracy and calibration metrics on predictive probabilities, as small pure functions.

All functions take ``probs`` of shape ``(N, C)`` — the predictive distribution over the C choices, e.g. the
average of K posterior samples' softmaxes — and integer ``labels`` of shape ``(N,)``, as torch tensors, numpy
arrays or nested lists, and return Python floats. The conventions follow the IVON-LoRA papers:

* accuracy and ECE are in **percent**;
* ECE uses 10 equal-width bins over the confidence max_c p_c, bin i covering (i/10, (i+1)/10] (a confidence
  of exactly 0.5 falls in (0.4, 0.5]); ECE = Σ_bins (n_bin / N) · |acc_bin − conf_bin|;
* NLL is −mean log p[label], in nats;
* Brier is the mean over examples of Σ_c (p_c − onehot_c)², *not* divided by C.

Computations run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "ReliabilityBins",
    "accuracy",
    "brier_score",
    "compute_metrics",
    "expected_calibration_error",
    "negative_log_likelihood",
    "reliability_bins",
]

_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics behind ECE and the reliability diagram.

    ``accuracy`` and ``confidence`` are fractions in [0, 1] and NaN for empty bins; bin i covers
    ``(edges[i], edges[i + 1]]``.
    """

    edges: np.ndarray
    counts: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error in percent."""
        filled = self.counts > 0
        weights = self.counts[filled] / self.counts.sum()
        return 100.0 * float(np.sum(weights * np.abs(self.accuracy[filled] - self.confidence[filled])))


def accuracy(probs: Any, labels: Any) -> float:
    """Share of examples whose most probable choice is the label, in percent."""
    p, y = _validated(probs, labels)
    return 100.0 * float(np.mean(p.argmax(axis=1) == y))


def reliability_bins(probs: Any, labels: Any, n_bins: int = 10) -> ReliabilityBins:
    """Group examples into ``n_bins`` equal-width confidence bins, right-closed: (i/n, (i+1)/n]."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    p, y = _validated(probs, labels)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    edges = np.arange(n_bins + 1) / n_bins  # i / n, correctly rounded, so a literal 0.7 lands in (0.6, 0.7]
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_accuracy = np.bincount(index, weights=correct, minlength=n_bins) / counts
        bin_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / counts
    return ReliabilityBins(edges=edges, counts=counts, accuracy=bin_accuracy, confidence=bin_confidence)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Expected calibration error in percent (papers' convention), from :func:`reliability_bins`."""
    return reliability_bins(probs, labels, n_bins).ece


def negative_log_likelihood(probs: Any, labels: Any) -> float:
    """−mean log p[label] in nats.

    A probability that underflowed to exactly 0 is raised to the smallest normal number of the input's float
    type, so one confidently wrong example gives a large but finite value instead of ``inf``.
    """
    p, y = _validated(probs, labels)
    picked = np.maximum(p[np.arange(len(y)), y], _smallest_normal(probs))
    return float(-np.mean(np.log(picked)))


def brier_score(probs: Any, labels: Any) -> float:
    """Mean over examples of Σ_c (p_c − onehot_c)² (in [0, 2]; not divided by the number of choices)."""
    p, y = _validated(probs, labels)
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def compute_metrics(probs: Any, labels: Any, n_bins: int = 10) -> dict[str, float]:
    """``acc`` (%), ``ece`` (%), ``nll`` (nats), ``brier`` and ``n`` (number of examples) in one dict."""
    return {
        "acc": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "n": len(_validated(probs, labels)[1]),
    }


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _smallest_normal(probs: Any) -> float:
    array = _as_numpy(probs)
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float64
    return float(np.finfo(dtype).tiny)


def _validated(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 probabilities and int labels, after checks that catch the usual mix-ups (logits, shapes)."""
    p = _as_numpy(probs).astype(np.float64)
    y = _as_numpy(labels)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs must have shape (N, C) with N, C >= 1, got {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},) to match probs {p.shape}, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}], got values from {y.min()} to {y.max()}")
    if not np.all(np.isfinite(p)) or p.min() < 0 or np.max(np.abs(p.sum(axis=1) - 1)) > _SUM_TOLERANCE:
        raise ValueError(
            "probs must be probabilities (non-negative rows that sum to 1); pass softmax(logits, dim=-1), "
            "averaged over posterior samples if you have several"
        )
    return p, y.astype(np.int64)
