"""Cost of uncertainty-aware MBR against plain MBR with the same number of samples, in one run.

On the same QA prompts (NQ-Open chat prompts, as in ``mbr_abstention.py``), timed in alternating repeats so
that load changes hit both sides alike:

* plain MBR: 32 samples of the mean model, MBR with the utility;
* uncertainty-aware MBR: N = 8 samples from each of M = 4 posterior samples (one batched ``generate``),
  Eq. 9 and Eq. 10 (both from the same samples; Eq. 10 is timed as the utility part);
* Eq. 13 token mixture: 8 samples from the mixture of the 4 models (32 rows).

Reported: generation and utility seconds, the ratios uncertainty-aware / plain (target <= 1.15) and
utility / generation (target <= 0.05), with and without the shared prompt KV cache. Sampled models can stop at
different lengths, so the decode steps (longest output) and generated tokens of each side are printed too, and
the generation ratio per decode step separates the cost of per-row posterior samples from longer outputs. Each
part is the minimum over the repeats (the least disturbed run), as CPU time of this process (all threads) and as
wall time: on a shared machine other jobs inflate wall times at random, CPU time much less.

    python eval/bench_mbr.py                 # SmolLM2-135M-Instruct, 4-bit base
    python eval/bench_mbr.py --tiny          # a random 2-layer model with SmolLM2's tokenizer (smoke test)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from mbr_abstention import build_posterior, load_questions, qa_prompts
from peft import LoraConfig, get_peft_model

from ivon_lora.mbr import decide, get_utility, sample_posterior_outputs
from ivon_lora.models import resolve_model_source
from ivon_lora.posterior import VariationalLoraPosterior
from ivon_lora.serialization import lora_parameters


def tiny_posterior(tokenizer: Any, std: float) -> VariationalLoraPosterior:
    """A random 2-layer Llama over the real tokenizer's vocabulary, for a quick run of the script itself."""
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(config), LoraConfig(r=8, lora_alpha=16))
    variances = {key: torch.full_like(p, std**2) for key, p in lora_parameters(model).items()}
    return VariationalLoraPosterior(model.eval(), variances, ess=1.0)


def timed(fn: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """Wall seconds and CPU seconds of this process (all threads; robust to other jobs on a shared machine)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}, result


def run_once(posterior: VariationalLoraPosterior, tokenizer: Any, prompts: list[str], args: argparse.Namespace,
             reuse_prompt_cache: bool) -> tuple[dict[str, dict[str, float]], dict[str, tuple[int, int]]]:
    """Seconds (wall and CPU) of generation and utility for plain MBR, Eq. 9/10 and Eq. 13 on all prompts, and
    (decode steps, generated tokens) of each side's samples."""
    common = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, add_special_tokens=False,
                  max_batch_rows=args.max_batch_rows, reuse_prompt_cache=reuse_prompt_cache)
    m, n = args.num_models, args.samples_per_model
    utility = get_utility(args.utility)
    times = {}
    times["plain generate"], plain = timed(lambda: sample_posterior_outputs(
        posterior, tokenizer, prompts, num_models=0, samples_per_model=m * n, **common))
    times["plain utility"], _ = timed(lambda: [decide(s, method="plain", utility=utility) for s in plain])
    times["UA generate"], samples = timed(lambda: sample_posterior_outputs(
        posterior, tokenizer, prompts, num_models=m, samples_per_model=n, **common))
    times["UA utility (Eq. 9)"], _ = timed(lambda: [decide(s, method="pooled", utility=utility) for s in samples])
    times["UA utility (Eq. 10)"], _ = timed(lambda: [decide(s, method="per_model", utility=utility) for s in samples])
    times["mixture generate"], mixture = timed(lambda: sample_posterior_outputs(
        posterior, tokenizer, prompts, num_models=m, samples_per_model=n, token_mixture=True, **common))
    times["mixture utility"], _ = timed(lambda: [decide(s, method="token_mixture", utility=utility) for s in mixture])
    lengths = {
        side: (max(int(s.num_tokens.max()) for s in outputs), sum(int(s.num_tokens.sum()) for s in outputs))
        for side, outputs in (("plain", plain), ("UA", samples), ("mixture", mixture))
    }
    return times, lengths


def summarize(
    runs: list[dict[str, dict[str, float]]], clock: str, lengths: dict[str, tuple[int, int]]
) -> dict[str, Any]:
    """Minimum over repeats (the least disturbed run) of every part, and the ratios of interest."""
    best = {key: min(r[key][clock] for r in runs) for key in runs[0]}
    plain = best["plain generate"] + best["plain utility"]
    per_step = {side: best[f"{side} generate"] / lengths[side][0] for side in ("plain", "UA")}
    return {
        "seconds": best,
        "ratios": {
            "UA / plain generation per decode step": per_step["UA"] / per_step["plain"],
            "UA (Eq. 10) / plain MBR": (best["UA generate"] + best["UA utility (Eq. 10)"]) / plain,
            "UA (Eq. 9) / plain MBR": (best["UA generate"] + best["UA utility (Eq. 9)"]) / plain,
            "Eq. 13 / plain MBR": (best["mixture generate"] + best["mixture utility"]) / plain,
            "utility / generation (UA, Eq. 10)": best["UA utility (Eq. 10)"] / best["UA generate"],
            "utility / generation (UA, Eq. 9)": best["UA utility (Eq. 9)"] / best["UA generate"],
            "utility / generation (plain)": best["plain utility"] / best["plain generate"],
        },
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tiny", action="store_true", help="random 2-layer model (checks the script, not speed)")
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--posterior-std", type=float, default=0.03)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num-models", type=int, default=4)
    parser.add_argument("--samples-per-model", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch-rows", type=int, default=256)
    parser.add_argument("--utility", default="chrf")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    if args.tiny:
        source, local_files_only = resolve_model_source(args.model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        posterior = tiny_posterior(tokenizer, args.posterior_std)
    else:
        posterior, tokenizer = build_posterior(args.model, None, args.posterior_std, 8, load_in_4bit=not args.no_4bit)
    prompts = qa_prompts(tokenizer, [q for q, _ in load_questions("nq_open", args.prompts)])
    run_once(posterior, tokenizer, prompts[:1], args, True)  # warm-up
    runs: dict[bool, list[dict[str, dict[str, float]]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for reuse in (True, False):
            times, lengths = run_once(posterior, tokenizer, prompts, args, reuse)  # lengths: the same every run
            runs[reuse].append(times)

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device={where}  model={'tiny random' if args.tiny else args.model or 'SmolLM2-135M-Instruct'}  "
          f"4bit={not (args.no_4bit or args.tiny)}  prompts={len(prompts)}  M={args.num_models}  "
          f"N={args.samples_per_model}  max_new_tokens={args.max_new_tokens}  utility={args.utility}  "
          f"repeats={args.repeats} (minimum reported)")
    print("decode steps / generated tokens: " + ", ".join(f"{side} {steps} / {tokens}"
                                                           for side, (steps, tokens) in lengths.items()))
    report: dict[str, Any] = {"lengths": lengths}
    for reuse, label in ((True, "shared prompt cache"), (False, "prompt on every row")):
        report[label] = {clock: summarize(runs[reuse], clock, lengths) for clock in ("cpu", "wall")}
        print(f"\n[{label}]            CPU s    wall s")
        cpu, wall = report[label]["cpu"], report[label]["wall"]
        for key in cpu["seconds"]:
            print(f"  {key:24s} {cpu['seconds'][key]:8.3f}  {wall['seconds'][key]:8.3f}")
        for key in cpu["ratios"]:
            print(f"  {key:36s} {cpu['ratios'][key]:6.3f}  {wall['ratios'][key]:6.3f}")
    print("\n" + json.dumps(report))


if __name__ == "__main__":
    main()
