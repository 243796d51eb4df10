"""Paths to the small model and text that ship inside the hiquant package.

``embedded_model_path()`` is a Hugging Face style folder (``config.json``, float16
``model.safetensors``, ``tokenizer.json``, ``generation_config.json``, ``recipe.json``) holding a
tiny LLaMA-architecture model (about 1 M parameters, GQA) trained on the Python standard library;
``embedded_calib_path()`` / ``embedded_test_path()`` are held-out standard library sources (never
trained on) for calibration and perplexity. They let every example, test and notebook run offline
in seconds. ``python/hiquant/data/README.md`` says how they were made and under which licence;
``scripts/make_embedded_model.py`` regenerates them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["embedded_model_path", "embedded_calib_path", "embedded_test_path", "embedded_recipe"]


def _data_dir() -> Path:
    # Wheels install packages as plain folders, so the resource root is a real directory; a
    # zipped install would need extraction, which no caller here wants for a model folder.
    root = resources.files(__package__) / "data"
    if not isinstance(root, Path):
        raise FileNotFoundError(
            f"hiquant is imported from an archive ({root!r}); its embedded data needs a regular "
            "installation: pip install hiquant (not a zipapp)")
    return root


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"hiquant's embedded data file {path} is missing; reinstall hiquant, or from a source "
            "checkout regenerate it with: python scripts/make_embedded_model.py")
    return path


def embedded_model_path() -> Path:
    """Folder of the embedded tiny LLaMA checkpoint (Hugging Face layout, float16)."""
    return _existing(_data_dir() / "tiny-llama")


def embedded_calib_path() -> Path:
    """UTF-8 text file of held-out calibration text (about 260 KB of Python source)."""
    return _existing(_data_dir() / "corpus" / "calib.txt")


def embedded_test_path() -> Path:
    """UTF-8 text file of held-out evaluation text (about 250 KB of Python source)."""
    return _existing(_data_dir() / "corpus" / "test.txt")


def embedded_recipe() -> dict:
    """How the embedded model was made and its reference numbers (``recipe.json``), e.g.
    ``embedded_recipe()["test_ppl_seq256"]``, the float16 model's perplexity on the test text with
    non-overlapping 256-token windows."""
    return json.loads(_existing(_data_dir() / "tiny-llama" / "recipe.json").read_text("utf-8"))
