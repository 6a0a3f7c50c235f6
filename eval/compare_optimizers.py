"""IVON vs AdamW on commonsense tasks × seeds, resumable; writes results.json, results.md and plots.

    python eval/compare_optimizers.py                                   # six paper tasks, seeds 21 42 87
    python eval/compare_optimizers.py --tasks arc_easy winogrande_s --max_steps 30 --max_eval 100
    ivon-lora compare ...                                               # the same from the CLI

Finished runs are skipped, so re-running the same command resumes an interrupted study.
"""

from __future__ import annotations

import logging
import sys

from ivon_lora.cli_utils import parse_config
from ivon_lora.study import StudyConfig, run_study

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run_study(parse_config(StudyConfig, sys.argv[1:], description=__doc__))
