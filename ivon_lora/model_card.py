"""Model cards for variational LoRA adapters.

The card is what a Hub visitor reads before downloading, so it states what PEFT alone cannot: that the adapter
is a posterior (mean + variance), how it was trained (LoRA and IVON settings), how the mean compares with
posterior averaging and with AdamW (``eval_results.json``), and how wide the posterior is. The posterior
statistics are computed here from ``adapter_variance.safetensors`` rather than passed in, so that the card
always describes the file next to it.

The card follows huggingface_hub's conventions (``ModelCardData`` YAML front matter, ``EvalResult`` entries in
``model-index`` form) and is rendered from the Jinja template ``model_cards/variational_lora_card.md``.

Call :func:`write_model_card` after ``save_pretrained``: PEFT's own card update replaces the ``tags`` and
``base_model`` fields.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open

from ivon_lora.evaluation.tasks import TASKS
from ivon_lora.hub import (
    ADAPTER_CONFIG_FILE,
    EVAL_RESULTS_FILE,
    MODEL_CARD_FILE,
    VARIANCE_FILE,
    VARIATIONAL_CARD_TAG,
    VARIATIONAL_CONFIG_FILE,
)

logger = logging.getLogger(__name__)

__all__ = ["ModuleSigma", "PosteriorSummary", "render_model_card", "summarize_posterior", "write_model_card"]

_PACKAGE_DIR = Path(__file__).resolve().parent
# A wheel ships the top-level model_cards/ folder as ivon_lora/model_cards/; a source tree has it next to ivon_lora/.
_TEMPLATE_CANDIDATES = [
    folder / "model_cards" / "variational_lora_card.md" for folder in (_PACKAGE_DIR, _PACKAGE_DIR.parent)
]
TEMPLATE_PATH = next((path for path in _TEMPLATE_CANDIDATES if path.is_file()), _TEMPLATE_CANDIDATES[-1])
CARD_TAGS = (VARIATIONAL_CARD_TAG, "variational-inference", "bayesian-deep-learning", "lora", "peft")

# (key in eval_results.json, column label, metric id in model-index)
_METRICS = (("acc", "ACC", "accuracy"), ("ece", "ECE", "ece"), ("nll", "NLL", "nll"), ("brier", "Brier", "brier_score"))
_AVERAGE_MODE = re.compile(r"ivon_avg_k(\d+)")
_TASK_TYPE = "multiple-choice"
# Versions shown in the card, as (distribution name, display name); PEFT's spelling lets PEFT's own card update
# recognise the line and not add a second one.
_FRAMEWORKS = (("peft", "PEFT"), ("ivon-lora", "ivon-lora"), ("transformers", "Transformers"), ("torch", "PyTorch"))


@dataclass(frozen=True)
class ModuleSigma:
    """Posterior width of one group of LoRA tensors, e.g. all ``q_proj.lora_A`` matrices across layers."""

    name: str
    tensors: int
    parameters: int
    mean_sigma: float


@dataclass(frozen=True)
class PosteriorSummary:
    """Summary statistics of the posterior standard deviations σ = sqrt(variance) of an adapter."""

    parameters: int
    tensors: int
    mean_sigma: float
    std_sigma: float
    median_sigma: float
    min_sigma: float
    max_sigma: float
    modules: tuple[ModuleSigma, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _EvalEntry:
    """One (task, evaluation mode) row of eval_results.json."""

    task: str
    mode: str
    metrics: Mapping[str, float]
    n: int | None
    scoring_mode: str | None
    dataset: str
    dataset_config: str | None
    split: str | None


def _module_group(key: str) -> str:
    """``...layers.3.self_attn.q_proj.lora_A.weight`` -> ``q_proj.lora_A``: group the same LoRA factor of the same
    target module across layers, which keeps the card's table short for any depth."""
    parts = key.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    return ".".join(parts[-2:])


def summarize_posterior(folder: str | Path) -> PosteriorSummary:
    """Statistics of σ over all variational parameters in ``folder/adapter_variance.safetensors``."""
    path = Path(folder) / VARIANCE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: a variational card describes the posterior, so save the adapter with its "
            "variances first (a plain LoRA adapter has no posterior to describe)."
        )
    sigmas: list[np.ndarray] = []
    groups: dict[str, list[float]] = {}  # name -> [tensors, parameters, sum of σ]
    with safe_open(path, framework="pt") as handle:
        file_metadata = dict(handle.metadata() or {})
        kind = file_metadata.get("kind")
        if kind != "variance":
            raise ValueError(
                f"{path} has metadata kind={kind!r}, expected 'variance': it was not written by ivon-lora's "
                "save_pretrained, or by a newer version; upgrade ivon-lora or save the posterior again."
            )
        for key in handle.keys():
            variance = handle.get_tensor(key).to(torch.float64)
            if not bool(torch.isfinite(variance).all()) or bool((variance <= 0).any()):
                raise ValueError(
                    f"{path}: tensor {key!r} holds non-finite or non-positive variances; the file is corrupt, "
                    "save the posterior again."
                )
            sigma = variance.sqrt()
            sigmas.append(sigma.flatten().numpy())
            group = groups.setdefault(_module_group(key), [0, 0, 0.0])
            group[0] += 1
            group[1] += sigma.numel()
            group[2] += float(sigma.sum())
    if not sigmas:
        raise ValueError(f"{path} holds no tensors: save the posterior again.")
    all_sigma = np.concatenate(sigmas)
    modules = tuple(
        ModuleSigma(name=name, tensors=int(tensors), parameters=int(count), mean_sigma=total / count)
        for name, (tensors, count, total) in sorted(groups.items())
    )
    return PosteriorSummary(
        parameters=int(all_sigma.size),
        tensors=len(sigmas),
        mean_sigma=float(all_sigma.mean()),
        std_sigma=float(all_sigma.std()),
        median_sigma=float(np.median(all_sigma)),
        min_sigma=float(all_sigma.min()),
        max_sigma=float(all_sigma.max()),
        modules=modules,
        metadata=file_metadata,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}): fix or delete it, then render the card again."
        ) from error


def _mode_sort_key(mode: str) -> tuple[int, int, str]:
    """IVON mean first, then K-sample averages by K, then AdamW, then anything else by name."""
    if mode == "ivon_mean":
        return (0, 0, mode)
    average = _AVERAGE_MODE.fullmatch(mode)
    if average:
        return (1, int(average.group(1)), mode)
    return (2, 0, mode) if mode == "adamw" else (3, 0, mode)


def _mode_label(mode: str) -> str:
    if mode == "ivon_mean":
        return "IVON, posterior mean"
    average = _AVERAGE_MODE.fullmatch(mode)
    if average:
        return f"IVON, {average.group(1)}-sample average"
    return "AdamW" if mode == "adamw" else mode


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _eval_entries(path: Path) -> list[_EvalEntry]:
    """Rows of eval_results.json: ``{task: {mode: {acc, ece, nll, brier, n}, "scoring_mode": str, ...}}``.

    Besides ``scoring_mode``, a task may carry ``dataset`` (Hub dataset id), ``dataset_config`` and ``split``;
    they place the result in the card's ``model-index``. Without them, a task of the evaluation registry gets its
    Hub dataset and config from there, and any other task's name stands in for the dataset.
    """
    results = _read_json(path)
    if not isinstance(results, dict):
        raise ValueError(f"{path} must hold a JSON object {{task: {{mode: metrics}}}}, got {type(results).__name__}.")
    entries = []
    for task, modes in results.items():
        if not isinstance(modes, dict):
            raise ValueError(f"{path}: task {task!r} must map to an object {{mode: metrics}}, got {modes!r}.")
        hub_source = TASKS[task].hub if task in TASKS else None
        for mode in sorted((name for name, value in modes.items() if isinstance(value, dict)), key=_mode_sort_key):
            values = modes[mode]
            missing = [key for key, _, _ in _METRICS if key not in values]
            if missing:
                raise ValueError(
                    f"{path}: task {task!r}, mode {mode!r} lacks {missing}; every mode needs acc, ece, nll and brier."
                )
            entries.append(
                _EvalEntry(
                    task=task,
                    mode=mode,
                    metrics={key: float(values[key]) for key, _, _ in _METRICS},
                    n=int(values["n"]) if values.get("n") is not None else None,
                    scoring_mode=_optional_str(modes.get("scoring_mode")),
                    dataset=str(modes.get("dataset") or (hub_source.path if hub_source else task)),
                    dataset_config=_optional_str(modes.get("dataset_config") or (hub_source and hub_source.name)),
                    split=_optional_str(modes.get("split")),
                )
            )
    return entries


def _eval_results(entries: Sequence[_EvalEntry]) -> list[EvalResult]:
    """One model-index result per task (huggingface_hub groups by dataset), one metric per (mode, metric);
    ``metric config`` names the mode so that tools can tell the IVON mean from the K-sample average."""
    return [
        EvalResult(
            task_type=_TASK_TYPE,
            dataset_type=entry.dataset,
            dataset_name=entry.task,
            dataset_config=entry.dataset_config,
            dataset_split=entry.split,
            dataset_args={"scoring_mode": entry.scoring_mode} if entry.scoring_mode else None,
            metric_type=metric_id,
            metric_value=entry.metrics[key],
            metric_name=f"{label} ({_mode_label(entry.mode)})",
            metric_config=entry.mode,
        )
        for entry in entries
        for key, label, metric_id in _METRICS
    ]


def _format_value(value: Any) -> str:
    """Compact, table-safe text for a config value."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, set)):
        return ", ".join(_format_value(item) for item in (sorted(value) if isinstance(value, set) else value))
    if isinstance(value, dict):
        return ", ".join(f"{name}={_format_value(item)}" for name, item in value.items())
    return str(value).replace("|", "\\|")


def _setup_rows(
    adapter_config: Mapping[str, Any],
    base_model: str,
    datasets: Sequence[str] | None,
    extra: Mapping[str, Any] | None,
) -> list[tuple[str, str]]:
    rows = [("Base model", base_model)]
    if datasets:
        rows.append(("Training data", ", ".join(datasets)))
    for label, key in (
        ("PEFT method", "peft_type"),
        ("Task type", "task_type"),
        ("LoRA rank r", "r"),
        ("LoRA alpha", "lora_alpha"),
        ("LoRA dropout", "lora_dropout"),
        ("Target modules", "target_modules"),
    ):
        if adapter_config.get(key) is not None:
            rows.append((label, _format_value(adapter_config[key])))
    rows.extend((str(name), _format_value(value)) for name, value in (extra or {}).items())
    return rows


def _posterior_rows(summary: PosteriorSummary) -> list[tuple[str, str]]:
    rows = [
        ("Variational parameters", f"{summary.parameters:,}"),
        ("Tensors", str(summary.tensors)),
        ("Mean σ", f"{summary.mean_sigma:.4g}"),
        ("Median σ", f"{summary.median_sigma:.4g}"),
        ("Min σ", f"{summary.min_sigma:.4g}"),
        ("Max σ", f"{summary.max_sigma:.4g}"),
    ]
    for label, key in (("Effective sample size (ess)", "ess"), ("Weight decay δ (prior precision)", "weight_decay")):
        if key in summary.metadata:
            rows.append((label, summary.metadata[key]))
    return rows


def _installed_versions() -> list[tuple[str, str]]:
    versions = []
    for distribution, name in _FRAMEWORKS:
        try:
            versions.append((name, importlib_metadata.version(distribution)))
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def render_model_card(
    folder: str | Path,
    *,
    base_model: str,
    repo_id: str | None = None,
    datasets: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ModelCard:
    """Model card for the variational adapter saved in ``folder``.

    Args:
        folder: adapter folder (adapter config, mean, variance, optional variational config and eval results).
        base_model: Hub id of the base model; the Hub rejects cards whose ``base_model`` is not a model id.
        repo_id: where the adapter will live on the Hub; used in the usage snippet and as the model-index name.
        datasets: Hub ids of the training datasets, for the card metadata.
        extra: more training-setup rows for the card, e.g. ``{"steps": 10000, "batch size": 4, "seed": 42}``.
    """
    folder = Path(folder)
    try:
        validate_repo_id(base_model)
    except HFValidationError as error:
        raise ValueError(
            f"base_model={base_model!r} is not a Hub model id: pass the id the base was published under "
            "(e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'), even when it was loaded from a local copy."
        ) from error
    config_path = folder / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: pass the folder that save_pretrained wrote.")
    if not TEMPLATE_PATH.is_file():
        raise FileNotFoundError(
            f"The model card template {TEMPLATE_PATH} is missing: reinstall ivon-lora (the wheel ships it)."
        )
    summary = summarize_posterior(folder)
    adapter_config = _read_json(config_path)
    variational_path = folder / VARIATIONAL_CONFIG_FILE
    variational_config = _read_json(variational_path) if variational_path.is_file() else {}
    if not isinstance(variational_config, dict):
        raise ValueError(f"{variational_path} must hold a JSON object of hyper-parameters, got {variational_config!r}.")
    eval_path = folder / EVAL_RESULTS_FILE
    entries = _eval_entries(eval_path) if eval_path.is_file() else []

    model_name = repo_id or folder.resolve().name
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        tags=[*CARD_TAGS, f"base_model:adapter:{base_model}"],
        datasets=list(datasets) if datasets else None,
        metrics=[metric_id for _, _, metric_id in _METRICS] if entries else None,
        model_name=model_name if entries else None,
        eval_results=_eval_results(entries) or None,
    )
    eval_rows = [
        {
            "task": entry.task,
            "scoring_mode": entry.scoring_mode or "not recorded",
            "method": _mode_label(entry.mode),
            **{key: f"{entry.metrics[key]:.4f}" for key, _, _ in _METRICS},
            "n": "" if entry.n is None else str(entry.n),
        }
        for entry in entries
    ]
    module_rows = [
        {"name": m.name, "tensors": m.tensors, "parameters": f"{m.parameters:,}", "mean_sigma": f"{m.mean_sigma:.4g}"}
        for m in summary.modules
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        base_model=base_model,
        adapter_location=repo_id or str(folder),
        setup_rows=_setup_rows(adapter_config, base_model, datasets, extra),
        ivon_rows=[(str(name), _format_value(value)) for name, value in variational_config.items()],
        eval_rows=eval_rows,
        posterior_rows=_posterior_rows(summary),
        module_rows=module_rows,
        versions=_installed_versions(),
    )


def write_model_card(
    folder: str | Path,
    *,
    base_model: str,
    repo_id: str | None = None,
    datasets: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Render the card (see :func:`render_model_card`) and write it to ``folder/README.md``, replacing PEFT's
    generic one; written atomically so that a crash never leaves a truncated card. Returns the card's path."""
    card = render_model_card(folder, base_model=base_model, repo_id=repo_id, datasets=datasets, extra=extra)
    path = Path(folder) / MODEL_CARD_FILE
    temporary = path.with_name(f".{MODEL_CARD_FILE}.tmp")
    card.save(temporary)
    os.replace(temporary, path)
    logger.info("Wrote the variational model card to %s", path)
    return path
