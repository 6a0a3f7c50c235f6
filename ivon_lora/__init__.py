"""ivon-lora: variational LoRA finetuning with the IVON optimizer, as a Hugging Face PEFT extension."""

from ivon_lora.optimizer import IVON
from ivon_lora.posterior import VariationalLoraPosterior
from ivon_lora.serialization import VariationalAdapterError
from ivon_lora.trainer import VariationalSFTTrainer, VariationalTrainer
from ivon_lora.training_args import VariationalSFTConfig, VariationalTrainingArguments

__all__ = [
    "IVON",
    "VariationalAdapterError",
    "VariationalLoraPosterior",
    "VariationalSFTConfig",
    "VariationalSFTTrainer",
    "VariationalTrainer",
    "VariationalTrainingArguments",
]
__version__ = "0.1.0"
