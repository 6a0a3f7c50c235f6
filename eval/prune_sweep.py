"""Posterior pruning vs magnitude pruning: ACC/ECE/NLL of the mean and the K-sample average against sparsity.

Trains one IVON adapter with the commonsense recipe (or loads one with --adapter), then prunes it by each criterion
(snr = |m|/σ, variance, magnitude = |m|) at each sparsity and evaluates every pruned adapter on the same questions.
Writes sweep.json, sweep.md (with the spread of σ and how far the SNR and magnitude masks overlap: with a
nearly uniform σ they are the same criterion) and sweep.png to --output_dir. Finished points are reused from
sweep.json; the unpruned point (0%) is the same adapter for every criterion and is evaluated once. The questions
are those of the adapter's training run (its config.yaml gives task, split seed and base model), so a pruned
adapter is never scored on questions it was trained on.

    python eval/prune_sweep.py --max_steps 40 --max_eval 100 --eval_samples 4
    python eval/prune_sweep.py --adapter outputs/commonsense/adapter --task arc_easy
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from ivon_lora.commonsense import CommonsenseConfig, evaluate_modes, run_commonsense  # noqa: E402
from ivon_lora.evaluation.data import DEFAULT_SPLIT_SEED, load_task_splits  # noqa: E402
from ivon_lora.evaluation.scoring import MultipleChoiceScorer  # noqa: E402
from ivon_lora.model_card import summarize_posterior  # noqa: E402
from ivon_lora.models import load_base_model  # noqa: E402
from ivon_lora.posterior import VariationalLoraPosterior  # noqa: E402
from ivon_lora.pruning import mask_agreement  # noqa: E402

logger = logging.getLogger("prune_sweep")
CRITERIA = ("snr", "variance", "magnitude")
CRITERION_COLORS = {"snr": "C0", "variance": "C2", "magnitude": "C3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, help="Existing variational adapter (default: train one first).")
    parser.add_argument("--task", help="Default: the adapter's training task (arc_easy when training here).")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9, 0.95])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--scope", default="tensor", choices=["tensor", "global"])
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--max_eval", type=int, default=100)
    parser.add_argument("--eval_samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42, help="Training seed and posterior-sampling seed.")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/prune_sweep"))
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    adapter = args.adapter
    if adapter is None:
        train_dir = args.output_dir / "trained"
        adapter = train_dir / "adapter"
        if not (adapter / "adapter_variance.safetensors").is_file():
            run_commonsense(CommonsenseConfig(task=args.task or "arc_easy", max_steps=args.max_steps,
                                              max_eval=args.max_eval, eval_samples=0, seed=args.seed,
                                              output_dir=str(train_dir)))
    trained = training_config(adapter)
    task = args.task or trained.get("task", "arc_easy")
    split_seed = trained.get("split_seed", DEFAULT_SPLIT_SEED)
    base, tokenizer = load_base_model(trained.get("model_name_or_path"), load_in_4bit=trained.get("load_in_4bit", True))
    posterior = VariationalLoraPosterior.from_pretrained(base, adapter)
    scorer = MultipleChoiceScorer(tokenizer, task, mode=trained.get("scoring_mode", "auto"), model=base)
    _, dataset = load_task_splits(task, seed=split_seed, max_eval=args.max_eval)
    logger.info("%s: %d questions (split seed %d) from %s", task, len(dataset), split_seed, adapter)

    results_path = args.output_dir / "sweep.json"
    results: dict[str, dict[str, dict]] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for criterion in args.criteria:
        for sparsity in args.sparsities:
            key = f"{sparsity:g}"
            if key in results.get(criterion, {}):
                continue
            unpruned = next((points["0"] for points in results.values() if "0" in points), None)
            if sparsity == 0 and unpruned is not None:
                results.setdefault(criterion, {})[key] = unpruned
                continue
            name = f"pruned_{criterion}_{key.replace('.', '_')}"
            pruned = posterior.prune(sparsity, criterion, args.scope, adapter_name=name)
            predictions = evaluate_modes(pruned.model, scorer, dataset, posterior=pruned,
                                         eval_samples=args.eval_samples, seed=args.seed)
            results.setdefault(criterion, {})[key] = {mode: p.metrics for mode, p in predictions.items()}
            posterior.model.set_adapter(posterior.adapter_name)
            posterior.model.delete_adapter(name)
            args.output_dir.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            logger.info("%s %.0f%%: %s", criterion, 100 * sparsity,
                        {m: round(v["acc"], 1) for m, v in results[criterion][key].items()})
    spread = posterior_spread(adapter, posterior, [s for s in args.sparsities if s > 0], args.scope)
    (args.output_dir / "sweep.md").write_text(markdown(results) + "\n".join(["", *spread]) + "\n")
    plot(results, args.output_dir / "sweep.png", task)


def training_config(adapter: Path) -> dict[str, Any]:
    """The recipe's config.yaml next to the adapter folder, or {} for an adapter saved some other way."""
    path = adapter.parent / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def posterior_spread(
    adapter: Path, posterior: VariationalLoraPosterior, sparsities: list[float], scope: str
) -> list[str]:
    """How much the posterior can tell SNR from magnitude: the spread of σ and the overlap of the two masks."""
    sigma = summarize_posterior(adapter)
    mean, variances = posterior.mean(), posterior.variance()
    overlap = ", ".join(f"{s:.0%}: {mask_agreement(mean, variances, s, scope=scope):.1%}" for s in sparsities)
    return [f"- posterior σ: min {sigma.min_sigma:.3g}, median {sigma.median_sigma:.3g}, max {sigma.max_sigma:.3g}, "
            f"coefficient of variation {sigma.std_sigma / sigma.mean_sigma:.1%}",
            f"- of the entries SNR prunes, magnitude prunes too: {overlap}"]


def _modes(points: dict[str, dict]) -> list[str]:
    """The evaluated modes, mean first (ivon_mean, ivon_avg<K>)."""
    return sorted(next(iter(points.values())), key=lambda mode: mode != "ivon_mean")


def markdown(results: dict[str, dict[str, dict]]) -> str:
    """One row per (criterion, sparsity), ACC / ECE / NLL per mode, then the issue's targets checked."""
    modes = _modes(next(iter(results.values())))
    lines = ["| criterion | pruned | " + " | ".join(f"{mode} ACC / ECE / NLL" for mode in modes) + " |",
             "|---|---|" + "---|" * len(modes)]
    for criterion, points in results.items():
        for sparsity in sorted(points, key=float):
            metrics = [points[sparsity][mode] for mode in modes]
            cells = [f"{m['acc']:.1f} / {m['ece']:.1f} / {m['nll']:.3f}" for m in metrics]
            lines.append(f"| {criterion} | {float(sparsity):.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *targets(results, modes)]) + "\n"


def targets(results: dict[str, dict[str, dict]], modes: list[str]) -> list[str]:
    """At 50% SNR pruning: ACC within 1 point and ECE no worse than unpruned; SNR ahead of magnitude at 75%+."""
    snr, magnitude = results.get("snr", {}), results.get("magnitude", {})
    lines = []
    for mode in modes:
        if "0" in snr and "0.5" in snr:
            d_acc = snr["0.5"][mode]["acc"] - snr["0"][mode]["acc"]
            d_ece = snr["0.5"][mode]["ece"] - snr["0"][mode]["ece"]
            verdict = "met" if abs(d_acc) <= 1 and d_ece <= 0 else "missed"
            lines.append(f"- {mode}, SNR 50%: ACC {d_acc:+.1f}, ECE {d_ece:+.1f} vs unpruned ({verdict})")
        for key in sorted(set(snr) & set(magnitude), key=float):
            if float(key) >= 0.75:
                a, b = snr[key][mode]["acc"], magnitude[key][mode]["acc"]
                lines.append(f"- {mode}, {float(key):.0%}: SNR {a:.1f} vs magnitude {b:.1f} ACC "
                             f"({'SNR ahead' if a > b else 'tie' if a == b else 'magnitude ahead'})")
    return lines


def plot(results: dict[str, dict[str, dict]], path: Path, task: str) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for criterion, points in results.items():
        color = CRITERION_COLORS[criterion]  # the same colour for a criterion in every sweep's plot
        xs = sorted(points, key=float)
        for mode, style in zip(_modes(points), ("-o", "--s")):  # solid: mean, dashed: K-sample average
            for ax, metric in zip(axes, ("acc", "ece", "nll")):
                values = [points[x][mode][metric] for x in xs]
                ax.plot([100 * float(x) for x in xs], values, style, color=color, label=f"{criterion} {mode}")
    for ax, label in zip(axes, ("accuracy (%) ↑", "ECE (%) ↓", "NLL ↓")):
        ax.set_xlabel("entries pruned (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"Pruning the IVON posterior on {task}: " + " vs ".join(results))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
