"""Uncertainty-aware minimum Bayes risk decoding and selective prediction.

``generation`` samples the hypotheses of all posterior models in batched ``generate`` calls,
``utilities`` builds pairwise utility matrices, ``estimators`` picks outputs from samples of
one or several posterior models, ``abstention`` turns the chosen output's expected utility
into abstain/answer decisions and evaluates them, and ``decode`` glues them together
(:func:`mbr_decode`).
"""

from .abstention import (
    abstain,
    aurc,
    auroc,
    calibrate_threshold,
    plot_risk_coverage,
    prediction_rejection_ratio,
    quality_at_coverage,
    risk_coverage_curve,
)
from .decode import MBR_METHODS, MBRDecision, decide, mbr_decode
from .estimators import MBRResult, mbr, mbr_per_model, mbr_pooled
from .generation import (
    PromptSamples,
    RowSampler,
    SampleStatistics,
    greedy_outputs,
    row_seed,
    sample_posterior_outputs,
)
from .utilities import (
    BertScore,
    Bleu,
    ChrF,
    DedupUtility,
    ExactMatch,
    MatrixUtility,
    PairwiseUtility,
    RougeL,
    TokenF1,
    Utility,
    available_utilities,
    get_utility,
    normalize_answer,
    register_utility,
)

__all__ = [
    "BertScore",
    "Bleu",
    "ChrF",
    "DedupUtility",
    "ExactMatch",
    "MBRDecision",
    "MBRResult",
    "MBR_METHODS",
    "MatrixUtility",
    "PairwiseUtility",
    "PromptSamples",
    "RougeL",
    "RowSampler",
    "SampleStatistics",
    "TokenF1",
    "Utility",
    "abstain",
    "aurc",
    "auroc",
    "available_utilities",
    "calibrate_threshold",
    "decide",
    "get_utility",
    "greedy_outputs",
    "mbr",
    "mbr_decode",
    "mbr_per_model",
    "mbr_pooled",
    "normalize_answer",
    "plot_risk_coverage",
    "prediction_rejection_ratio",
    "quality_at_coverage",
    "register_utility",
    "risk_coverage_curve",
    "row_seed",
    "sample_posterior_outputs",
]
