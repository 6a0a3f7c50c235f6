"""Scoring multiple-choice questions with a causal LM: one logit per choice, for training and evaluation.

Two modes (see :mod:`ivon_lora.evaluation.tasks` for the prompts):

* ``"letter"`` (the IVON-LoRA papers): one row per question; the choice logits are the next-token logits of
  the answer tokens (``" A"``, ``" B"``, ...) at the prompt's last position. Only that position's logits are
  computed (``logits_to_keep=1``), because the vocabulary head over every position would dominate the cost.
  The answer token ids are derived from the tokenizer for every prompt (tokenize prompt + answer and check
  that exactly one token is added), so BPE vocabularies that store ``" A"`` rather than ``"A"`` are handled,
  and an answer that is not a single token fails loudly.
* ``"cloze"`` (lm-eval-harness log-likelihood): ``num_choices`` consecutive rows per question, one per
  (context, continuation) pair; a choice's logit is the summed log-probability of its continuation tokens.
  Tokens are split as in lm-eval-harness: the continuation's tokens are those of ``context + continuation``
  beyond the tokens of ``context``. Logits are computed only for the continuation positions
  (``logits_to_keep`` = longest continuation + 1).
* ``"auto"``: letter for models with at least :data:`LETTER_MODE_MIN_PARAMETERS` parameters, cloze below —
  small models cannot follow the lettered format (SmolLM2-135M scores below chance in letter mode even after
  finetuning, about 50% zero-shot in cloze mode on ARC-Easy). ``scorer.mode`` is the resolved mode; report it
  with every number.

Batches are left-padded, and every tensor except ``labels`` has a leading *rows* dimension, so a batch can be
tiled K times along dim 0 (:func:`tile_batch`) to score K posterior samples in one forward:
:meth:`MultipleChoiceScorer.choice_logits` derives the number of questions from the row count only.
Prompts longer than ``max_length`` tokens lose tokens from the left, so the end — where the answer is
read — is kept (the papers use 320).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ivon_lora.evaluation.tasks import MultipleChoiceExample, MultipleChoiceTask, get_task
from ivon_lora.inference import tile_rows

__all__ = [
    "LETTER_MODE_MIN_PARAMETERS",
    "MultipleChoiceScorer",
    "ScoringMode",
    "answer_token_ids",
    "resolve_scoring_mode",
    "tile_batch",
]

logger = logging.getLogger(__name__)

ScoringMode = Literal["letter", "cloze"]
LETTER_MODE_MIN_PARAMETERS = 1_000_000_000


def resolve_scoring_mode(mode: str, model: nn.Module | None = None) -> ScoringMode:
    """Turn ``"auto"`` into ``"letter"`` or ``"cloze"`` from the model's parameter count."""
    if mode in ("letter", "cloze"):
        return mode  # type: ignore[return-value]
    if mode != "auto":
        raise ValueError(f"mode must be 'letter', 'cloze' or 'auto', got {mode!r}")
    if model is None:
        raise ValueError("mode='auto' chooses letter or cloze scoring from the model size: pass model=..., or set mode")
    # transformers' count undoes 4-bit packing; plain modules are counted directly.
    count = model.num_parameters() if hasattr(model, "num_parameters") else sum(p.numel() for p in model.parameters())
    resolved: ScoringMode = "letter" if count >= LETTER_MODE_MIN_PARAMETERS else "cloze"
    logger.info("Scoring mode 'auto' -> %r (%.2fB parameters)", resolved, count / 1e9)
    return resolved


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, answers: Sequence[str]) -> list[int]:
    """The single token each answer adds after ``prompt``; raises if an answer is not exactly one new token.

    ``answers`` are the strings as they follow the prompt, leading space included (``" A"``): tokenizing
    prompt + answer and comparing with the prompt alone finds the id the model actually predicts there.
    """
    prompt_ids = _encode(tokenizer, prompt)
    ids = []
    for answer in answers:
        full = _encode(tokenizer, prompt + answer)
        added = full[len(prompt_ids) :]
        if full[: len(prompt_ids)] != prompt_ids or len(added) != 1:
            pieces = tokenizer.convert_ids_to_tokens(full[-max(len(added), 1) :])
            raise ValueError(
                f"The answer {answer!r} after the prompt ending {prompt[-30:]!r} does not add exactly one token "
                f"(the prompt + answer ends in {pieces}); letter scoring reads one next-token logit per choice. "
                "Use mode='cloze' for this tokenizer and task."
            )
        ids.append(added[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"The answers {list(answers)} map to the same token ids {ids}; they cannot be told apart")
    return ids


def tile_batch(batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Repeat every row tensor ``k`` times along dim 0 (``torch.cat([t] * k)``); ``labels`` stay as they are.

    ``choice_logits`` of the tiled batch is ``(k * B, C)``, sample-major: rows ``s*B:(s+1)*B`` belong to the
    ``s``-th copy.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return {key: value if key == "labels" else tile_rows(value, k) for key, value in batch.items()}


class MultipleChoiceScorer:
    """Builds batches for a task and turns a model's output into one logit per choice.

    Use ``collate`` as a DataLoader's ``collate_fn`` over :func:`~ivon_lora.evaluation.data.load_task_splits`
    datasets, then ``choice_logits(model, batch)`` for ``(B, C)`` scores or ``loss(model, batch)`` for training.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        task: str | MultipleChoiceTask,
        mode: str = "auto",
        max_length: int = 320,
        *,
        model: nn.Module | None = None,
    ) -> None:
        """
        Args:
            tokenizer: the model's tokenizer (its padding side is not used: batches are always left-padded).
            task: task name or object.
            mode: ``"letter"``, ``"cloze"`` or ``"auto"`` (needs ``model``, only to count its parameters).
            max_length: the longest input in tokens; prompts are cut from the left beyond it.
        """
        self.tokenizer = tokenizer
        self.task = get_task(task)
        self.mode: ScoringMode = resolve_scoring_mode(mode, model)
        self.max_length = max_length
        self._special_prefix = _special_prefix(tokenizer)
        if max_length <= len(self._special_prefix) + 1:
            raise ValueError(f"max_length={max_length} leaves no room for a prompt")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = pad if pad is not None else 0  # any id works: padded positions are masked out
        self._warned_truncation = False

    @property
    def rows_per_question(self) -> int:
        """Rows one question takes in a batch: 1 in letter mode, ``num_choices`` in cloze mode."""
        return 1 if self.mode == "letter" else self.task.num_choices

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenize dataset rows into a left-padded batch.

        Letter mode: ``input_ids``, ``attention_mask`` (B, L), ``answer_ids`` (B, C), ``labels`` (B,).
        Cloze mode: ``input_ids``, ``attention_mask`` (B*C, L), ``continuation_mask`` (B*C, T) marking the
        continuation among the last T tokens, ``labels`` (B,).
        """
        parsed = [MultipleChoiceExample.from_row(row) for row in examples]
        labels = torch.tensor([example.label for example in parsed], dtype=torch.long)
        if self.mode == "letter":
            return {**self._collate_letter(parsed), "labels": labels}
        return {**self._collate_cloze(parsed), "labels": labels}

    def choice_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One float32 logit per choice, ``(rows / rows_per_question, C)``; softmax over C gives p."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if self.mode == "letter":
            logits = self._forward(model, input_ids, attention_mask, keep=1)[:, -1, :]
            return logits.float().gather(1, batch["answer_ids"])
        num_choices = self.task.num_choices
        if input_ids.shape[0] % num_choices:
            raise ValueError(
                f"a cloze batch has {input_ids.shape[0]} rows, not a multiple of the {num_choices} choices per "
                "question; split batches only at multiples of scorer.rows_per_question"
            )
        continuation_mask = batch["continuation_mask"]
        tail = continuation_mask.shape[1]
        logits = self._forward(model, input_ids, attention_mask, keep=tail + 1)[:, :-1, :].float()
        targets = input_ids[:, -tail:]
        token_logprobs = logits.gather(2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        scores = torch.where(continuation_mask, token_logprobs, torch.zeros_like(token_logprobs)).sum(dim=1)
        return scores.view(-1, num_choices)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss: cross-entropy over the choices only, averaged over the batch's questions."""
        return F.cross_entropy(self.choice_logits(model, batch), batch["labels"])

    # -----------------------------------------------------------------------------------------------------

    def _forward(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
    ) -> torch.Tensor:
        # Positions count real tokens only, so a left-padded row sees the positions it would see unpadded
        # (models with absolute position embeddings, e.g. GPT-2, depend on it).
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        output = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
        )
        return output.logits

    def _collate_letter(self, examples: list[MultipleChoiceExample]) -> dict[str, torch.Tensor]:
        sequences, answers = [], []
        for example in examples:
            prompt = self.task.letter_prompt(example)
            answers.append(answer_token_ids(self.tokenizer, prompt, self.task.letter_continuations))
            sequences.append(self._with_prefix(_encode(self.tokenizer, prompt), self.max_length))
        return {**self._left_pad(sequences), "answer_ids": torch.tensor(answers, dtype=torch.long)}

    def _collate_cloze(self, examples: list[MultipleChoiceExample]) -> dict[str, torch.Tensor]:
        sequences, continuation_lengths = [], []
        for example in examples:
            for context, continuation in self.task.cloze_requests(example):
                context_ids = _encode(self.tokenizer, context)
                continuation_ids = _encode(self.tokenizer, context + continuation)[len(context_ids) :]
                if not context_ids or not continuation_ids:
                    raise ValueError(
                        f"example {example.id!r}: cloze request {(context, continuation)!r} is empty on one side"
                    )
                room = self.max_length - len(continuation_ids)
                if room <= len(self._special_prefix):
                    raise ValueError(
                        f"example {example.id!r}: its continuation alone takes {len(continuation_ids)} tokens; "
                        f"raise max_length (now {self.max_length})"
                    )
                sequences.append(self._with_prefix(context_ids, room) + continuation_ids)
                continuation_lengths.append(len(continuation_ids))
        tail = max(continuation_lengths)
        positions = torch.arange(tail)
        lengths = torch.tensor(continuation_lengths)
        continuation_mask = positions.unsqueeze(0) >= (tail - lengths).unsqueeze(1)
        return {**self._left_pad(sequences), "continuation_mask": continuation_mask}

    def _with_prefix(self, ids: list[int], budget: int) -> list[int]:
        """Special tokens (BOS) + the last tokens of ``ids`` that fit in ``budget`` tokens."""
        room = budget - len(self._special_prefix)
        if len(ids) > room:
            if not self._warned_truncation:
                logger.warning(
                    "%s: a prompt of %d tokens exceeds max_length=%d and loses its first tokens (warned once)",
                    self.task.name, len(ids) + len(self._special_prefix), self.max_length,
                )
                self._warned_truncation = True
            ids = ids[len(ids) - room :]
        return self._special_prefix + ids

    def _left_pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(sequences), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[row, width - len(sequence) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. Llama-3's BOS; none for Qwen or SmolLM2).

    Tokens it would append (an EOS) are left out: the answer is read at the end of the prompt.
    """
    probe = "Answer"
    bare = _encode(tokenizer, probe)
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start])
    raise ValueError(f"cannot locate the text tokens among the special tokens of {type(tokenizer).__name__}")
