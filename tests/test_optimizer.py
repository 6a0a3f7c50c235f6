"""IVON optimizer: agreement with the reference implementation, the posterior it learns, and its edge cases."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from ivon_lora import IVON

ivon_reference = pytest.importorskip("ivon", reason="the test oracle ivon-opt is a test extra")


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_data(seed: int = 1, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class InjectedNoiseIVON(IVON):
    """Our optimizer, drawing its ε from a queue of flat per-group vectors (the reference's layout)."""

    def __init__(self, *args, noise_queue: list[list[torch.Tensor]], **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_queue = noise_queue

    def _standard_normal(self, params, train=True):
        per_group = self.noise_queue.pop(0)
        noise = []
        for group, flat in zip(self.param_groups, per_group):
            offset = 0
            for p in group["params"]:
                noise.append(flat[offset : offset + p.numel()].view_as(p).clone())
                offset += p.numel()
        return noise


@contextmanager
def reference_randn(noise_queue: list[list[torch.Tensor]]):
    """Make the reference's torch.randn(numel) calls return the queued vectors, group by group."""
    original = torch.randn
    pending = list(noise_queue.pop(0))

    def fake_randn(numel, *args, **kwargs):
        flat = pending.pop(0)
        assert flat.numel() == numel
        return flat.clone()

    torch.randn = fake_randn
    try:
        yield
    finally:
        torch.randn = original


def param_groups(model: nn.Module, split: bool) -> list[dict]:
    if not split:
        return [{"params": list(model.parameters())}]
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.05}]


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
@pytest.mark.parametrize("rescale_lr", [True, False])
@pytest.mark.parametrize("clip_radius", [math.inf, 1e-3])
def test_matches_reference_trajectory(mc_samples, weight_decay, rescale_lr, clip_radius):
    split = mc_samples == 3  # also cover several param groups with their own lr
    hyper = dict(lr=0.1, ess=50.0, hess_init=0.3, beta1=0.9, beta2=0.999, weight_decay=weight_decay,
                 clip_radius=clip_radius, rescale_lr=rescale_lr)
    ours_model, ref_model = make_mlp(), make_mlp()
    x, y = make_data()
    numels = [sum(p.numel() for p in g["params"]) for g in param_groups(ours_model, split)]
    steps = 60
    gen = torch.Generator().manual_seed(7)
    noise = [[torch.randn(n, generator=gen) for n in numels] for _ in range(steps * mc_samples)]

    ours = InjectedNoiseIVON(param_groups(ours_model, split), noise_queue=list(noise), mc_samples=mc_samples, **hyper)
    ref = ivon_reference.IVON(param_groups(ref_model, split), mc_samples=mc_samples, **hyper)
    ref_queue = list(noise)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        batch = slice((step * 8) % 32, (step * 8) % 32 + 8)
        for _ in range(mc_samples):
            with ours.sampled_params(train=True):
                loss_fn(ours_model(x[batch]), y[batch]).backward()
            with reference_randn(ref_queue), ref.sampled_params(train=True):
                ref.zero_grad()
                loss_fn(ref_model(x[batch]), y[batch]).backward()
        ours.step()
        ref.step()

        for group, ref_group in zip(ours.param_groups, ref.param_groups):
            hess = torch.cat([ours.state[p]["hess"].flatten() for p in group["params"]])
            mom = torch.cat([ours.state[p]["momentum"].flatten() for p in group["params"]])
            torch.testing.assert_close(hess, ref_group["hess"], rtol=2e-5, atol=1e-7)
            torch.testing.assert_close(mom, ref_group["momentum"], rtol=2e-5, atol=1e-7)
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
    # The run must have moved the means and the Hessians, or the comparison proves nothing.
    assert not torch.allclose(next(ours_model.parameters()), next(make_mlp().parameters()))
    assert not torch.allclose(ours.state[next(ours_model.parameters())]["hess"], torch.tensor(0.3))


def test_hessian_converges_to_least_squares_curvature():
    """For L(θ) = ½·mean((Xθ − y)²) the Hessian is XᵀX/n; IVON's h must find its diagonal."""
    torch.manual_seed(0)
    n, d = 200, 4
    x = torch.randn(n, d) * torch.tensor([0.5, 1.0, 2.0, 3.0])
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n)
    hessian = x.T @ x / n
    theta = nn.Parameter(torch.zeros(d))
    wd, ess = 1e-2, 1000.0
    opt = IVON([theta], lr=0.05, ess=ess, hess_init=1.0, beta2=0.999, weight_decay=wd, mc_samples=8,
               rescale_lr=False, seed=3)

    def closure():
        loss = 0.5 * ((x @ theta - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(6000):
        opt.step(closure)
    h = opt.state[theta]["hess"]
    torch.testing.assert_close(h, hessian.diagonal(), rtol=0.06, atol=0.0)
    torch.testing.assert_close(opt.posterior_variance(theta), 1.0 / (ess * (h + wd)))
    torch.testing.assert_close(opt.posterior_std(theta) ** 2, opt.posterior_variance(theta))
    # The mean is the MAP of the loss plus the Gaussian prior: (H + δI)·m = Xᵀy/n.
    map_estimate = torch.linalg.solve(hessian + wd * torch.eye(d), x.T @ y / n)
    torch.testing.assert_close(theta.detach(), map_estimate, rtol=0.02, atol=0.02)


def train(model: nn.Module, opt: IVON, steps: range) -> list[float]:
    x, y = make_data()
    losses = []
    for step in steps:
        batch = slice((step * 8) % 32, (step * 8) % 32 + 8)
        for _ in range(opt.mc_samples):
            with opt.sampled_params(train=True):
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
            losses.append(loss.item())
        opt.step()
    return losses


def test_resume_is_bit_identical(tmp_path):
    hyper = dict(lr=0.05, ess=100.0, hess_init=0.5, mc_samples=2, weight_decay=1e-3, seed=11)
    model = make_mlp()
    opt = IVON(model.parameters(), **hyper)
    full_losses = train(model, opt, range(20))

    model_a = make_mlp()
    opt_a = IVON(model_a.parameters(), **hyper)
    first = train(model_a, opt_a, range(10))
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_b = make_mlp(seed=99)
    model_b.load_state_dict(ckpt["model"])
    opt_b = IVON(model_b.parameters(), **{**hyper, "seed": 0, "mc_samples": 1})
    opt_b.load_state_dict(ckpt["opt"])
    second = train(model_b, opt_b, range(10, 20))

    assert first + second == full_losses
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["hess"], opt_b.state[q]["hess"])
        assert torch.equal(opt.state[p]["momentum"], opt_b.state[q]["momentum"])


def test_noise_depends_on_seed_and_rank():
    model = make_mlp()
    draws = []
    for seed, rank in [(0, 0), (0, 0), (1, 0), (0, 1)]:
        opt = IVON(model.parameters(), lr=0.1, ess=10.0, seed=seed)
        opt._rank = rank
        draws.append(opt._standard_normal(list(model.parameters()))[0])
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0], draws[3])


def test_sampled_params_restores_mean_on_exception():
    model = make_mlp()
    before = copy.deepcopy(model.state_dict())
    opt = IVON(model.parameters(), lr=0.1, ess=10.0)
    with pytest.raises(KeyError, match="boom"):
        with opt.sampled_params(train=True):
            assert not torch.equal(model[0].weight, before["0.weight"])  # really perturbed
            raise KeyError("boom")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    with pytest.raises(RuntimeError, match="without any recorded sample"):
        opt.step()  # the failed sample was not recorded


def test_sample_std_matches_posterior():
    p = nn.Parameter(torch.zeros(20000))
    opt = IVON([p], lr=0.1, ess=4.0, hess_init=0.25, weight_decay=0.0)
    with opt.sampled_params():
        sample = p.detach().clone()
    assert torch.equal(p, torch.zeros(20000))
    assert abs(sample.std().item() - 1.0) < 0.02  # σ = 1/sqrt(4 · 0.25) = 1
    assert abs(sample.mean().item()) < 0.02


def test_empty_group_frozen_and_unused_params_are_skipped():
    model = make_mlp()
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    unused = nn.Parameter(torch.ones(3))
    opt = IVON([{"params": []}, {"params": list(model.parameters()) + [frozen, unused]}], lr=0.1, ess=10.0)
    train(model, opt, range(3))
    assert torch.equal(frozen, torch.ones(3)) and torch.equal(unused, torch.ones(3))
    assert frozen not in opt.state
    assert "grad_sum" not in opt.state[unused] and torch.equal(opt.state[unused]["momentum"], torch.zeros(3))
    assert opt.param_groups[1]["step"] == 3 and opt.param_groups[0]["step"] == 0


def test_bf16_params_keep_fp32_state_and_small_updates():
    p = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = IVON([p], lr=1e-4, ess=1.0, hess_init=1.0, weight_decay=0.0, rescale_lr=False)
    for _ in range(50):
        with opt.sampled_params(train=True):
            (p.float().sum()).backward()  # gradient 1 everywhere: the mean decreases by ~lr per step
        opt.step()
    state = opt.state[p]
    assert state["mean"].dtype == state["hess"].dtype == state["momentum"].dtype == torch.float32
    assert p.dtype == torch.bfloat16
    # 50 updates of ~1e-4 are each below bf16 resolution at 1.0 (2^-7), but the fp32 mean records them.
    assert state["mean"][0].item() == pytest.approx(1.0 - 50 * 1e-4, rel=1e-3)
    assert p[0].item() == pytest.approx(state["mean"][0].item(), abs=2**-8)
    # Resume keeps the state in fp32.
    fresh = IVON([p], lr=1e-4, ess=1e8)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["hess"].dtype == torch.float32
    assert torch.equal(fresh.state[p]["mean"], state["mean"])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1.0}, "lr"),
        ({"ess": 0.0}, "ess"),
        ({"ess": float("nan")}, "ess"),
        ({"hess_init": 0.0}, "hess_init"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"clip_radius": 0.0}, "clip_radius"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    args = {"lr": 0.1, "ess": 10.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        IVON([nn.Parameter(torch.zeros(2))], **args)


def test_nested_sampling_and_step_inside_sampling_are_refused():
    p = nn.Parameter(torch.zeros(2))
    opt = IVON([p], lr=0.1, ess=10.0)
    with opt.sampled_params():
        with pytest.raises(RuntimeError, match="nested"):
            with opt.sampled_params():
                pass
    assert torch.equal(p, torch.zeros(2))


def test_load_state_dict_rejects_foreign_state():
    p = nn.Parameter(torch.zeros(2))
    adam = torch.optim.AdamW([p])
    with pytest.raises(ValueError, match="not written by ivon_lora.IVON"):
        IVON([p], lr=0.1, ess=10.0).load_state_dict(adam.state_dict())


def test_param_group_overrides_are_validated():
    opt = IVON([nn.Parameter(torch.zeros(2))], lr=0.1, ess=10.0)
    with pytest.raises(ValueError, match="ess"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "ess": 0.0})
