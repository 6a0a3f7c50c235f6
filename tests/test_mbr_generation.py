"""Batched posterior sampling for MBR equals a naive one-sample-at-a-time sampler, and the decode API on top.

The reference sampler below shares nothing with the library but the definition of a draw: at every step one
float64 uniform u from the sample's own generator (seeded by ``row_seed``) picks the first token whose
cumulative probability exceeds u. It recomputes the whole prefix without a KV cache, without padding, with the
weights θ_m copied into the model, and for the token mixture averages the M models' probabilities itself. So
equal texts mean that tiling, left padding, chunking, per-row LoRA samples, the mixture and the EOS handling of
the batched path are right; the log-likelihoods are compared within float tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from conftest import load_tiny_lora, word_tokenizer
from ivon_lora import VariationalLoraPosterior
from ivon_lora.inference import draw_samples, lora_samples_per_row, tile_rows
from ivon_lora.mbr import (
    MBR_METHODS,
    RowSampler,
    calibrate_threshold,
    decide,
    greedy_outputs,
    mbr,
    mbr_decode,
    mbr_per_model,
    mbr_pooled,
    row_seed,
    sample_posterior_outputs,
)
from ivon_lora.serialization import lora_parameters

EOS_IDS = [2, 10, 11, 12, 13, 21]  # several end tokens (21 is frequent here) so that samples stop at different steps
PROMPTS = ["w5 w6 w7", "w9 w10 w11 w12 w13 w20", "w40"]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


def sharp_posterior(path, *, four_bit: bool = True, variance: float = 1e-2) -> VariationalLoraPosterior:
    """A posterior whose samples visibly disagree: peaked next-token distributions, wide LoRA variances."""
    model = load_tiny_lora(path, four_bit=four_bit)
    model.eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    model.generation_config.eos_token_id = list(EOS_IDS)
    variances = {key: torch.full_like(p, variance) for key, p in lora_parameters(model).items()}
    return VariationalLoraPosterior(model, variances, ess=1.0)


@contextmanager
def weights(posterior: VariationalLoraPosterior, theta: Mapping[str, Tensor]) -> Iterator[None]:
    backup = posterior.mean()
    with torch.no_grad():
        for key, p in posterior.parameters.items():
            p.copy_(theta[key])
    try:
        yield
    finally:
        with torch.no_grad():
            for key, p in posterior.parameters.items():
                p.copy_(backup[key])


@torch.no_grad()
def reference_sample(posterior, thetas, tokenizer, prompt: str, seed: int, max_new_tokens: int):
    """(text, log-likelihood, mean entropy) of one sample from the mixture of ``thetas`` (one θ: that model)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tokenizer(prompt).input_ids])
    tokens, log_likelihood, entropies = [], 0.0, []
    for _ in range(max_new_tokens):
        per_model = []
        for theta in thetas:
            with weights(posterior, theta):
                per_model.append(posterior.model(input_ids=ids).logits[0, -1].double().softmax(-1))
        probs = torch.stack(per_model).mean(0)
        u = torch.rand((), generator=generator, dtype=torch.float64)
        cdf = probs.cumsum(0)
        token = int((cdf <= u * cdf[-1]).sum())
        log_likelihood += float(probs[token].log())
        entropies.append(float(-(probs * probs.log()).nansum()))
        tokens.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token in EOS_IDS:
            break
    text = tokenizer.decode(tokens[:-1] if tokens[-1] in EOS_IDS else tokens, skip_special_tokens=True).strip()
    return text, log_likelihood, float(np.mean(entropies))


@pytest.mark.parametrize("arch, four_bit", [("llama", True), ("qwen2", False)])
@pytest.mark.parametrize("token_mixture", [False, True], ids=["per-model", "token-mixture"])
def test_batched_sampling_equals_sequential_reference(arch, four_bit, token_mixture, tiny_checkpoints, tokenizer):
    post = sharp_posterior(tiny_checkpoints[arch], four_bit=four_bit)
    num_models, per_model, seed, new = 2, 3, 7, 8
    kwargs = dict(num_models=num_models, samples_per_model=per_model, max_new_tokens=new, seed=seed,
                  token_mixture=token_mixture)
    batched = sample_posterior_outputs(post, tokenizer, PROMPTS, **kwargs)
    # One prompt per generate call, and the prompt run on every row instead of a shared prompt cache.
    chunked = sample_posterior_outputs(post, tokenizer, PROMPTS, max_batch_rows=1, reuse_prompt_cache=False, **kwargs)
    draws = draw_samples(post, num_models, torch.Generator().manual_seed(seed))
    thetas = [{key: value[m] for key, value in draws.items()} for m in range(num_models)]
    # bitsandbytes' CPU 4-bit layers make a KV-cached decoding step differ from a full forward by up to ~1e-3 in
    # the log-probabilities (plain transformers incremental decoding shows the same, without any of this code);
    # unquantized models agree to float32 rounding.
    tolerance = 2e-3 if four_bit else 1e-4
    lengths = []
    for prompt, result, alone in zip(PROMPTS, batched, chunked):
        assert result.texts == alone.texts
        np.testing.assert_allclose(result.log_likelihoods, alone.log_likelihoods, rtol=tolerance, atol=tolerance)
        assert len(result.texts) == (1 if token_mixture else num_models)
        for m, outputs in enumerate(result.texts):
            models = thetas if token_mixture else [thetas[m]]
            for n, text in enumerate(outputs):
                expected = reference_sample(post, models, tokenizer, prompt, row_seed(seed, prompt, m, n), new)
                assert text == expected[0], (prompt, m, n)
                assert result.log_likelihoods[m, n] == pytest.approx(expected[1], rel=tolerance, abs=tolerance)
                assert result.mean_entropies[m, n] == pytest.approx(expected[2], rel=tolerance, abs=tolerance)
        lengths.extend(result.num_tokens.ravel().tolist())
    # Not vacuous: some samples stopped at an EOS early and some ran to the limit; the models disagree.
    assert min(lengths) < new and max(lengths) == new
    if not token_mixture:
        assert any(set(r.texts[0]) != set(r.texts[1]) for r in batched)


def test_one_model_reduces_to_plain_sampling_and_plain_mbr(tiny_checkpoints, tokenizer):
    post = sharp_posterior(tiny_checkpoints["llama"])
    common = dict(samples_per_model=6, max_new_tokens=6, seed=3)
    per_model = sample_posterior_outputs(post, tokenizer, PROMPTS, num_models=1, **common)
    mixture = sample_posterior_outputs(post, tokenizer, PROMPTS, num_models=1, token_mixture=True, **common)
    for a, b in zip(per_model, mixture):
        assert a.texts == b.texts
        np.testing.assert_allclose(a.log_likelihoods, b.log_likelihoods, rtol=1e-6)
    for samples in per_model:
        plain = mbr(list(samples.texts[0]), utility="chrf")
        for method in ("pooled", "per_model", "token_mixture", "plain"):
            decision = decide(samples, method=method, utility="chrf")
            assert (decision.text, decision.score) == (plain.best, pytest.approx(plain.score, abs=1e-12))

    # A posterior that is (numerically) a point mass at the mean samples exactly like the mean model.
    point_mass = VariationalLoraPosterior(post.model, {k: torch.full_like(v, 1e-30) for k, v in post.variances.items()},
                                          ess=1.0)
    at_theta = sample_posterior_outputs(point_mass, tokenizer, PROMPTS, num_models=1, **common)
    at_mean = sample_posterior_outputs(point_mass, tokenizer, PROMPTS, num_models=0, **common)
    plain_model = sample_posterior_outputs(post.model, tokenizer, PROMPTS, num_models=0, **common)
    for a, b, c in zip(at_theta, at_mean, plain_model):
        assert a.texts == b.texts == c.texts
        np.testing.assert_allclose(a.log_likelihoods, b.log_likelihoods, rtol=1e-4)


def test_generation_config_defaults_do_not_change_the_samples(tiny_checkpoints, tokenizer):
    post = sharp_posterior(tiny_checkpoints["llama"], four_bit=False)
    common = dict(num_models=2, samples_per_model=3, max_new_tokens=6, seed=4)
    expected = sample_posterior_outputs(post, tokenizer, PROMPTS, **common)
    assert any(n < 5 for r in expected for n in r.num_tokens.ravel())  # so that min_new_tokens=5 would matter
    config = post.model.generation_config
    config.update(do_sample=True, temperature=0.1, top_k=1, top_p=0.5, repetition_penalty=5.0, min_new_tokens=5)
    got = sample_posterior_outputs(post, tokenizer, PROMPTS, **common)
    assert [r.texts for r in got] == [r.texts for r in expected]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.log_likelihoods, b.log_likelihoods, rtol=1e-6)


def test_row_sampler_draws_from_the_mixture_and_keeps_copies_identical():
    torch.manual_seed(0)
    copies, groups, vocabulary = 3, 4000, 5
    logits = torch.randn(copies, 1, vocabulary).mul(2.0).expand(copies, groups, vocabulary).reshape(-1, vocabulary)
    mixture = logits.view(copies, groups, vocabulary)[:, 0].softmax(-1).mean(0)
    sampler = RowSampler(range(groups), eos_token_ids=[99], copies=copies)
    one_hot = sampler(torch.zeros(copies * groups, 1, dtype=torch.long), logits)
    tokens = one_hot.argmax(-1).view(copies, groups)
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0], tokens[2])
    assert torch.isinf(one_hot).sum() == copies * groups * (vocabulary - 1)  # exactly one finite score per row
    frequencies = torch.bincount(tokens[0], minlength=vocabulary).double() / groups
    torch.testing.assert_close(frequencies, mixture.double(), atol=0.03, rtol=0)  # > 4 standard errors
    torch.testing.assert_close(sampler.log_likelihood, mixture.log()[tokens[0]].double(), rtol=1e-5, atol=1e-6)
    entropy = -(mixture * mixture.log()).sum()
    torch.testing.assert_close(sampler.mean_entropy(), entropy.double().expand(groups), rtol=1e-5, atol=1e-6)

    # Identical copies: the mixture is the model itself, so the draws equal a single-copy sampler's.
    single = RowSampler(range(groups), eos_token_ids=[99])
    alone = single(torch.zeros(groups, 1, dtype=torch.long), logits[:groups]).argmax(-1)
    same = RowSampler(range(groups), eos_token_ids=[99], copies=copies)
    stacked = same(torch.zeros(copies * groups, 1, dtype=torch.long), logits[:groups].repeat(copies, 1))
    assert torch.equal(stacked.argmax(-1)[:groups], alone)


def test_epsilon_sampling_never_draws_tokens_below_epsilon():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).expand(2000, 5)
    probs = logits[0].softmax(-1)
    epsilon = 0.03
    assert (probs < epsilon).sum() == 3
    sampler = RowSampler(range(2000), eos_token_ids=[99], epsilon=epsilon)
    tokens = sampler(torch.zeros(2000, 1, dtype=torch.long), logits)
    drawn = set(tokens.argmax(-1).tolist())
    assert drawn == {0, 1}


def test_num_return_sequences_keeps_rows_sample_major(tiny_checkpoints, tokenizer):
    """generate's own expansion (each row repeated consecutively) keeps rows [m·B·N, (m+1)·B·N) on θ_m."""
    post = sharp_posterior(tiny_checkpoints["llama"], four_bit=False)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    draws = draw_samples(post, 2, torch.Generator().manual_seed(0))
    with torch.no_grad(), lora_samples_per_row(post, draws) as k:
        out = post.model.generate(
            input_ids=tile_rows(batch.input_ids, k),
            attention_mask=tile_rows(batch.attention_mask, k),
            do_sample=True,
            num_return_sequences=4,
            max_new_tokens=1,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    first_step = out.logits[0].view(2, len(PROMPTS), 4, -1)
    for m in range(2):
        with weights(post, {key: value[m] for key, value in draws.items()}), torch.no_grad():
            expected = post.model(**batch).logits[:, -1]
        for n in range(4):
            torch.testing.assert_close(first_step[m, :, n], expected, rtol=1e-4, atol=1e-4)


def test_greedy_outputs_match_generate(tiny_checkpoints, tokenizer):
    post = sharp_posterior(tiny_checkpoints["qwen3"], four_bit=False)
    results = greedy_outputs(post, tokenizer, PROMPTS, max_new_tokens=8)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        generated = post.model.generate(
            **batch, do_sample=False, max_new_tokens=8, eos_token_id=EOS_IDS, pad_token_id=0
        )
    for row, result in zip(generated[:, batch.input_ids.shape[1] :].tolist(), results):
        expected = row[: next((i for i, t in enumerate(row) if t in EOS_IDS), len(row))]
        assert result.texts == ((tokenizer.decode(expected, skip_special_tokens=True).strip(),),)
        assert result.log_likelihoods.shape == (1, 1) and result.log_likelihoods[0, 0] <= 0


@pytest.mark.parametrize("method", MBR_METHODS)
def test_mbr_decode_end_to_end_with_abstention(method, tiny_checkpoints, tokenizer):
    post = sharp_posterior(tiny_checkpoints["llama"])
    kwargs = dict(method=method, utility="chrf", num_models=2, samples_per_model=4, max_new_tokens=6, seed=1)
    decisions = mbr_decode(post, tokenizer, PROMPTS, **kwargs)
    estimator = mbr_per_model if method == "per_model" else mbr_pooled
    for decision in decisions:
        assert not decision.abstained
        expected = estimator(decision.samples.texts, "chrf")
        assert (decision.text, decision.score) == (expected.best, expected.score)
        assert decision.text in decision.candidates and 0.0 <= decision.score <= 1.0
        assert len(decision.samples.texts) == (2 if method in ("pooled", "per_model") else 1)
        stats = decision.samples.statistics_of(decision.text)
        assert stats.log_likelihood <= 0 and stats.mean_entropy >= 0 and 1 <= stats.num_tokens <= 6
    scores = [d.score for d in decisions]
    threshold = calibrate_threshold(scores, target_coverage=0.5)
    again = mbr_decode(post, tokenizer, PROMPTS, threshold=threshold, **kwargs)
    assert [d.abstained for d in again] == [s < threshold for s in scores]
    assert [d.text for d in again] == [d.text for d in decisions]  # same seed, same samples


def test_input_errors(tiny_checkpoints, tokenizer):
    post = sharp_posterior(tiny_checkpoints["llama"], four_bit=False)
    with pytest.raises(ValueError, match="needs a VariationalLoraPosterior"):
        sample_posterior_outputs(post.model, tokenizer, PROMPTS, num_models=2)
    with pytest.raises(ValueError, match="Unknown MBR method"):
        mbr_decode(post, tokenizer, PROMPTS, method="beam")
    with pytest.raises(TypeError, match="list of strings"):
        sample_posterior_outputs(post, tokenizer, "w5 w6")
    with pytest.raises(ValueError, match="unknown utility"):
        mbr_decode(post, tokenizer, PROMPTS, utility="nope")
    unpadded = copy.deepcopy(tokenizer)
    unpadded.pad_token = None
    with pytest.raises(ValueError, match="pad_token"):
        sample_posterior_outputs(post, unpadded, PROMPTS, num_models=1)
