"""VariationalTrainer / VariationalSFTTrainer on tiny 4-bit Llama, Qwen2 and Qwen3 models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

from conftest import ARCHITECTURES, load_tiny_lora, pattern_dataset
from ivon_lora import (
    IVON,
    VariationalLoraPosterior,
    VariationalSFTConfig,
    VariationalSFTTrainer,
    VariationalTrainer,
    VariationalTrainingArguments,
)
from ivon_lora.serialization import VARIANCE_FILE, lora_parameters

FAST = dict(report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, dataloader_num_workers=0)


def make_args(tmp_path: Path, **overrides) -> VariationalTrainingArguments:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, ess=1e4,
                  learning_rate=0.2, hess_init=1e-2, beta2=0.9, clip_radius=float("inf"), seed=0, **FAST)
    values.update(overrides)
    return VariationalTrainingArguments(**values)


class RecordingCollator:
    """Default collation that remembers every batch it produced (so tests can replay them)."""

    def __init__(self):
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, features):
        batch = transformers.default_data_collator(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def manual_ivon_run(model, args: VariationalTrainingArguments, batches, samples_per_step: int, clip: float = 0.0):
    """The plain research loop: each micro-batch one posterior sample; step after ``samples_per_step``."""
    model.train()
    opt = IVON([p for p in model.parameters() if p.requires_grad], **args.ivon_hyperparameters(args.ess))
    opt.mc_samples = samples_per_step
    scheduler = transformers.get_linear_schedule_with_warmup(opt, 0, args.max_steps)
    for start in range(0, len(batches), samples_per_step):
        for batch in batches[start : start + samples_per_step]:
            with opt.sampled_params(train=True):
                model(**batch).loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        scheduler.step()
    return opt


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trains_saves_and_reloads_on_4bit_base(arch, tiny_checkpoints, tmp_path):
    model = load_tiny_lora(tiny_checkpoints[arch])
    assert any("Linear4bit" in type(m).__name__ for m in model.modules())
    args = make_args(tmp_path, max_steps=40, per_device_train_batch_size=8)
    trainer = VariationalTrainer(model=model, args=args, train_dataset=pattern_dataset())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert isinstance(trainer.ivon, IVON)

    trainer.save_model(str(tmp_path / "adapter"))
    folder = tmp_path / "adapter"
    mean, variance = load_file(folder / "adapter_model.safetensors"), load_file(folder / VARIANCE_FILE)
    assert set(mean) == set(variance) and all(v.dtype == torch.float32 for v in variance.values())
    expected = {key: trainer.ivon.posterior_variance(p) for key, p in lora_parameters(model).items()}
    for key in expected:
        torch.testing.assert_close(variance[key], expected[key])
    config = json.loads((folder / "variational_config.json").read_text())
    assert config["ess"] == 1e4 and config["optimizer"] == "ivon"
    assert config["steps_trained"] == 40 and config["lr_scheduler_type"] == "linear"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = PeftModel.from_pretrained(load_tiny_lora(tiny_checkpoints[arch]).unload(), str(folder))
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    for key, p in lora_parameters(plain).items():
        torch.testing.assert_close(p.detach(), mean[key])

    posterior = VariationalLoraPosterior.from_pretrained(load_tiny_lora(tiny_checkpoints[arch]).unload(), str(folder))
    for key, v in posterior.variance().items():
        torch.testing.assert_close(v, variance[key])


def test_gradient_accumulation_equals_mc_samples_of_plain_loop(tiny_checkpoints, tmp_path):
    """GA=2 x batch 2 = one IVON step with 2 samples on the same micro-batches and the same noise."""
    collator = RecordingCollator()
    model = load_tiny_lora(tiny_checkpoints["llama"])
    args = make_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3)
    trainer = VariationalTrainer(model=model, args=args, train_dataset=pattern_dataset(12), data_collator=collator)
    trainer.train()

    reference = load_tiny_lora(tiny_checkpoints["llama"])
    opt = manual_ivon_run(reference, args, collator.batches, samples_per_step=2)
    for (key, p), q in zip(lora_parameters(model).items(), lora_parameters(reference).values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(trainer.ivon.state[p]["hess"], opt.state[q]["hess"], rtol=1e-4, atol=1e-7)
    # Guard against a vacuous pass: the step changed the adapter.
    start = load_tiny_lora(tiny_checkpoints["llama"])
    assert not torch.allclose(next(iter(lora_parameters(start).values())), next(iter(lora_parameters(model).values())))


def test_mc_samples_per_micro_batch(tiny_checkpoints, tmp_path):
    collator = RecordingCollator()
    model = load_tiny_lora(tiny_checkpoints["llama"])
    args = make_args(tmp_path, per_device_train_batch_size=4, mc_samples=2, max_steps=2)
    trainer = VariationalTrainer(model=model, args=args, train_dataset=pattern_dataset(8), data_collator=collator)
    trainer.train()
    reference = load_tiny_lora(tiny_checkpoints["llama"])
    twice = [b for b in collator.batches for _ in range(2)]
    manual_ivon_run(reference, args, twice, samples_per_step=2)
    for p, q in zip(lora_parameters(model).values(), lora_parameters(reference).values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_max_grad_norm_clips_each_sample_before_capture(tiny_checkpoints, tmp_path):
    results = {}
    for clip in (0.0, 1e-3):
        collator = RecordingCollator()
        model = load_tiny_lora(tiny_checkpoints["llama"])
        args = make_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                         max_grad_norm=clip)
        trainer = VariationalTrainer(model=model, args=args, train_dataset=pattern_dataset(8), data_collator=collator)
        trainer.train()
        reference = load_tiny_lora(tiny_checkpoints["llama"])
        manual_ivon_run(reference, args, collator.batches, samples_per_step=2, clip=clip)
        for p, q in zip(lora_parameters(model).values(), lora_parameters(reference).values()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        results[clip] = [p.detach().clone() for p in lora_parameters(model).values()]
        if clip:
            assert any("grad_norm" in h for h in trainer.state.log_history)
    assert not all(torch.allclose(a, b) for a, b in zip(results[0.0], results[1e-3]))


def test_bf16_autocast_keeps_fp32_lora_and_state(tiny_checkpoints, tmp_path):
    model = load_tiny_lora(tiny_checkpoints["qwen2"])
    trainer = VariationalTrainer(model=model, args=make_args(tmp_path, bf16=True), train_dataset=pattern_dataset(16))
    trainer.train()
    for p in lora_parameters(model).values():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        assert trainer.ivon.state[p]["hess"].dtype == torch.float32


def test_fp16_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fp16 mixed precision is not supported"):
        VariationalTrainingArguments(output_dir=str(tmp_path), fp16=True, use_cpu=True, report_to=[])


@pytest.mark.parametrize("field, value", [("ess", 0.0), ("hess_init", -1.0), ("beta2", 1.0), ("mc_samples", 0),
                                          ("eval_posterior_samples", -1), ("clip_radius", 0.0)])
def test_invalid_arguments_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        VariationalTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **{field: value})


def test_ess_defaults_to_training_set_size(tiny_checkpoints, tmp_path):
    model = load_tiny_lora(tiny_checkpoints["llama"])
    trainer = VariationalTrainer(model=model, args=make_args(tmp_path, ess=None, max_steps=1),
                                 train_dataset=pattern_dataset(20))
    trainer.train()
    assert trainer.ivon.param_groups[0]["ess"] == 20.0


def test_resume_from_checkpoint_reproduces_uninterrupted_run(tiny_checkpoints, tmp_path):
    def run(out: str, max_steps: int, resume: str | None = None):
        model = load_tiny_lora(tiny_checkpoints["llama"], dropout=0.1)
        args = make_args(tmp_path, output_dir=out, max_steps=6, save_strategy="steps", save_steps=3)
        trainer = VariationalTrainer(model=model, args=args, train_dataset=pattern_dataset(16))
        if max_steps < 6:  # simulate a kill after `max_steps` by stopping the loop via a callback
            trainer.add_callback(StopAt(max_steps))
        trainer.train(resume_from_checkpoint=resume)
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        return model, trainer, losses

    full_model, full_trainer, full_losses = run(str(tmp_path / "full"), 6)
    run(str(tmp_path / "killed"), 3)
    resumed_model, resumed_trainer, resumed_losses = run(str(tmp_path / "killed"), 6, str(tmp_path / "killed/checkpoint-3"))
    assert [resumed_losses[s] for s in (4, 5, 6)] == [full_losses[s] for s in (4, 5, 6)]
    for p, q in zip(lora_parameters(full_model).values(), lora_parameters(resumed_model).values()):
        assert torch.equal(p, q)
        assert torch.equal(full_trainer.ivon.state[p]["hess"], resumed_trainer.ivon.state[q]["hess"])
    assert (tmp_path / "killed/checkpoint-3" / VARIANCE_FILE).is_file()


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True
        return control


def test_posterior_averaged_evaluation(tiny_checkpoints, tmp_path):
    model = load_tiny_lora(tiny_checkpoints["llama"])
    data = pattern_dataset(16)
    trainer = VariationalTrainer(model=model, args=make_args(tmp_path, eval_posterior_samples=4), train_dataset=data,
                                 eval_dataset=data)
    trainer.train()
    averaged = trainer.evaluate()["eval_loss"]
    trainer.args.eval_posterior_samples = 0
    at_mean = trainer.evaluate()["eval_loss"]
    assert averaged != at_mean and abs(averaged - at_mean) < 0.5
    # K = 1 average of probabilities reproduces the model's own loss under that one sample.
    trainer.args.eval_posterior_samples = 1
    assert abs(trainer.evaluate()["eval_loss"] - at_mean) < 0.2


def test_foreign_optimizer_is_refused(tiny_checkpoints, tmp_path):
    model = load_tiny_lora(tiny_checkpoints["llama"])
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="trains with IVON"):
        VariationalTrainer(model=model, args=make_args(tmp_path), train_dataset=pattern_dataset(4),
                           optimizers=(adamw, None))


def test_sft_trainer_variant(tiny_checkpoints, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 64)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                     bos_token="<s>")
    from datasets import Dataset

    rows = [{"text": " ".join(f"t{3 + (i + j) % 3 * 7}" for j in range(15))} for i in range(16)]
    model = load_tiny_lora(tiny_checkpoints["qwen3"])
    config = VariationalSFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=3,
                                  ess=1e4, max_length=32, **FAST)
    trainer = VariationalSFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer)
    trainer.train()
    assert isinstance(trainer.ivon, IVON) and trainer.ivon.param_groups[0]["step"] == 3
    trainer.save_model(str(tmp_path / "sft-adapter"))
    assert (tmp_path / "sft-adapter" / VARIANCE_FILE).is_file()


def test_ddp_two_cpu_ranks_equal_one_rank_replay(tiny_checkpoints, tmp_path):
    """torchrun with 2 gloo ranks: same means everywhere, per-rank noise, averaged ĝ and ε·g."""
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", str(worker),
         str(tiny_checkpoints["llama"]), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key])  # identical means on all ranks
    assert not torch.equal(ranks[0]["batches"][0]["input_ids"], ranks[1]["batches"][0]["input_ids"])

    model = load_tiny_lora(tiny_checkpoints["llama"])
    model.train()
    args = make_args(tmp_path, per_device_train_batch_size=2, max_steps=ranks[0]["steps"])

    class RankReplay(IVON):
        replay_rank = 0

        def _standard_normal(self, params, train=True):
            saved = (self._rank, self._samples_in_step)
            self._rank, self._samples_in_step = self.replay_rank, 0
            try:
                return super()._standard_normal(params, train)
            finally:
                self._rank, self._samples_in_step = saved

    opt = RankReplay([p for p in model.parameters() if p.requires_grad], **args.ivon_hyperparameters(args.ess))
    scheduler = transformers.get_linear_schedule_with_warmup(opt, 0, args.max_steps)
    for step in range(args.max_steps):
        for rank in range(2):
            opt.replay_rank = rank
            with opt.sampled_params(train=True):
                model(**ranks[rank]["batches"][step]).loss.backward()
        opt.step()
        scheduler.step()
    for key, p in lora_parameters(model).items():
        torch.testing.assert_close(p.detach(), ranks[0]["params"][key], rtol=1e-5, atol=1e-6)
