"""Overlay PNGs: one picture per dialogue, the image and then one tile per round.

Each round tile shows the image with the predicted mask in orange and the ground-truth mask (when the
data has one) in green, where both agree the colours mix; the tile's caption is the round number, the
referred round, the round's Dice (x100, when there is ground truth) and the query, wrapped to the tile width.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mediround.atomic import atomic_path
from mediround.data.dialogue import Dialogue
from mediround.data.images import load_mask
from mediround.errors import DataError
from mediround.metrics import pair_counts

OVERLAYS_FOLDER = "overlays"
"""Where a predictions folder keeps its overlay PNGs (``<safe id>.png``)."""
TILE = 256
CAPTION_LINES = 4
LINE_HEIGHT = 12
COLUMNS = 4
PREDICTED_COLOUR = np.array([255, 140, 0], dtype=np.float32)
TRUTH_COLOUR = np.array([0, 200, 80], dtype=np.float32)
ALPHA = 0.45


def _tint(pixels: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    tinted = pixels.copy()
    tinted[mask] = (1 - ALPHA) * tinted[mask] + ALPHA * colour
    return tinted


def mask_overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (RGB uint8) with ``mask`` tinted in the predicted colour, at the image's own size."""
    tinted = _tint(image.astype(np.float32), np.asarray(mask, bool), PREDICTED_COLOUR)
    return np.clip(tinted, 0, 255).astype(np.uint8)


def _tile(image: np.ndarray, predicted: np.ndarray | None, truth: np.ndarray | None) -> Image.Image:
    pixels = image.astype(np.float32)
    if truth is not None:
        pixels = _tint(pixels, truth, TRUTH_COLOUR)
    if predicted is not None:
        pixels = _tint(pixels, predicted, PREDICTED_COLOUR)
    tile = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    scale = TILE / max(tile.size)
    size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
    return tile.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)


def _truth(dialogue: Dialogue, number: int, shape: tuple[int, int]) -> np.ndarray | None:
    path = dialogue.mask_path(number)
    if path is None:
        return None
    try:
        mask = load_mask(path)
    except DataError:
        return None
    return mask if mask.shape == shape else None


def render_overlay(dialogue: Dialogue, image: np.ndarray, predicted: Sequence[np.ndarray]) -> Image.Image:
    """The overlay picture of one dialogue: the plain image, then one captioned tile per predicted round."""
    font = ImageFont.load_default()
    shape = image.shape[:2]
    captions = ["image"]
    tiles = [_tile(image, None, None)]
    for number, (round_, mask) in enumerate(zip(dialogue.rounds, predicted), start=1):
        truth = _truth(dialogue, number, shape)
        tiles.append(_tile(image, mask, truth))
        ref = f" (ref {round_.ref})" if round_.ref is not None else ""
        dice = "" if truth is None else f" Dice {100 * pair_counts(np.asarray(mask, bool), truth).dice:.1f}"
        captions.append(f"R{number}{ref}{dice}: {round_.query}")
    columns = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_height = TILE + CAPTION_LINES * LINE_HEIGHT + 6
    sheet = Image.new("RGB", (columns * TILE, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    characters = max(10, TILE // 6)
    for index, (tile, caption) in enumerate(zip(tiles, captions)):
        left, top = (index % columns) * TILE, (index // columns) * cell_height
        sheet.paste(tile, (left + (TILE - tile.width) // 2, top))
        lines = textwrap.wrap(caption, characters)[:CAPTION_LINES]
        for line_number, line in enumerate(lines):
            draw.text((left + 3, top + TILE + 3 + line_number * LINE_HEIGHT), line, fill="black", font=font)
    return sheet


def write_overlay(
    path: str | os.PathLike, dialogue: Dialogue, image: np.ndarray, predicted: Sequence[np.ndarray]
) -> None:
    """Render the dialogue's overlay and save it as a PNG, atomically."""
    with atomic_path(path) as tmp:
        render_overlay(dialogue, image, predicted).save(tmp, format="PNG")
