"""Moving variational LoRA adapter folders to and from the Hugging Face Hub.

A variational adapter is only usable when its posterior mean (``adapter_model.safetensors``, PEFT's own file)
and its posterior variances (``adapter_variance.safetensors``) travel together. This module therefore

* pushes a folder in ONE commit, so that a reader of the repository never sees a mean without its variance
  or a variance from another training run, and refuses folders whose two files do not describe the same
  tensors before anything is uploaded;
* resolves a Hub repository (or a local folder) to a local folder through huggingface_hub's own download and
  cache code, so that revision pinning, tokens, ``HF_HUB_OFFLINE`` and the shared cache behave as everywhere
  else in the Hugging Face stack.

Only the files are handled here; reading and validating the tensors is the loader's job.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.errors import HFValidationError
from safetensors import safe_open

from ivon_lora.serialization import (
    ADAPTER_CONFIG_FILE,
    MEAN_FILE,
    VARIANCE_FILE,
    VARIATIONAL_CONFIG_FILE,
    VariationalAdapterError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "EVAL_RESULTS_FILE",
    "MEAN_FILE",
    "MODEL_CARD_FILE",
    "VARIANCE_FILE",
    "VARIATIONAL_CARD_TAG",
    "VARIATIONAL_CONFIG_FILE",
    "push_adapter_folder",
    "resolve_adapter_folder",
]

EVAL_RESULTS_FILE = "eval_results.json"
MODEL_CARD_FILE = "README.md"
# The Hub tag that marks a card as describing a variational adapter (PEFT's generic card lacks it).
VARIATIONAL_CARD_TAG = "ivon"

# Files a loader needs, in upload order; the card is handled separately because it is not needed to load.
_REQUIRED_FILES = (ADAPTER_CONFIG_FILE, MEAN_FILE, VARIANCE_FILE)
_OPTIONAL_FILES = (VARIATIONAL_CONFIG_FILE, EVAL_RESULTS_FILE)
_DOWNLOAD_FILES = _REQUIRED_FILES + _OPTIONAL_FILES

_PLAIN_LORA_HINT = (
    "this looks like a plain LoRA adapter, not a variational one: load it with PeftModel.from_pretrained, "
    "or train with VariationalTrainer to get a posterior"
)
_MAX_KEYS_SHOWN = 5


def _named_adapter_subfolders(folder: Path) -> list[str]:
    """Immediate subfolders that hold a variational adapter (where PEFT saves non-default named adapters)."""
    return sorted(child.name for child in folder.iterdir() if (child / VARIANCE_FILE).is_file())


def _missing_adapter_message(folder: Path, origin: str) -> str:
    """Explain why ``folder`` is not a variational adapter folder, pointing at the likely fix."""
    if (folder / MEAN_FILE).is_file():
        return f"{origin} has {MEAN_FILE} but no {VARIANCE_FILE}: {_PLAIN_LORA_HINT}."
    named = _named_adapter_subfolders(folder) if folder.is_dir() else []
    if named:
        return (
            f"{origin} holds no adapter at its top level but named adapters in the subfolders {named}: "
            f"pass subfolder=<name> to pick one."
        )
    return (
        f"{origin} holds no variational adapter ({MEAN_FILE} + {VARIANCE_FILE}). If the adapter is a named "
        f"adapter, pass subfolder=<adapter name>; PEFT saves non-default adapters in subfolders."
    )


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading any tensor data."""
    with safe_open(path, framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _preview(keys: set[str]) -> str:
    shown = sorted(keys)[:_MAX_KEYS_SHOWN]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" (and {more} more)" if more else "")


def _check_pushable(folder: Path) -> None:
    """Refuse a folder that would publish half a posterior, before any network call."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the folder that save_pretrained wrote.")
    if not (folder / ADAPTER_CONFIG_FILE).is_file() and not (folder / MEAN_FILE).is_file():
        named = _named_adapter_subfolders(folder)
        if named:
            raise VariationalAdapterError(
                f"{folder} holds named adapters in the subfolders {named}, not one adapter: push each with "
                f"push_adapter_folder({str(folder / named[0])!r}, repo_id, path_in_repo={named[0]!r})."
            )
    if not (folder / MEAN_FILE).is_file() or not (folder / VARIANCE_FILE).is_file():
        raise VariationalAdapterError(f"Refusing to push: {_missing_adapter_message(folder, str(folder))}")
    if not (folder / ADAPTER_CONFIG_FILE).is_file():
        raise VariationalAdapterError(
            f"Refusing to push {folder}: {ADAPTER_CONFIG_FILE} is missing, so PeftModel.from_pretrained could not "
            "load the adapter. Save it with save_pretrained, which writes the LoRA config next to the weights."
        )
    mean_shapes = _tensor_shapes(folder / MEAN_FILE)
    variance_shapes = _tensor_shapes(folder / VARIANCE_FILE)
    only_mean = mean_shapes.keys() - variance_shapes.keys()
    only_variance = variance_shapes.keys() - mean_shapes.keys()
    if only_mean or only_variance:
        details = []
        if only_mean:
            details.append(f"keys without a variance: {_preview(only_mean)}")
        if only_variance:
            details.append(f"variances without a mean: {_preview(only_variance)}")
        raise VariationalAdapterError(
            f"Refusing to push {folder}: {MEAN_FILE} and {VARIANCE_FILE} do not hold the same tensors "
            f"({'; '.join(details)}). They come from different saves; save the posterior again."
        )
    mismatched = {key for key, shape in mean_shapes.items() if variance_shapes[key] != shape}
    if mismatched:
        key = sorted(mismatched)[0]
        raise VariationalAdapterError(
            f"Refusing to push {folder}: {len(mismatched)} tensors have different shapes in {MEAN_FILE} and "
            f"{VARIANCE_FILE}, e.g. {key}: {mean_shapes[key]} vs {variance_shapes[key]}. Save the posterior again."
        )


def _warn_if_not_variational_card(card_path: Path) -> None:
    """PEFT's save_pretrained writes a generic card; say how to get the variational one instead."""
    tags = ModelCard.load(card_path).data.tags or []
    if VARIATIONAL_CARD_TAG not in tags:
        logger.warning(
            "%s is not a variational LoRA card (no %r tag); pushing it as is. Call "
            "ivon_lora.model_card.write_model_card(folder, base_model=..., repo_id=...) after save_pretrained "
            "to describe the posterior and its evaluation.",
            card_path,
            VARIATIONAL_CARD_TAG,
        )


def push_adapter_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    path_in_repo: str | None = None,
) -> CommitInfo:
    """Upload one variational adapter folder (mean, variance, configs, eval results, card) in a single commit.

    Args:
        folder: a folder written by save_pretrained for ONE adapter (for a named adapter, its subfolder).
        repo_id: the model repository, created if it does not exist.
        private: visibility for a newly created repository (an existing one keeps its own).
        revision: branch to commit to, created from the default branch if missing, or an open pull request's
            ``refs/pr/<n>``.
        commit_message: defaults to a message saying that a posterior mean and variance were uploaded.
        token: Hub token; ``None`` uses the usual places (``HF_TOKEN``, ``hf auth login``).
        create_pr: open a pull request instead of committing to the branch.
        path_in_repo: folder inside the repository, e.g. the adapter name for a named adapter.

    Returns:
        huggingface_hub's ``CommitInfo`` of the commit (or of the pull request).
    """
    folder = Path(folder)
    _check_pushable(folder)
    card_path = folder / MODEL_CARD_FILE
    if not card_path.is_file():
        raise VariationalAdapterError(
            f"Refusing to push {folder}: it has no {MODEL_CARD_FILE}. Write the card first with "
            f"ivon_lora.model_card.write_model_card({str(folder)!r}, base_model=..., repo_id={repo_id!r})."
        )
    _warn_if_not_variational_card(card_path)

    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo and path_in_repo.strip("/") else ""
    names = [*_REQUIRED_FILES, *(name for name in _OPTIONAL_FILES if (folder / name).is_file()), MODEL_CARD_FILE]
    operations = [CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=folder / name) for name in names]

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True).repo_id
    if revision is not None and revision != constants.DEFAULT_REVISION and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    logger.info("Pushing %s to %s (%s)", ", ".join(names), repo_id, revision or constants.DEFAULT_REVISION)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload variational LoRA adapter (posterior mean and variance)",
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
    )


def resolve_adapter_folder(
    path_or_repo_id: str | Path,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Local folder holding a variational adapter, downloading it from the Hub when needed.

    A local folder is used as is. Otherwise ``path_or_repo_id`` is a Hub model id, downloaded (only the adapter
    files) into the huggingface_hub cache; ``revision`` pins a branch, tag or commit, and with ``HF_HUB_OFFLINE=1``
    a previously downloaded snapshot is used without any network call.

    Raises:
        ValueError: the folder or repository holds no ``adapter_variance.safetensors`` (e.g. a plain LoRA).
    """
    local = Path(path_or_repo_id).expanduser()
    is_local = local.is_dir()
    if is_local:
        if revision is not None:
            logger.warning("Ignoring revision=%r: %s is a local folder, not a Hub repository.", revision, local)
        folder = local / subfolder if subfolder else local
        origin = str(folder)
    else:
        folder = _download(str(path_or_repo_id), subfolder, revision=revision, token=token, cache_dir=cache_dir)
        where = [f"{label} {value!r}" for label, value in (("subfolder", subfolder), ("revision", revision)) if value]
        origin = f"Hub repository {str(path_or_repo_id)!r}" + (f" ({', '.join(where)})" if where else "")
    if not (folder / VARIANCE_FILE).is_file() or not (folder / MEAN_FILE).is_file():
        message = _missing_adapter_message(folder, origin)
        if not is_local and constants.is_offline_mode():
            message += (
                " HF_HUB_OFFLINE is set, so only the local cache was searched: if the repository does hold a "
                "variational adapter, download it once with network access."
            )
        raise VariationalAdapterError(message)
    return folder


def _download(
    repo_id: str,
    subfolder: str | None,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | Path | None,
) -> Path:
    """Fetch the adapter files of a Hub repository through huggingface_hub's cache; return their folder."""
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(
            repo_id,
            repo_type="model",
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=[prefix + name for name in _DOWNLOAD_FILES],
        )
    except HFValidationError as error:
        raise VariationalAdapterError(
            f"{repo_id!r} is neither an existing local folder nor a valid Hub repository id ('user/name'): "
            "check the path."
        ) from error
    return Path(snapshot) / prefix
