"""``ivon-lora``: the command line for the main user tasks.

    ivon-lora train    [recipe flags]                      train + evaluate + save (recipes/llama_commonsense.py)
    ivon-lora evaluate ADAPTER --task arc_easy [-k 10]      evaluate a saved variational adapter
    ivon-lora prune    ADAPTER OUT --amount 0.5 [--criterion snr]   prune entries (or --ranks k)
    ivon-lora push     ADAPTER USER/REPO [--private]        upload mean + variance + card in one Hub commit
    ivon-lora compare  [--tasks ...] [--seeds ...]          IVON vs AdamW study, resumable

Exit codes: 0 success; 2 invalid input (bad flags, malformed adapter folder, unknown task); 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("ivon_lora.cli")

EXIT_OK, EXIT_FAILURE, EXIT_INVALID_INPUT = 0, 1, 2


def _train(argv: list[str]) -> None:
    from ivon_lora.cli_utils import parse_config
    from ivon_lora.commonsense import CommonsenseConfig, run_commonsense

    run_commonsense(parse_config(CommonsenseConfig, argv, description="Train, evaluate and save one adapter."))


def _compare(argv: list[str]) -> None:
    from ivon_lora.cli_utils import parse_config
    from ivon_lora.study import StudyConfig, run_study

    run_study(parse_config(StudyConfig, argv, description="IVON vs AdamW over tasks x seeds (resumable)."))


def _evaluate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ivon-lora evaluate", description="Evaluate a saved variational adapter.")
    parser.add_argument("adapter", help="Local folder or Hub repo id of the adapter (with adapter_variance.safetensors).")
    parser.add_argument("--base_model", help="Base model (default: the adapter's base_model_name_or_path).")
    parser.add_argument("--task", required=True, help="Task name, e.g. arc_easy.")
    parser.add_argument("-k", "--eval_samples", type=int, default=10, help="Posterior samples to average (0: mean only).")
    parser.add_argument("--scoring_mode", default="auto", choices=["auto", "letter", "cloze"])
    parser.add_argument("--max_eval", type=int, default=None, help="Evaluate at most this many questions.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--no_load_in_4bit", action="store_true", help="Load the base in full precision.")
    parser.add_argument("--data_source", default="auto", choices=["auto", "hub", "offline"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default="outputs/evaluate")
    args = parser.parse_args(argv)

    from peft import PeftConfig

    from ivon_lora.commonsense import evaluate_modes, evaluation_results, write_evaluation
    from ivon_lora.evaluation.data import load_task_splits
    from ivon_lora.evaluation.scoring import MultipleChoiceScorer
    from ivon_lora.hub import resolve_adapter_folder
    from ivon_lora.models import load_base_model
    from ivon_lora.posterior import VariationalLoraPosterior

    folder = resolve_adapter_folder(args.adapter)
    base_name = args.base_model or PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    base, tokenizer = load_base_model(base_name, load_in_4bit=not args.no_load_in_4bit)
    posterior = VariationalLoraPosterior.from_pretrained(base, folder)
    _, dataset = load_task_splits(args.task, args.data_source, seed=args.seed, max_eval=args.max_eval)
    scorer = MultipleChoiceScorer(tokenizer, args.task, mode=args.scoring_mode, model=base)
    predictions = evaluate_modes(
        posterior.model, scorer, dataset, posterior=posterior, eval_samples=args.eval_samples,
        batch_size=args.batch_size, seed=args.seed,
    )
    write_evaluation(Path(args.output_dir), args.task, predictions, evaluation_results(args.task, predictions))


def _prune(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ivon-lora prune", description="Prune a saved variational adapter.")
    parser.add_argument("adapter", help="Local folder or Hub repo id of the adapter.")
    parser.add_argument("output_dir", type=Path, help="Where the pruned adapter is saved.")
    parser.add_argument("--amount", type=float, help="Fraction of entries to prune (unstructured), in [0, 1).")
    parser.add_argument("--criterion", default="snr", choices=["snr", "variance", "magnitude"])
    parser.add_argument("--scope", default="tensor", choices=["tensor", "global"])
    parser.add_argument("--ranks", type=float, help="Structured: rank kept per layer (int) or fraction of components.")
    parser.add_argument("--base_model", help="Base model (default: the adapter's base_model_name_or_path).")
    args = parser.parse_args(argv)
    if (args.amount is None) == (args.ranks is None):
        parser.error("give exactly one of --amount (unstructured) or --ranks (structured)")

    from peft import PeftConfig

    from ivon_lora.hub import resolve_adapter_folder
    from ivon_lora.models import load_base_model
    from ivon_lora.posterior import VariationalLoraPosterior

    folder = resolve_adapter_folder(args.adapter)
    base_name = args.base_model or PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    base, _ = load_base_model(base_name, load_in_4bit=False)
    posterior = VariationalLoraPosterior.from_pretrained(base, folder)
    if args.ranks is not None:
        keep = int(args.ranks) if args.ranks >= 1 else args.ranks
        pruned = posterior.prune_ranks(keep, "snr" if args.criterion == "variance" else args.criterion)
    else:
        pruned = posterior.prune(args.amount, args.criterion, args.scope)
    print(pruned.save_pretrained(args.output_dir))


def _push(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ivon-lora push", description="Upload a variational adapter to the Hub.")
    parser.add_argument("adapter", type=Path, help="Folder written by save_model / save_pretrained.")
    parser.add_argument("repo_id", help="Target repo, e.g. user/my-ivon-adapter.")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="Branch to commit to (created if missing).")
    parser.add_argument("--commit_message")
    parser.add_argument("--create_pr", action="store_true")
    parser.add_argument("--base_model", help="Hub id of the base model for the card (default: from adapter_config).")
    args = parser.parse_args(argv)

    from peft import PeftConfig

    from ivon_lora.hub import push_adapter_folder
    from ivon_lora.model_card import write_model_card

    base = args.base_model or PeftConfig.from_pretrained(str(args.adapter)).base_model_name_or_path
    write_model_card(args.adapter, base_model=base, repo_id=args.repo_id)
    info = push_adapter_folder(
        args.adapter, args.repo_id, private=args.private or None, revision=args.revision,
        commit_message=args.commit_message, create_pr=args.create_pr,
    )
    print(getattr(info, "commit_url", info))


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "train": (_train, "train, evaluate and save an adapter (the recipe's flags; --help for them)"),
    "evaluate": (_evaluate, "evaluate a saved variational adapter at the mean and K-sample average"),
    "prune": (_prune, "prune a variational adapter by SNR, variance or magnitude (entries or whole ranks)"),
    "push": (_push, "push an adapter with its variances and a model card to the Hub in one commit"),
    "compare": (_compare, "IVON vs AdamW study over tasks x seeds (eval/compare_optimizers.py)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [__doc__.strip(), "", "commands:"] + [f"  {name:<10}{help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nivon-lora: unknown command {argv[0]!r}", file=sys.stderr)
            return EXIT_INVALID_INPUT
        return EXIT_OK if argv else EXIT_INVALID_INPUT
    command, _ = COMMANDS[argv[0]]
    try:
        command(argv[1:])
    except SystemExit as exit_:  # argparse: --help is 0, a usage error is 2
        code = exit_.code if isinstance(exit_.code, int) else EXIT_INVALID_INPUT
        if not isinstance(exit_.code, int) and exit_.code is not None:
            print(exit_.code, file=sys.stderr)
        return code
    except (ValueError, KeyError, FileNotFoundError) as error:
        logger.error("%s", error)
        return EXIT_INVALID_INPUT
    except Exception:  # noqa: BLE001 - report, then a distinct exit code
        logger.exception("ivon-lora %s failed", argv[0])
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
