"""ivon-lora: variational LoRA finetuning with the IVON optimizer, as a Hugging Face PEFT extension.

The public names are imported lazily, so that ``import ivon_lora`` (and the ``ivon-lora`` CLI) stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "IVON": "ivon_lora.optimizer",
    "VariationalAdapterError": "ivon_lora.serialization",
    "VariationalLoraPosterior": "ivon_lora.posterior",
    "VariationalTrainer": "ivon_lora.trainer",
    "VariationalSFTTrainer": "ivon_lora.trainer",
    "CustomLossTrainer": "ivon_lora.trainer",
    "VariationalTrainingArguments": "ivon_lora.training_args",
    "VariationalSFTConfig": "ivon_lora.training_args",
    "load_base_model": "ivon_lora.models",
    "push_adapter_folder": "ivon_lora.hub",
    "resolve_adapter_folder": "ivon_lora.hub",
    "render_model_card": "ivon_lora.model_card",
    "write_model_card": "ivon_lora.model_card",
    "summarize_posterior": "ivon_lora.model_card",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ivon_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
