"""The IVON-vs-AdamW study: grid orchestration, resumability and the mean ± std summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ivon_lora.study as study
from ivon_lora.commonsense import EVAL_RESULTS_FILE, write_config
from ivon_lora.study import StudyConfig, results_markdown, run_study


def fake_run(calls):
    """Stands in for training: writes what run_commonsense writes, with metrics derived from the seed."""

    def run(config):
        calls.append((config.task, config.seed, config.optimizer, config.learning_rate))
        out = Path(config.output_dir)
        out.mkdir(parents=True)
        modes = ["zero_shot"] if config.max_steps == 0 else ["adamw"] if config.optimizer == "adamw" else ["ivon_mean", f"ivon_avg_k{config.eval_samples}"]
        results = {config.task: {m: {"acc": 50.0 + config.seed % 7 + i, "ece": 10.0 - i, "nll": 1.0, "brier": 0.5,
                                     "n": 4} for i, m in enumerate(modes)}}
        results[config.task]["scoring_mode"] = "cloze"
        (out / EVAL_RESULTS_FILE).write_text(json.dumps(results))
        write_config(config, 1.0)
        probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1], [0.2, 0.8]])
        np.savez(out / "predictions.npz", **{f"{m}_probs": probs for m in modes},
                 **{f"{m}_labels": np.array([0, 1, 1, 1]) for m in modes})
        return results

    return run


def test_grid_resume_and_summary(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "run_commonsense", fake_run(calls))
    config = StudyConfig(tasks=["arc_easy", "winogrande_s"], seeds=[21, 42], output_dir=str(tmp_path), eval_samples=3)
    summary = run_study(config)
    assert len(calls) == 10  # 2 zero-shot references + 2 tasks x 2 seeds x 2 optimizers
    assert {(c[2], c[3]) for c in calls} == {("adamw", 1e-3), ("ivon", 1.0)}
    assert summary["arc_easy"]["zero_shot"]["seeds"] == 1

    accs = [50.0 + 21 % 7, 50.0 + 42 % 7]
    row = summary["arc_easy"]["ivon_avg_k3"]
    assert row["seeds"] == 2
    assert row["acc_mean"] == pytest.approx(np.mean(accs) + 1)
    assert row["acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / np.sqrt(2))  # sample std (ddof = 1)
    # Paired per seed: the fake IVON average scores acc + 1 and ece - 1 relative to AdamW on every seed.
    difference = summary["arc_easy"]["ivon_avg_k3 - adamw"]
    assert difference["acc_mean"] == pytest.approx(1.0) and difference["acc_std"] == pytest.approx(0.0)
    assert difference["ece_mean"] == pytest.approx(-1.0) and difference["seeds"] == 2
    assert summary["winogrande_s"]["adamw"]["ece_mean"] == pytest.approx(10.0)
    table = (tmp_path / "results.md").read_text()
    assert "| arc_easy | adamw | 2 |" in table and "± " in table
    assert "| arc_easy | ivon_avg_k3 - adamw | 2 | +1.0 ± 0.0 | -1.0 ± 0.0 |" in table
    assert (tmp_path / "ece_acc.png").is_file() and (tmp_path / "reliability_arc_easy.png").is_file()

    calls.clear()
    run_study(config)  # everything finished: nothing re-runs
    assert calls == []
    (Path(config.run_config("arc_easy", 42, "ivon").output_dir) / EVAL_RESULTS_FILE).unlink()
    import shutil

    shutil.rmtree(config.run_config("arc_easy", 42, "ivon").output_dir)
    run_study(config)
    assert calls == [("arc_easy", 42, "ivon", 1.0)]

    config.max_steps = 7  # finished runs made with other settings are never mixed in
    with pytest.raises(ValueError, match="other settings"):
        run_study(config)


def test_markdown_orders_modes():
    summary = {"t": {"ivon_avg_k4": {**{f"{m}_{s}": 1.0 for m in study.METRICS for s in ("mean", "std")}, "seeds": 3, "n": 5},
                     "adamw": {**{f"{m}_{s}": 2.0 for m in study.METRICS for s in ("mean", "std")}, "seeds": 3, "n": 5}}}
    lines = results_markdown(summary).splitlines()
    assert lines[2].startswith("| t | adamw |") and lines[3].startswith("| t | ivon_avg_k4 |")


def test_learning_rates_are_tuned_on_held_out_training_questions(tmp_path, monkeypatch):
    calls, seen = [], []
    run = fake_run(calls)

    def run_with_lr_effect(config):
        seen.append((config.tune_holdout, config.eval_samples, config.optimizer, config.learning_rate))
        results = run(config)
        mode = next(iter(m for m in results[config.task] if m != "scoring_mode"))
        results[config.task][mode]["acc"] = {0.1: 60.0, 0.5: 70.0, 1e-4: 65.0, 1e-3: 55.0}.get(config.learning_rate, 0.0)
        (Path(config.output_dir) / EVAL_RESULTS_FILE).write_text(json.dumps(results))
        return results

    monkeypatch.setattr(study, "run_commonsense", run_with_lr_effect)
    config = StudyConfig(tasks=["arc_easy"], seeds=[21], output_dir=str(tmp_path), ivon_lr_grid=[0.1, 0.5],
                         adamw_lr_grid=[1e-4, 1e-3], tune_holdout=50)
    run_study(config)
    tuning_runs = [s for s in seen if s[0] == 50]
    assert len(tuning_runs) == 4 and all(s[1] == 0 for s in tuning_runs)
    final = [s for s in seen if s[0] == 0][1:]  # after the zero-shot reference
    assert sorted((s[2], s[3]) for s in final) == [("adamw", 1e-4), ("ivon", 0.5)]
    chosen = json.loads((tmp_path / "tuning.json").read_text())
    assert chosen["ivon"]["chosen"] == 0.5 and chosen["adamw"]["chosen"] == 1e-4
