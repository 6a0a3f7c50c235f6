"""IVON vs AdamW under identical conditions, over tasks × seeds: the study behind ``eval/compare_optimizers.py``.

For every (task, seed) it trains the same LoRA twice — IVON and AdamW, same model, data, steps, schedule and
LoRA config — and evaluates AdamW, IVON at the mean and IVON posterior-averaged. Every run writes its own folder
(``runs/<task>/seed<seed>/<optimizer>``); a run whose ``eval_results.json`` exists is skipped, so an interrupted
study resumes where it stopped. The summary is ``results.json``, ``results.md`` (mean ± std over seeds) and
plots (reliability diagrams pooled over seeds, ECE/ACC bars).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ivon_lora.commonsense import EVAL_RESULTS_FILE, CommonsenseConfig, run_commonsense

logger = logging.getLogger(__name__)

__all__ = ["StudyConfig", "run_study", "summarize_study"]

METRICS = ("acc", "ece", "nll", "brier")
PAPER_TASKS = ["arc_challenge", "arc_easy", "openbookqa", "boolq", "winogrande_s", "winogrande_m"]


@dataclass
class StudyConfig:
    """The grid and the shared training setup; every field is a flag of ``eval/compare_optimizers.py``."""

    tasks: list[str] = field(default_factory=lambda: list(PAPER_TASKS), metadata={"help": "Tasks to run."})
    seeds: list[int] = field(default_factory=lambda: [21, 42, 87], metadata={"help": "Seeds (papers: 21 42 87)."})
    output_dir: str = field(default="outputs/study", metadata={"help": "Study folder (runs/ inside; resumable)."})
    ivon_learning_rate: float = field(default=1.0, metadata={"help": "IVON lr (replaced by the tuned one if a grid is given)."})
    adamw_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW lr (replaced by the tuned one if a grid is given)."})
    ivon_lr_grid: list[float] = field(default_factory=list, metadata={"help": "IVON lrs to tune over (empty: no tuning)."})
    adamw_lr_grid: list[float] = field(default_factory=list, metadata={"help": "AdamW lrs to tune over (empty: no tuning)."})
    tune_holdout: int = field(default=100, metadata={"help": "Training questions held out as the tuning validation set."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Base model (default: the recipe's)."})
    max_steps: int = field(default=40, metadata={"help": "Optimizer steps per run."})
    max_train: int | None = field(default=None, metadata={"help": "Training questions per task (None: all)."})
    max_eval: int | None = field(default=100, metadata={"help": "Evaluation questions per task (None: all)."})
    max_length: int = field(default=320, metadata={"help": "Longest prompt in tokens."})
    eval_samples: int = field(default=4, metadata={"help": "K for the posterior-averaged evaluation."})
    ess: float | None = field(default=None, metadata={"help": "IVON ess (default: the paper's per-task value)."})
    scoring_mode: str = field(default="auto", metadata={"help": "letter, cloze or auto."})
    load_in_4bit: bool = field(default=True, metadata={"help": "4-bit NF4 base."})
    data_source: str = field(default="auto", metadata={"help": "hub, offline or auto."})

    def run_config(self, task: str, seed: int, optimizer: str, learning_rate: float | None = None) -> CommonsenseConfig:
        """The run of the grid; with ``learning_rate`` a tuning run (validation hold-out, mean only)."""
        tuning = learning_rate is not None
        default_lr = self.ivon_learning_rate if optimizer == "ivon" else self.adamw_learning_rate
        folder = Path(self.output_dir) / "runs" / task / f"seed{seed}" / optimizer
        if tuning:
            folder = Path(self.output_dir) / "tuning" / task / f"{optimizer}_lr{learning_rate:g}"
        overrides: dict[str, Any] = dict(
            task=task, seed=seed, optimizer=optimizer, max_steps=self.max_steps, max_train=self.max_train,
            max_eval=self.max_eval, max_length=self.max_length, eval_samples=0 if tuning else self.eval_samples,
            ess=self.ess, scoring_mode=self.scoring_mode, load_in_4bit=self.load_in_4bit, data_source=self.data_source,
            learning_rate=learning_rate if tuning else default_lr, tune_holdout=self.tune_holdout if tuning else 0,
            output_dir=str(folder),
        )
        if self.model_name_or_path:
            overrides["model_name_or_path"] = self.model_name_or_path
        return CommonsenseConfig(**overrides)

    def zero_shot_config(self, task: str) -> CommonsenseConfig:
        """The untrained base evaluated on the same questions (a reference row of the table)."""
        return dataclasses.replace(self.run_config(task, self.seeds[0], "adamw"), max_steps=0,
                                   output_dir=str(Path(self.output_dir) / "runs" / task / "zero_shot"))


def _run_once(run: CommonsenseConfig, label: str) -> dict[str, Any]:
    """Run unless its results exist with the same configuration (resumability); return the results."""
    path = Path(run.output_dir) / EVAL_RESULTS_FILE
    if path.is_file():
        config_path = Path(run.output_dir) / "config.yaml"
        saved = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        saved.pop("wall_time_s", None)
        differing = sorted(k for k, v in dataclasses.asdict(run).items() if saved.get(k, object()) != v)
        if differing:
            raise ValueError(
                f"{run.output_dir} holds a finished run made with other settings ({differing}); "
                "use another --output_dir or delete that folder to re-run it."
            )
        logger.info("%s: done already, skipped", label)
    else:
        logger.info("%s: running", label)
        started = time.time()
        run_commonsense(run)
        gc.collect()
        logger.info("%s: finished in %.0f s", label, time.time() - started)
    return json.loads(path.read_text())


def tune_learning_rates(config: StudyConfig) -> dict[str, Any]:
    """Pick each optimizer's lr by accuracy (ties: NLL) on questions held out from the first task's training
    split, first seed only — the reported eval split is never used for tuning. Updates ``config`` in place."""
    task, seed = config.tasks[0], config.seeds[0]
    chosen: dict[str, Any] = {}
    for optimizer, grid in (("ivon", config.ivon_lr_grid), ("adamw", config.adamw_lr_grid)):
        scores = {}
        for lr in grid:
            results = _run_once(config.run_config(task, seed, optimizer, learning_rate=lr), f"tune {optimizer} lr={lr:g}")
            metrics = results[task]["ivon_mean" if optimizer == "ivon" else "adamw"]
            scores[lr] = metrics
        if scores:
            best = max(scores, key=lambda lr: (scores[lr]["acc"], -scores[lr]["nll"]))
            setattr(config, f"{optimizer}_learning_rate", best)
            chosen[optimizer] = {"chosen": best, "validation": {f"{lr:g}": m for lr, m in scores.items()}}
    return chosen


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Tune (if grids are given), run every missing (task, seed, optimizer), and write the summary."""
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tuning = tune_learning_rates(config)
    if tuning:
        (output / "tuning.json").write_text(json.dumps(tuning, indent=2) + "\n")
    (output / "study_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    for task in config.tasks:  # the untrained base on the same questions, as a reference row
        _run_once(config.zero_shot_config(task), f"{task} zero-shot")
    grid = [(t, s, o) for t in config.tasks for s in config.seeds for o in ("adamw", "ivon")]
    for index, (task, seed, optimizer) in enumerate(grid, 1):
        _run_once(config.run_config(task, seed, optimizer), f"[{index}/{len(grid)}] {task} seed {seed} {optimizer}")
    return summarize_study(config)


def _load_runs(config: StudyConfig) -> dict[str, dict[str, dict[int | None, dict[str, float]]]]:
    """{task: {mode: {seed: metrics}}} from the finished runs (seed None: the zero-shot reference)."""
    table: dict[str, dict[str, dict[int | None, dict[str, float]]]] = {}
    for task in config.tasks:
        paths: list[tuple[int | None, Path]] = [(None, Path(config.zero_shot_config(task).output_dir))]
        paths += [(s, Path(config.run_config(task, s, o).output_dir)) for s in config.seeds for o in ("adamw", "ivon")]
        for seed, folder in paths:
            if not (folder / EVAL_RESULTS_FILE).is_file():
                continue
            for mode, metrics in json.loads((folder / EVAL_RESULTS_FILE).read_text())[task].items():
                if isinstance(metrics, dict):
                    table.setdefault(task, {}).setdefault(mode, {})[seed] = metrics
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _row(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    stats = {m: _mean_std([r[m] for r in per_seed]) for m in METRICS}
    return {
        **{f"{m}_mean": mean for m, (mean, _) in stats.items()},
        **{f"{m}_std": std for m, (_, std) in stats.items()},
        "seeds": len(per_seed),
        "n": int(per_seed[0]["n"]),
    }


def _paired_differences(modes: dict[str, dict[int | None, dict[str, float]]]) -> dict[str, Any]:
    """``<ivon mode> - adamw``: per-seed differences (same seed, same questions), then mean ± std over seeds."""
    adamw = modes.get("adamw", {})
    rows = {}
    for mode in sorted(m for m in modes if m.startswith("ivon")):
        seeds = sorted(set(modes[mode]) & set(adamw))
        if seeds:
            rows[f"{mode} - adamw"] = _row([
                {**{m: modes[mode][s][m] - adamw[s][m] for m in METRICS}, "n": modes[mode][s]["n"]} for s in seeds
            ])
    return rows


def summarize_study(config: StudyConfig) -> dict[str, Any]:
    """Aggregate finished runs into ``results.json``, ``results.md`` and the plots (partial grids are fine)."""
    output = Path(config.output_dir)
    table = _load_runs(config)
    summary = {
        task: {**{mode: _row(list(runs.values())) for mode, runs in modes.items()}, **_paired_differences(modes)}
        for task, modes in table.items()
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "results.md").write_text(results_markdown(summary))
    if summary:
        _plot_bars(summary, output / "ece_acc.png")
        _plot_pooled_reliability(config, output)
    return summary


def results_markdown(summary: dict[str, Any]) -> str:
    """Mean ± std over seeds per task and mode, then the paired IVON − AdamW differences (signed)."""
    lines = ["| task | method | seeds | ACC ↑ | ECE ↓ | NLL ↓ | Brier ↓ |", "|---|---|---|---|---|---|---|"]
    for task, modes in summary.items():
        for mode in sorted(modes, key=_mode_order):
            row, sign = modes[mode], "+" if mode.endswith(" - adamw") else ""
            cells = []
            for m in METRICS:
                digits = 1 if m in ("acc", "ece") else 3
                cells.append(f"{row[f'{m}_mean']:{sign}.{digits}f} ± {row[f'{m}_std']:.{digits}f}")
            lines.append(f"| {task} | {mode} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mode_order(mode: str) -> tuple[int, str]:
    """zero-shot, AdamW, IVON mean, IVON averages, then the differences."""
    return ({"zero_shot": 0, "adamw": 1, "ivon_mean": 2}.get(mode, 4 if mode.endswith(" - adamw") else 3), mode)


def _plot_bars(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    modes = sorted({m for t in summary.values() for m in t if not m.endswith(" - adamw")}, key=_mode_order)
    figure, axes = plt.subplots(1, 2, figsize=(5 + 1.6 * len(tasks), 4.2))
    width = 0.8 / len(modes)
    for ax, metric, label in zip(axes, ("acc", "ece"), ("accuracy (%) ↑", "ECE (%) ↓")):
        for i, mode in enumerate(modes):
            xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(tasks))]
            means = [summary[t].get(mode, {}).get(f"{metric}_mean", np.nan) for t in tasks]
            stds = [summary[t].get(mode, {}).get(f"{metric}_std", 0.0) for t in tasks]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=mode)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("IVON vs AdamW (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_pooled_reliability(config: StudyConfig, output: Path) -> None:
    """One reliability figure per task, predictions pooled over seeds, one panel per mode."""
    from ivon_lora.evaluation.plots import plot_reliability_diagrams

    for task in config.tasks:
        pooled: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for seed in config.seeds:
            for optimizer in ("adamw", "ivon"):
                path = Path(config.run_config(task, seed, optimizer).output_dir) / "predictions.npz"
                if not path.is_file():
                    continue
                arrays = np.load(path)
                for key in arrays.files:
                    if key.endswith("_probs"):
                        mode = key[: -len("_probs")]
                        probs, labels = pooled.setdefault(mode, ([], []))
                        probs.append(arrays[key])
                        labels.append(arrays[f"{mode}_labels"])
        if pooled:
            ordered = {m: (np.concatenate(pooled[m][0]), np.concatenate(pooled[m][1])) for m in sorted(pooled, key=_mode_order)}
            plot_reliability_diagrams(ordered, output / f"reliability_{task}.png", title=f"{task}: pooled over seeds")
