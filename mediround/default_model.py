"""The checkpoint shipped inside the package, used when a command is given no ``--model``.

It is the tiny preset (every weight built from config) trained on CPU on the synthetic benchmark, with
its JCM: a model for trying the tool and for tests, not for clinical or research use. The folder holds
a normal MediRound checkpoint plus ``TRAINING.json`` (recipes, seeds, data command, measured scores)
and ``README.md``; ``recipes/default-tiny.yaml`` and ``recipes/default-tiny-jcm.yaml`` retrain it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from mediround.errors import CheckpointError

ASSET_NAME = "default-model"
TRAINING_FILE = "TRAINING.json"


def default_checkpoint() -> Path:
    """The shipped checkpoint folder; ``CheckpointError`` when the package was installed without it."""
    folder = Path(str(resources.files("mediround") / "assets" / ASSET_NAME))
    if not (folder / "manifest.json").is_file():
        raise CheckpointError(f"{folder}: the shipped default model is missing from this installation; "
                              "pass --model CKPT")
    return folder


def training_record(folder: Path | None = None) -> dict:
    """The shipped model's ``TRAINING.json``: how it was trained and what it scored."""
    path = (folder or default_checkpoint()) / TRAINING_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the training record: {error}") from None


def default_model_notice(folder: Path) -> str:
    """The one line a command prints when it falls back to the shipped model."""
    return (f"no --model given: using the shipped tiny model ({folder}), trained on synthetic slices "
            "for trying the tool; not for clinical or research use")
