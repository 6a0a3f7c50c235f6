"""Predictive probabilities on a multiple-choice dataset: at the mean, or averaged over K posterior samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ivon_lora.evaluation.metrics import compute_metrics
from ivon_lora.evaluation.scoring import MultipleChoiceScorer, tile_batch
from ivon_lora.inference import predictive_probabilities
from ivon_lora.posterior import VariationalLoraPosterior

logger = logging.getLogger(__name__)

__all__ = ["Predictions", "predict_multiple_choice"]


@dataclass
class Predictions:
    """Predictive probabilities ``(N, C)``, labels ``(N,)`` and their metrics (acc/ece/nll/brier/n)."""

    probs: np.ndarray
    labels: np.ndarray
    num_samples: int
    scoring_mode: str
    metrics: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = compute_metrics(self.probs, self.labels)


@torch.no_grad()
def predict_multiple_choice(
    model: nn.Module,
    scorer: MultipleChoiceScorer,
    dataset: datasets.Dataset,
    *,
    posterior: VariationalLoraPosterior | None = None,
    num_samples: int = 0,
    batch_size: int = 8,
    max_rows: int | None = None,
    seed: int = 0,
    desc: str | None = None,
) -> Predictions:
    """Score every question; ``num_samples=K > 0`` averages ``softmax`` over K posterior samples per question.

    The K samples of a batch run in one forward of K×B rows (see :mod:`ivon_lora.inference`), chunked to at
    most ``max_rows`` rows. Samples are drawn from a generator seeded with ``seed``, so runs are repeatable.
    """
    if num_samples and posterior is None:
        raise ValueError("num_samples > 0 needs a posterior (VariationalLoraPosterior).")
    if len(dataset) == 0:
        raise ValueError("The evaluation dataset is empty.")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    probs, labels = [], []
    label = desc or (f"eval K={num_samples}" if num_samples else "eval mean")
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=label, unit="batch"):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset)))).to_list()
            batch = scorer.collate(rows)
            labels.append(batch.pop("labels"))
            device = next(model.parameters()).device
            batch = {key: value.to(device) for key, value in batch.items()}
            probs.append(
                predictive_probabilities(
                    lambda b: scorer.choice_logits(model, b),
                    batch,
                    posterior,
                    num_samples,
                    generator=generator,
                    max_rows=max_rows,
                    tile=tile_batch,
                ).cpu()
            )
    finally:
        model.train(was_training)
    return Predictions(
        probs=torch.cat(probs).numpy(), labels=torch.cat(labels).numpy(), num_samples=num_samples, scoring_mode=scorer.mode
    )
