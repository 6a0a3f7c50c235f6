"""VariationalTrainer (IVON) vs Trainer (AdamW) on the same QLoRA model, data and steps: step time and peak memory.

Each optimizer runs in its own fresh subprocess (so peak memory is its own), alternating over ``--rounds``; the
ratios IVON / AdamW are computed from the medians of the same invocation. Memory is the CUDA peak allocation on
GPU, and on CPU the peak resident set size sampled every 5 ms during ``train()`` (both workers import the same
modules, so the difference is training memory, not imports).

    python eval/bench_trainer.py                          # SmolLM2-135M, 4-bit base, LoRA r=8 q/v
    python eval/bench_trainer.py --model /path/to/llama-1b --steps 20 --seq_len 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

import torch


def worker(args: argparse.Namespace) -> dict[str, float]:
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from ivon_lora.models import load_base_model
    from ivon_lora.trainer import VariationalTrainer
    from ivon_lora.training_args import VariationalTrainingArguments

    base, _ = load_base_model(args.model, load_in_4bit=not args.no_4bit)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size * (args.steps + args.warmup), args.seq_len), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    common = dict(output_dir="/tmp/bench_trainer", per_device_train_batch_size=args.batch_size, max_steps=args.steps + args.warmup,
                  save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True,
                  use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), seed=0)
    if args.worker == "ivon":
        trainer = VariationalTrainer(model=model, args=VariationalTrainingArguments(ess=1e6, **common), train_dataset=data)
    else:
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(learning_rate=5e-5, **common),
                                       train_dataset=data)
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_peak = [0]
    done = threading.Event()

    def sample_rss() -> None:
        process = psutil.Process()
        while not done.is_set():
            rss_peak[0] = max(rss_peak[0], process.memory_info().rss)
            done.wait(0.005)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    trainer.train()
    done.set()
    sampler.join()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else rss_peak[0] / 2**20
    return {"step_s": statistics.median(times[args.warmup:]), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Base model (default: the offline SmolLM2-135M-Instruct).")
    parser.add_argument("--no_4bit", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=["ivon", "adamw"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return

    forwarded = list(sys.argv[1:])
    results: dict[str, list[dict[str, float]]] = {"adamw": [], "ivon": []}
    for _ in range(args.rounds):
        for name in ("adamw", "ivon"):
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *forwarded, "--worker", name],
                                 capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.split("RESULT ", 1)[1]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device={device}  model={args.model or 'SmolLM2-135M-Instruct'}  4bit={not args.no_4bit}  batch={args.batch_size}x"
          f"{args.seq_len}  steps={args.steps} (+{args.warmup} warm-up)  rounds={args.rounds}")
    summary = {name: {k: statistics.median(r[k] for r in runs) for k in ("step_s", "peak_mib")} for name, runs in results.items()}
    for name, row in summary.items():
        print(f"{name:<6} step {row['step_s'] * 1e3:9.1f} ms   peak {row['peak_mib']:9.1f} MiB")
    print(f"IVON/AdamW: step time {summary['ivon']['step_s'] / summary['adamw']['step_s']:.3f}x, "
          f"peak memory {summary['ivon']['peak_mib'] / summary['adamw']['peak_mib']:.3f}x")


if __name__ == "__main__":
    main()
