"""Batched per-row posterior samples equal the sequential per-sample loop (4-bit base included)."""

from __future__ import annotations

import pytest
import torch

from conftest import load_tiny_lora
from ivon_lora import VariationalLoraPosterior
from ivon_lora.inference import draw_samples, lora_samples_per_row, predictive_probabilities, tile_rows
from ivon_lora.serialization import lora_parameters


def posterior_on(path, four_bit=True) -> VariationalLoraPosterior:
    model = load_tiny_lora(path, four_bit=four_bit)
    model.eval()
    variances = {k: torch.full_like(p, 4e-4) for k, p in lora_parameters(model).items()}
    return VariationalLoraPosterior(model, variances, ess=1.0)


def sequential_logits(post: VariationalLoraPosterior, samples, input_ids, mask) -> list[torch.Tensor]:
    outputs = []
    backup = post.mean()
    for k in range(next(iter(samples.values())).shape[0]):
        with torch.no_grad():
            for key, p in post.parameters.items():
                p.copy_(samples[key][k])
            outputs.append(post.model(input_ids=input_ids, attention_mask=mask).logits)
            for key, p in post.parameters.items():
                p.copy_(backup[key])
    return outputs


@pytest.mark.parametrize("arch, four_bit", [("llama", True), ("qwen2", True), ("qwen3", False)])
def test_batched_samples_equal_sequential_loop(arch, four_bit, tiny_checkpoints):
    post = posterior_on(tiny_checkpoints[arch], four_bit)
    input_ids = torch.randint(3, 60, (3, 10))
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0  # left padding on one row
    samples = draw_samples(post, 4, torch.Generator().manual_seed(0))
    expected = sequential_logits(post, samples, input_ids, mask)
    with torch.no_grad(), lora_samples_per_row(post, samples) as k:
        batched = post.model(input_ids=tile_rows(input_ids, k), attention_mask=tile_rows(mask, k)).logits
    for i in range(4):
        torch.testing.assert_close(batched[3 * i : 3 * (i + 1)], expected[i], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected[0], expected[1])  # the samples differ, so the check is not vacuous
    # The model's own forward is back afterwards.
    assert "forward" not in vars(next(m for m in post.model.modules() if hasattr(m, "lora_A") and m.lora_A))


def test_predictive_probabilities_average_softmax_and_chunking(tiny_checkpoints):
    post = posterior_on(tiny_checkpoints["llama"])
    input_ids = torch.randint(3, 60, (2, 8))

    def score_fn(batch):
        return post.model(input_ids=batch["input_ids"], logits_to_keep=1).logits[:, -1, :5]

    whole = predictive_probabilities(score_fn, {"input_ids": input_ids}, post, 6, generator=torch.Generator().manual_seed(1))
    chunked = predictive_probabilities(score_fn, {"input_ids": input_ids}, post, 6,
                                       generator=torch.Generator().manual_seed(1), max_rows=5)
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-6)
    samples = draw_samples(post, 6, torch.Generator().manual_seed(1))
    loop = sequential_logits(post, samples, input_ids, torch.ones_like(input_ids))
    expected = torch.stack([l[:, -1, :5].softmax(-1) for l in loop]).mean(0)
    torch.testing.assert_close(whole, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole.sum(-1), torch.ones(2))
    at_mean = predictive_probabilities(score_fn, {"input_ids": input_ids}, post, 0)
    torch.testing.assert_close(at_mean, score_fn({"input_ids": input_ids}).softmax(-1))


def test_rows_must_be_whole_samples(tiny_checkpoints):
    post = posterior_on(tiny_checkpoints["llama"], four_bit=False)
    samples = draw_samples(post, 2)
    with pytest.raises(ValueError, match="tile it"), lora_samples_per_row(post, samples):
        post.model(input_ids=torch.randint(3, 60, (3, 4)))
