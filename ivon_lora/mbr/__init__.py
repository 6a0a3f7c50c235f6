"""Uncertainty-aware minimum Bayes risk decoding and selective prediction.

``utilities`` builds pairwise utility matrices, ``estimators`` picks outputs from samples of
one or several posterior models, and ``abstention`` turns the chosen output's expected utility
into abstain/answer decisions and evaluates them.
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
from .estimators import MBRResult, mbr, mbr_per_model, mbr_pooled
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
    "MBRResult",
    "MatrixUtility",
    "PairwiseUtility",
    "RougeL",
    "TokenF1",
    "Utility",
    "abstain",
    "aurc",
    "auroc",
    "available_utilities",
    "calibrate_threshold",
    "get_utility",
    "mbr",
    "mbr_per_model",
    "mbr_pooled",
    "normalize_answer",
    "plot_risk_coverage",
    "prediction_rejection_ratio",
    "quality_at_coverage",
    "register_utility",
    "risk_coverage_curve",
]
