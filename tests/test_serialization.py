"""The on-disk contract: every malformed posterior file is refused with an error naming file and key."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ivon_lora.serialization import (
    MEAN_FILE,
    VARIANCE_FILE,
    VariationalAdapterError,
    fingerprint,
    read_variances,
    staged_directory,
    write_variances,
)

KEY = "base_model.model.layers.0.q_proj.lora_A.weight"


@pytest.fixture
def folder(tmp_path):
    mean = {KEY: torch.randn(4, 8), "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 4)}
    save_file(mean, str(tmp_path / MEAN_FILE))
    variances = {k: torch.rand_like(v) + 0.1 for k, v in mean.items()}
    write_variances(tmp_path, variances, mean, ess=1e6, weight_decay=0.0, extra_metadata={"note": "x"})
    return tmp_path


def rewrite(folder, mutate_tensors=None, mutate_metadata=None):
    """Rewrite the variance file with modified tensors/metadata (bypassing write-time validation)."""
    path = folder / VARIANCE_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_metadata:
        mutate_metadata(metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_round_trip_and_metadata(folder):
    variances, metadata = read_variances(folder)
    assert set(variances) == set(load_file(str(folder / MEAN_FILE)))
    assert metadata["format_version"] == "1" and metadata["kind"] == "variance"
    assert float(metadata["ess"]) == 1e6 and metadata["note"] == "x"
    assert metadata["mean_fingerprint"] == fingerprint(load_file(str(folder / MEAN_FILE)))


def set_key(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


@pytest.mark.parametrize(
    "mutate_tensors, mutate_metadata, message",
    [
        (lambda t: t.pop(KEY), None, "missing"),
        (set_key("extra.lora_A.weight", torch.ones(2)), None, "unexpected"),
        (set_key(KEY, torch.ones(8, 4)), None, "shape"),
        (set_key(KEY, torch.ones(4, 8, dtype=torch.float16)), None, "dtype"),
        (set_key(KEY, torch.full((4, 8), float("nan"))), None, "NaN"),
        (set_key(KEY, torch.zeros(4, 8)), None, "<= 0"),
        (set_key(KEY, -torch.ones(4, 8)), None, "<= 0"),
        (None, lambda m: m.__setitem__("format_version", "99"), "unknown format_version"),
        (None, lambda m: m.__setitem__("kind", "hessian"), "kind"),
        (None, lambda m: m.pop("ess"), "ess"),
        (None, lambda m: m.__setitem__("weight_decay", "abc"), "weight_decay"),
        (None, lambda m: m.__setitem__("mean_fingerprint", "0" * 64), "different adapter mean"),
    ],
)
def test_malformed_variance_file_is_refused(folder, mutate_tensors, mutate_metadata, message):
    rewrite(folder, mutate_tensors, mutate_metadata)
    with pytest.raises(VariationalAdapterError, match=message) as error:
        read_variances(folder)
    assert VARIANCE_FILE in str(error.value)
    if mutate_tensors is not None and message not in {"missing", "unexpected"}:
        assert KEY in str(error.value)


def test_missing_and_truncated_files(folder):
    data = (folder / VARIANCE_FILE).read_bytes()
    (folder / VARIANCE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(VariationalAdapterError, match="truncated or corrupt"):
        read_variances(folder)
    (folder / VARIANCE_FILE).unlink()
    with pytest.raises(VariationalAdapterError, match="plain LoRA adapter"):
        read_variances(folder)


def test_variance_of_another_step_is_refused(folder):
    mean = load_file(str(folder / MEAN_FILE))
    mean[KEY] = mean[KEY] + 1e-3  # the mean moved on (next step) but the variance file is old
    save_file(mean, str(folder / MEAN_FILE))
    with pytest.raises(VariationalAdapterError, match="different adapter mean"):
        read_variances(folder)


def test_write_validates_before_writing(tmp_path):
    mean = {KEY: torch.randn(2, 2)}
    with pytest.raises(VariationalAdapterError, match="<= 0"):
        write_variances(tmp_path, {KEY: torch.zeros(2, 2)}, mean, ess=1.0, weight_decay=0.0)
    assert not (tmp_path / VARIANCE_FILE).exists()


def test_staged_directory_leaves_target_untouched_on_crash(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / MEAN_FILE).write_text("old mean")
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / VARIANCE_FILE).write_text("new variance")
            (staging / MEAN_FILE).write_text("new mean")
            raise RuntimeError("crash before the move")
    assert (target / MEAN_FILE).read_text() == "old mean" and not (target / VARIANCE_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging debris left behind

    with staged_directory(target) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / VARIANCE_FILE).write_text("v")
        (staging / MEAN_FILE).write_text("new mean")
    assert (target / MEAN_FILE).read_text() == "new mean" and (target / "sub" / VARIANCE_FILE).read_text() == "v"
