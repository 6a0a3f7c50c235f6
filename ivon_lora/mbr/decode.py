"""Uncertainty-aware MBR decoding with abstention: sampling, an estimator and a threshold in one call.

    decisions = mbr_decode(posterior, tokenizer, prompts, method="pooled", utility="chrf")
    threshold = calibrate_threshold([d.score for d in decisions], target_coverage=0.8)   # on held-out prompts
    decisions = mbr_decode(posterior, tokenizer, new_prompts, threshold=threshold)
    answers = [None if d.abstained else d.text for d in decisions]

Methods (Daheim et al., ICLR 2025): ``"plain"`` ordinary MBR over N samples of the mean model; ``"pooled"``
(Eq. 9) and ``"per_model"`` (Eq. 10) over N samples from each of M posterior samples; ``"token_mixture"``
(Eq. 13) ordinary MBR over N samples from the token-level mixture of the M models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from ivon_lora.posterior import VariationalLoraPosterior

from .abstention import abstain
from .estimators import MBRResult, mbr_per_model, mbr_pooled
from .generation import PromptSamples, sample_posterior_outputs
from .utilities import UtilitySpec, get_utility

__all__ = ["MBRDecision", "MBR_METHODS", "decide", "mbr_decode"]

Method = Literal["plain", "pooled", "per_model", "token_mixture"]

# The estimator of each method; on the single model row of "plain" and "token_mixture" pooling is ordinary MBR.
_ESTIMATORS: dict[str, Callable[..., MBRResult]] = {
    "plain": mbr_pooled,
    "pooled": mbr_pooled,
    "per_model": mbr_per_model,
    "token_mixture": mbr_pooled,
}
MBR_METHODS: tuple[str, ...] = tuple(_ESTIMATORS)


@dataclass(frozen=True)
class MBRDecision:
    """The MBR output of one prompt and whether to abstain from it.

    ``score`` is the expected utility of ``text`` (the confidence; higher = more agreement among the samples).
    ``text`` is kept when ``abstained`` so that thresholds can be changed afterwards (``dataclasses.replace``).
    ``candidates`` and ``candidate_scores`` are the distinct sampled strings and their expected utilities;
    ``samples`` holds every sample with its log-likelihood and token entropy (the usual baselines).
    """

    text: str
    score: float
    abstained: bool
    candidates: tuple[str, ...]
    candidate_scores: np.ndarray
    samples: PromptSamples


def decide(
    samples: PromptSamples,
    *,
    method: Method = "pooled",
    utility: UtilitySpec = "chrf",
    threshold: float | None = None,
    include_self: bool = True,
) -> MBRDecision:
    """Pick one prompt's output from its samples with ``method``'s estimator; abstain when its score < threshold."""
    result = _ESTIMATORS[_checked(method)](samples.texts, utility, include_self)
    return MBRDecision(
        text=result.best,
        score=result.score,
        abstained=threshold is not None and bool(abstain(result.score, threshold)),
        candidates=result.candidates,
        candidate_scores=result.scores,
        samples=samples,
    )


def mbr_decode(
    posterior: VariationalLoraPosterior | nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    method: Method = "pooled",
    utility: UtilitySpec = "chrf",
    num_models: int = 4,
    samples_per_model: int = 8,
    threshold: float | None = None,
    include_self: bool = True,
    **sampling: Any,
) -> list[MBRDecision]:
    """Sample, run MBR and decide abstention for every prompt.

    Args:
        posterior: the variational posterior; a plain model only works with ``method="plain"``.
        method: see the module docstring. ``"plain"`` samples ``samples_per_model`` outputs of the mean and
            ignores ``num_models`` (plain MBR with 32 samples: ``samples_per_model=32``).
        utility: a registered utility name (``"chrf"``, ``"bleu"``, ``"rouge_l"``, ``"exact_match"``, ``"f1"``,
            ...), a :class:`~ivon_lora.mbr.utilities.Utility`, or a ``(hyp, ref) -> float`` callable.
        num_models, samples_per_model: M posterior samples and N outputs per sample.
        threshold: abstain when the chosen output's expected utility is below it (``None``: never abstain); get
            one for a target coverage with :func:`~ivon_lora.mbr.abstention.calibrate_threshold` on held-out
            decisions' scores.
        include_self: see :mod:`ivon_lora.mbr.estimators`.
        **sampling: passed to :func:`~ivon_lora.mbr.generation.sample_posterior_outputs` (``max_new_tokens``,
            ``seed``, ``epsilon``, ``max_batch_rows``, ``add_special_tokens``, ``progress``).
    """
    method = _checked(method)
    utility = get_utility(utility)  # resolved once, and a bad one fails before the expensive sampling
    all_samples = sample_posterior_outputs(
        posterior,
        tokenizer,
        prompts,
        num_models=0 if method == "plain" else num_models,
        samples_per_model=samples_per_model,
        token_mixture=method == "token_mixture",
        **sampling,
    )
    return [
        decide(samples, method=method, utility=utility, threshold=threshold, include_self=include_self)
        for samples in all_samples
    ]


def _checked(method: str) -> str:
    if method not in _ESTIMATORS:
        raise ValueError(f"Unknown MBR method {method!r}; choose one of {', '.join(MBR_METHODS)}.")
    return method
