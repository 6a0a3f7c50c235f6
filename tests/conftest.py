"""Shared fixtures: tiny random Llama / Qwen2 / Qwen3 checkpoints built in the test, loaded with a 4-bit base."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

ARCHITECTURES = ("llama", "qwen2", "qwen3")
VOCAB = 64

warnings.filterwarnings("ignore", message=".*kernels-community.*")
logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One saved random checkpoint per architecture (seeded), shared by the session."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    paths = {}
    for arch in ARCHITECTURES:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
        model.save_pretrained(root / arch)
        paths[arch] = root / arch
    return paths


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer over the tiny models' vocabulary: ids 0/1/2 are pad/bos/eos as in their configs."""
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def load_tiny_lora(path: Path, *, four_bit: bool = True, seed: int = 0, dropout: float = 0.0, rank: int = 4):
    """A PEFT LoRA model on a tiny checkpoint, with an NF4 base when ``four_bit`` (bitsandbytes on CPU)."""
    kwargs = {}
    if four_bit:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    # PEFT initialises B = 0; start from a non-zero adapter so that every test sees real gradients through A too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def pattern_dataset(n: int = 32, length: int = 16, seed: int = 0) -> Dataset:
    """A learnable language: each sequence repeats a random 3-token motif."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        motif = torch.randint(3, VOCAB, (3,), generator=g)
        ids = motif.repeat(length // 3 + 1)[:length]
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * length, "labels": ids.tolist()})
    return Dataset.from_list(rows)
