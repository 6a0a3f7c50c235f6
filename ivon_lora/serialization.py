"""The on-disk contract of a variational adapter: PEFT's files plus ``adapter_variance.safetensors``.

A saved folder stays a valid PEFT adapter (``PeftModel.from_pretrained`` loads the mean) and adds the
posterior variances under exactly PEFT's key names. The variance file's metadata records the format version,
what the tensors are, the ``ess`` and weight decay they came from, and a fingerprint of the mean they belong
to, so a variance is never silently paired with another step's mean. Folders are written through a staging
directory and moved into place file by file, variances first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
MEAN_FILE = "adapter_model.safetensors"
VARIANCE_FILE = "adapter_variance.safetensors"
VARIATIONAL_CONFIG_FILE = "variational_config.json"
FORMAT_VERSION = "1"
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)


class VariationalAdapterError(ValueError):
    """A variational adapter folder is missing, malformed, or does not belong to the model."""


def adapter_folder(directory: str | Path, adapter_name: str) -> Path:
    """Where PEFT puts an adapter inside a save directory (non-default adapters go in a subfolder)."""
    directory = Path(directory)
    return directory if adapter_name == "default" else directory / adapter_name


def lora_parameters(model: PeftModel, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The adapter's parameters under the exact key names PEFT uses in ``adapter_model.safetensors``.

    PEFT's own key mapping is applied to the model's parameters themselves, so the two files can never
    disagree on names (adapter names stripped, module prefixes kept).
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"Expected a peft.PeftModel, got {type(model).__name__}; wrap the base model with get_peft_model first.")
    if adapter_name not in model.peft_config:
        raise KeyError(f"Adapter {adapter_name!r} not found; the model has {sorted(model.peft_config)}.")
    named = dict(model.named_parameters())
    mapped = get_peft_model_state_dict(model, state_dict=named, adapter_name=adapter_name)
    parameters = {key: value for key, value in mapped.items() if isinstance(value, nn.Parameter)}
    if not parameters:
        raise VariationalAdapterError(f"Adapter {adapter_name!r} has no parameters to put a posterior on.")
    return parameters


def fingerprint(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over key names, dtypes, shapes and bytes: identifies the mean a variance file belongs to."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def validate_variances(variances: Mapping[str, Tensor], mean: Mapping[str, Tensor], *, source: str) -> None:
    """Keys equal to the mean's, shapes equal, float32, finite and strictly positive — or a named error."""
    missing, extra = sorted(set(mean) - set(variances)), sorted(set(variances) - set(mean))
    if missing or extra:
        raise VariationalAdapterError(
            f"{source}: variance keys do not match the adapter mean: missing {missing[:5]}, unexpected {extra[:5]}"
            f"{' (and more)' if len(missing) > 5 or len(extra) > 5 else ''}."
        )
    for key in sorted(variances):
        variance = variances[key]
        if tuple(variance.shape) != tuple(mean[key].shape):
            raise VariationalAdapterError(
                f"{source}: key {key!r} has shape {tuple(variance.shape)} but the mean has {tuple(mean[key].shape)}."
            )
        if variance.dtype != torch.float32:
            raise VariationalAdapterError(f"{source}: key {key!r} has dtype {variance.dtype}; variances must be float32.")
        if not torch.isfinite(variance).all():
            raise VariationalAdapterError(f"{source}: key {key!r} contains NaN or infinite variances.")
        if not (variance > 0).all():
            raise VariationalAdapterError(f"{source}: key {key!r} contains variances <= 0; variances must be positive.")


def write_variances(
    folder: str | Path,
    variances: Mapping[str, Tensor],
    mean: Mapping[str, Tensor],
    *,
    ess: float,
    weight_decay: float,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``adapter_variance.safetensors`` for ``mean`` into ``folder`` (validated first, then atomically)."""
    path = Path(folder) / VARIANCE_FILE
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in variances.items()}
    validate_variances(tensors, mean, source=str(path))
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "variance",
        "ess": repr(float(ess)),
        "weight_decay": repr(float(weight_decay)),
        "mean_fingerprint": fingerprint(mean),
        **dict(extra_metadata or {}),
    }
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def write_variational_config(folder: str | Path, config: Mapping[str, Any]) -> Path:
    path = Path(folder) / VARIATIONAL_CONFIG_FILE
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def read_variational_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / VARIATIONAL_CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def read_mean(folder: str | Path) -> dict[str, Tensor]:
    path = Path(folder) / MEAN_FILE
    if not path.is_file():
        raise VariationalAdapterError(f"{path}: adapter mean not found; is {Path(folder)} a PEFT adapter folder?")
    return _load_safetensors(path)


def read_variances(folder: str | Path, mean: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load and validate ``adapter_variance.safetensors`` against the folder's mean (or the given one).

    Returns the variances and the file's metadata. Everything is checked before anything is returned, so a
    caller never receives half a posterior.
    """
    folder = Path(folder)
    path = folder / VARIANCE_FILE
    if not path.is_file():
        raise VariationalAdapterError(
            f"{path} not found: this looks like a plain LoRA adapter. Load its mean with PeftModel.from_pretrained, "
            "or train it with ivon_lora.VariationalTrainer to get a posterior."
        )
    mean = read_mean(folder) if mean is None else mean
    variances = _load_safetensors(path)
    metadata = _read_metadata(path)
    version = metadata.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise VariationalAdapterError(
            f"{path}: unknown format_version {version!r} (this ivon-lora reads {list(SUPPORTED_FORMAT_VERSIONS)}); "
            "upgrade ivon-lora or re-save the adapter."
        )
    if metadata.get("kind") != "variance":
        raise VariationalAdapterError(f"{path}: metadata kind is {metadata.get('kind')!r}, expected 'variance'.")
    for field in ("ess", "weight_decay"):
        try:
            value = float(metadata[field])
        except (KeyError, ValueError):
            raise VariationalAdapterError(f"{path}: metadata field {field!r} is missing or not a number.") from None
        if not math.isfinite(value) or value < 0 or (field == "ess" and value == 0):
            raise VariationalAdapterError(f"{path}: metadata field {field!r} has invalid value {value!r}.")
    validate_variances(variances, mean, source=str(path))
    if metadata.get("mean_fingerprint") != fingerprint(mean):
        raise VariationalAdapterError(
            f"{path}: the variances were saved for a different adapter mean than {folder / MEAN_FILE} "
            "(e.g. another training step, or an interrupted save). Re-save the adapter from one posterior."
        )
    return variances, metadata


@contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success move its files into ``target``, variance files first.

    The staging folder sits next to ``target`` (same filesystem, so each move is an atomic rename). A crash
    leaves either the old files, or a new variance beside an old mean — which :func:`read_variances` refuses
    through the mean fingerprint — never a silently mismatched pair.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
        files = [f for f in staging.rglob("*") if f.is_file()]
        files.sort(key=lambda f: (f.name != VARIANCE_FILE, f.name == MEAN_FILE, str(f)))
        for file in files:
            destination = target / file.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise VariationalAdapterError(f"{path}: cannot read safetensors file (truncated or corrupt?): {error}") from error


def _read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
