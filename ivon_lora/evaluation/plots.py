"""Reliability diagrams: per-bin accuracy against confidence, with bin counts and ECE, written as PNG.

The bins are those of :func:`ivon_lora.evaluation.metrics.reliability_bins`, so the picture and the reported
ECE come from one computation. Several models can be drawn side by side (same axes) for comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ivon_lora.evaluation.metrics import accuracy, reliability_bins  # noqa: E402

__all__ = ["plot_reliability_diagram", "plot_reliability_diagrams"]

logger = logging.getLogger(__name__)


def plot_reliability_diagram(
    probs: Any, labels: Any, path: str | Path, title: str | None = None, n_bins: int = 10
) -> Path:
    """Draw one model's reliability diagram to ``path`` (PNG) and return the path."""
    return plot_reliability_diagrams({title or "model": (probs, labels)}, path, n_bins=n_bins)


def plot_reliability_diagrams(
    results: Mapping[str, tuple[Any, Any]], path: str | Path, title: str | None = None, n_bins: int = 10
) -> Path:
    """Draw one panel per model (``name -> (probs, labels)``), side by side, to ``path`` (PNG)."""
    if not results:
        raise ValueError("results is empty: pass at least one name -> (probs, labels)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 4.8), squeeze=False, sharey=True)
    for ax, (name, (probs, labels)) in zip(axes[0], results.items()):
        _draw_panel(ax, name, probs, labels, n_bins)
    axes[0][0].set_ylabel("accuracy in bin")
    if title:
        figure.suptitle(title, fontsize=13)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    logger.info("Wrote reliability diagram %s", path)
    return path


def _draw_panel(ax: plt.Axes, name: str, probs: Any, labels: Any, n_bins: int) -> None:
    bins = reliability_bins(probs, labels, n_bins)
    width = 1.0 / n_bins
    lefts = bins.edges[:-1]
    filled = bins.counts > 0
    bar_accuracy = np.where(filled, bins.accuracy, 0.0)
    gap_bottom = np.where(filled, np.minimum(bins.accuracy, bins.confidence), 0.0)
    gap_height = np.where(filled, np.abs(bins.accuracy - bins.confidence), 0.0)

    ax.bar(lefts, bar_accuracy, width=width, align="edge", color="#4C72B0", edgecolor="black", label="accuracy")
    ax.bar(lefts, gap_height, bottom=gap_bottom, width=width, align="edge", color="#DD8452", alpha=0.35,
           edgecolor="#C44E52", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.plot(bins.confidence[filled], bins.accuracy[filled], "o", color="black", markersize=3, label="(conf, acc)")
    for left, count, height in zip(lefts, bins.counts, np.maximum(bar_accuracy, gap_bottom + gap_height)):
        if count:
            ax.text(left + width / 2, min(height, 1.0) + 0.015, str(count), ha="center", va="bottom", fontsize=7)

    n = int(bins.counts.sum())
    ax.set_title(f"{name}\nACC {accuracy(probs, labels):.1f}%  ECE {bins.ece:.1f}%  (N={n})", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.1)
    ax.set_xticks(bins.edges[:: max(1, n_bins // 5)])
    ax.set_xlabel("confidence (max p); numbers: examples per bin")
    ax.set_aspect("equal", adjustable="box")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
