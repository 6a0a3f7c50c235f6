"""Model cards of variational adapters: metadata, evaluation table and posterior statistics."""

from __future__ import annotations

import ast
import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

import ivon_lora
from ivon_lora.model_card import render_model_card, summarize_posterior, write_model_card

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
PREFIX = "base_model.model.model.layers"
# Posterior standard deviations per tensor, chosen so that every statistic is easy to compute by hand.
SIGMAS = {
    f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": [[0.1, 0.2], [0.3, 0.4]],
    f"{PREFIX}.1.self_attn.q_proj.lora_A.weight": [[0.5, 0.6], [0.7, 0.8]],
    f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": [[0.01], [0.02]],
    f"{PREFIX}.0.self_attn.v_proj.lora_A.weight": [[1.5, 2.5, 3.0]],
}
EVAL_RESULTS = {
    "arc_easy": {
        "adamw": {"acc": 0.57, "ece": 0.226, "nll": 2.04, "brier": 0.6123, "n": 300},
        "ivon_avg_k10": {"acc": 0.58, "ece": 0.2141, "nll": 1.94, "brier": 0.5901, "n": 300},
        "ivon_mean": {"acc": 0.59, "ece": 0.2139, "nll": 1.98, "brier": 0.5955, "n": 300},
        "scoring_mode": "cloze",
        "split": "test",
    },
    "my_task": {
        "ivon_mean": {"acc": 0.8, "ece": 0.05, "nll": 0.4, "brier": 0.3},
        "scoring_mode": "letter",
        "dataset": "me/my_data",
    },
}
METRIC_IDS = {"acc": "accuracy", "ece": "ece", "nll": "nll", "brier": "brier_score"}


def write_variances(folder: Path, sigmas: dict[str, list], *, kind: str = "variance") -> None:
    save_file(
        {key: torch.tensor(value) ** 2 for key, value in sigmas.items()},
        folder / "adapter_variance.safetensors",
        metadata={"format_version": "1", "kind": kind, "ess": "1000000", "weight_decay": "0.0001"},
    )


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "/local/copy/of/smollm2",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    means = {key: torch.zeros(torch.tensor(value).shape) for key, value in SIGMAS.items()}
    save_file(means, folder / "adapter_model.safetensors")
    write_variances(folder, SIGMAS)
    (folder / "variational_config.json").write_text(json.dumps({"lr": 0.03, "ess": 1e6, "hess_init": 0.001}))
    (folder / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    return folder


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Cells of the markdown table rows whose first cell is ``first_cell``."""
    rows = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    return [[cell.strip() for cell in row] for row in rows]


def test_metadata_round_trips_through_model_card_load(adapter: Path) -> None:
    path = write_model_card(adapter, base_model=BASE, repo_id="user/smol-ivon", datasets=["allenai/ai2_arc"])

    data = ModelCard.load(path).data
    assert data.library_name == "peft"
    assert data.base_model == BASE
    assert {"ivon", "variational-inference", "lora", "peft", f"base_model:adapter:{BASE}"} <= set(data.tags)
    assert data.datasets == ["allenai/ai2_arc"]
    assert data.model_name == "user/smol-ivon"
    loaded = {(r.dataset_name, r.metric_config, r.metric_type): r.metric_value for r in data.eval_results}
    expected = {
        (task, mode, METRIC_IDS[key]): value
        for task, modes in EVAL_RESULTS.items()
        for mode, metrics in modes.items()
        if isinstance(metrics, dict)
        for key, value in metrics.items()
        if key in METRIC_IDS
    }
    assert loaded == expected
    arc = next(r for r in data.eval_results if r.dataset_name == "arc_easy")
    assert (arc.dataset_type, arc.dataset_config, arc.dataset_split) == ("allenai/ai2_arc", "ARC-Easy", "test")
    assert arc.dataset_args == {"scoring_mode": "cloze"}
    mine = next(r for r in data.eval_results if r.dataset_name == "my_task")
    assert (mine.dataset_type, mine.dataset_config) == ("me/my_data", None)
    assert not list(adapter.glob(".*.tmp"))


def test_eval_table_matches_eval_results(adapter: Path) -> None:
    text = render_model_card(adapter, base_model=BASE).text

    arc = table_rows(text, "arc_easy")
    assert [row[2] for row in arc] == ["IVON, posterior mean", "IVON, 10-sample average", "AdamW"]
    for row, mode in zip(arc, ["ivon_mean", "ivon_avg_k10", "adamw"], strict=True):
        metrics = EVAL_RESULTS["arc_easy"][mode]
        assert row[1] == "cloze"
        assert [float(cell) for cell in row[3:7]] == [round(metrics[key], 4) for key in ("acc", "ece", "nll", "brier")]
        assert row[7] == "300"
    (mine,) = table_rows(text, "my_task")
    assert mine[1:3] == ["letter", "IVON, posterior mean"] and mine[7] == ""


def test_posterior_statistics_match_hand_computation(adapter: Path) -> None:
    flat = [sigma for value in SIGMAS.values() for sigma in torch.tensor(value).flatten().tolist()]
    q_a = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]

    summary = summarize_posterior(adapter)

    assert summary.parameters == 13 and summary.tensors == 4
    assert summary.mean_sigma == pytest.approx(sum(flat) / 13)
    assert summary.std_sigma == pytest.approx(statistics.pstdev(flat))
    assert summary.median_sigma == pytest.approx(statistics.median(flat))
    assert (summary.min_sigma, summary.max_sigma) == pytest.approx((0.01, 3.0))
    modules = {m.name: (m.tensors, m.parameters, m.mean_sigma) for m in summary.modules}
    assert modules == {
        "q_proj.lora_A": (2, 8, pytest.approx(sum(q_a) / 8)),
        "q_proj.lora_B": (1, 2, pytest.approx(0.015)),
        "v_proj.lora_A": (1, 3, pytest.approx(7.0 / 3)),
    }
    text = render_model_card(adapter, base_model=BASE).text
    for label, value in [("Mean σ", sum(flat) / 13), ("Median σ", statistics.median(flat)), ("Max σ", 3.0)]:
        (row,) = table_rows(text, label)
        assert float(row[1]) == pytest.approx(value, rel=1e-3)
    assert table_rows(text, "Variational parameters") == [["Variational parameters", "13"]]
    (row,) = table_rows(text, "q_proj.lora_A")
    assert row[1:3] == ["2", "8"] and float(row[3]) == pytest.approx(0.45, rel=1e-3)
    assert table_rows(text, "Effective sample size (ess)") == [["Effective sample size (ess)", "1000000"]]


def test_training_setup_and_ivon_hyperparameters(adapter: Path) -> None:
    text = render_model_card(adapter, base_model=BASE, extra={"steps": 284, "seed": 42}).text

    assert table_rows(text, "LoRA rank r") == [["LoRA rank r", "2"]]
    assert table_rows(text, "Target modules") == [["Target modules", "q_proj, v_proj"]]
    assert table_rows(text, "steps") == [["steps", "284"]]
    assert table_rows(text, "`ess`") == [["`ess`", "1e+06"]]
    assert table_rows(text, "`hess_init`") == [["`hess_init`", "0.001"]]


def test_usage_snippets_are_valid_python_for_the_repo(adapter: Path) -> None:
    text = render_model_card(adapter, base_model=BASE, repo_id="user/smol-ivon").text

    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        ast.parse(block)
    assert 'PeftModel.from_pretrained(base, "user/smol-ivon")' in blocks[0]
    assert 'VariationalLoraPosterior.from_pretrained(base, "user/smol-ivon")' in blocks[1]
    assert "with post.sample():" in blocks[1]


def test_snippet_names_exist_in_the_library() -> None:
    posterior_class = getattr(ivon_lora, "VariationalLoraPosterior", None)
    if posterior_class is None:
        pytest.skip("ivon_lora.VariationalLoraPosterior is not part of the package yet")
    assert callable(getattr(posterior_class, "from_pretrained", None))
    assert callable(getattr(posterior_class, "sample", None))


def test_card_without_evaluation_or_variational_config(adapter: Path) -> None:
    (adapter / "eval_results.json").unlink()
    (adapter / "variational_config.json").unlink()

    card = ModelCard(str(render_model_card(adapter, base_model=BASE)))

    assert card.data.eval_results is None and card.data.get("model-index") is None
    assert "No `eval_results.json` was saved" in card.text
    assert "optimizer settings are not recorded" in card.text


@pytest.mark.parametrize("base_model", ["/local/copy/of/smollm2", "./model", "a/b/c"])
def test_base_model_must_be_a_hub_id(adapter: Path, base_model: str) -> None:
    with pytest.raises(ValueError, match="not a Hub model id"):
        render_model_card(adapter, base_model=base_model)


def test_plain_lora_folder_has_no_posterior_to_describe(adapter: Path) -> None:
    (adapter / "adapter_variance.safetensors").unlink()

    with pytest.raises(FileNotFoundError, match="adapter_variance.safetensors"):
        render_model_card(adapter, base_model=BASE)


@pytest.mark.parametrize(
    ("sigmas", "kind", "message"),
    [
        (SIGMAS, "hessian", "kind='hessian'"),
        ({**SIGMAS, f"{PREFIX}.0.self_attn.v_proj.lora_A.weight": [[0.0, 1.0, 1.0]]}, "variance", "non-positive"),
    ],
    ids=["wrong-kind", "zero-variance"],
)
def test_invalid_variance_file_is_refused(adapter: Path, sigmas: dict, kind: str, message: str) -> None:
    write_variances(adapter, sigmas, kind=kind)

    with pytest.raises(ValueError, match=message):
        summarize_posterior(adapter)


def test_incomplete_eval_results_are_refused(adapter: Path) -> None:
    (adapter / "eval_results.json").write_text(json.dumps({"arc_easy": {"ivon_mean": {"acc": 0.5}}}))

    with pytest.raises(ValueError, match=r"'arc_easy', mode 'ivon_mean' lacks \['ece', 'nll', 'brier'\]"):
        render_model_card(adapter, base_model=BASE)
