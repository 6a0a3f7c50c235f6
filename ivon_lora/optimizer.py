"""IVON (Improved Variational Online Newton) as a plain ``torch.optim.Optimizer``.

IVON learns a diagonal Gaussian posterior N(m, σ²) over the parameters it optimizes:

* ``m`` — the mean; between steps it is what the parameter tensor holds (for fp32 parameters) or an fp32
  master copy in the optimizer state (for bf16/fp16 parameters, whose resolution is too coarse for IVON's
  small updates);
* ``h`` — a diagonal Hessian estimate, and σ² = 1 / (ess · (h + δ)), with ``ess`` the effective sample size
  and δ the weight decay (prior precision).

A training step draws θ = m + σ·ε, evaluates the gradient there, and uses the reparameterisation estimate
ĥ = E[(θ − m)·g] / σ² to update ``h``. Several draws inside one step are Monte-Carlo samples::

    for batch in loader:
        for _ in range(optimizer.mc_samples):
            with optimizer.sampled_params(train=True):
                loss_fn(model(batch)).backward()
        optimizer.step()

The maths follows Shen et al., "Variational Learning is Effective for Large Deep Networks" (ICML 2024).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

__all__ = ["IVON"]

_MASK64 = (1 << 64) - 1


def _mix_seed(*values: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 finaliser), so that noise is a pure function of
    (seed, rank, step, sample) and never needs a generator state to be checkpointed per rank."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state * 0xBF58476D1CE4E5B9) & _MASK64
        state ^= state >> 27
        state = (state * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1


class IVON(Optimizer):
    """Variational online Newton optimizer with a diagonal Gaussian posterior per parameter tensor.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate of the mean.
        ess: effective sample size, usually the training-set size. It acts as an inverse temperature:
            larger values give a narrower posterior.
        hess_init: initial value of the Hessian estimate ``h``.
        beta1: momentum coefficient of the gradient.
        beta2: averaging coefficient of the Hessian estimate.
        weight_decay: δ, the precision of the isotropic Gaussian prior (it also regularises the mean).
        mc_samples: Monte-Carlo samples per step when :meth:`step` is given a closure.
        clip_radius: element-wise clip of the preconditioned update (``inf`` disables clipping).
        rescale_lr: multiply ``lr`` by ``hess_init + weight_decay`` (Shen et al.'s convention; the LoRA papers
            turn it off).
        seed: seed of the optimizer's own noise generator.

    Defaults are the general-purpose ones of Shen et al.; :class:`ivon_lora.VariationalTrainingArguments`
    carries the LoRA-paper defaults instead.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        mc_samples: int = 1,
        clip_radius: float = math.inf,
        rescale_lr: bool = True,
        seed: int = 0,
    ) -> None:
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"IVON: mc_samples must be a positive integer, got {mc_samples!r}.")
        if not isinstance(seed, int):
            raise ValueError(f"IVON: seed must be an integer, got {seed!r}.")
        defaults = dict(
            lr=lr,
            ess=ess,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            clip_radius=clip_radius,
            rescale_lr=rescale_lr,
            step=0,
        )
        _validate_hyperparameters(**{k: v for k, v in defaults.items() if k in _RULES})
        super().__init__(params, defaults)
        self.mc_samples = mc_samples
        self.seed = seed
        self._rank = 0
        self._process_group: dist.ProcessGroup | None = None
        self._sync_across_ranks = False
        self._samples_in_step = 0
        self._prediction_draws = 0
        self._sampling = False
        self._generators: dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------ configuration
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _validate_hyperparameters(**{k: v for k, v in param_group.items() if k in _RULES})
        super().add_param_group(param_group)

    def enable_distributed(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Make this optimizer one replica of a data-parallel run.

        Every rank keeps identical means and Hessians; each rank draws its own noise (the rank is mixed into
        the seed), and :meth:`step` averages the captured gradient and noise-gradient sums across ranks before
        the shared update. Call once, after ``torch.distributed`` is initialised, before the first sample.
        Gradients must *not* be all-reduced by DDP itself (use ``model.no_sync()``): averaging raw gradients
        across ranks with different noise would corrupt the Hessian estimate.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("IVON.enable_distributed() needs an initialised torch.distributed process group.")
        self._process_group = process_group
        self._rank = dist.get_rank(process_group)
        self._sync_across_ranks = dist.get_world_size(process_group) > 1

    # ------------------------------------------------------------------ posterior access
    def _trainable(self) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield group, p

    def _param_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        """Lazily create the float32 posterior state of ``p``."""
        state = self.state[p]
        if "hess" not in state:
            state["hess"] = torch.full_like(p, group["hess_init"], dtype=torch.float32, memory_format=torch.preserve_format)
            state["momentum"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            if p.dtype != torch.float32:
                state["mean"] = p.detach().float()
        return state

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("IVON: this tensor is not a parameter of the optimizer.")

    def posterior_mean(self, p: Tensor) -> Tensor:
        """The float32 posterior mean of parameter ``p`` (a copy)."""
        if self._sampling:
            raise RuntimeError("IVON: the mean is not in the parameters inside sampled_params(); read it outside.")
        state = self.state.get(p, {})
        return state["mean"].clone() if "mean" in state else p.detach().float().clone()

    def posterior_variance(self, p: Tensor) -> Tensor:
        """σ² = 1 / (ess · (h + δ)) of parameter ``p`` (float32)."""
        group = self._group_of(p)
        hess = self._param_state(group, p)["hess"]
        return 1.0 / (group["ess"] * (hess + group["weight_decay"]))

    def posterior_std(self, p: Tensor) -> Tensor:
        """σ of parameter ``p`` (float32)."""
        return self.posterior_variance(p).sqrt()

    # ------------------------------------------------------------------ sampling
    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _standard_normal(self, params: list[Tensor], train: bool = True) -> list[Tensor]:
        """Draw ε ~ N(0, 1) for each tensor, from generators re-seeded with (seed, rank, step, sample).

        The training stream is a pure function of those counters, so a resumed run continues bit-identically
        and each data-parallel rank draws its own noise even though only rank 0 writes checkpoints. Draws for
        prediction use their own counter and never shift the training stream.
        """
        step = self.param_groups[0]["step"] if self.param_groups else 0
        if train:
            sample_seed = _mix_seed(self.seed, self._rank, step, self._samples_in_step)
        else:
            self._prediction_draws += 1
            sample_seed = _mix_seed(self.seed, self._rank, step, 1 << 40, self._prediction_draws)
        seeded: set[torch.device] = set()
        noise = []
        for p in params:
            generator = self._generator(p.device)
            if p.device not in seeded:
                generator.manual_seed(_mix_seed(sample_seed, (p.device.index or 0) + 1))
                seeded.add(p.device)
            noise.append(torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32))
        return noise

    @contextmanager
    def sampled_params(self, train: bool = False) -> Iterator[None]:
        """Set every trainable parameter to a posterior sample θ = m + σ·ε for the duration of the block.

        On exit the means are put back, also when the block raises. With ``train=True`` the block starts
        with cleared gradients and, if it completes, its gradients are recorded as one Monte-Carlo sample for
        the next :meth:`step` (parameters whose gradient is ``None`` contribute nothing).
        """
        if self._sampling:
            raise RuntimeError("IVON.sampled_params() cannot be nested.")
        entries = [(group, p, self._param_state(group, p)) for group, p in self._trainable()]
        backups = self._draw_sample(entries, train)
        self._sampling = True
        if train:
            for _, p, _ in entries:
                p.grad = None
        try:
            yield
            if train:
                self._capture(entries, backups)
        finally:
            self._restore(entries, backups)
            self._sampling = False

    @torch.no_grad()
    def _draw_sample(self, entries: list[tuple[dict[str, Any], Tensor, dict[str, Any]]], train: bool) -> list[Tensor | None]:
        """Write θ = m + σ·ε into the parameters; return fp32 backups of the means that live in the parameter."""
        if not entries:
            return []
        noise = self._standard_normal([p for _, p, _ in entries], train)
        for group, indices in _by_group(entries):
            group_noise = [noise[i] for i in indices]
            scale = torch._foreach_add([entries[i][2]["hess"] for i in indices], group["weight_decay"])
            torch._foreach_mul_(scale, group["ess"])
            torch._foreach_sqrt_(scale)
            torch._foreach_div_(group_noise, scale)  # σ·ε, computed as ε / sqrt(ess·(h+δ))
        in_place = [i for i, (_, _, state) in enumerate(entries) if "mean" not in state]
        backups: list[Tensor | None] = [None] * len(entries)
        if in_place:
            params = [entries[i][1].data for i in in_place]
            for i, backup in zip(in_place, torch._foreach_mul(params, 1.0)):
                backups[i] = backup
            torch._foreach_add_(params, [noise[i] for i in in_place])
        for (_, p, state), eps in zip(entries, noise):
            if "mean" in state:
                p.copy_(state["mean"] + eps)
        return backups

    @torch.no_grad()
    def _capture(self, entries: list[tuple[dict[str, Any], Tensor, dict[str, Any]]], backups: list[Tensor | None]) -> None:
        """Add this sample's g and (θ − m)·g to the step's running sums."""
        seen = [(p, state, backup) for (_, p, state), backup in zip(entries, backups) if p.grad is not None]
        if seen:
            grads = [p.grad.float() for p, _, _ in seen]
            means = [state["mean"] if backup is None else backup for _, state, backup in seen]
            perturbations = torch._foreach_sub([p.detach().float() for p, _, _ in seen], means)
            fresh = [i for i, (_, state, _) in enumerate(seen) if "grad_sum" not in state]
            for i in fresh:
                seen[i][1]["grad_sum"] = torch.zeros_like(grads[i])
                seen[i][1]["noise_grad_sum"] = torch.zeros_like(grads[i])
            torch._foreach_add_([state["grad_sum"] for _, state, _ in seen], grads)
            torch._foreach_addcmul_([state["noise_grad_sum"] for _, state, _ in seen], perturbations, grads)
        self._samples_in_step += 1

    @torch.no_grad()
    def _restore(self, entries: list[tuple[dict[str, Any], Tensor, dict[str, Any]]], backups: list[Tensor | None]) -> None:
        in_place = [(p.data, backup) for (_, p, _), backup in zip(entries, backups) if backup is not None]
        if in_place:
            torch._foreach_copy_([p for p, _ in in_place], [b for _, b in in_place])
        for (_, p, state), backup in zip(entries, backups):
            if backup is None:
                p.copy_(state["mean"])

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update means, Hessians and momenta from the samples recorded since the last step.

        With a ``closure`` (which must compute the loss and call ``backward()``), ``mc_samples`` samples are
        drawn here; otherwise at least one ``sampled_params(train=True)`` block must have run since the last step.
        """
        loss = None
        if closure is not None:
            losses = []
            for _ in range(self.mc_samples):
                with self.sampled_params(train=True), torch.enable_grad():
                    losses.append(closure().detach())
            loss = torch.stack(losses).mean()
        if self._samples_in_step == 0:
            raise RuntimeError(
                "IVON.step() was called without any recorded sample: run forward/backward inside "
                "`with optimizer.sampled_params(train=True):` (or pass a closure to step())."
            )
        if self._sampling:
            raise RuntimeError("IVON.step() cannot be called inside sampled_params().")

        total_samples = self._sync_samples() if self._sync_across_ranks else float(self._samples_in_step)
        for group in self.param_groups:
            self._update_group(group, total_samples)
        self._samples_in_step = 0
        return loss

    def _sync_samples(self) -> float:
        """All-reduce (sum) the captured sums and the sample count across ranks; return the global count."""
        tensors: list[Tensor] = []
        for group, p in self._trainable():
            state = self._param_state(group, p)
            if "grad_sum" not in state:  # every rank must reduce the same tensor set
                state["grad_sum"] = torch.zeros_like(state["hess"])
                state["noise_grad_sum"] = torch.zeros_like(state["hess"])
            tensors += [state["grad_sum"], state["noise_grad_sum"]]
        count = torch.tensor([float(self._samples_in_step)], device=tensors[0].device if tensors else "cpu")
        flat = torch.cat([t.reshape(-1) for t in tensors] + [count])
        dist.all_reduce(flat, group=self._process_group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return float(flat[-1])

    def _update_group(self, group: dict[str, Any], num_samples: float) -> None:
        params, means, hessians, momenta, grads, noise_grads = [], [], [], [], [], []
        for p in group["params"]:
            state = self.state.get(p)
            if not state or "grad_sum" not in state:
                continue  # no gradient this step: frozen or unused
            params.append(p)
            means.append(state["mean"] if "mean" in state else p.data)
            hessians.append(state["hess"])
            momenta.append(state["momentum"])
            grads.append(state.pop("grad_sum"))
            noise_grads.append(state.pop("noise_grad_sum"))
        if not params:
            return

        group["step"] += 1
        beta1, beta2, wd, ess = group["beta1"], group["beta2"], group["weight_decay"], group["ess"]
        lr = group["lr"] * (group["hess_init"] + wd) if group["rescale_lr"] else group["lr"]

        torch._foreach_div_(grads, num_samples)  # ĝ
        torch._foreach_div_(noise_grads, num_samples)  # mean of (θ − m)·g
        # ĥ = mean((θ − m)·g) / σ² = mean((θ − m)·g) · ess · (h + δ)
        hess_plus_wd = torch._foreach_add(hessians, wd)
        hess_hat = torch._foreach_mul(noise_grads, hess_plus_wd)
        torch._foreach_mul_(hess_hat, ess)

        torch._foreach_lerp_(momenta, grads, 1.0 - beta1)

        # h ← β2·h + (1−β2)·ĥ + ½(1−β2)²·(h − ĥ)² / (h + δ)
        correction = torch._foreach_sub(hessians, hess_hat)
        torch._foreach_mul_(correction, correction)
        torch._foreach_div_(correction, hess_plus_wd)
        torch._foreach_mul_(hessians, beta2)
        torch._foreach_add_(hessians, hess_hat, alpha=1.0 - beta2)
        torch._foreach_add_(hessians, correction, alpha=0.5 * (1.0 - beta2) ** 2)

        # m ← m − lr·clip((mom / (1 − β1^t) + δ·m) / (h + δ), ±clip_radius)
        update = torch._foreach_div(momenta, 1.0 - beta1 ** group["step"])
        if wd != 0.0:
            torch._foreach_add_(update, means, alpha=wd)
        torch._foreach_copy_(hess_plus_wd, hessians)  # reuse the buffer for the new h + δ
        torch._foreach_add_(hess_plus_wd, wd)
        torch._foreach_div_(update, hess_plus_wd)
        if math.isfinite(group["clip_radius"]):
            torch._foreach_clamp_min_(update, -group["clip_radius"])
            torch._foreach_clamp_max_(update, group["clip_radius"])
        torch._foreach_add_(means, update, alpha=-lr)

        for p, mean in zip(params, means):
            if mean is not p.data:
                p.copy_(mean)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ivon"] = {"seed": self.seed, "mc_samples": self.mc_samples, "samples_in_step": self._samples_in_step}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyper-parameters, step counts and the float32 posterior state.

        torch's own loader would cast the state to each parameter's dtype (bf16 would destroy ``h``), so the
        per-parameter state is mapped back by position here instead.
        """
        extra = state_dict.get("ivon")
        if extra is None:
            raise ValueError("IVON.load_state_dict: this state dict was not written by ivon_lora.IVON (no 'ivon' entry).")
        if extra.get("samples_in_step", 0):
            raise ValueError("IVON.load_state_dict: the state was saved in the middle of a step (unused samples).")
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("IVON.load_state_dict: the parameter groups do not match the saved optimizer's.")
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        self.state.clear()
        for group, saved in zip(self.param_groups, saved_groups):
            for p, index in zip(group["params"], saved["params"]):
                if index in state_dict["state"]:
                    self.state[p] = {
                        key: value.to(device=p.device, dtype=torch.float32) for key, value in state_dict["state"][index].items()
                    }
        self.seed = int(extra["seed"])
        self.mc_samples = int(extra["mc_samples"])


def _by_group(entries: list[tuple[dict[str, Any], Tensor, dict[str, Any]]]) -> list[tuple[dict[str, Any], list[int]]]:
    """(group, indices of its entries) for each parameter group present in ``entries``."""
    buckets: dict[int, tuple[dict[str, Any], list[int]]] = {}
    for i, (group, _, _) in enumerate(entries):
        buckets.setdefault(id(group), (group, []))[1].append(i)
    return list(buckets.values())


_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda v: v >= 0.0, "must be >= 0"),
    "ess": (lambda v: v > 0.0, "must be > 0 (typically the training-set size)"),
    "hess_init": (lambda v: v > 0.0, "must be > 0"),
    "beta1": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "beta2": (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    "weight_decay": (lambda v: v >= 0.0, "must be >= 0"),
    "clip_radius": (lambda v: v > 0.0, "must be > 0 (use math.inf to disable clipping)"),
}


def _validate_hyperparameters(**values: float) -> None:
    """Raise a ValueError naming the first hyper-parameter outside its valid range."""
    for name, value in values.items():
        check, requirement = _RULES[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not check(value):
            raise ValueError(f"IVON: {name} {requirement}, got {value!r}.")
