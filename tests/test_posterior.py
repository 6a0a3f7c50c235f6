"""VariationalLoraPosterior: sampling, tempering, saving/loading (also with several named adapters, 4-bit base)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel

from conftest import load_tiny_lora
from ivon_lora import IVON, VariationalAdapterError, VariationalLoraPosterior
from ivon_lora.serialization import VARIANCE_FILE, lora_parameters


def fitted_posterior(path) -> VariationalLoraPosterior:
    model = load_tiny_lora(path)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = IVON(params, lr=0.05, ess=1e3, hess_init=0.5, weight_decay=1e-3, beta2=0.9)
    ids = torch.randint(3, 60, (2, 12))
    for _ in range(3):
        with opt.sampled_params(train=True):
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return VariationalLoraPosterior.from_optimizer(model, opt, config={"lr": 0.05})


def test_from_optimizer_and_sampling(tiny_checkpoints):
    post = fitted_posterior(tiny_checkpoints["llama"])
    mean = post.mean()
    assert post.ess == 1e3 and post.weight_decay == 1e-3
    with post.sample(seed=1) as theta:
        for key, p in post.parameters.items():
            assert torch.equal(p.detach(), theta[key]) and not torch.equal(p.detach(), mean[key])
    for key, p in post.parameters.items():
        assert torch.equal(p.detach(), mean[key])
    with post.sample(seed=1) as again:
        assert all(torch.equal(again[k], theta[k]) for k in theta)
    with pytest.raises(ZeroDivisionError):
        with post.sample(seed=2):
            1 / 0
    assert all(torch.equal(p.detach(), mean[k]) for k, p in post.parameters.items())


def test_sample_statistics_match_variance(tiny_checkpoints):
    post = fitted_posterior(tiny_checkpoints["qwen2"])
    key = next(iter(post.variances))
    draws = torch.stack([post.draw(torch.Generator().manual_seed(i))[key] for i in range(400)])
    empirical = draws.var(0)
    ratio = (empirical / post.variances[key]).mean().item()
    assert 0.9 < ratio < 1.1
    torch.testing.assert_close(draws.mean(0), post.mean()[key], atol=4 * post.variances[key].sqrt().max().item() / 20, rtol=0)


def test_temper_scales_variance(tiny_checkpoints):
    post = fitted_posterior(tiny_checkpoints["llama"])
    hot = post.temper(4.0)
    assert hot.ess == post.ess / 4.0
    for key in post.variances:
        torch.testing.assert_close(hot.variances[key], 4.0 * post.variances[key])
    assert hot.temper(0.5).metadata["temperature"] == "2.0"
    with pytest.raises(ValueError, match="temperature"):
        post.temper(0.0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_save_and_load_round_trip_on_4bit_base(arch, tiny_checkpoints, tmp_path):
    post = fitted_posterior(tiny_checkpoints[arch])
    folder = post.save_pretrained(tmp_path / "adapter")
    assert (folder / VARIANCE_FILE).is_file() and (folder / "variational_config.json").is_file()

    base = load_tiny_lora(tiny_checkpoints[arch]).unload()
    loaded = VariationalLoraPosterior.from_pretrained(base, folder)
    assert isinstance(loaded.model, PeftModel)
    assert any("Linear4bit" in type(m).__name__ for m in loaded.model.modules())
    assert loaded.config == {"lr": 0.05} and loaded.ess == post.ess
    for key in post.variances:
        torch.testing.assert_close(loaded.variances[key], post.variances[key])
        torch.testing.assert_close(loaded.parameters[key].detach(), post.parameters[key].detach())

    # Into an existing PeftModel: the mean overwrites the adapter's current weights.
    other = load_tiny_lora(tiny_checkpoints[arch], seed=5)
    reloaded = VariationalLoraPosterior.from_pretrained(other, folder)
    for key in post.variances:
        torch.testing.assert_close(reloaded.parameters[key].detach(), post.parameters[key].detach())


def test_named_adapters_use_subfolders(tiny_checkpoints, tmp_path):
    model = load_tiny_lora(tiny_checkpoints["llama"])
    model.add_adapter("task2", LoraConfig(r=2, target_modules=["q_proj"]))
    variances = {k: torch.full_like(p, 0.01, dtype=torch.float32) for k, p in lora_parameters(model, "task2").items()}
    post = VariationalLoraPosterior(model, variances, adapter_name="task2", ess=10.0)
    folder = post.save_pretrained(tmp_path / "multi")
    assert folder == tmp_path / "multi" / "task2" and (folder / VARIANCE_FILE).is_file()
    assert not (tmp_path / "multi" / VARIANCE_FILE).exists()
    loaded = VariationalLoraPosterior.from_pretrained(model, tmp_path / "multi", subfolder="task2", adapter_name="task3")
    assert loaded.adapter_name == "task3" and set(loaded.variances) == set(variances)


def test_mismatched_variances_are_refused(tiny_checkpoints):
    model = load_tiny_lora(tiny_checkpoints["llama"])
    good = {k: torch.ones_like(p) for k, p in lora_parameters(model).items()}
    key = next(iter(good))
    with pytest.raises(VariationalAdapterError, match="missing"):
        VariationalLoraPosterior(model, {k: v for k, v in good.items() if k != key}, ess=1.0)
    with pytest.raises(VariationalAdapterError, match="shape"):
        VariationalLoraPosterior(model, {**good, key: torch.ones(3)}, ess=1.0)


def test_loading_a_plain_lora_adapter_explains_itself(tiny_checkpoints, tmp_path):
    model = load_tiny_lora(tiny_checkpoints["llama"])
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(VariationalAdapterError, match="plain LoRA adapter"):
        VariationalLoraPosterior.from_pretrained(load_tiny_lora(tiny_checkpoints["llama"]).unload(), tmp_path / "plain")
