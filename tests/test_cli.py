"""The ivon-lora console script: help, exit codes, and a push that reaches huggingface_hub's commit API."""

from __future__ import annotations

import subprocess
import sys

import pytest
from huggingface_hub import CommitInfo, HfApi

from conftest import load_tiny_lora
from ivon_lora.cli import EXIT_INVALID_INPUT, EXIT_OK, main
from ivon_lora.posterior import VariationalLoraPosterior
from ivon_lora.serialization import lora_parameters


def test_help_and_usage_errors(capsys):
    assert main(["--help"]) == EXIT_OK
    assert "evaluate" in capsys.readouterr().out
    assert main([]) == EXIT_INVALID_INPUT
    assert main(["frobnicate"]) == EXIT_INVALID_INPUT
    assert main(["evaluate", "--help"]) == EXIT_OK
    assert main(["evaluate"]) == EXIT_INVALID_INPUT  # missing required arguments
    assert main(["evaluate", "some/adapter", "--task", "arc_easy", "--temperature", "0"]) == EXIT_INVALID_INPUT


def test_invalid_adapter_is_invalid_input(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty"), "--task", "arc_easy"]) == EXIT_INVALID_INPUT
    assert main(["push", str(tmp_path / "empty"), "user/repo"]) == EXIT_INVALID_INPUT


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "ivon_lora.cli", "push", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "repo_id" in result.stdout


def test_push_makes_one_commit_with_card(tiny_checkpoints, tmp_path, monkeypatch):
    import torch

    model = load_tiny_lora(tiny_checkpoints["llama"])
    variances = {k: torch.full_like(p, 0.01) for k, p in lora_parameters(model).items()}
    folder = VariationalLoraPosterior(model, variances, ess=100.0).save_pretrained(tmp_path / "adapter")
    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: commits.append(
        (repo_id, sorted(op.path_in_repo for op in operations))) or CommitInfo(
        commit_url=f"https://hf.co/{repo_id}/commit/1", commit_message="m", commit_description="", oid="1" * 40))
    code = main(["push", str(folder), "user/repo", "--base_model", "HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert code == EXIT_OK
    assert commits == [("user/repo", ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                      "adapter_variance.safetensors", "variational_config.json"])]


def test_prune_command_writes_a_pruned_adapter(tiny_checkpoints, tmp_path, monkeypatch):
    import torch

    import ivon_lora.models as models

    model = load_tiny_lora(tiny_checkpoints["llama"])
    variances = {k: torch.full_like(p, 0.01) for k, p in lora_parameters(model).items()}
    folder = VariationalLoraPosterior(model, variances, ess=100.0).save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(models, "load_base_model",
                        lambda name, load_in_4bit: (load_tiny_lora(tiny_checkpoints["llama"]).unload(), None))
    assert main(["prune", str(folder), str(tmp_path / "out"), "--amount", "0.5"]) == EXIT_OK
    pruned = VariationalLoraPosterior.from_pretrained(load_tiny_lora(tiny_checkpoints["llama"]).unload(),
                                                      tmp_path / "out" / "default_pruned")
    zeros = sum(int((p == 0).sum()) for p in pruned.parameters.values())
    assert zeros == sum(p.numel() for p in pruned.parameters.values()) // 2
    assert main(["prune", str(folder), str(tmp_path / "x")]) == EXIT_INVALID_INPUT  # neither --amount nor --ranks


def test_mbr_command_decodes_and_abstains(tiny_checkpoints, tmp_path, monkeypatch):
    import json

    import torch

    import ivon_lora.models as models
    from conftest import word_tokenizer

    model = load_tiny_lora(tiny_checkpoints["llama"])
    variances = {k: torch.full_like(p, 0.01) for k, p in lora_parameters(model).items()}
    folder = VariationalLoraPosterior(model, variances, ess=100.0).save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(models, "load_base_model", lambda name, load_in_4bit: (
        load_tiny_lora(tiny_checkpoints["llama"]).unload(), word_tokenizer()))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n" for i in range(5, 13)))
    common = [str(folder), "--prompts", str(prompts), "-M", "2", "-N", "3", "--max_new_tokens", "4"]

    def run(*extra: str) -> list[dict]:
        output = tmp_path / "decisions.jsonl"
        assert main(["mbr", *common, "--output", str(output), *extra]) == EXIT_OK
        return [json.loads(line) for line in output.read_text().splitlines()]

    never = run()
    assert [r["prompt"] for r in never] == [f"w{i} w{i + 1} w{i + 2}" for i in range(5, 13)]
    assert not any(r["abstained"] for r in never) and all(1 <= r["distinct_samples"] <= 6 for r in never)
    assert all(r["abstained"] for r in run("--threshold", "101"))  # chrF is at most 100
    # Calibrating on the same prompts (same seed, same decisions): coverage >= 50%, cut at the 4th best score.
    calibrated = run("--coverage", "0.5", "--calibration", str(prompts))
    scores = sorted((r["score"] for r in never), reverse=True)
    assert [r["abstained"] for r in calibrated] == [r["score"] < scores[3] for r in never]
    assert sum(not r["abstained"] for r in calibrated) >= 4

    prompts.write_text('{"text": "w5"}\n')
    assert main(["mbr", *common, "--output", str(tmp_path / "x.jsonl")]) == EXIT_INVALID_INPUT
    assert main(["mbr", *common, "--output", str(tmp_path / "x.jsonl"), "--coverage", "0.5"]) == EXIT_INVALID_INPUT
