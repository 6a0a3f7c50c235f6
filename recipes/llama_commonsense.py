"""Variational LoRA (IVON) on commonsense multiple-choice QA: train, evaluate (mean and K-sample average), save.

    accelerate launch recipes/llama_commonsense.py                       # offline default: SmolLM2 + ARC-Easy
    accelerate launch recipes/llama_commonsense.py --optimizer adamw     # the AdamW baseline, same everything
    accelerate launch recipes/llama_commonsense.py --config recipes/configs/llama2_7b_arc_challenge.yaml
    accelerate launch --num_processes 2 recipes/llama_commonsense.py ... # multi-GPU (DDP)

Flags override the YAML file given with --config; `--help` lists them all (see ivon_lora.commonsense).
"""

from __future__ import annotations

import logging
import sys

from ivon_lora.cli_utils import parse_config
from ivon_lora.commonsense import CommonsenseConfig, run_commonsense


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_config(CommonsenseConfig, sys.argv[1:] if argv is None else argv, description=__doc__)
    return run_commonsense(config)


if __name__ == "__main__":
    main()
