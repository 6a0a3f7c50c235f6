"""``VariationalTrainer`` and ``VariationalSFTTrainer``: IVON-LoRA through the Hugging Face Trainer.

Both are the stock trainers with one shared mixin that changes four things:

* the optimizer is :class:`ivon_lora.IVON` over the trainable (LoRA) parameters;
* every gradient-accumulation micro-batch (and every extra ``mc_samples`` draw) is its own posterior sample:
  forward/backward run inside ``IVON.sampled_params(train=True)`` on the micro-batch's *mean* loss, without
  the Trainer's 1/GA loss scaling and without DDP's gradient all-reduce (IVON averages g and (θ−m)·g across
  ranks itself);
* ``max_grad_norm`` clips each sample's gradient before IVON records it;
* every save (``save_model`` and checkpoints) writes ``adapter_variance.safetensors`` beside the adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import DistributedType
from peft import PeftModel
from torch import Tensor, nn
from transformers import Trainer
from trl import SFTTrainer

from ivon_lora.optimizer import IVON
from ivon_lora.posterior import VariationalLoraPosterior
from ivon_lora.serialization import staged_directory
from ivon_lora.training_args import IVONArgumentsMixin

logger = logging.getLogger(__name__)

__all__ = ["CustomLossTrainer", "VariationalTrainer", "VariationalSFTTrainer", "VariationalTrainerMixin"]

LossFn = Callable[[nn.Module, dict[str, Any]], Tensor]


class LossFnMixin:
    """Lets a Trainer take ``loss_fn(model, inputs) -> mean loss`` for objectives that need their own forward
    (e.g. multiple-choice scoring), instead of the model's built-in loss."""

    def __init__(self, *args: Any, loss_fn: LossFn | None = None, **kwargs: Any) -> None:
        self.loss_fn = loss_fn
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        if self.loss_fn is None:
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss = self.loss_fn(model, inputs)
        return (loss, None) if return_outputs else loss


class VariationalTrainerMixin(LossFnMixin):
    """The IVON behaviour shared by both trainers; put it before the Trainer class in the bases."""

    args: IVONArgumentsMixin
    model: nn.Module
    optimizer: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, IVONArgumentsMixin):
            raise TypeError(
                f"{type(self).__name__} needs VariationalTrainingArguments (or VariationalSFTConfig), "
                f"got {type(self.args).__name__}."
            )
        if self.optimizer is not None and not isinstance(self.optimizer, IVON):
            raise TypeError(f"{type(self).__name__} trains with IVON; got optimizer {type(self.optimizer).__name__}.")
        unsupported = {DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM}
        if self.accelerator.distributed_type in unsupported:  # type: ignore[attr-defined]
            raise NotImplementedError(
                f"{self.accelerator.distributed_type} is not supported by IVON-LoRA yet; use DDP (multi-GPU/CPU)."  # type: ignore[attr-defined]
            )
        self._sample_grad_norms: list[Tensor] = []

    # ------------------------------------------------------------------ optimizer
    @property
    def ivon(self) -> IVON:
        """The IVON optimizer (unwrapped from accelerate's wrapper)."""
        if self.optimizer is None:
            raise RuntimeError("The optimizer does not exist yet: call train() (or create_optimizer()) first.")
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _resolve_ess(self) -> float:
        if self.args.ess is not None:
            return float(self.args.ess)
        dataset = getattr(self, "train_dataset", None)
        try:
            ess = float(len(dataset))  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("ess was not set and the training dataset has no length: pass ess explicitly.") from None
        logger.info("IVON: ess not set, using the number of training examples (%d).", int(ess))
        return ess

    def create_optimizer(self, model: nn.Module | None = None) -> IVON:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            params = [p for p in opt_model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("No trainable parameters: wrap the model with peft.get_peft_model before training.")
            non_fp32 = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
            if non_fp32:
                logger.warning(
                    "Trainable parameters in %s: IVON keeps an fp32 master copy, but samples are rounded to the "
                    "parameter dtype. Keep LoRA weights in float32 (the QLoRA norm).",
                    non_fp32,
                )
            self.optimizer = IVON(params, **self.args.ivon_hyperparameters(self._resolve_ess()))
            if self.accelerator.num_processes > 1:  # type: ignore[attr-defined]
                self.optimizer.enable_distributed()
        return self.optimizer

    def variational_config(self) -> dict[str, Any]:
        """What ``variational_config.json`` records: the IVON hyper-parameters and the training setup."""
        hyper = self.args.ivon_hyperparameters(self.ivon.param_groups[0]["ess"])
        return {
            "optimizer": "ivon",
            **hyper,
            # SchedulerType is a str Enum whose str() is "SchedulerType.LINEAR"; record its value ("linear").
            "lr_scheduler_type": getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type),
            "steps_trained": self.state.global_step,  # type: ignore[attr-defined]
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "world_size": self.args.world_size,
            "max_grad_norm": self.args.max_grad_norm,
        }

    def posterior(self, adapter_name: str | None = None) -> VariationalLoraPosterior:
        """The current posterior of the trained adapter (mean in the model, variances from IVON)."""
        model = self.model
        if not isinstance(model, PeftModel):
            raise TypeError("VariationalLoraPosterior needs a peft.PeftModel; wrap the model with get_peft_model.")
        if self.optimizer is None:
            self.create_optimizer()
        name = adapter_name or model.active_adapter
        return VariationalLoraPosterior.from_optimizer(model, self.ivon, adapter_name=name, config=self.variational_config())

    # ------------------------------------------------------------------ training
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """One micro-batch = ``mc_samples`` posterior samples, each recorded by IVON.

        The loss is this micro-batch's mean (``num_items_in_batch`` is deliberately not used), backward runs
        outside DDP's gradient sync, and the returned value is scaled by 1/GA only for the Trainer's logging.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        ivon = self.ivon
        trainable = [p for group in ivon.param_groups for p in group["params"] if p.requires_grad]
        losses = []
        for _ in range(self.args.mc_samples):
            with ivon.sampled_params(train=True), self.accelerator.no_sync(model):  # type: ignore[attr-defined]
                with self.compute_loss_context_manager():  # type: ignore[attr-defined]
                    loss = self.compute_loss(model, inputs)
                if self.args.n_gpu > 1:
                    loss = loss.mean()
                loss.backward()
                if self.args.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(trainable, self.args.max_grad_norm)
                    self._sample_grad_norms.append(norm.detach())
            losses.append(loss.detach())
        return torch.stack(losses).mean() / self.current_gradient_accumulation_steps  # type: ignore[attr-defined]

    def _clip_grad_norm(self, model: nn.Module) -> Tensor | None:
        """Clipping already happened per sample; report the mean pre-clip norm of this step's samples."""
        if not self._sample_grad_norms:
            return None
        norm = torch.stack(self._sample_grad_norms).mean()
        self._sample_grad_norms.clear()
        return norm

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # type: ignore[override]
        samples = self.args.eval_posterior_samples
        if samples == 0 or self.optimizer is None:
            if samples and self.optimizer is None:
                logger.warning("eval_posterior_samples=%d but there is no posterior yet: evaluating the mean.", samples)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)  # type: ignore[misc]
        if self.loss_fn is not None:
            raise NotImplementedError(
                "Posterior-averaged Trainer evaluation covers causal-LM labels; for multiple-choice scoring use "
                "ivon_lora.evaluation (posterior-averaged predictive probabilities)."
            )
        inputs = self._prepare_inputs(inputs)  # type: ignore[attr-defined]
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("Posterior-averaged evaluation needs `labels` in the eval batches.")
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            probs = None
            for _ in range(samples):
                with self.ivon.sampled_params(train=False):
                    logits = model(**model_inputs).logits.float()
                p = logits.softmax(-1)
                probs = p if probs is None else probs.add_(p)
            log_probs = (probs / samples).clamp_min(torch.finfo(torch.float32).tiny).log()
            targets = labels[:, 1:]
            picked = log_probs[:, :-1].gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            mask = targets != -100
            loss = -(picked * mask).sum() / mask.sum().clamp_min(1)
        if prediction_loss_only:
            return loss, None, None
        return loss, log_probs, labels

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """PEFT's save plus the variances, staged so that mean and variance land together."""
        output_dir = output_dir or self.args.output_dir
        posterior = self.posterior() if isinstance(self.model, PeftModel) else None
        if posterior is None:
            logger.warning("The model is not a PeftModel: saving without a posterior.")
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        with staged_directory(output_dir) as staging:
            super()._save(str(staging), state_dict)  # type: ignore[misc]
            posterior.write_into(staging)


class VariationalTrainer(VariationalTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that learns a Gaussian posterior over LoRA weights with IVON.

    Use it exactly like ``Trainer`` with a PEFT model and :class:`VariationalTrainingArguments`. ``loss_fn``
    (optional keyword) replaces the model's own loss for objectives that need their own forward, e.g.
    multiple-choice scoring: it is called as ``loss_fn(model, inputs)`` and must return the micro-batch's mean loss.
    """


class VariationalSFTTrainer(VariationalTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with IVON: pass a :class:`VariationalSFTConfig` and a PEFT model or ``peft_config``."""


class CustomLossTrainer(LossFnMixin, Trainer):
    """A plain ``Trainer`` (AdamW by default) accepting the same ``loss_fn``: the non-variational baseline."""
