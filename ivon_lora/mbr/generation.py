"""Sampling the hypotheses of (uncertainty-aware) MBR: all posterior samples of a batch in one ``generate``.

For B prompts, M posterior samples θ_1..θ_M and N outputs per sample, the batch has M·B·N rows in sample-major
order: row ``m·B·N + b·N + n`` is output n of prompt b under θ_m (the prompts tiled M times with
:func:`~ivon_lora.inference.tile_rows`, each row repeated N times consecutively, as ``num_return_sequences``
does). Inside :func:`~ivon_lora.inference.lora_samples_per_row` the base model, 4-bit included, runs once on
all rows and only the low-rank update differs per θ_m. The prompt itself is run once per (θ_m, prompt) and its
KV cache repeated for the N outputs, so a long prompt costs M prompt rows rather than M·N.

The tokens are drawn by :class:`RowSampler`, a logits processor that samples every row from its own seeded
stream and hands ``generate`` a one-hot score that greedy search then follows. Reasons for not using
``generate``'s own ``do_sample``:

* a sample depends only on ``(seed, prompt, m, n)``, not on what else is in the batch, so batching and
  chunking change nothing and one sample can be reproduced alone (see :func:`row_seed`);
* the token-level mixture (Eq. 13) needs the M copies of a row to draw one shared token from the average of
  their M next-token distributions;
* the sequence log-likelihood and token entropy (abstention baselines) are summed on the fly instead of keeping
  ``(steps, rows, vocabulary)`` scores;
* generation-config defaults (temperature, top-k/p, repetition penalty, ...) cannot leak in: sampling is plain
  ancestral sampling, optionally epsilon-truncated.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from ivon_lora.inference import draw_samples, lora_samples_per_row, tile_rows
from ivon_lora.posterior import VariationalLoraPosterior

logger = logging.getLogger(__name__)

__all__ = [
    "PromptSamples",
    "RowSampler",
    "SampleStatistics",
    "greedy_outputs",
    "row_seed",
    "sample_posterior_outputs",
]

# Explicit neutral values for the generation-config knobs that would reshape the distribution before the
# sampler sees it; ``generate`` fills every knob left at None from the model's own generation_config.
_NEUTRAL_GENERATION = {
    "do_sample": False,  # RowSampler already picked the token; greedy search just reads its one-hot score
    "num_beams": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
}


def _neutral_generation(model: nn.Module) -> dict[str, Any]:
    """:data:`_NEUTRAL_GENERATION`, plus ``min_new_tokens=0`` only where the model's config sets it (passing it
    otherwise would add a min-length processor that copies the scores every step)."""
    if getattr(getattr(model, "generation_config", None), "min_new_tokens", None):
        return {**_NEUTRAL_GENERATION, "min_new_tokens": 0}
    return dict(_NEUTRAL_GENERATION)


class SampleStatistics(NamedTuple):
    """Sequence log-likelihood, mean token entropy (nats) and number of generated tokens (EOS included)."""

    log_likelihood: float
    mean_entropy: float
    num_tokens: int


@dataclass(frozen=True)
class PromptSamples:
    """The decoded outputs of one prompt: ``texts[m][n]`` is output n under model m.

    ``log_likelihoods`` (sum of the log-probabilities of the generated tokens, EOS included),
    ``mean_entropies`` (mean over those steps of the next-token distribution's entropy, in nats) and
    ``num_tokens`` have shape (models, N) and refer to the distribution each output was drawn from: θ_m's, the
    M-model mixture's (then models = 1), or the mean model's.
    """

    texts: tuple[tuple[str, ...], ...]
    log_likelihoods: np.ndarray
    mean_entropies: np.ndarray
    num_tokens: np.ndarray

    def statistics_of(self, text: str) -> SampleStatistics:
        """Statistics of the first sample equal to ``text`` (model 0's samples first, as the estimators' ties)."""
        for m, outputs in enumerate(self.texts):
            if text in outputs:
                n = outputs.index(text)
                return SampleStatistics(
                    float(self.log_likelihoods[m, n]), float(self.mean_entropies[m, n]), int(self.num_tokens[m, n])
                )
        raise KeyError(f"{text!r} is not among the samples")


def row_seed(seed: int, prompt: str, model_index: int, sample_index: int) -> int:
    """Seed of the token stream of output ``sample_index`` under model ``model_index`` for ``prompt``.

    Keyed by the prompt's text rather than its position, so the same prompt gets the same samples in any batch.
    The token-level mixture uses ``model_index=0``, which makes it coincide with plain sampling when M = 1.
    """
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    entropy = [seed, *np.frombuffer(digest[:16], dtype=np.uint32).tolist()]
    sequence = np.random.SeedSequence(entropy, spawn_key=(model_index, sample_index))
    return int(sequence.generate_state(1, np.uint64)[0])


class RowSampler(LogitsProcessor):
    """Draws each group's next token from its own stream and returns a one-hot score for greedy search.

    The rows form ``copies`` sample-major blocks of G rows each; row g of every block belongs to group g. With
    ``copies > 1`` (token-level mixture) a group's next-token distribution is the average of its copies'
    probabilities and all copies receive the drawn token, so they stay identical. Each group draws with inverse
    CDF from one float64 uniform of its own generator per step; ``seeds=None`` picks the arg-max instead
    (greedy decoding). ``epsilon > 0`` first drops tokens of probability below it (epsilon sampling).

    Per group it accumulates, while unfinished, the log-probability of the drawn tokens and the entropy of the
    untruncated distribution; a group is finished after it drew one of ``eos_token_ids``. The state belongs to
    one ``generate`` call: use a fresh instance for every call.
    """

    def __init__(
        self,
        seeds: Sequence[int] | None,
        *,
        eos_token_ids: Sequence[int],
        copies: int = 1,
        epsilon: float = 0.0,
    ) -> None:
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}.")
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}.")
        self.generators = None if seeds is None else [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.eos_token_ids = torch.tensor(list(eos_token_ids), dtype=torch.long)
        self.copies = copies
        self.epsilon = epsilon
        self.log_likelihood: Tensor | None = None
        self.entropy_sum: Tensor | None = None
        self.num_tokens: Tensor | None = None
        self._finished: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        rows, vocabulary = scores.shape
        if rows % self.copies:
            raise ValueError(f"{rows} rows are not {self.copies} stacked copies of the same groups.")
        groups = rows // self.copies
        if self.generators is not None and len(self.generators) != groups:
            raise ValueError(f"Got {groups} groups of rows but {len(self.generators)} seeds.")
        if self._finished is None:  # first step: the last column is still the prompt
            self._finished = torch.zeros(groups, dtype=torch.bool, device=scores.device)
            self.log_likelihood = torch.zeros(groups, dtype=torch.float64, device=scores.device)
            self.entropy_sum = torch.zeros_like(self.log_likelihood)
            self.num_tokens = torch.zeros(groups, dtype=torch.long, device=scores.device)
        else:
            last = input_ids[:groups, -1]  # copy 0 of every group
            self._finished |= torch.isin(last, self.eos_token_ids.to(last.device))

        log_probs = scores.float().log_softmax(-1)
        if self.copies > 1:
            log_probs = log_probs.view(self.copies, groups, vocabulary).logsumexp(0) - np.log(self.copies)
        probs = log_probs.exp()
        tokens = self._draw(probs)

        active = ~self._finished
        chosen = log_probs.gather(1, tokens[:, None]).squeeze(1).double()
        self.log_likelihood += torch.where(active, chosen, 0.0)
        self.entropy_sum += torch.where(active, torch.special.entr(probs).sum(-1).double(), 0.0)
        self.num_tokens += active.long()

        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, tokens.repeat(self.copies)[:, None], 0.0)

    def _draw(self, probs: Tensor) -> Tensor:
        if self.generators is None:
            return probs.argmax(-1)
        if self.epsilon > 0:
            keep = probs >= self.epsilon
            keep.scatter_(1, probs.argmax(-1, keepdim=True), True)  # never drop every token
            probs = probs * keep
        cdf = probs.cumsum(-1, dtype=torch.float64)
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        targets = uniforms.to(cdf.device) * cdf[:, -1]
        # The first index whose cumulative mass exceeds the target; zero-probability tokens are never picked.
        return torch.searchsorted(cdf, targets[:, None], right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)

    def mean_entropy(self) -> Tensor:
        """Mean entropy per generated token of every group (0 for a group without tokens)."""
        if self.entropy_sum is None or self.num_tokens is None:
            raise RuntimeError("The sampler has not been called yet.")
        return self.entropy_sum / self.num_tokens.clamp(min=1)


def sample_posterior_outputs(
    posterior: VariationalLoraPosterior | nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    num_models: int = 4,
    samples_per_model: int = 8,
    max_new_tokens: int = 64,
    seed: int = 0,
    token_mixture: bool = False,
    epsilon: float = 0.0,
    max_batch_rows: int = 256,
    add_special_tokens: bool = True,
    reuse_prompt_cache: bool = True,
    progress: bool = False,
) -> list[PromptSamples]:
    """Ancestral samples from M posterior samples θ_m (N each) for every prompt, in batched ``generate`` calls.

    Args:
        posterior: the variational posterior, or any causal LM (a ``PeftModel`` or base model), which is then
            sampled as is, like ``num_models=0``.
        tokenizer: its tokenizer; prompts are padded on the left.
        prompts: finished prompt strings (apply a chat template first where the model expects one).
        num_models: M. ``0`` samples the mean model (plain sampling).
        samples_per_model: N outputs per model.
        seed: θ_1..θ_M are ``draw_samples(posterior, M, torch.Generator().manual_seed(seed))``, the same for every
            prompt; the token streams are seeded by :func:`row_seed`.
        token_mixture: sample N outputs from the mixture of the M models' next-token distributions (Eq. 13)
            instead of N per model; the result then has one model row.
        epsilon: epsilon-sampling cut-off (0 = pure ancestral sampling).
        max_batch_rows: prompts go to ``generate`` in chunks of at most this many rows (at least one prompt).
        add_special_tokens: passed to the tokenizer; ``False`` for prompts rendered by a chat template.
        reuse_prompt_cache: run each prompt through each model once and share its KV cache among the N outputs
            (needs a cache with ``batch_repeat_interleave``, as transformers' ``DynamicCache``); ``False`` lets
            ``generate`` process the prompt on all M·N rows.
        progress: show a progress bar over the chunks.

    Returns one :class:`PromptSamples` per prompt.
    """
    if samples_per_model < 1:
        raise ValueError(f"samples_per_model must be >= 1, got {samples_per_model}.")
    if num_models < 0:
        raise ValueError(f"num_models must be >= 0, got {num_models}.")
    if not isinstance(posterior, VariationalLoraPosterior) and num_models > 0:
        raise ValueError("num_models > 0 needs a VariationalLoraPosterior; pass num_models=0 to sample a plain model.")
    model = posterior.model if isinstance(posterior, VariationalLoraPosterior) else posterior
    lora = None
    if num_models > 0:
        draws = draw_samples(posterior, num_models, torch.Generator().manual_seed(seed))
        lora = functools.partial(lora_samples_per_row, posterior, draws)
    decoding = _Decoding(
        models=max(num_models, 1),
        per_model=samples_per_model,
        seed=seed,
        max_new_tokens=max_new_tokens,
        add_special_tokens=add_special_tokens,
        reuse_prompt_cache=reuse_prompt_cache,
        mixture=token_mixture,
        epsilon=epsilon,
        lora=lora,
    )
    return _generate(model, tokenizer, prompts, decoding, max_batch_rows=max_batch_rows, progress=progress)


def greedy_outputs(
    model: VariationalLoraPosterior | nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    max_batch_rows: int = 256,
    add_special_tokens: bool = True,
    progress: bool = False,
) -> list[PromptSamples]:
    """Greedy decoding (of the mean, for a posterior), with the same statistics as the samples; shape (1, 1)."""
    if isinstance(model, VariationalLoraPosterior):
        model = model.model
    decoding = _Decoding(
        models=1,
        per_model=1,
        seed=None,
        max_new_tokens=max_new_tokens,
        add_special_tokens=add_special_tokens,
        reuse_prompt_cache=False,
    )
    return _generate(model, tokenizer, prompts, decoding, max_batch_rows=max_batch_rows, progress=progress)


@dataclass(frozen=True)
class _Decoding:
    """What stays the same for every chunk of one call: layout, seeding and generation settings."""

    models: int
    per_model: int
    seed: int | None  # None: greedy
    max_new_tokens: int
    add_special_tokens: bool
    reuse_prompt_cache: bool
    mixture: bool = False
    epsilon: float = 0.0
    lora: Callable[[], AbstractContextManager[Any]] | None = None

    @property
    def drawing_models(self) -> int:
        """Model rows in the result: the copies of a token-level mixture draw together."""
        return 1 if self.mixture else self.models


def _generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    decoding: _Decoding,
    *,
    max_batch_rows: int,
    progress: bool,
) -> list[PromptSamples]:
    """Generate ``models`` x ``per_model`` outputs per prompt, one ``generate`` call per chunk of prompts."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string.")
    if decoding.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {decoding.max_new_tokens}.")
    if tokenizer.pad_token_id is None:
        raise ValueError("Batched generation pads prompts: set tokenizer.pad_token (e.g. to tokenizer.eos_token).")
    prompts_per_chunk = max(1, max_batch_rows // (decoding.models * decoding.per_model))
    chunks: Iterator[int] = iter(range(0, len(prompts), prompts_per_chunk))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, total=-(-len(prompts) // prompts_per_chunk), desc="generate", unit="chunk")
    results: list[PromptSamples] = []
    for start in chunks:
        results.extend(_generate_chunk(model, tokenizer, list(prompts[start : start + prompts_per_chunk]), decoding))
    return results


def _generate_chunk(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, chunk: list[str], decoding: _Decoding
) -> list[PromptSamples]:
    eos_ids = _eos_token_ids(model, tokenizer)
    encoded = tokenizer(
        chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=decoding.add_special_tokens
    ).to(model.device)
    # Prompt rows m·B + b (model m, prompt b); sequence rows m·B·N + b·N + n (output n).
    prompt_ids = tile_rows(encoded["input_ids"], decoding.models)
    prompt_mask = tile_rows(encoded["attention_mask"], decoding.models)
    input_ids = prompt_ids.repeat_interleave(decoding.per_model, 0)
    seeds = None
    if decoding.seed is not None:
        seeds = [
            row_seed(decoding.seed, prompt, m, n)
            for m in range(decoding.drawing_models)
            for prompt in chunk
            for n in range(decoding.per_model)
        ]
    sampler = RowSampler(
        seeds, eos_token_ids=eos_ids, copies=decoding.models if decoding.mixture else 1, epsilon=decoding.epsilon
    )
    logger.debug(
        "generate: %d prompts x %d models x %d outputs = %d rows (%s)",
        len(chunk), decoding.models, decoding.per_model, input_ids.shape[0], "greedy" if seeds is None else "sampled",
    )
    extra: dict[str, Any] = {}
    with torch.no_grad(), (decoding.lora() if decoding.lora is not None else nullcontext()):
        if decoding.reuse_prompt_cache and decoding.per_model > 1 and prompt_ids.shape[1] > 1:
            extra["past_key_values"] = _shared_prompt_cache(model, prompt_ids, prompt_mask, decoding.per_model)
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=prompt_mask.repeat_interleave(decoding.per_model, 0),
            logits_processor=LogitsProcessorList([sampler]),
            max_new_tokens=decoding.max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
            **_neutral_generation(model),
            **extra,
        )
    shape = (decoding.drawing_models, len(chunk), decoding.per_model)
    groups = int(np.prod(shape))
    texts = _decode(tokenizer, sequences[:groups, input_ids.shape[1] :], sampler.num_tokens, eos_ids)
    texts_per_row = [texts[start : start + decoding.per_model] for start in range(0, groups, decoding.per_model)]
    log_likelihoods = sampler.log_likelihood.cpu().numpy().reshape(shape)
    entropies = sampler.mean_entropy().cpu().numpy().reshape(shape)
    lengths = sampler.num_tokens.cpu().numpy().reshape(shape)
    return [
        PromptSamples(
            texts=tuple(tuple(texts_per_row[m * len(chunk) + b]) for m in range(decoding.drawing_models)),
            log_likelihoods=log_likelihoods[:, b],
            mean_entropies=entropies[:, b],
            num_tokens=lengths[:, b],
        )
        for b in range(len(chunk))
    ]


def _shared_prompt_cache(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, repeats: int) -> Any:
    """KV cache of every prompt row but its last token, computed once and repeated for the ``repeats`` outputs.

    ``generate`` then only runs the last prompt token and the new ones: the prompt's prefill costs one row per
    (model, prompt) instead of one per output. Positions follow ``generate``'s rule for left padding.
    """
    mask = prompt_mask[:, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = model(
        input_ids=prompt_ids[:, :-1], attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    ).past_key_values
    if not hasattr(cache, "batch_repeat_interleave"):
        raise ValueError(f"{type(cache).__name__} cannot be repeated per output; pass reuse_prompt_cache=False.")
    cache.batch_repeat_interleave(repeats)
    return cache


def _eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids from the model's generation config (chat models often end turns with several), else the tokenizer."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("Neither the model's generation_config nor the tokenizer defines an EOS token.")
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _decode(
    tokenizer: PreTrainedTokenizerBase, generated: Tensor, num_tokens: Tensor, eos_ids: Sequence[int]
) -> list[str]:
    """Decode the first ``num_tokens[g]`` generated tokens of row g, without a final EOS."""
    eos = set(eos_ids)
    token_lists = []
    for row, count in zip(generated.tolist(), num_tokens.tolist()):
        tokens = row[:count]
        if tokens and tokens[-1] in eos:
            tokens = tokens[:-1]
        token_lists.append(tokens)
    return [text.strip() for text in tokenizer.batch_decode(token_lists, skip_special_tokens=True)]
