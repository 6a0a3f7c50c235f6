"""Posterior pruning of a variational LoRA adapter: drop the entries or rank components the posterior doubts.

    sparse = post.prune(0.5, criterion="snr")     # unstructured: half the entries set to exactly 0
    small = post.prune_ranks(4)                   # structured: a genuinely rank-4 adapter

Both return a NEW posterior over a NEW adapter added to the same ``PeftModel`` (named ``"<adapter>_pruned"``
unless ``adapter_name`` is given) and make it the active adapter. The base model (possibly 4-bit) is shared, not
copied; the original adapter's weights and posterior are never touched, so ``model.set_adapter(post.adapter_name)``
gives the unpruned adapter back and ``model.delete_adapter(pruned.adapter_name)`` frees the pruned one. As for any
named PEFT adapter, ``pruned.save_pretrained(dir)`` writes into ``dir/<adapter_name>/`` and returns that folder.

Unstructured pruning sets the mean of pruned entries to 0 and keeps a boolean mask (``posterior.pruning_masks``,
True = pruned) that sampling respects, so a sample never re-grows a pruned weight. On disk the mask is encoded in the
variance file itself: pruned entries store the variance :data:`PRUNED_VARIANCE` (the smallest normal float32, so the
file stays finite and positive, and a consumer unaware of pruning samples them as ~1e-19), and the metadata records
the pruning (``pruning.*`` keys) including the number of pruned entries, which the loader checks.

Structured pruning removes row i of ``lora_A`` together with column i of ``lora_B`` and writes the new ranks into the
PEFT config (``r``/``lora_alpha`` plus ``rank_pattern``/``alpha_pattern`` where layers differ), with ``lora_alpha``
rescaled so every layer keeps its scaling: the pruned adapter computes exactly what the original computes with the
dropped components set to 0. Its saved folder is a plain, smaller PEFT adapter.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft import PeftConfig
from peft.tuners.lora import LoraLayer
from torch import Tensor

from ivon_lora.serialization import VariationalAdapterError, lora_parameters

if TYPE_CHECKING:
    from ivon_lora.posterior import VariationalLoraPosterior

logger = logging.getLogger(__name__)

__all__ = [
    "PRUNED_VARIANCE",
    "component_scores",
    "entry_scores",
    "lowest",
    "mask_agreement",
    "prune",
    "prune_ranks",
    "pruning_masks",
    "select_components",
]

PRUNED_VARIANCE = torch.finfo(torch.float32).tiny
"""Variance stored on disk for a pruned entry: positive and finite (the file contract), and far below any real σ²."""

ENTRY_CRITERIA = ("snr", "variance", "magnitude")
COMPONENT_CRITERIA = ("snr", "magnitude")
SCOPES = ("tensor", "global")
PRUNING_PREFIX = "pruning."
RANK_PRUNING_PREFIX = "rank_pruning."


# ---------------------------------------------------------------------------------------------- ranking (pure)
def lowest(scores: Tensor, count: int) -> Tensor:
    """Boolean mask of the ``count`` lowest scores of a 1-D tensor; among equal scores the earlier index goes first.

    A stable sort makes the choice deterministic, so the same posterior always prunes the same entries.
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[torch.sort(scores, stable=True).indices[:count]] = True
    return mask


def entry_scores(criterion: str, mean: Tensor, variance: Tensor) -> Tensor:
    """How much an entry deserves to stay (prune the lowest): |m|/σ, −σ², or |m|."""
    if criterion == "snr":
        return mean.abs() / variance.sqrt()
    if criterion == "variance":
        return -variance
    if criterion == "magnitude":
        return mean.abs()
    raise ValueError(f"Unknown pruning criterion {criterion!r}; choose one of {ENTRY_CRITERIA}.")


def pruning_masks(
    mean: Mapping[str, Tensor],
    variances: Mapping[str, Tensor],
    amount: float,
    criterion: str = "snr",
    scope: str = "tensor",
) -> dict[str, Tensor]:
    """Which entries to prune (True), per key: ``round(amount·n)`` of the lowest-scoring entries.

    ``scope="tensor"`` prunes that many in every tensor (n = its size); ``scope="global"`` ranks all entries of all
    tensors together (n = total size, keys in the mapping's order, so ties prune earlier keys first).
    """
    _check_amount(amount)
    if scope not in SCOPES:
        raise ValueError(f"Unknown pruning scope {scope!r}; choose one of {SCOPES}.")
    scores = {key: entry_scores(criterion, mean[key].float(), variances[key].float()).flatten() for key in mean}
    if scope == "tensor":
        flat = {key: lowest(s, round(amount * s.numel())) for key, s in scores.items()}
    else:
        together = torch.cat([s.to(next(iter(scores.values())).device) for s in scores.values()])
        chosen = lowest(together, round(amount * together.numel())).split([s.numel() for s in scores.values()])
        flat = {key: part.to(scores[key].device) for key, part in zip(scores, chosen)}
    return {key: flat[key].reshape(mean[key].shape) for key in mean}


def mask_agreement(
    mean: Mapping[str, Tensor],
    variances: Mapping[str, Tensor],
    amount: float,
    criteria: tuple[str, str] = ("snr", "magnitude"),
    scope: str = "tensor",
) -> float:
    """Fraction of the entries pruned by ``criteria[0]`` that ``criteria[1]`` prunes too (1.0: the same masks).

    A diagnostic for whether the posterior adds anything: while σ is still (nearly) uniform, as after a short run
    at β2 close to 1 where the Hessian stays at its initial value, SNR pruning is magnitude pruning.
    """
    first, second = (pruning_masks(mean, variances, amount, criterion, scope) for criterion in criteria)
    pruned = sum(int(first[key].sum()) for key in first)
    if pruned == 0:
        return 1.0
    return sum(int((first[key] & second[key]).sum()) for key in first) / pruned


def component_scores(
    criterion: str, a_mean: Tensor, a_variance: Tensor, b_mean: Tensor, b_variance: Tensor, scaling: float = 1.0
) -> Tensor:
    """One score per rank component i (row i of A, column i of B): how much it deserves to stay.

    ``"snr"``: geometric mean of the root-mean-square SNR of a_i and of b_i. ΔW_i = b_i a_iᵀ vanishes as soon as one
    factor does, so a component is scored by both; the RMS makes layers of different widths comparable, and the score
    is invariant to the rescaling a_i·c, b_i/c that leaves ΔW_i unchanged. ``"magnitude"`` (the non-Bayesian
    baseline): the root-mean-square entry of scaling·b_i a_iᵀ, i.e. scaling·‖a_i‖·‖b_i‖/sqrt(#entries).
    """
    a_mean, b_mean = a_mean.float().flatten(1), b_mean.float().transpose(0, 1).flatten(1)  # both (r, entries)
    if criterion == "snr":
        a_snr = (a_mean.square() / a_variance.float().flatten(1)).mean(1)
        b_snr = (b_mean.square() / b_variance.float().transpose(0, 1).flatten(1)).mean(1)
        return (a_snr * b_snr).pow(0.25)
    if criterion == "magnitude":
        return abs(scaling) * a_mean.norm(dim=1) * b_mean.norm(dim=1) / math.sqrt(a_mean.shape[1] * b_mean.shape[1])
    raise ValueError(f"Unknown rank-pruning criterion {criterion!r}; choose one of {COMPONENT_CRITERIA}.")


def select_components(scores: Sequence[Tensor], keep: int | float) -> list[Tensor]:
    """Sorted indices of the components each layer keeps.

    ``keep`` as an int is the rank every layer keeps (layers of lower rank keep all). As a float in (0, 1] it is the
    fraction of all components kept, ranked across layers, ``round(keep·total)`` of them but at least the best one
    of every layer (PEFT cannot express a rank-0 layer). Ties drop the earlier component first.
    """
    _check_keep(keep)
    if isinstance(keep, numbers.Integral):
        dropped = [lowest(s, max(0, s.numel() - int(keep))) for s in scores]
    else:
        flat = torch.cat([s.float().cpu() for s in scores])
        protected = torch.cat([~lowest(s.float().cpu(), s.numel() - 1) for s in scores])  # each layer's best
        drop = max(0, flat.numel() - max(round(keep * flat.numel()), len(scores)))
        dropped = list(lowest(flat.masked_fill(protected, math.inf), drop).split([s.numel() for s in scores]))
    return [torch.nonzero(~d.cpu()).flatten() for d in dropped]


def _check_amount(amount: float) -> None:
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or not 0 <= amount < 1:
        raise ValueError(f"amount is the fraction of entries to prune and must lie in [0, 1), got {amount!r}.")


def _check_keep(keep: int | float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be a rank (int >= 1) or a fraction of components (float in (0, 1]), got {keep!r}.")
    if isinstance(keep, numbers.Integral) and keep < 1:
        raise ValueError(f"keep as an int is the rank to keep per layer and must be >= 1, got {keep}.")
    if not isinstance(keep, numbers.Integral) and not 0 < keep <= 1:
        raise ValueError(f"keep as a float is the fraction of components to keep and must lie in (0, 1], got {keep}.")


# ---------------------------------------------------------------------------------------------- masks on disk
def validate_pruning_masks(masks: Mapping[str, Tensor], mean: Mapping[str, Tensor], *, source: str) -> None:
    """Masks must be boolean, shaped like the mean, and the mean must be exactly 0 wherever an entry is pruned."""
    unknown = sorted(set(masks) - set(mean))
    if unknown:
        raise VariationalAdapterError(f"{source}: pruning masks for keys the adapter does not have: {unknown[:5]}.")
    for key, mask in masks.items():
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(mean[key].shape):
            raise VariationalAdapterError(
                f"{source}: pruning mask of {key!r} must be bool with shape {tuple(mean[key].shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}."
            )
        if mean[key].detach()[mask.to(mean[key].device)].any():
            raise VariationalAdapterError(f"{source}: key {key!r} has pruned entries whose mean is not 0.")


def encode_pruned_variances(variances: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Variances as saved: :data:`PRUNED_VARIANCE` at pruned entries (whatever tempering did to them in memory)."""
    return {key: v.masked_fill(masks[key], PRUNED_VARIANCE) if key in masks else v for key, v in variances.items()}


def decode_pruning_masks(
    variances: Mapping[str, Tensor], mean: Mapping[str, Tensor], metadata: Mapping[str, str], *, source: str
) -> dict[str, Tensor]:
    """Recover and validate the masks of a saved, unstructurally pruned posterior (none if no pruning is recorded)."""
    if PRUNING_PREFIX + "pruned_entries" not in metadata:
        return {}
    masks = {key: v == PRUNED_VARIANCE for key, v in variances.items()}
    masks = {key: m for key, m in masks.items() if m.any()}
    found, recorded = sum(int(m.sum()) for m in masks.values()), metadata[PRUNING_PREFIX + "pruned_entries"]
    if str(found) != recorded:
        raise VariationalAdapterError(
            f"{source}: metadata records {recorded} pruned entries but {found} variances carry the pruned marker; "
            "the file was modified outside ivon-lora. Re-save the pruned posterior."
        )
    validate_pruning_masks(masks, mean, source=source)
    return masks


# ---------------------------------------------------------------------------------------------- posteriors
def prune(
    posterior: VariationalLoraPosterior,
    amount: float,
    criterion: str = "snr",
    scope: str = "tensor",
    *,
    adapter_name: str | None = None,
) -> VariationalLoraPosterior:
    """Unstructured pruning into a new adapter (see the module docstring); ``amount=0`` copies the posterior."""
    if posterior.pruning_masks or PRUNING_PREFIX + "pruned_entries" in posterior.metadata:
        raise ValueError("This posterior is already pruned; prune the original (unpruned) posterior instead.")
    mean = posterior.mean()
    masks = {key: m for key, m in pruning_masks(mean, posterior.variances, amount, criterion, scope).items() if m.any()}
    pruned = sum(int(m.sum()) for m in masks.values())
    total = sum(v.numel() for v in mean.values())
    record = {
        "criterion": criterion,
        "amount": repr(float(amount)),
        "scope": scope,
        "pruned_entries": str(pruned),
        "total_entries": str(total),
    }
    logger.info("Pruning %d of %d entries (%s, %s scope).", pruned, total, criterion, scope)
    return _derived_posterior(
        posterior,
        adapter_name,
        copy.deepcopy(posterior.model.peft_config[posterior.adapter_name]),
        mean={key: m.masked_fill(masks[key], 0.0) if key in masks else m for key, m in mean.items()},
        variances=encode_pruned_variances(posterior.variances, masks),
        masks=masks,
        record={PRUNING_PREFIX + name: value for name, value in record.items()},
    )


@dataclass(frozen=True)
class _RankedLayer:
    """One LoRA layer of the adapter: its module name in the base model, the PEFT keys of its factors, its scaling."""

    module_name: str
    key_a: str
    key_b: str
    scaling: float


def prune_ranks(
    posterior: VariationalLoraPosterior, keep: int | float, criterion: str = "snr", *, adapter_name: str | None = None
) -> VariationalLoraPosterior:
    """Structured pruning into a new, lower-rank adapter (see the module docstring and :func:`select_components`)."""
    if posterior.pruning_masks:
        raise ValueError("Prune ranks before pruning entries: this posterior is already unstructurally pruned.")
    config = copy.deepcopy(posterior.model.peft_config[posterior.adapter_name])
    layers = _ranked_layers(posterior)
    mean, variances = posterior.mean(), posterior.variances
    scores = [
        component_scores(criterion, mean[l.key_a], variances[l.key_a], mean[l.key_b], variances[l.key_b], l.scaling)
        for l in layers
    ]
    kept = select_components(scores, keep)
    new_mean, new_variances = dict(mean), dict(variances)
    ranks_and_alphas = {}
    for layer, indices in zip(layers, kept):
        for key, dim in ((layer.key_a, 0), (layer.key_b, 1)):
            new_mean[key] = mean[key].index_select(dim, indices.to(mean[key].device))
            new_variances[key] = variances[key].index_select(dim, indices.to(variances[key].device))
        rank = len(indices)
        alpha = layer.scaling * (math.sqrt(rank) if config.use_rslora else rank)  # keeps lora_alpha / r unchanged
        ranks_and_alphas[layer.module_name] = (rank, int(alpha) if float(alpha).is_integer() else alpha)
    _set_ranks(config, ranks_and_alphas)
    before, after = sum(s.numel() for s in scores), sum(len(i) for i in kept)
    record = {"criterion": criterion, "keep": repr(keep), "components_before": str(before), "components_after": str(after)}
    logger.info("Keeping %d of %d LoRA rank components (%s).", after, before, criterion)
    return _derived_posterior(
        posterior,
        adapter_name,
        config,
        mean=new_mean,
        variances=new_variances,
        masks={},
        record={RANK_PRUNING_PREFIX + name: value for name, value in record.items()},
    )


def _ranked_layers(posterior: VariationalLoraPosterior) -> list[_RankedLayer]:
    """Every LoRA layer of the adapter; A's rank is dim 0, B's dim 1 (Linear, Conv and Embedding LoRA alike)."""
    key_of = {id(p): key for key, p in posterior.parameters.items()}
    name = posterior.adapter_name
    prefix = "base_model.model."
    layers = []
    for module_name, module in posterior.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if name in module.lora_A:
            factors = module.lora_A[name].weight, module.lora_B[name].weight
        elif name in module.lora_embedding_A:
            factors = module.lora_embedding_A[name], module.lora_embedding_B[name]
        else:
            continue
        if getattr(module, "num_experts", 1) > 1:
            raise NotImplementedError(f"{module_name}: rank pruning of LoRA on stacked expert parameters is not supported.")
        key_a, key_b = key_of[id(factors[0])], key_of[id(factors[1])]
        layers.append(_RankedLayer(module_name.removeprefix(prefix), key_a, key_b, module.scaling[name]))
    if not layers:
        raise VariationalAdapterError(f"Adapter {name!r} has no LoRA layers whose rank could be pruned.")
    return layers


def _set_ranks(config: PeftConfig, ranks_and_alphas: Mapping[str, tuple[int, float]]) -> None:
    """The most common (rank, alpha) becomes ``r``/``lora_alpha``; other layers get exact-name pattern entries."""
    (rank, alpha), _ = Counter(ranks_and_alphas.values()).most_common(1)[0]
    config.r, config.lora_alpha = rank, alpha
    config.rank_pattern = {name: r for name, (r, _) in ranks_and_alphas.items() if r != rank}
    config.alpha_pattern = {name: a for name, (_, a) in ranks_and_alphas.items() if a != alpha}


def _derived_posterior(
    posterior: VariationalLoraPosterior,
    adapter_name: str | None,
    config: PeftConfig,
    *,
    mean: Mapping[str, Tensor],
    variances: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    record: Mapping[str, str],
) -> VariationalLoraPosterior:
    """Add ``config`` as a new adapter beside the original, fill it with ``mean``, activate it, wrap it in a posterior."""
    model = posterior.model
    name = adapter_name or f"{posterior.adapter_name}_pruned"
    if name in model.peft_config:
        raise ValueError(
            f"The model already has an adapter {name!r}; pass adapter_name=... "
            f"or free it with model.delete_adapter({name!r})."
        )
    # Initialisers such as PiSSA rewrite the (shared) base weights; the default one only creates the adapter.
    config.init_lora_weights = True
    model.add_adapter(name, config)
    try:
        parameters = lora_parameters(model, name)
        if set(parameters) != set(mean):
            mismatch = sorted(set(parameters) ^ set(mean))[:5]
            raise VariationalAdapterError(f"The pruned adapter's keys do not match the pruned mean: {mismatch}.")
        with torch.no_grad():
            for key, parameter in parameters.items():
                parameter.copy_(mean[key])
        derived = type(posterior)(
            model,
            variances,
            adapter_name=name,
            ess=posterior.ess,
            weight_decay=posterior.weight_decay,
            config=posterior.config,
            metadata={**posterior.metadata, **record},
            pruning_masks=masks,
        )
    except BaseException:
        model.delete_adapter(name)
        raise
    model.set_adapter(name, inference_mode=config.inference_mode)
    return derived
