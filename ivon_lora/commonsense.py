"""The commonsense finetuning job behind ``recipes/llama_commonsense.py``: train one LoRA adapter per task with
IVON (or the AdamW baseline), evaluate it at the mean and posterior-averaged, and write everything to disk.

Outputs in ``output_dir``: ``adapter/`` (PEFT adapter + ``adapter_variance.safetensors`` + model card; with
``--prune`` the pruned adapter goes to ``adapter/<name>_pruned/``, PEFT's layout for a second adapter),
``eval_results.json`` (per task, per mode: acc, ece, nll, brier, n, and the scoring mode), ``reliability.png``,
``config.yaml`` (the configuration used) and ``predictions.npz`` (probabilities and labels per mode).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments, set_seed

from ivon_lora.evaluation.data import DEFAULT_SPLIT_SEED, load_task_splits
from ivon_lora.evaluation.predict import Predictions, predict_multiple_choice
from ivon_lora.evaluation.scoring import MultipleChoiceScorer
from ivon_lora.models import DEFAULT_MODEL, load_base_model
from ivon_lora.posterior import VariationalLoraPosterior
from ivon_lora.trainer import CustomLossTrainer, VariationalTrainer
from ivon_lora.training_args import VariationalTrainingArguments

logger = logging.getLogger(__name__)

__all__ = ["CommonsenseConfig", "evaluate_modes", "evaluation_results", "run_commonsense", "write_evaluation"]

EVAL_RESULTS_FILE = "eval_results.json"

# (ess, hess_init) per task in Cong et al. (2024); tasks not listed use the ARC values.
PAPER_IVON_SETTINGS: dict[str, tuple[float, float]] = {
    "winogrande_s": (1e7, 3e-4),
    "winogrande_m": (1e8, 3e-4),
    "arc_challenge": (1e6, 1e-3),
    "arc_easy": (1e6, 1e-3),
    "openbookqa": (1e6, 1e-3),
    "boolq": (1e7, 3e-4),
}


@dataclass
class CommonsenseConfig:
    """Everything the commonsense job needs; every field is a command-line flag and a YAML key.

    Defaults are the offline CPU job (SmolLM2-135M-Instruct, 4-bit base, ARC-Easy, cloze scoring) sized to
    finish in about 15 minutes on 2 cores. ``recipes/configs/`` holds the paper setups.
    """

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id or local folder of the base model."})
    task: str = field(default="arc_easy", metadata={"help": "Task name (see ivon_lora.evaluation.task_names())."})
    optimizer: str = field(default="ivon", metadata={"help": "ivon or adamw (the baseline: same LoRA, data and steps)."})
    load_in_4bit: bool = field(default=True, metadata={"help": "bitsandbytes NF4 base weights (QLoRA)."})
    scoring_mode: str = field(default="auto", metadata={"help": "letter, cloze or auto (letter for >= 1B parameters)."})
    split_seed: int = field(
        default=DEFAULT_SPLIT_SEED,
        metadata={"help": "Seed of the data split protocol; keep it fixed across training seeds so every seed is "
                  "evaluated on the same questions."},
    )
    data_source: str = field(default="auto", metadata={"help": "hub, offline or auto (offline when the Hub is unreachable)."})
    max_train: int | None = field(default=None, metadata={"help": "Use at most this many training questions."})
    max_eval: int | None = field(default=100, metadata={"help": "Evaluate at most this many questions (None: all)."})
    tune_holdout: int = field(
        default=0,
        metadata={"help": "If > 0, hold out this many training questions and evaluate on them instead of the eval "
                  "split: for tuning hyper-parameters without touching the numbers you report."},
    )
    max_length: int = field(default=320, metadata={"help": "Longest prompt in tokens (papers: 320)."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps (0: evaluate the untrained base, 'zero_shot')."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Questions per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches (= posterior samples) per step."})
    learning_rate: float | None = field(
        default=None,
        metadata={"help": "Default: 1.0 for IVON, 1e-3 for AdamW — tuned for SmolLM2-135M at 30 steps on held-out "
                  "ARC-Easy validation questions (README 'Results'); the paper setups set their own."},
    )
    lr_scheduler_type: str = field(default="linear", metadata={"help": "LR schedule (papers: linear decay)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    ess: float | None = field(default=None, metadata={"help": "IVON effective sample size (default: the paper's per-task value)."})
    hess_init: float | None = field(default=None, metadata={"help": "IVON initial Hessian (default: the paper's per-task value)."})
    beta2: float = field(default=0.99999, metadata={"help": "IVON Hessian averaging."})
    clip_radius: float = field(default=1e-3, metadata={"help": "IVON element-wise update clip."})
    weight_decay: float = field(default=0.0, metadata={"help": "IVON prior precision / AdamW weight decay."})
    mc_samples: int = field(default=1, metadata={"help": "IVON posterior samples per micro-batch."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "LoRA targets."})
    prune: float = field(default=0.0, metadata={"help": "After IVON training, prune this fraction of adapter entries (0: off)."})
    prune_criterion: str = field(default="snr", metadata={"help": "snr (|m|/sigma), variance or magnitude."})
    prune_scope: str = field(default="tensor", metadata={"help": "tensor (per-tensor fraction) or global."})
    eval_samples: int = field(default=4, metadata={"help": "K posterior samples for the averaged evaluation (0: mean only)."})
    eval_batch_size: int = field(default=8, metadata={"help": "Questions per evaluation batch."})
    eval_max_rows: int | None = field(default=None, metadata={"help": "Cap on rows per forward (K x batch x choices)."})
    seed: int = field(default=42, metadata={"help": "Seed for LoRA init, data order and IVON noise (papers: 21/42/87)."})
    output_dir: str = field(default="outputs/commonsense", metadata={"help": "Where everything is written."})
    logging_steps: int = field(default=5, metadata={"help": "Log the training loss every N steps."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on for GPUs that support it)."})

    def __post_init__(self) -> None:
        if self.optimizer not in ("ivon", "adamw"):
            raise ValueError(f"optimizer must be 'ivon' or 'adamw', got {self.optimizer!r}.")
        if self.prune and self.optimizer != "ivon":
            raise ValueError("--prune needs a posterior: it works with --optimizer ivon only.")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples must be >= 0, got {self.eval_samples}.")
        if self.learning_rate is None:
            self.learning_rate = 1.0 if self.optimizer == "ivon" else 1e-3
        paper_ess, paper_hess_init = PAPER_IVON_SETTINGS.get(self.task, PAPER_IVON_SETTINGS["arc_easy"])
        self.ess = paper_ess if self.ess is None else self.ess
        self.hess_init = paper_hess_init if self.hess_init is None else self.hess_init
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _training_arguments(config: CommonsenseConfig) -> TrainingArguments:
    common: dict[str, Any] = dict(
        output_dir=str(Path(config.output_dir) / "trainer"),
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        bf16=config.bf16,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # the scorer's collate needs the raw question columns
        dataloader_num_workers=0,
    )
    if config.optimizer == "adamw":
        return TrainingArguments(**common)
    return VariationalTrainingArguments(
        ess=config.ess,
        hess_init=config.hess_init,
        beta2=config.beta2,
        clip_radius=config.clip_radius,
        mc_samples=config.mc_samples,
        **common,
    )


def run_commonsense(config: CommonsenseConfig) -> dict[str, Any]:
    """Train, evaluate and save; returns the ``eval_results.json`` content."""
    started = time.time()
    output_dir = Path(config.output_dir)
    set_seed(config.seed)
    base, tokenizer = load_base_model(config.model_name_or_path, load_in_4bit=config.load_in_4bit)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    train, evaluation = load_task_splits(
        config.task, config.data_source, seed=config.split_seed, max_train=config.max_train, max_eval=config.max_eval
    )
    if config.tune_holdout:
        if config.tune_holdout >= len(train):
            raise ValueError(f"tune_holdout={config.tune_holdout} leaves no training questions (only {len(train)}).")
        cut = len(train) - config.tune_holdout
        train, evaluation = train.select(range(cut)), train.select(range(cut, len(train)))
    scorer = MultipleChoiceScorer(tokenizer, config.task, mode=config.scoring_mode, max_length=config.max_length, model=base)
    logger.info("Task %s: %d train / %d eval questions, %s scoring", config.task, len(train), len(evaluation), scorer.mode)

    trainer_cls = VariationalTrainer if config.optimizer == "ivon" else CustomLossTrainer
    trainer = trainer_cls(
        model=model, args=_training_arguments(config), train_dataset=train, data_collator=scorer.collate, loss_fn=scorer.loss
    )
    if config.max_steps == 0:
        return _zero_shot(config, model, scorer, evaluation)
    trainer.train()
    if not trainer.accelerator.is_main_process:  # evaluation and saving happen once, on the main process
        trainer.accelerator.wait_for_everyone()
        return {}

    adapter_dir = output_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # saved before evaluating: VariationalTrainer adds the variances
    posterior = trainer.posterior() if config.optimizer == "ivon" else None
    if posterior is not None and config.prune:
        posterior = posterior.prune(config.prune, config.prune_criterion, config.prune_scope)
        adapter_dir = posterior.save_pretrained(adapter_dir)  # PEFT's layout: a named adapter's subfolder
        logger.info("Pruned %.0f%% of the adapter by %s; saved to %s", 100 * config.prune, config.prune_criterion, adapter_dir)
    predictions = evaluate_modes(
        model,
        scorer,
        evaluation,
        posterior=posterior,
        eval_samples=config.eval_samples,
        batch_size=config.eval_batch_size,
        max_rows=config.eval_max_rows,
        seed=config.seed,
    )
    results = evaluation_results(config.task, predictions, split="validation-holdout" if config.tune_holdout else "eval")
    if config.prune:
        results[config.task]["pruning"] = {"amount": config.prune, "criterion": config.prune_criterion, "scope": config.prune_scope}
    _write_outputs(config, adapter_dir, predictions, results, time.time() - started)
    trainer.accelerator.wait_for_everyone()
    return results


def _zero_shot(config: CommonsenseConfig, model: Any, scorer: MultipleChoiceScorer, evaluation: Any) -> dict[str, Any]:
    """The reference point without finetuning (LoRA B = 0, so the PEFT model computes the base model)."""
    started = time.time()
    predictions = {"zero_shot": predict_multiple_choice(model, scorer, evaluation, batch_size=config.eval_batch_size)}
    results = evaluation_results(config.task, predictions)
    write_evaluation(Path(config.output_dir), config.task, predictions, results)
    write_config(config, time.time() - started)
    return results


def write_config(config: CommonsenseConfig, seconds: float) -> Path:
    """``config.yaml``: every setting of the run (and its wall time), so results can be traced and resumed safely."""
    path = Path(config.output_dir) / "config.yaml"
    path.write_text(yaml.safe_dump({**dataclasses.asdict(config), "wall_time_s": round(seconds, 1)}))
    return path


def evaluate_modes(
    model: Any,
    scorer: MultipleChoiceScorer,
    dataset: Any,
    *,
    posterior: VariationalLoraPosterior | None,
    eval_samples: int,
    batch_size: int = 8,
    max_rows: int | None = None,
    seed: int = 0,
) -> dict[str, Predictions]:
    """Predictions per reporting mode: ``adamw`` without a posterior; ``ivon_mean`` and ``ivon_avg_k{K}`` with one."""
    if posterior is None:
        return {"adamw": predict_multiple_choice(model, scorer, dataset, batch_size=batch_size)}
    predictions = {"ivon_mean": predict_multiple_choice(model, scorer, dataset, batch_size=batch_size)}
    if eval_samples:
        predictions[f"ivon_avg_k{eval_samples}"] = predict_multiple_choice(
            model, scorer, dataset, posterior=posterior, num_samples=eval_samples, batch_size=batch_size,
            max_rows=max_rows, seed=seed,
        )
    return predictions


def evaluation_results(task: str, predictions: dict[str, Predictions], split: str = "eval") -> dict[str, Any]:
    """The ``eval_results.json`` layout: ``{task: {mode: metrics, "scoring_mode": ..., "split": ...}}``."""
    entry: dict[str, Any] = {name: p.metrics for name, p in predictions.items()}
    entry["scoring_mode"] = next(iter(predictions.values())).scoring_mode
    entry["split"] = split
    return {task: entry}


def write_evaluation(output_dir: Path, task: str, predictions: dict[str, Predictions], results: dict[str, Any]) -> None:
    """``eval_results.json``, ``predictions.npz`` and ``reliability.png`` into ``output_dir``."""
    from ivon_lora.evaluation.plots import plot_reliability_diagrams

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / EVAL_RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    arrays = {f"{name}_{kind}": getattr(p, kind) for name, p in predictions.items() for kind in ("probs", "labels")}
    np.savez(output_dir / "predictions.npz", **arrays)
    plot_reliability_diagrams(
        {name: (p.probs, p.labels) for name, p in predictions.items()},
        output_dir / "reliability.png",
        title=f"{task} ({next(iter(predictions.values())).scoring_mode} scoring)",
    )
    for name, p in predictions.items():
        m = p.metrics
        logger.info("%-14s acc %.1f  ece %.1f  nll %.3f  brier %.3f  (n=%d)", name, m["acc"], m["ece"], m["nll"],
                    m["brier"], m["n"])


def _write_outputs(
    config: CommonsenseConfig, adapter_dir: Path, predictions: dict[str, Predictions], results: dict[str, Any], seconds: float
) -> None:
    output_dir = Path(config.output_dir)
    write_evaluation(output_dir, config.task, predictions, results)
    (adapter_dir / EVAL_RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    write_config(config, seconds)
    if config.optimizer == "ivon":
        _write_card(adapter_dir, config.model_name_or_path)


def _write_card(adapter_dir: Path, base_model: str) -> None:
    from ivon_lora.model_card import write_model_card

    try:
        write_model_card(adapter_dir, base_model=base_model)
    except ValueError as error:  # e.g. a local base model path, which Hub cards cannot reference
        logger.warning("No model card written: %s", error)
