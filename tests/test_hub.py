"""Hub I/O of variational adapter folders.

The Hub is unreachable here, so uploads are intercepted exactly at huggingface_hub's commit API
(``HfApi.create_repo`` / ``create_branch`` / ``create_commit``) and downloads run huggingface_hub's real
``snapshot_download`` in offline mode against a real cache layout built in ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import save_file

from ivon_lora.hub import push_adapter_folder, resolve_adapter_folder

KEYS = (
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
)
SHAPES = {KEYS[0]: (2, 8), KEYS[1]: (8, 2)}
VARIATIONAL_CARD = "---\nlibrary_name: peft\ntags:\n- ivon\n- lora\n---\n\n# A variational adapter\n"
ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_variance.safetensors",
    "variational_config.json",
    "eval_results.json",
    "README.md",
}


def write_adapter(
    folder: Path,
    *,
    variance_shapes: dict[str, tuple[int, ...]] | None = None,
    with_variance: bool = True,
    optional_files: bool = True,
    card: str | None = VARIATIONAL_CARD,
) -> Path:
    """A small adapter folder as save_pretrained lays it out (tensors of the right names and shapes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({key: torch.zeros(shape) for key, shape in SHAPES.items()}, folder / "adapter_model.safetensors")
    if with_variance:
        shapes = SHAPES if variance_shapes is None else variance_shapes
        save_file(
            {key: torch.full(shape, 1e-4) for key, shape in shapes.items()},
            folder / "adapter_variance.safetensors",
            metadata={"format_version": "1", "kind": "variance", "ess": "1000", "weight_decay": "0.0"},
        )
    if optional_files:
        (folder / "variational_config.json").write_text(json.dumps({"lr": 0.03, "ess": 1e3}))
        (folder / "eval_results.json").write_text(json.dumps({"arc_easy": {"scoring_mode": "cloze"}}))
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Record every call that would reach the Hub, answering like the Hub does."""
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def create_repo(self: HfApi, repo_id: str, **kwargs: Any) -> RepoUrl:
        calls.append(("create_repo", (repo_id,), kwargs))
        namespaced = repo_id if "/" in repo_id else f"me/{repo_id}"  # the Hub prefixes the user's namespace
        return RepoUrl(f"https://huggingface.co/{namespaced}")

    def create_branch(self: HfApi, repo_id: str, **kwargs: Any) -> None:
        calls.append(("create_branch", (repo_id,), kwargs))

    def create_commit(self: HfApi, repo_id: str, operations: Any, **kwargs: Any) -> CommitInfo:
        calls.append(("create_commit", (repo_id, list(operations)), kwargs))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'a' * 40}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="a" * 40,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_uploads_all_adapter_files_in_one_commit(tmp_path: Path, hub_calls: list) -> None:
    folder = write_adapter(tmp_path / "adapter")

    info = push_adapter_folder(folder, "user/repo", private=True, commit_message="Add posterior")

    assert [name for name, _, _ in hub_calls] == ["create_repo", "create_commit"]
    _, (repo_id,), repo_kwargs = hub_calls[0]
    assert repo_id == "user/repo"
    assert repo_kwargs["private"] is True and repo_kwargs["exist_ok"] is True
    _, (commit_repo, operations), commit_kwargs = hub_calls[1]
    assert commit_repo == "user/repo"
    assert {op.path_in_repo for op in operations} == ADAPTER_FILES
    for op in operations:
        assert Path(op.path_or_fileobj).read_bytes() == (folder / op.path_in_repo).read_bytes()
    assert commit_kwargs["commit_message"] == "Add posterior"
    assert commit_kwargs["revision"] is None and commit_kwargs["create_pr"] is False
    assert info.oid == "a" * 40


def test_push_skips_absent_optional_files_and_has_a_default_message(tmp_path: Path, hub_calls: list) -> None:
    push_adapter_folder(write_adapter(tmp_path / "adapter", optional_files=False), "user/repo")

    _, (_, operations), commit_kwargs = hub_calls[-1]
    assert {op.path_in_repo for op in operations} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_variance.safetensors",
        "README.md",
    }
    assert "variance" in commit_kwargs["commit_message"]


def test_push_to_a_branch_subfolder_and_pull_request(tmp_path: Path, hub_calls: list) -> None:
    push_adapter_folder(
        write_adapter(tmp_path / "adapter"), "user/repo", revision="exp-1", create_pr=True, path_in_repo="/named/"
    )

    assert [name for name, _, _ in hub_calls] == ["create_repo", "create_branch", "create_commit"]
    _, (branch_repo,), branch_kwargs = hub_calls[1]
    assert branch_repo == "user/repo"
    assert branch_kwargs["branch"] == "exp-1" and branch_kwargs["exist_ok"] is True
    _, (_, operations), commit_kwargs = hub_calls[2]
    assert {op.path_in_repo for op in operations} == {f"named/{name}" for name in ADAPTER_FILES}
    assert commit_kwargs["revision"] == "exp-1" and commit_kwargs["create_pr"] is True


@pytest.mark.parametrize("revision", ["main", "refs/pr/3"])
def test_push_to_an_existing_revision_creates_no_branch(tmp_path: Path, hub_calls: list, revision: str) -> None:
    push_adapter_folder(write_adapter(tmp_path / "adapter"), "user/repo", revision=revision)

    assert [name for name, _, _ in hub_calls] == ["create_repo", "create_commit"]
    assert hub_calls[-1][2]["revision"] == revision


def test_push_commits_to_the_repo_id_the_hub_created(tmp_path: Path, hub_calls: list) -> None:
    push_adapter_folder(write_adapter(tmp_path / "adapter"), "repo")

    _, (commit_repo, _), _ = hub_calls[-1]
    assert commit_repo == "me/repo"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: write_adapter(folder, with_variance=False), "plain LoRA adapter"),
        (lambda folder: write_adapter(folder, variance_shapes={KEYS[0]: SHAPES[KEYS[0]]}), "keys without a variance"),
        (
            lambda folder: write_adapter(folder, variance_shapes={**SHAPES, "base_model.extra.weight": (2,)}),
            "variances without a mean",
        ),
        (lambda folder: write_adapter(folder, variance_shapes={**SHAPES, KEYS[1]: (2, 8)}), "different shapes"),
        (lambda folder: write_adapter(folder, card=None), "write_model_card"),
    ],
    ids=["no-variance", "missing-variance-key", "extra-variance-key", "shape-mismatch", "no-card"],
)
def test_push_refuses_half_a_posterior_before_any_hub_call(
    tmp_path: Path, hub_calls: list, make: Any, message: str
) -> None:
    folder = make(tmp_path / "adapter")

    with pytest.raises(ValueError, match=message):
        push_adapter_folder(folder, "user/repo")
    assert hub_calls == []


def test_push_refuses_a_folder_of_named_adapters_and_names_them(tmp_path: Path, hub_calls: list) -> None:
    write_adapter(tmp_path / "save" / "task_a")
    write_adapter(tmp_path / "save" / "task_b")

    with pytest.raises(ValueError, match=r"\['task_a', 'task_b'\].*path_in_repo='task_a'"):
        push_adapter_folder(tmp_path / "save", "user/repo")
    assert hub_calls == []


def test_push_warns_about_a_generic_peft_card(
    tmp_path: Path, hub_calls: list, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_adapter(tmp_path / "adapter", card="---\nlibrary_name: peft\ntags:\n- lora\n---\n\n# Model\n")

    with caplog.at_level(logging.WARNING, logger="ivon_lora.hub"):
        push_adapter_folder(folder, "user/repo")
    assert "write_model_card" in caplog.text
    assert [name for name, _, _ in hub_calls] == ["create_repo", "create_commit"]


# --------------------------------------------------------------------------------------------------------
# Downloads: huggingface_hub's real cache layout, read by its real snapshot_download in offline mode

COMMIT_MAIN = "1" * 40
COMMIT_OLD = "2" * 40


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (it reads the variable once, at import)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def cache_snapshot(cache_dir: Path, repo_id: str, commit: str, source: Path, *, refs: tuple[str, ...] = ()) -> Path:
    """Put ``source``'s files into the cache as huggingface_hub stores a downloaded commit."""
    storage = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for file in source.rglob("*"):
        if file.is_file():
            target = snapshot / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def test_resolve_returns_the_cached_snapshot_offline(tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "cache"
    snapshot = cache_snapshot(cache, "user/repo", COMMIT_MAIN, write_adapter(tmp_path / "a"), refs=("main",))

    folder = resolve_adapter_folder("user/repo", cache_dir=cache)

    assert folder == snapshot
    assert (folder / "adapter_variance.safetensors").is_file()


def test_resolve_uses_the_default_cache(tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = cache_snapshot(tmp_path / "hub", "user/repo", COMMIT_MAIN, write_adapter(tmp_path / "a"), refs=("main",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    assert resolve_adapter_folder("user/repo") == snapshot


@pytest.mark.parametrize(("revision", "expected"), [(None, COMMIT_MAIN), ("v1", COMMIT_OLD), (COMMIT_OLD, COMMIT_OLD)])
def test_resolve_honours_revision_pinning(tmp_path: Path, offline: None, revision: str | None, expected: str) -> None:
    cache = tmp_path / "cache"
    cache_snapshot(cache, "user/repo", COMMIT_MAIN, write_adapter(tmp_path / "new"), refs=("main",))
    cache_snapshot(cache, "user/repo", COMMIT_OLD, write_adapter(tmp_path / "old"), refs=("v1",))

    folder = resolve_adapter_folder("user/repo", revision=revision, cache_dir=cache)

    assert folder.name == expected


def test_resolve_named_adapter_subfolder(tmp_path: Path, offline: None) -> None:
    source = tmp_path / "save"
    write_adapter(source / "task_a")
    snapshot = cache_snapshot(tmp_path / "cache", "user/repo", COMMIT_MAIN, source, refs=("main",))

    assert resolve_adapter_folder("user/repo", subfolder="task_a", cache_dir=tmp_path / "cache") == snapshot / "task_a"
    with pytest.raises(ValueError, match="subfolder"):
        resolve_adapter_folder("user/repo", cache_dir=tmp_path / "cache")


def test_resolve_downloads_only_adapter_files(tmp_path: Path, offline: None) -> None:
    """With a cached tree listing, huggingface_hub checks that every *requested* file is present: a large file
    that the adapter does not need (here missing from the snapshot) must not be requested."""
    cache = tmp_path / "cache"
    snapshot = cache_snapshot(cache, "user/repo", COMMIT_MAIN, write_adapter(tmp_path / "a"), refs=("main",))
    listing = {path.name: {"size": path.stat().st_size, "blob_id": "0" * 40} for path in snapshot.iterdir()}
    listing["pytorch_model.bin"] = {"size": 10**9, "blob_id": "f" * 40}
    trees = cache / "models--user--repo" / "trees"
    trees.mkdir()
    (trees / f"{COMMIT_MAIN}.json").write_text(json.dumps({"format_version": 1, "files": listing}))

    assert resolve_adapter_folder("user/repo", cache_dir=cache) == snapshot


def test_resolve_rejects_a_cached_plain_lora(tmp_path: Path, offline: None) -> None:
    source = write_adapter(tmp_path / "plain", with_variance=False)
    cache_snapshot(tmp_path / "cache", "user/plain", COMMIT_MAIN, source, refs=("main",))

    with pytest.raises(ValueError, match="plain LoRA adapter, not a variational one.*PeftModel.from_pretrained"):
        resolve_adapter_folder("user/plain", cache_dir=tmp_path / "cache")


def test_resolve_offline_without_cache_raises_huggingface_hubs_error(tmp_path: Path, offline: None) -> None:
    with pytest.raises(LocalEntryNotFoundError):
        resolve_adapter_folder("user/absent", cache_dir=tmp_path / "cache")


def test_resolve_local_folder_as_is(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "adapter")
    write_adapter(tmp_path / "save" / "task_a")

    assert resolve_adapter_folder(folder) == folder
    assert resolve_adapter_folder(str(tmp_path / "save"), subfolder="task_a") == tmp_path / "save" / "task_a"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: write_adapter(root / "plain", with_variance=False), "plain LoRA adapter"),
        (lambda root: write_adapter(root / "save" / "task_b").parent, r"subfolders \['task_b'\]"),
    ],
    ids=["plain-lora", "named-adapters"],
)
def test_resolve_local_folder_errors(tmp_path: Path, make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_adapter_folder(make(tmp_path))


def test_resolve_rejects_a_path_that_is_neither_folder_nor_repo_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither an existing local folder nor a valid Hub repository id"):
        resolve_adapter_folder(str(tmp_path / "missing" / "adapter"))
