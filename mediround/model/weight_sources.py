"""Where weights come from: a local path, or (refused, with instructions) a model hub name.

Nothing is ever downloaded. The model's loaders and the doctor word a missing weight path the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
LOCAL_WEIGHT_FOLDERS = ("weights", "runs", "checkpoints")
"""Folders the shipped recipes and docs keep weights in: ``weights/x`` is a local path not yet there (e.g.
``weights/llava-med-v1.5-mistral-7b-hf`` before ``convert-llava``), never a hub name."""
WEIGHTS_PAGE = "docs/real-weights.md"


def looks_like_hub_name(source: str) -> bool:
    """``owner/name`` whose owner is no local folder and whose name is no weight file."""
    return (
        HUB_NAME.match(source) is not None
        and Path(source).parts[0] not in LOCAL_WEIGHT_FOLDERS
        and not Path(source).parent.is_dir()
        and Path(source).suffix not in WEIGHT_SUFFIXES
    )


def missing_path_detail(source: str, what: str) -> str:
    """Why a weight path is not there; a hub name gets the download instructions (nothing is downloaded)."""
    if looks_like_hub_name(source):
        local = f"weights/{source.split('/')[-1]}"
        return (
            f"{source}: looks like a model hub name, not a local path; nothing is downloaded: download it "
            f"first (huggingface-cli download {source} --local-dir {local}) and point the recipe at {local}"
        )
    return f"{source}: {what} not found ({WEIGHTS_PAGE} says how to get and convert the weights)"
