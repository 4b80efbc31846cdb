"""Decode images and masks from PNG/JPEG into the arrays every other module expects.

Images become RGB ``uint8`` arrays of shape (H, W, 3), whatever their mode:

- ``L``/``1``: grey repeated to three channels; ``LA``/``RGBA``: the alpha channel is dropped, not
  composited (medical RGBA files, e.g. BiomedParse's, carry an opaque alpha; compositing onto a
  background would invent intensities); ``P``: the palette colours.
- 16-bit and 32-bit greyscale (``I;16``, ``I``, ``F``): windowed linearly between the 0.5th and 99.5th
  percentiles of the image (values outside are clipped), so CT/MRI contrast survives; a constant image
  becomes black.

Masks become ``bool`` arrays of shape (H, W): foreground is value > 0 in the first channel (palette
masks: palette index > 0).

Files larger than ``MAX_PIXELS`` are refused before decoding (decompression-bomb guard).
Every failure (missing, empty, corrupt, too large) is a ``DataError(file, None, None, reason)``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mediround.atomic import atomic_path
from mediround.errors import DataError

MAX_PIXELS = 50_000_000
"""Largest image accepted (width x height): 50 megapixels, far above any medical slice in use."""

WINDOW_PERCENTILES = (0.5, 99.5)

_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _open(path: str | os.PathLike) -> Image.Image:
    """Open lazily (header only), turning every failure into a ``DataError`` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(str(path), None, None, "a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise DataError(str(path), None, None, "empty file (0 bytes)")
    except FileNotFoundError:
        raise DataError(str(path), None, None, "file not found") from None
    except NotADirectoryError:
        raise DataError(str(path), None, None, "file not found") from None
    try:
        with warnings.catch_warnings():
            # MAX_PIXELS below decides; Pillow's own warning would only add a second, noisier line.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise DataError(str(path), None, None, f"image too large ({error})") from None
    except UnidentifiedImageError:
        raise DataError(
            str(path), None, None, "not a readable image (corrupt or unsupported format)"
        ) from None
    except OSError as error:
        raise DataError(str(path), None, None, f"corrupt image: {error}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise DataError(
            str(path), None, None, f"image too large: {width}x{height} exceeds {MAX_PIXELS} pixels"
        )
    return image


def _decode(path: str | os.PathLike) -> Image.Image:
    image = _open(path)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(str(path), None, None, f"corrupt image: {error}") from None
    return image


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) read from the file header only; the pixel data is not decoded."""
    with _open(path) as image:
        return image.size


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after checking the file's structure and checksums, without decoding pixels."""
    with _open(path) as image:
        size = image.size
        try:
            image.verify()
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(str(path), None, None, f"corrupt image: {error}") from None
    return size


def percentile_window(values: np.ndarray) -> tuple[float, float]:
    """(low, width) between the 0.5th and 99.5th percentiles of ``values``; width 0 for a constant array."""
    low, high = np.percentile(values.astype(np.float64, copy=False), WINDOW_PERCENTILES)
    return float(low), float(max(high - low, 0.0))


def apply_window(values: np.ndarray, low: float, width: float) -> np.ndarray:
    """uint8 values, 0 at ``low`` and below, 255 at ``low + width`` and above, linear between (rounded);
    all 0 when ``width`` is not positive. Element-wise: any part of an array maps as the whole does."""
    if width <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.clip((values.astype(np.float64) - low) / width, 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def window(values: np.ndarray) -> np.ndarray:
    """Map a high-depth greyscale array to uint8 between its 0.5th and 99.5th percentiles."""
    return apply_window(values, *percentile_window(values))


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """An (H, W) uint8 greyscale image as the (H, W, 3) RGB array every image becomes."""
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2), dtype=np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of a PNG/JPEG image in any mode (see the module docstring)."""
    with _decode(path) as image:
        if image.mode in _HIGH_DEPTH_MODES:
            grey = window(np.asarray(image))
        elif image.mode in ("L", "1"):
            grey = np.asarray(image.convert("L"))
        elif image.mode == "LA":
            grey = np.asarray(image)[..., 0]
        else:
            grey = None
            rgb = np.asarray(
                image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
            )
    if grey is not None:
        return grey_to_rgb(grey)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Boolean mask (H, W): foreground where the first channel (or palette index) is > 0."""
    with _decode(path) as image:
        values = np.asarray(image)
    if values.ndim == 3:
        values = values[..., 0]
    return values > 0


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB uint8 image (H, W, 3) as a PNG, atomically (``load_image`` reads it back unchanged)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(str(path), None, None, f"an image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def save_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a 2-D boolean mask as an 8-bit PNG with values 0/255, atomically."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(str(path), None, None, f"a mask must be 2-D, got shape {mask.shape}")
    pixels = np.where(mask.astype(bool), 255, 0).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
