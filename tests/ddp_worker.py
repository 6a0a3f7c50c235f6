"""Run by tests/test_trainer.py under `torchrun --nproc_per_node 2`: a short IVON run on 2 gloo CPU ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from conftest import load_tiny_lora, pattern_dataset
from ivon_lora import VariationalTrainer, VariationalTrainingArguments
from ivon_lora.serialization import lora_parameters

STEPS = 3


class RecordingCollator:
    def __init__(self):
        self.batches = []

    def __call__(self, features):
        batch = transformers.default_data_collator(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def main(checkpoint: str, out: str) -> None:
    collator = RecordingCollator()
    model = load_tiny_lora(Path(checkpoint))
    args = VariationalTrainingArguments(
        output_dir=str(Path(out) / "ddp"), per_device_train_batch_size=2, max_steps=STEPS, ess=1e4, learning_rate=0.2,
        hess_init=1e-2, beta2=0.9, clip_radius=float("inf"), seed=0, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="no", dataloader_num_workers=0,
    )
    trainer = VariationalTrainer(model=model, args=args, train_dataset=pattern_dataset(16), data_collator=collator)
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.state
    trainer.train()
    rank = dist.get_rank()
    params = {key: p.detach().clone() for key, p in lora_parameters(trainer.model).items()}
    torch.save({"params": params, "batches": collator.batches[:STEPS], "steps": STEPS}, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
