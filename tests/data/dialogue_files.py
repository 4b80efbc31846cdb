"""Helpers for the data-layer tests: tiny PNGs, MR-MedSeg items and JSONL records written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 6, 4


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def box_mask(
    top: int, left: int, bottom: int, right: int, height: int = HEIGHT, width: int = WIDTH
) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    return mask


MR_ITEMS = [
    {
        "task": "segmentation",
        "base": "[null]",
        "conversations": [
            {"from": "human", "value": "[IMAGE256:images/s1.png] Segment the liver."},
            {"from": "gpt", "value": "[MASK-DECODE:masks/s1_r00.png]."},
            {
                "from": "human",
                "value": "[MASK-ENCODE:masks/s1_r00.png][BOX-ENCODE:masks/s1_r00.png] Segment the organ beside it.",
                "ind": 0,
            },
            {"from": "gpt", "value": "It is [REF-DECODE:masks/s1_r00.png][MASK-DECODE:masks/s1_r01.png]."},
            {"from": "human", "value": "Which structure is usually larger?"},
            {"from": "gpt", "value": "The liver."},
            {
                "from": "human",
                "value": "[MASK-ENCODE:masks/s1_r01.png][BOX-ENCODE:masks/s1_r01.png] Segment what lies below it.",
                "ind": 1,
            },
            {"from": "gpt", "value": "[MASK-DECODE:masks/s1_r02.png]"},
        ],
    },
    {
        "id": "s2-a",
        "task": "segmentation",
        "base": "[null]",
        "origin": "hand-written",
        "conversations": [
            {"from": "human", "value": "Segment  [IMAGE256:images/s2.png]the lesion, please."},
            {"from": "gpt", "value": "Sure, [MASK-DECODE:masks/s2_r00.png] ."},
        ],
    },
]


def jsonl_line(dialogue_id: str, image: str = "images/s1.png", **changes) -> dict:
    """A valid two-round JSONL record for the dataset fixture; ``changes`` replace top-level fields."""
    record = {
        "id": dialogue_id,
        "image": image,
        "modality": "CT",
        "scenario": "organ-lesion",
        "rounds": [
            {"query": "Segment the liver.", "answer": "It is [SEG].", "mask": "masks/s1_r00.png"},
            {
                "query": "Segment the organ beside it.",
                "answer": "It is [SEG].",
                "mask": "masks/s1_r01.png",
                "ref": 1,
            },
        ],
    }
    record.update(changes)
    return record


def write_jsonl_lines(path: Path, lines: list) -> Path:
    """Write records (dicts are dumped, str/bytes written as they are) one per line."""
    chunks = []
    for line in lines:
        if isinstance(line, dict):
            chunks.append(json.dumps(line).encode())
        elif isinstance(line, str):
            chunks.append(line.encode())
        else:
            chunks.append(line)
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path
