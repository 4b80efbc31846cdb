"""Small valid data, broken variants of it, and a tiny untrained checkpoint for the reliability tests."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def write_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)
    return path


def rect_mask(top: int, left: int, size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top : top + 10, left : left + 12] = 255
    return mask


def huge_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` (one grey pixel of data): a decompression bomb's shape
    without allocating it. Readers must refuse it from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)
    return path


def write_dataset(root: Path) -> Path:
    """Images and masks every record below names: a 2-round dialogue image, an empty mask, odd images."""
    rng = np.random.default_rng(0)
    write_png(root / "images" / "a.png", rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    write_png(root / "masks" / "a1.png", rect_mask(2, 3))
    write_png(root / "masks" / "a2.png", rect_mask(15, 12))
    write_png(root / "masks" / "empty.png", np.zeros((SIZE, SIZE), dtype=np.uint8))
    write_png(root / "masks" / "small.png", rect_mask(0, 0, size=16))
    grey16 = (np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 60)
    write_png(root / "images" / "grey16.png", grey16)
    palette = Image.fromarray(rng.integers(0, 3, (SIZE, SIZE), dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30] + [0] * 759)
    palette.save(root / "images" / "palette.png")
    palette_mask = Image.fromarray((rect_mask(2, 3) > 0).astype(np.uint8), mode="P")
    palette_mask.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette_mask.save(root / "masks" / "palette.png")
    write_png(root / "images" / "one.png", np.full((1, 1), 90, dtype=np.uint8))
    write_png(root / "masks" / "one.png", np.full((1, 1), 255, dtype=np.uint8))
    (root / "images" / "empty.png").write_bytes(b"")
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 300, dtype=np.uint8)))
    huge_png_header(root / "images" / "huge.png", 10_000, 10_000)
    write_png(root.parent / "outside.png", np.zeros((SIZE, SIZE), dtype=np.uint8))
    return root


def record(dialogue_id: str, image: str = "images/a.png", **changes) -> dict:
    """A valid 2-round JSONL record whose round 2 refers to round 1; ``changes`` replace top-level fields."""
    value = {
        "id": dialogue_id,
        "image": image,
        "rounds": [
            {"query": "Segment the liver.", "answer": "It is [SEG].", "mask": "masks/a1.png"},
            {"query": "Segment the lesion inside it.", "answer": "It is [SEG].", "mask": "masks/a2.png", "ref": 1},
        ],
    }
    value.update(changes)
    return value


def one_round(dialogue_id: str, image: str = "images/a.png", mask: str | None = "masks/a1.png") -> dict:
    round_ = {"query": "Segment the liver.", "answer": "It is [SEG]."}
    if mask is not None:
        round_["mask"] = mask
    return {"id": dialogue_id, "image": image, "rounds": [round_]}


def write_lines(path: Path, lines: list) -> Path:
    """One line per entry: dicts as JSON, str and bytes as they are."""
    chunks = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        chunks.append(line.encode("utf-8") if isinstance(line, str) else line)
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def save_tiny_checkpoint(folder: Path) -> Path:
    """``build_model(tiny)`` (untrained) saved as a MediRound checkpoint folder."""
    import torch

    from mediround.model import build_model, preset
    from mediround.model.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    return save_checkpoint(build_model(preset("tiny")), folder)
