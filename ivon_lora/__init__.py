"""ivon-lora: variational LoRA finetuning with the IVON optimizer."""

from ivon_lora.optimizer import IVON

__all__ = ["IVON"]
__version__ = "0.1.0"
