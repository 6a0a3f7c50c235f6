"""Posterior-averaged prediction cost: K samples in one batched pass vs one mean forward vs K sequential passes.

Measured side by side in one run on the same batch of multiple-choice questions (letter-style: one row per
question, last-position logits only). Ratios are to one forward at the mean.

    python eval/bench_inference.py                    # SmolLM2-135M, 4-bit base, K=8, batch 8
    python eval/bench_inference.py --k 8 --batch_size 16 --no_4bit
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from ivon_lora.inference import draw_samples, lora_samples_per_row, tile_rows
from ivon_lora.models import load_base_model
from ivon_lora.posterior import VariationalLoraPosterior
from ivon_lora.serialization import lora_parameters


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--no_4bit", action="store_true")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base, _ = load_base_model(args.model, load_in_4bit=not args.no_4bit)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.eval()
    device = next(model.parameters()).device
    variances = {key: torch.full_like(p, 1e-4) for key, p in lora_parameters(model).items()}
    posterior = VariationalLoraPosterior(model, variances, ess=1e6)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    samples = draw_samples(posterior, args.k, torch.Generator().manual_seed(1))

    def mean_forward():
        model(input_ids=ids, logits_to_keep=1).logits.softmax(-1)

    def batched():
        with lora_samples_per_row(posterior, samples):
            logits = model(input_ids=tile_rows(ids, args.k), logits_to_keep=1).logits
        logits.softmax(-1).view(args.k, args.batch_size, -1).mean(0)

    def sequential():
        total = 0
        for k in range(args.k):
            with lora_samples_per_row(posterior, {key: v[k : k + 1] for key, v in samples.items()}):
                total = total + model(input_ids=ids, logits_to_keep=1).logits.softmax(-1)
        total / args.k

    t_mean = timed(mean_forward, args.repeats)
    t_batched = timed(batched, args.repeats)
    t_sequential = timed(sequential, args.repeats)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device={where}  4bit={not args.no_4bit}  K={args.k}  batch={args.batch_size}x{args.seq_len}  repeats={args.repeats}")
    print(f"mean forward          {t_mean * 1e3:9.1f} ms   1.00x")
    print(f"K batched (one pass)  {t_batched * 1e3:9.1f} ms   {t_batched / t_mean:.2f}x")
    print(f"K sequential passes   {t_sequential * 1e3:9.1f} ms   {t_sequential / t_mean:.2f}x")


if __name__ == "__main__":
    main()
