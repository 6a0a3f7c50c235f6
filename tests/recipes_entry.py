"""Import helper: run recipes/llama_commonsense.py's main() in-process (the recipes folder is not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "llama_commonsense.py"


def run_recipe(argv: list[str]) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("llama_commonsense", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)
