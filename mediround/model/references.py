"""Reference inputs of a round that points back to an earlier one: the masked crop and the box.

This module owns the "predicted mask too small" rule: a reference mask with at most
``MIN_REFERENCE_PIXELS`` foreground pixels is replaced by the whole image (full box), as in the authors'
evaluation. Training applies the same rule to (rare) empty ground-truth masks.

It also owns the optional stray-fragment rule (``heads.reference_min_fragment``, off in the paper's
configuration): the connected parts of a reference mask that hold less than that share of its foreground
are left out of the crop and the box. A predicted mask often carries a few stray pixels far from the
structure; its bounding box then spans both and the box token points at another place
(docs/model.md).

And the rule for a chained round's reference cut from the model's own mask (``heads.predicted_reference``,
``reference_from_prediction``): by the mask, as above, or as the authors' validation cuts it, by the
masked image's non-black pixels, falling back to the ground-truth reference when there are none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

MIN_REFERENCE_PIXELS = 9
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
FOURIER_SCALE = 3.0
"""Standard deviation of the random frequencies (per unit of the [-1, 1] box coordinates)."""


@dataclass(frozen=True)
class PredictedMask:
    """A referred round's mask as the model predicted it (H, W), and that round's ground-truth mask when the
    caller has it (the reference the authors' validation keeps when the predicted one cannot be cut)."""

    mask: np.ndarray
    truth: np.ndarray | None = None


class NoImagePixels(ValueError):
    """The masked image has no non-black pixel to cut a crop from (``reference_from_masked_image``)."""


@dataclass
class Reference:
    """The crop (square uint8, zero padding) and the normalised box ``[xmin/W, ymin/H, xmax/W, ymax/H]``."""

    crop: np.ndarray
    box: np.ndarray
    whole_image: bool


def without_small_fragments(mask: np.ndarray, min_fragment: float) -> np.ndarray:
    """``mask`` (bool) without its 8-connected parts that hold less than ``min_fragment`` of its
    foreground; the largest part always stays."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return mask
    # Label inside the mask's box only: a one-part mask of a large slice then costs little.
    window = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    labels, count = ndimage.label(mask[window], structure=EIGHT_CONNECTED)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    kept = sizes >= min_fragment * sizes.sum()
    kept[int(np.argmax(sizes))] = True
    kept[0] = False
    cleaned = np.zeros_like(mask)
    cleaned[window] = kept[labels]
    return cleaned


def reference_from_mask(image: np.ndarray, mask: np.ndarray | None, min_fragment: float = 0.0,
                        box_max: str = "exclusive") -> Reference:
    """Mask the image with ``mask``, crop to its bounding box and zero-pad to a square (bottom/right).

    The box's right/bottom edges are exclusive (the whole image is ``[0, 0, 1, 1]``) or, with
    ``box_max="inclusive"``, the mask's last column and row (``heads.box_max``). With
    ``min_fragment > 0`` the mask's parts below that share of its foreground are dropped first. A missing
    mask or one with <= 9 pixels (after dropping) means the whole image.
    """
    height, width = image.shape[:2]
    keep = None if mask is None else np.asarray(mask, dtype=bool)
    if keep is not None:
        if keep.shape != (height, width):
            raise ValueError(f"reference mask shape {keep.shape} differs from image shape {(height, width)}")
        if min_fragment > 0:
            keep = without_small_fragments(keep, min_fragment)
    whole = keep is None or int(np.count_nonzero(keep)) <= MIN_REFERENCE_PIXELS
    if whole:
        keep = np.ones((height, width), dtype=bool)
    rows = np.flatnonzero(keep.any(axis=1))
    cols = np.flatnonzero(keep.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # Cut the box first: masking the whole image costs a pass over every pixel of a large slice.
    region = np.where(keep[top:bottom, left:right, None], image[top:bottom, left:right], 0)
    side = max(region.shape[0], region.shape[1])
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    crop[: region.shape[0], : region.shape[1]] = region
    return Reference(crop=crop, box=_box(top, bottom, left, right, height, width, box_max), whole_image=whole)


def _box(top: int, bottom: int, left: int, right: int, height: int, width: int, box_max: str) -> np.ndarray:
    """The normalised box of rows [top, bottom) and columns [left, right) (``heads.box_max`` edges)."""
    past = 0 if box_max == "exclusive" else 1
    return np.array([left / width, top / height, (right - past) / width, (bottom - past) / height], dtype=np.float32)


def reference_from_masked_image(image: np.ndarray, mask: np.ndarray, box_max: str = "exclusive") -> Reference:
    """The authors' validation's reference from a predicted mask: the image masked with ``mask``; when at most
    9 of its pixels are non-black in channel 0, the whole image instead. The crop is the masked image cut to
    the box of its non-black pixels (any channel) and zero-padded to a square (bottom/right); the box token
    bounds the mask itself (the whole image in the fallback). Raises ``NoImagePixels`` when no pixel of the
    (masked) image is non-black, where their ``get_bbox`` fails.
    """
    height, width = image.shape[:2]
    keep = np.asarray(mask, dtype=bool)
    if keep.shape != (height, width):
        raise ValueError(f"reference mask shape {keep.shape} differs from image shape {(height, width)}")
    masked = np.where(keep[..., None], image, 0).astype(np.uint8)
    whole = int(np.count_nonzero(masked[..., 0])) <= MIN_REFERENCE_PIXELS
    if whole:
        keep = np.ones((height, width), dtype=bool)
        masked = np.asarray(image, dtype=np.uint8)
    lit = masked.any(axis=-1)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        raise NoImagePixels("the masked image has no non-black pixel")
    region = masked[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    side = max(region.shape[0], region.shape[1])
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    crop[: region.shape[0], : region.shape[1]] = region
    box_rows, box_cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    box = _box(box_rows[0], box_rows[-1] + 1, box_cols[0], box_cols[-1] + 1, height, width, box_max)
    return Reference(crop=crop, box=box, whole_image=whole)


def reference_from_prediction(image: np.ndarray, predicted: PredictedMask, rule: str, min_fragment: float = 0.0,
                              box_max: str = "exclusive") -> Reference:
    """A chained round's reference from the model's mask of the referred round (``heads.predicted_reference``):
    ``mask`` cuts it as ``reference_from_mask``; ``masked-image`` as ``reference_from_masked_image`` (after
    the stray-fragment rule), and where that finds no non-black pixel, from the ground truth
    (``predicted.truth``, cut by its mask as in training) when given, else the whole image."""
    if rule == "mask":
        return reference_from_mask(image, predicted.mask, min_fragment, box_max)
    mask = np.asarray(predicted.mask, dtype=bool)
    if min_fragment > 0:
        mask = without_small_fragments(mask, min_fragment)
    try:
        return reference_from_masked_image(image, mask, box_max)
    except NoImagePixels:
        return reference_from_mask(image, predicted.truth, min_fragment, box_max)


class BoxEncoder(nn.Module):
    """The box token's embedding: ``Linear(4, hidden)`` of the normalised box (the paper), or with
    ``fourier_features = n > 0`` a linear map of the box and of the sine and cosine of ``n`` fixed random
    projections of its corners, as SAM's prompt encoder encodes points: positions a small language model
    can tell apart without first learning a non-linear map of four numbers."""

    def __init__(self, hidden: int, fourier_features: int = 0, seed: int = 0):
        super().__init__()
        frequencies = None
        if fourier_features:
            generator = torch.Generator().manual_seed(seed)
            frequencies = torch.randn(4, fourier_features, generator=generator) * FOURIER_SCALE
        self.register_buffer("frequencies", frequencies)
        self.linear = nn.Linear(4 + 2 * fourier_features, hidden)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        if self.frequencies is None:
            return self.linear(boxes)
        angles = 2 * torch.pi * (2 * boxes - 1) @ self.frequencies.to(boxes.dtype)
        return self.linear(torch.cat([boxes, angles.sin(), angles.cos()], dim=-1))
