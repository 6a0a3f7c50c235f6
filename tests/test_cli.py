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
