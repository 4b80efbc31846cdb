"""The ``dataset`` fixture: images, masks and an MR-MedSeg file in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dialogue_files import HEIGHT, MR_ITEMS, WIDTH, box_mask, write_png


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Images and masks for MR_ITEMS under tmp_path/data, and MR_ITEMS as data/mr.json; returns data/."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("s1", "s2"):
        write_png(root / "images" / f"{name}.png", rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    write_png(root / "masks" / "s1_r00.png", box_mask(0, 0, 2, 3))
    write_png(root / "masks" / "s1_r01.png", box_mask(0, 3, 2, 6))
    write_png(root / "masks" / "s1_r02.png", box_mask(2, 3, 4, 6))
    write_png(root / "masks" / "s2_r00.png", box_mask(1, 1, 3, 5))
    (root / "mr.json").write_text(json.dumps(MR_ITEMS, indent=2), encoding="utf-8")
    return root
