"""Command-line parsing shared by the recipes and the ``ivon-lora`` CLI: dataclass flags plus ``--config x.yaml``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

T = TypeVar("T")


def parse_config(config_class: type[T], argv: list[str], description: str | None = None) -> T:
    """Parse ``argv`` into ``config_class``; values from ``--config file.yaml`` act as defaults that flags override.

    Unknown YAML keys are an error (a typo must not silently fall back to a default).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(config_class, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file with default values for the flags below.")
    if known.config is not None:
        values: dict[str, Any] = yaml.safe_load(known.config.read_text()) or {}
        fields = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise SystemExit(f"{known.config}: unknown keys {unknown}; see --help for the valid ones.")
        parser.set_defaults(**values)
    namespace = parser.parse_args(rest)
    kwargs = {key: value for key, value in vars(namespace).items() if key != "config"}
    return config_class(**kwargs)
