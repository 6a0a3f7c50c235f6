"""Posterior pruning vs magnitude pruning: ACC/ECE/NLL of the mean and the K-sample average against sparsity.

Trains one IVON adapter with the commonsense recipe (or loads one with --adapter), then prunes it by each criterion
(snr = |m|/σ, variance, magnitude = |m|) at each sparsity and evaluates every pruned adapter on the same questions.
Writes sweep.json, sweep.md and sweep.png to --output_dir. Finished points are reused from sweep.json.

    python eval/prune_sweep.py --max_steps 40 --max_eval 100 --eval_samples 4
    python eval/prune_sweep.py --adapter outputs/commonsense/adapter --task arc_easy
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ivon_lora.commonsense import CommonsenseConfig, evaluate_modes, run_commonsense  # noqa: E402
from ivon_lora.evaluation.data import load_task_splits  # noqa: E402
from ivon_lora.evaluation.scoring import MultipleChoiceScorer  # noqa: E402
from ivon_lora.models import load_base_model  # noqa: E402
from ivon_lora.posterior import VariationalLoraPosterior  # noqa: E402

logger = logging.getLogger("prune_sweep")
CRITERIA = ("snr", "variance", "magnitude")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, help="Existing variational adapter (default: train one first).")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 0.9, 0.95])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    parser.add_argument("--scope", default="tensor", choices=["tensor", "global"])
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--max_eval", type=int, default=100)
    parser.add_argument("--eval_samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/prune_sweep"))
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    adapter = args.adapter
    if adapter is None:
        train_dir = args.output_dir / "trained"
        adapter = train_dir / "adapter"
        if not (adapter / "adapter_variance.safetensors").is_file():
            run_commonsense(CommonsenseConfig(task=args.task, max_steps=args.max_steps, max_eval=args.max_eval,
                                              eval_samples=0, seed=args.seed, output_dir=str(train_dir)))
    base, tokenizer = load_base_model()
    posterior = VariationalLoraPosterior.from_pretrained(base, adapter)
    scorer = MultipleChoiceScorer(tokenizer, args.task, mode="auto", model=base)
    _, dataset = load_task_splits(args.task, seed=args.seed, max_eval=args.max_eval)

    results_path = args.output_dir / "sweep.json"
    results: dict[str, dict[str, dict]] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for criterion in args.criteria:
        for sparsity in args.sparsities:
            key = f"{sparsity:g}"
            if key in results.get(criterion, {}):
                continue
            name = f"pruned_{criterion}_{key.replace('.', '_')}"
            pruned = posterior.prune(sparsity, criterion, args.scope, adapter_name=name)
            predictions = evaluate_modes(pruned.model, scorer, dataset, posterior=pruned, eval_samples=args.eval_samples,
                                         seed=args.seed)
            results.setdefault(criterion, {})[key] = {mode: p.metrics for mode, p in predictions.items()}
            posterior.model.set_adapter(posterior.adapter_name)
            posterior.model.delete_adapter(name)
            args.output_dir.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            logger.info("%s %.0f%%: %s", criterion, 100 * sparsity,
                        {m: round(v["acc"], 1) for m, v in results[criterion][key].items()})
    (args.output_dir / "sweep.md").write_text(markdown(results))
    plot(results, args.output_dir / "sweep.png", args.task)


def markdown(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| criterion | sparsity | mode | ACC | ECE | NLL |", "|---|---|---|---|---|---|"]
    for criterion, points in results.items():
        for sparsity, modes in sorted(points.items(), key=lambda item: float(item[0])):
            for mode, m in modes.items():
                lines.append(f"| {criterion} | {float(sparsity):.0%} | {mode} | {m['acc']:.1f} | {m['ece']:.1f} | {m['nll']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, dict]], path: Path, task: str) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for criterion, points in results.items():
        xs = sorted(points, key=float)
        for mode, style in (("ivon_mean", "-o"), (next((m for m in points[xs[0]] if m.startswith("ivon_avg")), None), "--s")):
            if mode is None:
                continue
            for ax, metric in zip(axes, ("acc", "ece", "nll")):
                ax.plot([100 * float(x) for x in xs], [points[x][mode][metric] for x in xs], style, label=f"{criterion} {mode}")
    for ax, label in zip(axes, ("accuracy (%) ↑", "ECE (%) ↓", "NLL ↓")):
        ax.set_xlabel("entries pruned (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"Pruning the IVON posterior on {task}: SNR / variance vs magnitude")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
