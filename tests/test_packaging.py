"""The wheel is complete: installed from it (not from the source tree), the model card template is found."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_model_card_template(tmp_path):
    source = tmp_path / "source"  # only what the build reads (the checkout also holds .venv/ and outputs/)
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("ivon_lora", "model_cards"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("ivon_lora-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    probe = "import ivon_lora.model_card as m; print(m.TEMPLATE_PATH, m.TEMPLATE_PATH.is_file())"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(target / "ivon_lora" / "model_cards" / "variational_lora_card.md"), "True"]
