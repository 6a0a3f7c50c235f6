"""``ivon-lora``: the command line for the main user tasks.

    ivon-lora train    [recipe flags]                      train + evaluate + save (recipes/llama_commonsense.py)
    ivon-lora evaluate ADAPTER --task arc_easy [-k 10]      evaluate a saved variational adapter
    ivon-lora prune    ADAPTER OUT --amount 0.5 [--criterion snr]   prune entries (or --ranks k)
    ivon-lora push     ADAPTER USER/REPO [--private]        upload mean + variance + card in one Hub commit
    ivon-lora compare  [--tasks ...] [--seeds ...]          IVON vs AdamW study, resumable
    ivon-lora mbr      ADAPTER --prompts F.jsonl --output O.jsonl [--coverage 0.8 --calibration H.jsonl]
                                                            uncertainty-aware MBR decoding with abstention

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
    parser.add_argument("adapter", help="Local folder or Hub repo id of the variational adapter.")
    parser.add_argument("--base_model", help="Base model (default: the adapter's base_model_name_or_path).")
    parser.add_argument("--task", required=True, help="Task name, e.g. arc_easy.")
    parser.add_argument("-k", "--eval_samples", type=int, default=10,
                        help="Posterior samples to average (0: mean only).")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="Scale the posterior variances (>1 widens, <1 narrows; VariationalLoraPosterior.temper).")
    parser.add_argument("--scoring_mode", default="auto", choices=["auto", "letter", "cloze"])
    parser.add_argument("--max_eval", type=int, default=None, help="Evaluate at most this many questions.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--no_load_in_4bit", action="store_true", help="Load the base in full precision.")
    parser.add_argument("--data_source", default="auto", choices=["auto", "hub", "offline"])
    parser.add_argument("--seed", type=int, default=42, help="Seed of the posterior samples.")
    parser.add_argument("--split_seed", type=int, default=1234,
                        help="The training run's split seed (the recipe's default): the held-out questions it left.")
    parser.add_argument("--output_dir", default="outputs/evaluate")
    args = parser.parse_args(argv)
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")

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
    if args.temperature != 1.0:
        posterior = posterior.temper(args.temperature)
    _, dataset = load_task_splits(args.task, args.data_source, seed=args.split_seed, max_eval=args.max_eval)
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


def _read_prompts(path: Path) -> list[str]:
    """Prompts from a ``.jsonl`` file (a ``"prompt"`` field per line) or a text file (one prompt per line)."""
    import json

    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{number}: every line needs a string field 'prompt'")
        prompts.append(record["prompt"])
    return prompts


def _mbr(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="ivon-lora mbr",
        description="Uncertainty-aware MBR decoding with a variational adapter; abstains on low expected utility.",
    )
    parser.add_argument("adapter", help="Local folder or Hub repo id of the variational adapter.")
    parser.add_argument("--prompts", type=Path, required=True,
                        help="A .jsonl file with a 'prompt' field per line, or a text file with one prompt per line.")
    parser.add_argument("--output", type=Path, required=True,
                        help="Decisions as .jsonl: prompt, output, score, abstained.")
    parser.add_argument("--method", default="pooled", choices=["plain", "pooled", "per_model", "token_mixture"])
    parser.add_argument("--utility", default="chrf", help="chrf, bleu, rouge_l, exact_match, f1, or a registered name.")
    parser.add_argument("-M", "--num_models", type=int, default=4, help="Posterior samples.")
    parser.add_argument("-N", "--samples_per_model", type=int, default=8, help="Outputs per posterior sample.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--epsilon", type=float, default=0.0, help="Epsilon-sampling cut-off (0: ancestral).")
    threshold = parser.add_mutually_exclusive_group()
    threshold.add_argument("--threshold", type=float, help="Abstain when the expected utility is below this.")
    threshold.add_argument("--coverage", type=float, help="Target coverage in (0, 1], calibrated on --calibration.")
    parser.add_argument("--calibration", type=Path, help="Held-out prompts (same formats) for --coverage.")
    parser.add_argument("--chat", action="store_true", help="Wrap each prompt as a user turn of the chat template.")
    parser.add_argument("--base_model", help="Base model (default: the adapter's base_model_name_or_path).")
    parser.add_argument("--no_load_in_4bit", action="store_true", help="Load the base in full precision.")
    parser.add_argument("--max_batch_rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.coverage is None) != (args.calibration is None):
        parser.error("--coverage and --calibration go together")
    prompts = _read_prompts(args.prompts)
    held_out = _read_prompts(args.calibration) if args.calibration is not None else []
    if not prompts or (args.calibration is not None and not held_out):
        raise ValueError("no prompts to decode (empty --prompts or --calibration file)")

    import dataclasses
    import json

    from peft import PeftConfig

    from ivon_lora.hub import resolve_adapter_folder
    from ivon_lora.mbr import abstain, calibrate_threshold, mbr_decode
    from ivon_lora.models import load_base_model
    from ivon_lora.posterior import VariationalLoraPosterior

    folder = resolve_adapter_folder(args.adapter)
    base_name = args.base_model or PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    base, tokenizer = load_base_model(base_name, load_in_4bit=not args.no_load_in_4bit)
    posterior = VariationalLoraPosterior.from_pretrained(base, folder)
    posterior.model.eval()

    def decode(texts: list[str]) -> list:
        if args.chat:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                   add_generation_prompt=True) for t in texts]
        return mbr_decode(
            posterior, tokenizer, texts, method=args.method, utility=args.utility, num_models=args.num_models,
            samples_per_model=args.samples_per_model, max_new_tokens=args.max_new_tokens, epsilon=args.epsilon,
            seed=args.seed, max_batch_rows=args.max_batch_rows, add_special_tokens=not args.chat, progress=True,
        )

    threshold_ = args.threshold
    if args.coverage is not None:
        threshold_ = calibrate_threshold([d.score for d in decode(held_out)], args.coverage)
        logger.info("threshold %.4f gives coverage >= %.2f on %d held-out prompts", threshold_, args.coverage,
                    len(held_out))
    decisions = decode(prompts)
    if threshold_ is not None:
        decisions = [dataclasses.replace(d, abstained=bool(abstain(d.score, threshold_))) for d in decisions]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as handle:
        for prompt, decision in zip(prompts, decisions):
            record = {"prompt": prompt, "output": decision.text, "score": decision.score,
                      "abstained": decision.abstained, "distinct_samples": len(decision.candidates)}
            handle.write(json.dumps(record) + "\n")
    answered = sum(not d.abstained for d in decisions)
    print(f"{args.output}: answered {answered} of {len(decisions)} prompts"
          + (f" (threshold {threshold_:.4f})" if threshold_ is not None else ""))


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "train": (_train, "train, evaluate and save an adapter (the recipe's flags; --help for them)"),
    "evaluate": (_evaluate, "evaluate a saved variational adapter at the mean and K-sample average"),
    "prune": (_prune, "prune a variational adapter by SNR, variance or magnitude (entries or whole ranks)"),
    "push": (_push, "push an adapter with its variances and a model card to the Hub in one commit"),
    "compare": (_compare, "IVON vs AdamW study over tasks x seeds (eval/compare_optimizers.py)"),
    "mbr": (_mbr, "uncertainty-aware MBR decoding of your prompts with abstention (threshold or coverage)"),
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
