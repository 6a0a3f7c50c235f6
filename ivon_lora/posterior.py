"""The object a user holds after variational training: a Gaussian posterior over one LoRA adapter.

    post = VariationalLoraPosterior.from_pretrained(base_model, "path/or/user-repo")
    with post.sample(seed=0):
        logits = post.model(**inputs).logits      # one posterior sample θ = m + σ·ε
    logits = post.model(**inputs).logits          # the mean again

The mean lives in the PEFT model's LoRA parameters (so everything PEFT does keeps working); the posterior
object adds the variances, keyed exactly like PEFT's ``adapter_model.safetensors``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from torch import Tensor, nn

from ivon_lora import pruning
from ivon_lora.optimizer import IVON
from ivon_lora.serialization import (
    VariationalAdapterError,
    adapter_folder,
    lora_parameters,
    read_mean,
    read_variances,
    read_variational_config,
    staged_directory,
    validate_variances,
    write_variances,
    write_variational_config,
)

logger = logging.getLogger(__name__)

__all__ = ["VariationalLoraPosterior"]


class VariationalLoraPosterior:
    """Diagonal Gaussian posterior N(m, σ²) over the LoRA parameters of one adapter of a ``PeftModel``.

    Args:
        model: the PEFT model whose adapter parameters hold the mean.
        variances: σ² per PEFT key (as in ``adapter_model.safetensors``).
        adapter_name: the adapter this posterior belongs to.
        ess: effective sample size the variances were computed with (recorded; tempering rescales it).
        weight_decay: prior precision δ the variances were computed with (recorded).
        config: how the posterior was trained (``variational_config.json``).
        metadata: extra string metadata stored with the variances (e.g. pruning records).
        pruning_masks: True where an entry is pruned (its mean is 0); samples keep these entries exactly 0.
    """

    def __init__(
        self,
        model: PeftModel,
        variances: Mapping[str, Tensor],
        *,
        adapter_name: str = "default",
        ess: float,
        weight_decay: float = 0.0,
        config: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        pruning_masks: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self.parameters = lora_parameters(model, adapter_name)
        mean = {key: p.detach() for key, p in self.parameters.items()}
        cpu_variances = {key: v.detach().to("cpu", torch.float32) for key, v in variances.items()}
        validate_variances(cpu_variances, mean, source=f"posterior of adapter {adapter_name!r}")
        self.variances = {key: cpu_variances[key].to(self.parameters[key].device) for key in self.parameters}
        self.ess = float(ess)
        self.weight_decay = float(weight_decay)
        self.config = dict(config or {})
        self.metadata = dict(metadata or {})
        masks = dict(pruning_masks or {})
        pruning.validate_pruning_masks(masks, self.parameters, source=f"posterior of adapter {adapter_name!r}")
        self.pruning_masks = {key: mask.to(self.parameters[key].device) for key, mask in masks.items()}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_optimizer(
        cls, model: PeftModel, optimizer: IVON, *, adapter_name: str = "default", config: Mapping[str, Any] | None = None
    ) -> VariationalLoraPosterior:
        """Take σ² = 1/(ess·(h+δ)) of every adapter parameter from a trained :class:`IVON`."""
        parameters = lora_parameters(model, adapter_name)
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        unknown = [key for key, p in parameters.items() if id(p) not in groups]
        if unknown:
            raise VariationalAdapterError(f"Adapter parameters not optimized by this IVON: {unknown[:5]}.")
        ess_values = {groups[id(p)]["ess"] for p in parameters.values()}
        wd_values = {groups[id(p)]["weight_decay"] for p in parameters.values()}
        if len(ess_values) > 1 or len(wd_values) > 1:
            raise VariationalAdapterError("The adapter's parameters use several ess/weight_decay values; cannot summarise.")
        variances = {key: optimizer.posterior_variance(p) for key, p in parameters.items()}
        return cls(
            model, variances, adapter_name=adapter_name, ess=ess_values.pop(), weight_decay=wd_values.pop(), config=config
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path_or_repo_id: str | Path,
        *,
        adapter_name: str = "default",
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        is_trainable: bool = False,
    ) -> VariationalLoraPosterior:
        """Load mean and variances from a local folder or a Hub repo.

        ``model`` is either a base model (it gets wrapped with ``PeftModel.from_pretrained``) or a ``PeftModel``
        (the adapter is loaded into it, or its existing ``adapter_name`` adapter is overwritten with the mean).
        The folder is fully validated before the model is touched.
        """
        from ivon_lora.hub import resolve_adapter_folder

        folder = resolve_adapter_folder(path_or_repo_id, subfolder=subfolder, revision=revision, token=token)
        mean = read_mean(folder)
        variances, metadata = read_variances(folder, mean)
        masks = pruning.decode_pruning_masks(variances, mean, metadata, source=str(folder))
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
        elif adapter_name not in model.peft_config:
            model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
        else:
            result = set_peft_model_state_dict(model, mean, adapter_name=adapter_name)
            if getattr(result, "unexpected_keys", None):
                raise VariationalAdapterError(f"{folder}: mean keys do not fit adapter {adapter_name!r}: {result.unexpected_keys[:5]}")
        model.set_adapter(adapter_name)
        extra = {k: v for k, v in metadata.items() if k not in {"format_version", "kind", "ess", "weight_decay", "mean_fingerprint"}}
        return cls(
            model,
            variances,
            adapter_name=adapter_name,
            ess=float(metadata["ess"]),
            weight_decay=float(metadata["weight_decay"]),
            config=read_variational_config(folder),
            metadata=extra,
            pruning_masks=masks,
        )

    # ------------------------------------------------------------------ inspection
    def mean(self) -> dict[str, Tensor]:
        """Copies of the mean tensors (what the model holds outside :meth:`sample`)."""
        return {key: p.detach().float().clone() for key, p in self.parameters.items()}

    def variance(self) -> dict[str, Tensor]:
        return dict(self.variances)

    def std(self) -> dict[str, Tensor]:
        return {key: v.sqrt() for key, v in self.variances.items()}

    @property
    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.variances.values())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(adapter={self.adapter_name!r}, tensors={len(self.variances)}, "
            f"parameters={self.num_parameters}, ess={self.ess:g}, weight_decay={self.weight_decay:g})"
        )

    # ------------------------------------------------------------------ use
    def draw(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One posterior sample θ = m + σ·ε per key, without touching the model; pruned entries stay exactly 0."""
        theta = {}
        for key, p in self.parameters.items():
            noise = self.variances[key].sqrt() * _randn_like(self.variances[key], generator)
            if key in self.pruning_masks:
                noise = noise.masked_fill(self.pruning_masks[key], 0.0)
            theta[key] = p.detach().float() + noise
        return theta

    @contextmanager
    def sample(self, seed: int | None = None, generator: torch.Generator | None = None) -> Iterator[dict[str, Tensor]]:
        """Put one posterior sample into the model for the block; the mean is restored on exit (also on error)."""
        if seed is not None:
            if generator is not None:
                raise ValueError("Pass either seed or generator, not both.")
            generator = torch.Generator().manual_seed(seed)
        theta = self.draw(generator)
        backups = {key: p.detach().clone() for key, p in self.parameters.items()}
        try:
            with torch.no_grad():
                for key, p in self.parameters.items():
                    p.copy_(theta[key])
            yield theta
        finally:
            with torch.no_grad():
                for key, p in self.parameters.items():
                    p.copy_(backups[key])

    def temper(self, temperature: float) -> VariationalLoraPosterior:
        """A posterior with σ² scaled by ``temperature`` (= ess / temperature), sharing the same model and mean.

        ``temperature > 1`` widens the posterior, ``< 1`` narrows it; no retraining involved.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        return VariationalLoraPosterior(
            self.model,
            {key: v * temperature for key, v in self.variances.items()},
            adapter_name=self.adapter_name,
            ess=self.ess / temperature,
            weight_decay=self.weight_decay,
            config=self.config,
            metadata={**self.metadata, "temperature": repr(float(temperature) * float(self.metadata.get("temperature", 1.0)))},
            pruning_masks=self.pruning_masks,
        )

    def prune(
        self, amount: float, criterion: str = "snr", scope: str = "tensor", *, adapter_name: str | None = None
    ) -> VariationalLoraPosterior:
        """Unstructured pruning: a new posterior whose ``round(amount·n)`` least trusted entries are fixed at 0.

        ``criterion``: ``"snr"`` drops the lowest |m|/σ, ``"variance"`` the highest σ², ``"magnitude"`` the lowest |m|;
        ``scope``: ``"tensor"`` (n per tensor) or ``"global"`` (n over the adapter). The result lives in a new adapter
        ``adapter_name`` (default ``"<adapter>_pruned"``) of the same model, made active; this posterior and its
        adapter are untouched. See :mod:`ivon_lora.pruning`.
        """
        return pruning.prune(self, amount, criterion, scope, adapter_name=adapter_name)

    def prune_ranks(
        self, keep: int | float, criterion: str = "snr", *, adapter_name: str | None = None
    ) -> VariationalLoraPosterior:
        """Structured pruning: a new posterior over a genuinely lower-rank adapter that computes the same as this one
        with the dropped rank components set to 0.

        ``keep``: rank kept per layer (int) or fraction of all components kept (float in (0, 1], ranked across
        layers). ``criterion``: ``"snr"`` or ``"magnitude"``. New adapter as in :meth:`prune`.
        """
        return pruning.prune_ranks(self, keep, criterion, adapter_name=adapter_name)

    # ------------------------------------------------------------------ persistence
    def write_into(self, directory: str | Path) -> Path:
        """Write variance file and variational config beside an adapter mean that PEFT already saved there."""
        folder = adapter_folder(directory, self.adapter_name)
        mean = read_mean(folder)
        current = {key: p.detach().to("cpu") for key, p in self.parameters.items()}
        for key, tensor in mean.items():
            if key in current and not torch.equal(tensor, current[key].to(tensor.dtype)):
                raise VariationalAdapterError(f"{folder}: saved mean differs from the model's at {key!r}; save them together.")
        variances = pruning.encode_pruned_variances(self.variances, self.pruning_masks)
        write_variances(folder, variances, mean, ess=self.ess, weight_decay=self.weight_decay, extra_metadata=self.metadata)
        write_variational_config(folder, self.config)
        return folder

    def save_pretrained(self, directory: str | Path, **peft_kwargs: Any) -> Path:
        """Save mean (PEFT's files) and variances together; returns the adapter's folder."""
        with staged_directory(directory) as staging:
            self.model.save_pretrained(str(staging), selected_adapters=[self.adapter_name], **peft_kwargs)
            self.write_into(staging)
        return adapter_folder(directory, self.adapter_name)

    def push_to_hub(self, repo_id: str, *, base_model: str | None = None, **push_kwargs: Any) -> Any:
        """Save to a temporary folder with a model card and upload everything in one Hub commit."""
        import tempfile

        from ivon_lora.hub import push_adapter_folder
        from ivon_lora.model_card import write_model_card

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(tmp)
            base = base_model or self.model.peft_config[self.adapter_name].base_model_name_or_path
            write_model_card(folder, base_model=base, repo_id=repo_id)
            return push_adapter_folder(folder, repo_id, **push_kwargs)


def _randn_like(reference: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise; drawn on the generator's device and moved, so a CPU seed gives the same draw anywhere."""
    device = generator.device if generator is not None else reference.device
    return torch.randn(reference.shape, generator=generator, device=device, dtype=torch.float32).to(reference.device)
