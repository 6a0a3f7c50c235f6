"""Posterior pruning: criteria on hand-made tensors, masks that sampling respects (also after save/load), and rank
pruning that yields a genuinely smaller PEFT adapter computing exactly the masked original (4-bit tiny base)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import load_tiny_lora
from ivon_lora import VariationalAdapterError, VariationalLoraPosterior
from ivon_lora.inference import draw_samples
from ivon_lora.pruning import PRUNED_VARIANCE, component_scores, mask_agreement, pruning_masks, select_components
from ivon_lora.serialization import MEAN_FILE, VARIANCE_FILE, lora_parameters

IDS = torch.tensor([[5, 9, 13, 40, 22, 7, 31, 8]])


# ---------------------------------------------------------------------------------------------- helpers
def is_factor_a(key: str) -> bool:
    """lora_A of Linear/Conv LoRA or lora_embedding_A of Embedding LoRA: the factor whose rank is dim 0."""
    return ".lora_A." in key or key.endswith(".lora_embedding_A")


def is_factor_b(key: str) -> bool:
    """The factor whose rank is dim 1 (not lora_B's bias, nor DoRA's magnitude)."""
    return key.endswith(".lora_B.weight") or key.endswith(".lora_embedding_B")


def random_posterior(model: PeftModel, seed: int = 0) -> VariationalLoraPosterior:
    g = torch.Generator().manual_seed(seed)
    variances = {k: torch.rand(p.shape, generator=g) * 1e-3 + 1e-5 for k, p in lora_parameters(model).items()}
    return VariationalLoraPosterior(model, variances, ess=100.0)


def component_posterior(model: PeftModel, component_variance: torch.Tensor) -> VariationalLoraPosterior:
    """Variance ``component_variance[i]`` on row i of every lora_A and column i of every lora_B (0.5 elsewhere)."""
    variances = {}
    for key, p in lora_parameters(model).items():
        if is_factor_a(key):
            variances[key] = component_variance.reshape(-1, *[1] * (p.dim() - 1)).expand(p.shape).clone()
        elif is_factor_b(key):
            variances[key] = component_variance.reshape(1, -1, *[1] * (p.dim() - 2)).expand(p.shape).clone()
        else:
            variances[key] = torch.full(p.shape, 0.5)
    return VariationalLoraPosterior(model, variances, ess=100.0)


def logits(model: nn.Module, adapter: str) -> torch.Tensor:
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def zero_components(posterior: VariationalLoraPosterior, dropped: list[int]) -> None:
    """The reference for rank pruning: the original adapter with the dropped components set to 0, in place."""
    with torch.no_grad():
        for key, p in posterior.parameters.items():
            if is_factor_a(key):
                p[dropped] = 0.0
            elif is_factor_b(key):
                p[:, dropped] = 0.0


def assert_zero_where_pruned(theta: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    assert masks
    for key, mask in masks.items():
        assert torch.equal(theta[key][mask], torch.zeros(int(mask.sum())))
        assert theta[key][~mask].ne(0).all()


def load_plain(load_base, folder) -> PeftModel:
    """``PeftModel.from_pretrained`` must load a pruned folder without any missing/unexpected-key warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load_base(), str(folder))
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    return model


# ---------------------------------------------------------------------------------------------- criteria (pure)
MEAN = {"w": torch.tensor([[3.0, -1.0], [0.5, 2.0]])}
VAR = {"w": torch.tensor([[1.0, 0.25], [0.01, 4.0]])}  # |m|/σ = [[3, 2], [5, 1]]


@pytest.mark.parametrize(
    "criterion, expected",
    [
        ("snr", [[False, True], [False, True]]),  # drops SNR 1 and 2
        ("magnitude", [[False, True], [True, False]]),  # drops |m| 0.5 and 1
        ("variance", [[True, False], [False, True]]),  # drops σ² 4 and 1
    ],
)
def test_entry_criteria_order_entries(criterion, expected):
    mask = pruning_masks(MEAN, VAR, 0.5, criterion)["w"]
    assert torch.equal(mask, torch.tensor(expected))


def test_global_scope_ranks_across_tensors():
    mean = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0])}
    variance = {k: torch.ones_like(v) for k, v in mean.items()}
    per_tensor = pruning_masks(mean, variance, 0.5, "snr", "tensor")
    assert per_tensor["a"].tolist() == [True, True, False, False] and per_tensor["b"].tolist() == [True, False]
    together = pruning_masks(mean, variance, 0.5, "snr", "global")
    assert together["a"].tolist() == [True, True, True, False] and together["b"].tolist() == [False, False]


def test_count_is_round_of_amount_and_ties_prune_earlier_entries_first():
    mean, variance = {"w": torch.ones(10)}, {"w": torch.ones(10)}
    assert pruning_masks(mean, variance, 0.3)["w"].tolist() == [True] * 3 + [False] * 7
    assert int(pruning_masks(mean, variance, 0.25)["w"].sum()) == 2  # Python's round: 2.5 -> 2
    assert int(pruning_masks(mean, variance, 0.35)["w"].sum()) == 4
    assert not pruning_masks(mean, variance, 0.0)["w"].any()


def test_mask_agreement_of_snr_and_magnitude():
    mean = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    uniform = {"w": torch.full((4,), 0.5)}
    assert mask_agreement(mean, uniform, 0.5) == 1.0  # uniform σ: SNR ranks exactly as |m|
    # σ² 1, 1, 100, 100 -> SNR 1, 2, 0.3, 0.4: SNR prunes entries 2, 3, magnitude prunes 0, 1
    assert mask_agreement(mean, {"w": torch.tensor([1.0, 1.0, 100.0, 100.0])}, 0.5) == 0.0
    # σ² 1, 16, 1, 1 -> SNR 1, 0.5, 3, 4: at 50% both prune entries 0, 1; at 25% SNR prunes 1, magnitude 0
    varied = {"w": torch.tensor([1.0, 16.0, 1.0, 1.0])}
    assert mask_agreement(mean, varied, 0.5) == 1.0
    assert mask_agreement(mean, varied, 0.25) == 0.0
    assert mask_agreement(mean, varied, 0.0) == 1.0  # nothing pruned: nothing to disagree on


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"amount": -0.1}, "amount"),
        ({"amount": 1.0}, "amount"),
        ({"amount": math.nan}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": 0.5, "criterion": "fisher"}, "criterion"),
        ({"amount": 0.5, "scope": "layer"}, "scope"),
    ],
)
def test_bad_pruning_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruning_masks(MEAN, VAR, **kwargs)


@pytest.mark.parametrize("keep", [0, -1, 0.0, 1.5, True, "2"])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        select_components([torch.ones(4)], keep)


def test_component_scores_on_hand_made_factors():
    a = torch.tensor([[2.0, 2.0], [1.0, 1.0], [4.0, 4.0]])  # rank 3, in 2: row RMS 2, 1, 4
    b = torch.tensor([[1.0, 3.0, 1.0], [1.0, 3.0, 1.0]])  # out 2: column RMS 1, 3, 1
    ones_a, ones_b = torch.ones_like(a), torch.ones_like(b)
    torch.testing.assert_close(component_scores("snr", a, ones_a, b, ones_b), torch.tensor([2.0, 3.0, 4.0]).sqrt())
    # ‖a_i‖·‖b_i‖/sqrt(2·2) = 2√2·√2/2, √2·3√2/2, 4√2·√2/2, times the scaling
    magnitude = component_scores("magnitude", a, ones_a, b, ones_b, scaling=0.5)
    torch.testing.assert_close(magnitude, torch.tensor([1.0, 1.5, 2.0]))
    # a_0·c and b_0/c leave ΔW_0 unchanged, and its SNR too
    c = torch.tensor([[10.0], [1.0], [1.0]])
    rescaled = component_scores("snr", a * c, ones_a * c**2, b / c.T, ones_b / c.T**2)
    torch.testing.assert_close(rescaled, component_scores("snr", a, ones_a, b, ones_b))
    with pytest.raises(ValueError, match="criterion"):
        component_scores("variance", a, ones_a, b, ones_b)


def test_select_components_per_layer_and_global():
    scores = [torch.tensor([0.1, 0.2]), torch.tensor([5.0, 6.0, 7.0])]
    assert [s.tolist() for s in select_components(scores, 2)] == [[0, 1], [1, 2]]
    assert [s.tolist() for s in select_components(scores, 1)] == [[1], [2]]
    assert [s.tolist() for s in select_components(scores, 0.6)] == [[1], [1, 2]]  # 3 of 5, best first
    assert [s.tolist() for s in select_components(scores, 0.2)] == [[1], [2]]  # at least one per layer
    assert [s.tolist() for s in select_components(scores, 1.0)] == [[0, 1], [0, 1, 2]]
    assert select_components([torch.ones(4)], 2)[0].tolist() == [2, 3]  # ties drop earlier components


# ---------------------------------------------------------------------------------------------- unstructured
def test_amount_zero_is_identity(tiny_checkpoints):
    post = random_posterior(load_tiny_lora(tiny_checkpoints["llama"]))
    same = post.prune(0.0)
    assert same.adapter_name == "default_pruned" and not same.pruning_masks
    assert same.metadata["pruning.pruned_entries"] == "0"
    for key in post.parameters:
        assert torch.equal(same.parameters[key], post.parameters[key])
        assert torch.equal(same.variances[key], post.variances[key])
    assert torch.equal(logits(post.model, "default_pruned"), logits(post.model, "default"))


def test_prune_makes_a_new_adapter_and_samples_never_regrow_pruned_entries(tiny_checkpoints):
    post = random_posterior(load_tiny_lora(tiny_checkpoints["llama"]))
    original = post.mean()
    reference_logits = logits(post.model, "default")
    pruned = post.prune(0.5, criterion="snr", scope="global", adapter_name="sparse")

    assert post.model.active_adapter == "sparse" and pruned.model is post.model
    assert sum(int(m.sum()) for m in pruned.pruning_masks.values()) == round(0.5 * post.num_parameters)
    assert pruned.metadata["pruning.criterion"] == "snr" and pruned.metadata["pruning.scope"] == "global"
    for key, mask in pruned.pruning_masks.items():
        assert torch.equal(pruned.parameters[key].detach()[mask], torch.zeros(int(mask.sum())))
        assert torch.equal(pruned.parameters[key].detach()[~mask], original[key][~mask])
        assert torch.equal(pruned.variances[key][~mask], post.variances[key][~mask])
        assert torch.equal(post.parameters[key].detach(), original[key])  # the original is untouched
    assert not torch.equal(logits(post.model, "sparse"), reference_logits)
    assert torch.equal(logits(post.model, "default"), reference_logits)  # the unpruned adapter is one call away

    with pruned.sample(seed=3) as theta:
        assert_zero_where_pruned(theta, pruned.pruning_masks)
        assert all(torch.equal(p.detach(), theta[k]) for k, p in pruned.parameters.items())
    stacked = draw_samples(pruned, 4, torch.Generator().manual_seed(0))  # the batched K-sample path
    for k in range(4):
        assert_zero_where_pruned({key: draws[k] for key, draws in stacked.items()}, pruned.pruning_masks)
    hot = pruned.temper(100.0)
    assert_zero_where_pruned(hot.draw(torch.Generator().manual_seed(1)), hot.pruning_masks)

    # The kept entries see the same noise as the unpruned posterior drawn with the same seed (paired comparisons).
    noise = {k: v - original[k] for k, v in post.draw(torch.Generator().manual_seed(7)).items()}
    pruned_draw = pruned.draw(torch.Generator().manual_seed(7))
    pruned_noise = {k: v - pruned.parameters[k].detach() for k, v in pruned_draw.items()}
    for key, mask in pruned.pruning_masks.items():
        torch.testing.assert_close(pruned_noise[key][~mask], noise[key][~mask])

    with pytest.raises(ValueError, match="already pruned"):
        pruned.prune(0.6)
    with pytest.raises(ValueError, match="already has an adapter 'sparse'"):
        post.prune(0.1, adapter_name="sparse")
    with pytest.raises(ValueError, match="Prune ranks before"):
        pruned.prune_ranks(2)


def test_saved_pruned_posterior_keeps_the_contract_and_its_mask(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["qwen3"]
    post = random_posterior(load_tiny_lora(path))
    pruned = post.prune(0.3, criterion="magnitude").temper(2.0)
    folder = pruned.save_pretrained(tmp_path / "saved")
    assert folder == tmp_path / "saved" / "default_pruned"

    mean, variances = load_file(str(folder / MEAN_FILE)), load_file(str(folder / VARIANCE_FILE))
    assert set(mean) == set(variances)
    with safe_open(str(folder / VARIANCE_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    recorded = metadata["pruning.criterion"], metadata["pruning.amount"], metadata["pruning.scope"]
    assert recorded == ("magnitude", "0.3", "tensor")
    assert metadata["temperature"] == "2.0"
    for key, mask in pruned.pruning_masks.items():
        assert torch.equal(variances[key][mask], torch.full((int(mask.sum()),), PRUNED_VARIANCE))  # whatever temper did
        assert not mean[key][mask].any()

    plain = load_plain(lambda: load_tiny_lora(path).unload(), folder)
    for key, p in lora_parameters(plain).items():
        assert torch.equal(p.detach(), pruned.parameters[key].detach())

    loaded = VariationalLoraPosterior.from_pretrained(load_tiny_lora(path).unload(), folder)
    assert loaded.metadata["pruning.pruned_entries"] == pruned.metadata["pruning.pruned_entries"]
    assert set(loaded.pruning_masks) == set(pruned.pruning_masks)
    for key, mask in pruned.pruning_masks.items():
        assert torch.equal(loaded.pruning_masks[key], mask)
        torch.testing.assert_close(loaded.variances[key][~mask], 2.0 * post.variances[key][~mask])
    with loaded.sample(seed=0) as theta:
        assert_zero_where_pruned(theta, loaded.pruning_masks)


def test_inconsistent_pruning_records_are_refused(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    post = random_posterior(load_tiny_lora(path))
    key = next(iter(post.parameters))
    everything = {key: torch.ones_like(post.variances[key], dtype=torch.bool)}
    with pytest.raises(VariationalAdapterError, match="mean is not 0"):
        VariationalLoraPosterior(post.model, post.variances, ess=1.0, pruning_masks=everything)
    folder = post.prune(0.5).save_pretrained(tmp_path / "saved")
    variance_file = folder / VARIANCE_FILE
    with safe_open(str(variance_file), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(load_file(str(variance_file)), str(variance_file), metadata={**metadata, "pruning.pruned_entries": "1"})
    with pytest.raises(VariationalAdapterError, match="records 1 pruned entries"):
        VariationalLoraPosterior.from_pretrained(load_tiny_lora(path).unload(), folder)


# ---------------------------------------------------------------------------------------------- structured
def test_prune_ranks_keeps_the_chosen_components_and_the_function(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["llama"]
    post = component_posterior(load_tiny_lora(path), torch.tensor([1.0, 1e-8, 1.0, 1e-8]))  # 1 and 3 are certain
    original_mean, original_variances = post.mean(), post.variance()
    small = post.prune_ranks(2, adapter_name="rank2")

    config = post.model.peft_config["rank2"]
    assert (config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern) == (2, 4, {}, {})  # 8/4 = 4/2
    for key, p in small.parameters.items():
        rows = ([1, 3],) if is_factor_a(key) else (slice(None), [1, 3])  # no other keys in this adapter
        assert torch.equal(p.detach(), original_mean[key][rows])
        assert torch.equal(small.variances[key], original_variances[key][rows])
    assert small.metadata["rank_pruning.components_after"] == "8"
    assert small.metadata["rank_pruning.components_before"] == "16"
    assert small.num_parameters == post.num_parameters // 2

    unpruned_logits = logits(post.model, "default")
    small_logits = logits(post.model, "rank2")
    zero_components(post, [0, 2])
    masked_logits = logits(post.model, "default")
    assert not torch.allclose(small_logits, unpruned_logits, atol=1e-4)  # the dropped components mattered
    torch.testing.assert_close(small_logits, masked_logits, rtol=1e-5, atol=1e-6)

    folder = small.save_pretrained(tmp_path / "small")
    full = post.save_pretrained(tmp_path / "full")
    assert (folder / MEAN_FILE).stat().st_size < (full / MEAN_FILE).stat().st_size
    plain = load_plain(lambda: load_tiny_lora(path).unload(), folder)
    torch.testing.assert_close(logits(plain, "default"), masked_logits, rtol=1e-5, atol=1e-6)
    loaded = VariationalLoraPosterior.from_pretrained(load_tiny_lora(path).unload(), folder)
    assert loaded.metadata["rank_pruning.criterion"] == "snr" and not loaded.pruning_masks
    for key in small.variances:
        assert torch.equal(loaded.variances[key], small.variances[key])

    # Structured first, then unstructured, composes.
    sparse = small.prune(0.5, adapter_name="rank2_sparse")
    assert {k: v.shape for k, v in sparse.variances.items()} == {k: v.shape for k, v in small.variances.items()}


def test_prune_ranks_by_fraction_writes_a_rank_pattern_that_reloads(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["qwen2"]
    post = random_posterior(load_tiny_lora(path))
    q0 = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():  # make every component of the first q_proj far more certain than any other
        for key in post.variances:
            if q0 in key:
                post.variances[key].mul_(1e-6)
    small = post.prune_ranks(0.5, adapter_name="halved")
    config = post.model.peft_config["halved"]
    names = [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"]
    ranks = {name: config.rank_pattern.get(name, config.r) for name in names}
    assert ranks[q0] == 4 and sum(ranks.values()) == 8 and min(ranks.values()) >= 1
    for name, rank in ranks.items():
        alpha = config.alpha_pattern.get(name, config.lora_alpha)
        assert alpha / rank == 2.0  # the original scaling 8/4
    small_logits = logits(post.model, "halved")

    folder = small.save_pretrained(tmp_path / "halved")
    plain = load_plain(lambda: load_tiny_lora(path).unload(), folder)
    for key, p in lora_parameters(plain).items():
        assert p.shape == small.parameters[key].shape
    torch.testing.assert_close(logits(plain, "default"), small_logits, rtol=1e-5, atol=1e-6)


def test_prune_ranks_by_magnitude_keeps_the_largest_component(tiny_checkpoints):
    post = random_posterior(load_tiny_lora(tiny_checkpoints["llama"]))
    mean = post.mean()
    small = post.prune_ranks(1, criterion="magnitude")
    for key_a in (k for k in mean if ".lora_A." in k):
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        best = int((mean[key_a].norm(dim=1) * mean[key_b].norm(dim=0)).argmax())
        assert torch.equal(small.parameters[key_a].detach(), mean[key_a][[best]])
    with pytest.raises(ValueError, match="criterion"):
        post.prune_ranks(1, criterion="variance", adapter_name="never")
    assert "never" not in post.model.peft_config


class EmbedConvProject(nn.Module):
    """A tiny non-transformers model: Embedding, Conv1d and Linear layers for every kind of LoRA factor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 12)
        self.conv = nn.Conv1d(12, 12, kernel_size=3, padding=1)
        self.proj = nn.Linear(12, 6)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(self.embed(input_ids).transpose(1, 2)).transpose(1, 2)
        return self.proj(hidden)


@pytest.mark.parametrize(
    "options",
    [
        {"use_rslora": True, "target_modules": ["embed", "conv", "proj"]},
        {"use_dora": True, "target_modules": ["conv", "proj"]},
        {"lora_bias": True, "target_modules": ["conv", "proj"]},
    ],
    ids=["rslora-embedding", "dora", "lora-bias"],
)
def test_prune_ranks_on_embedding_conv_dora_and_bias(options, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(EmbedConvProject(), LoraConfig(r=4, lora_alpha=3, init_lora_weights=False, **options))
    post = component_posterior(model, torch.tensor([1e-8, 1.0, 1e-8, 1.0]))
    small = post.prune_ranks(2, adapter_name="rank2")
    expected_alpha = 3 * (math.sqrt(2 / 4) if options.get("use_rslora") else 2 / 4)  # scaling α/r or α/√r unchanged
    assert post.model.peft_config["rank2"].lora_alpha == pytest.approx(expected_alpha)
    ids = torch.tensor([[1, 5, 31, 7]])
    with torch.no_grad():
        small_out = post.model(ids)
        post.model.set_adapter("default")
        unpruned_out = post.model(ids)
        zero_components(post, [1, 3])
        masked_out = post.model(ids)
    assert not torch.allclose(small_out, unpruned_out, atol=1e-4)
    torch.testing.assert_close(small_out, masked_out, rtol=1e-5, atol=1e-6)

    folder = small.save_pretrained(tmp_path / "custom")
    torch.manual_seed(0)  # the same base weights as above
    reloaded = VariationalLoraPosterior.from_pretrained(EmbedConvProject(), folder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids), small_out, rtol=1e-5, atol=1e-6)
