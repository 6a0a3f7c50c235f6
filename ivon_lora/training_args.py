"""Training arguments for IVON-LoRA: ``TrainingArguments`` / TRL's ``SFTConfig`` plus IVON's hyper-parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from ivon_lora.optimizer import _validate_hyperparameters


@dataclass
class IVONArgumentsMixin:
    """IVON fields shared by :class:`VariationalTrainingArguments` and :class:`VariationalSFTConfig`.

    Defaults follow the LoRA setups of Cong et al. (2024): lr 0.03, no weight decay, update clipping 1e-3,
    beta2 0.99999, ``rescale_lr`` off, one Monte-Carlo sample per micro-batch.
    """

    learning_rate: float = field(default=0.03, metadata={"help": "IVON learning rate of the posterior mean (LoRA papers: 0.03)."})
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "IVON's prior precision δ (also regularises the mean). The LoRA papers use 0."},
    )
    max_grad_norm: float = field(
        default=0.0,
        metadata={
            "help": "If > 0, clip the gradient of every Monte-Carlo sample to this norm BEFORE IVON records it "
            "(clipping after recording would change nothing). Off by default: clip_radius bounds IVON's updates."
        },
    )
    ess: float | None = field(
        default=None,
        metadata={
            "help": "Effective sample size (inverse temperature of the posterior). Default: the number of training "
            "examples. The LoRA papers use 1e6-1e8 (ARC/OBQA 1e6, WinoGrande-S/BoolQ 1e7, WinoGrande-M 1e8)."
        },
    )
    hess_init: float = field(default=1e-3, metadata={"help": "Initial Hessian estimate h (LoRA papers: 1e-3 or 3e-4)."})
    beta1: float = field(default=0.9, metadata={"help": "IVON gradient momentum (adam_beta1 is ignored)."})
    beta2: float = field(default=0.99999, metadata={"help": "IVON Hessian averaging (adam_beta2 is ignored)."})
    clip_radius: float = field(default=1e-3, metadata={"help": "Element-wise clip of IVON's update; inf disables."})
    mc_samples: int = field(
        default=1,
        metadata={"help": "Posterior samples per micro-batch. Each gradient-accumulation micro-batch is a sample too."},
    )
    rescale_lr: bool = field(default=False, metadata={"help": "Multiply lr by hess_init + weight_decay (Shen et al.)."})
    ivon_seed: int | None = field(default=None, metadata={"help": "Seed of IVON's noise (default: `seed`)."})
    eval_posterior_samples: int = field(
        default=0,
        metadata={
            "help": "How evaluation uses the posterior: 0 = the mean; K > 0 = average the predictive probabilities "
            "of K posterior samples."
        },
    )

    def __post_init__(self) -> None:
        if getattr(self, "fp16", False):
            raise ValueError(
                "fp16 mixed precision is not supported with IVON: the GradScaler scales gradients (and skips steps on "
                "overflow) before IVON records ε·g, which corrupts the Hessian estimate. Use bf16=True (or fp32)."
            )
        super().__post_init__()  # type: ignore[misc]
        if self.ess is not None:
            _validate_hyperparameters(ess=self.ess)
        _validate_hyperparameters(
            lr=self.learning_rate,
            hess_init=self.hess_init,
            beta1=self.beta1,
            beta2=self.beta2,
            weight_decay=self.weight_decay,
            clip_radius=self.clip_radius,
        )
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {self.mc_samples!r}.")
        if not isinstance(self.eval_posterior_samples, int) or self.eval_posterior_samples < 0:
            raise ValueError(f"eval_posterior_samples must be an integer >= 0, got {self.eval_posterior_samples!r}.")
        if self.max_grad_norm < 0 or math.isnan(self.max_grad_norm):
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}.")

    def ivon_hyperparameters(self, ess: float) -> dict[str, float | int | bool]:
        """Keyword arguments for :class:`ivon_lora.IVON` (also recorded in ``variational_config.json``)."""
        return {
            "lr": self.learning_rate,
            "ess": ess,
            "hess_init": self.hess_init,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "weight_decay": self.weight_decay,
            "mc_samples": self.mc_samples,
            "clip_radius": self.clip_radius,
            "rescale_lr": self.rescale_lr,
            "seed": self.seed if self.ivon_seed is None else self.ivon_seed,
        }


@dataclass
class VariationalTrainingArguments(IVONArgumentsMixin, TrainingArguments):
    """``transformers.TrainingArguments`` for :class:`ivon_lora.VariationalTrainer` (adds IVON's hyper-parameters)."""


@dataclass
class VariationalSFTConfig(IVONArgumentsMixin, SFTConfig):
    """TRL ``SFTConfig`` for :class:`ivon_lora.VariationalSFTTrainer` (adds IVON's hyper-parameters)."""
