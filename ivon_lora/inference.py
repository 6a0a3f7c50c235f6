"""Posterior-averaged inference in one batched pass: K LoRA samples applied per row of a K×B batch.

Instead of K sequential forwards (or K model copies), the batch is tiled K times along the rows and every LoRA
layer applies sample k to rows ``[k·B, (k+1)·B)``: the (possibly 4-bit) base layer runs once on the stacked
batch, and the low-rank update becomes two batched matmuls with the K sampled factors. Generation works the
same way as long as the rows stay sample-major (``generate`` expands each row consecutively, which keeps it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from ivon_lora.posterior import VariationalLoraPosterior

logger = logging.getLogger(__name__)

__all__ = ["draw_samples", "lora_samples_per_row", "predictive_probabilities", "tile_rows"]


def draw_samples(
    posterior: VariationalLoraPosterior, num_samples: int, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """K posterior samples per key, stacked: ``{key: Tensor (K, *shape)}`` (float32, on the parameter's device)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    draws = [posterior.draw(generator) for _ in range(num_samples)]
    return {key: torch.stack([d[key] for d in draws]) for key in posterior.parameters}


def tile_rows(tensor: Tensor, num_samples: int) -> Tensor:
    """``torch.cat([tensor] * K)``: the sample-major row layout :func:`lora_samples_per_row` expects."""
    return tensor.repeat(num_samples, *([1] * (tensor.dim() - 1)))


def _lora_layers(posterior: VariationalLoraPosterior) -> list[tuple[LoraLayer, str, str]]:
    """(layer, key of lora_A, key of lora_B) for every LoRA layer of the posterior's adapter."""
    key_of = {id(p): key for key, p in posterior.parameters.items()}
    name = posterior.adapter_name
    layers = []
    for module in posterior.model.modules():
        if not isinstance(module, LoraLayer) or name not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module.lora_A[name], nn.Linear):  # Linear, 4-/8-bit Linear; not Embedding/Conv LoRA
            raise NotImplementedError(f"Per-row posterior samples support LoRA on linear layers, not {type(module).__name__}.")
        if module.use_dora.get(name, False) or module.merged:
            raise NotImplementedError("Per-row posterior samples need an unmerged, non-DoRA LoRA adapter.")
        layers.append((module, key_of[id(module.lora_A[name].weight)], key_of[id(module.lora_B[name].weight)]))
    return layers


@contextmanager
def lora_samples_per_row(posterior: VariationalLoraPosterior, samples: Mapping[str, Tensor]) -> Iterator[int]:
    """Inside the block, a forward on K·B rows uses LoRA sample k for rows ``[k·B, (k+1)·B)``.

    ``samples`` maps every key of the posterior to a ``(K, *shape)`` tensor (see :func:`draw_samples`). Only the
    posterior's adapter may be active. Yields K. The model's own forward is restored on exit.
    """
    active = posterior.model.active_adapters
    if list(active) != [posterior.adapter_name]:
        raise ValueError(f"Activate only adapter {posterior.adapter_name!r} (active: {active}).")
    sizes = {int(t.shape[0]) for t in samples.values()}
    if len(sizes) != 1 or set(samples) != set(posterior.parameters):
        raise ValueError("samples must hold the same number K of draws for every key of the posterior.")
    num_samples = sizes.pop()
    patched = []
    try:
        for layer, key_a, key_b in _lora_layers(posterior):
            layer.forward = _per_row_forward(layer, posterior.adapter_name, samples[key_a], samples[key_b], num_samples)
            patched.append(layer)
        yield num_samples
    finally:
        for layer in patched:
            del layer.forward


def _per_row_forward(layer: LoraLayer, adapter: str, lora_a: Tensor, lora_b: Tensor, num_samples: int) -> Callable[..., Tensor]:
    scaling = layer.scaling[adapter]
    dropout = layer.lora_dropout[adapter]

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        rows = x.shape[0]
        if rows % num_samples:
            raise ValueError(f"Batch of {rows} rows is not K={num_samples} stacked copies; tile it with tile_rows().")
        per_sample = dropout(x).reshape(num_samples, -1, x.shape[-1])  # (K, B·T, in)
        a = lora_a.to(per_sample.dtype)
        b = lora_b.to(per_sample.dtype)
        delta = torch.bmm(torch.bmm(per_sample, a.transpose(1, 2)), b.transpose(1, 2)) * scaling
        return result + delta.reshape(result.shape).to(result.dtype)

    return forward


@torch.no_grad()
def predictive_probabilities(
    score_fn: Callable[[dict[str, Tensor]], Tensor],
    batch: Mapping[str, Tensor],
    posterior: VariationalLoraPosterior | None = None,
    num_samples: int = 0,
    *,
    generator: torch.Generator | None = None,
    max_rows: int | None = None,
    tile: Callable[[Mapping[str, Tensor], int], dict[str, Tensor]] | None = None,
) -> Tensor:
    """Predictive probabilities ``mean_k softmax(score_fn(batch under θ_k))``; ``num_samples=0`` uses the mean.

    ``score_fn`` maps a batch to class logits ``(rows, C)``. The K samples are evaluated in one batched forward
    of K×B rows, split into chunks of whole samples when K×B exceeds ``max_rows``. ``tile`` tiles a batch K
    times (default: every tensor with :func:`tile_rows`; pass the scorer's own when rows are grouped).
    """
    if num_samples == 0 or posterior is None:
        return score_fn(dict(batch)).float().softmax(-1)
    tile = tile or (lambda b, k: {name: tile_rows(t, k) for name, t in b.items()})
    samples = draw_samples(posterior, num_samples, generator)
    first = next(iter(batch.values()))
    per_chunk = num_samples if max_rows is None else max(1, min(num_samples, max_rows // max(1, first.shape[0])))
    total = None
    for start in range(0, num_samples, per_chunk):
        chunk = {key: value[start : start + per_chunk] for key, value in samples.items()}
        k = next(iter(chunk.values())).shape[0]
        with lora_samples_per_row(posterior, chunk):
            logits = score_fn(tile(batch, k)).float()
        probs = logits.softmax(-1).reshape(k, -1, logits.shape[-1]).sum(0)
        total = probs if total is None else total + probs
    return total / num_samples
