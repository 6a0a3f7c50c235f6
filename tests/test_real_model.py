"""Real SmolLM2-135M-Instruct (offline GGUF conversion, 4-bit NF4 base): the slice of real-model checks CI runs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ivon_lora import VariationalLoraPosterior, VariationalTrainer, VariationalTrainingArguments
from ivon_lora.evaluation.data import load_task_splits
from ivon_lora.evaluation.scoring import MultipleChoiceScorer
from ivon_lora.models import load_base_model
from ivon_lora.serialization import VARIANCE_FILE, lora_parameters

pytestmark = pytest.mark.slow


def test_ivon_steps_save_and_reload_with_peft_and_posterior(tmp_path):
    base, tokenizer = load_base_model(load_in_4bit=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    train, _ = load_task_splits("arc_easy", "offline", max_train=8, max_eval=1)
    scorer = MultipleChoiceScorer(tokenizer, "arc_easy", mode="cloze", max_length=128)
    args = VariationalTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                        learning_rate=0.1, ess=1e6, report_to=[], use_cpu=True, save_strategy="no",
                                        remove_unused_columns=False, disable_tqdm=True)
    trainer = VariationalTrainer(model=model, args=args, train_dataset=train, data_collator=scorer.collate,
                                 loss_fn=scorer.loss)
    trainer.train()
    assert trainer.ivon.param_groups[0]["step"] == 2
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / VARIANCE_FILE).is_file()
    means = {k: p.detach().clone() for k, p in lora_parameters(model).items()}
    variances = trainer.posterior().variance()

    fresh, _ = load_base_model(load_in_4bit=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    assert not [w for w in caught if "key" in str(w.message).lower()]
    for key, p in lora_parameters(plain).items():
        torch.testing.assert_close(p.detach(), means[key])
    post = VariationalLoraPosterior.from_pretrained(plain, tmp_path / "adapter")
    for key, v in post.variance().items():
        torch.testing.assert_close(v, variances[key])


def test_recipe_runs_end_to_end(tmp_path):
    from recipes_entry import run_recipe

    results = run_recipe(["--max_steps", "2", "--max_train", "8", "--max_eval", "4", "--eval_samples", "2",
                          "--per_device_train_batch_size", "2", "--eval_batch_size", "4", "--output_dir", str(tmp_path)])
    modes = results["arc_easy"]
    assert {"ivon_mean", "ivon_avg_k2"} <= set(modes) and modes["scoring_mode"] == "cloze"
    for name in ("eval_results.json", "reliability.png", "config.yaml", "adapter/adapter_variance.safetensors",
                 "adapter/README.md"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["arc_easy"]["ivon_mean"]["n"] == 4 and 0 <= saved["arc_easy"]["ivon_mean"]["acc"] <= 100
