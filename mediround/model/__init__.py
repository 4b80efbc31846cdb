"""The MediRound model: config, build, processor, forward over dialogues, sessions over rounds, checkpoints.

The names below are the package's public face (``from mediround.model import build_model``), each imported
from its submodule on first use. Why not at import time: the light submodules (``config``,
``weight_sources``) are read by commands that never build a model (``mediround --help``, ``mediround
recipes``, recipe validation), and importing any submodule runs this file first; an eager import here would
pull torch, transformers and peft (about 5 s) into all of them (tests/test_layers.py checks).
"""

from __future__ import annotations

import importlib
from typing import Any

EXPORTS: dict[str, str] = {
    "MASK_THRESHOLD": "mediround.model.frame",
    "DialogueProcessor": "mediround.model.processor",
    "DialogueSample": "mediround.model.processor",
    "DialogueSession": "mediround.model.session",
    "ImageContext": "mediround.model.session",
    "MediRound": "mediround.model.mediround",
    "MediRoundConfig": "mediround.model.config",
    "RoundResult": "mediround.model.session",
    "build_model": "mediround.model.build",
    "encode_image": "mediround.model.session",
    "load_sample": "mediround.model.processor",
    "preset": "mediround.model.config",
    "trainable_parameters": "mediround.model.build",
}
"""Each public name and the submodule that defines it."""


def __getattr__(name: str) -> Any:
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(EXPORTS))
