"""Reference inputs of a round that points back to an earlier one: the masked crop and the box.

This module owns the "predicted mask too small" rule: a reference mask with at most
``MIN_REFERENCE_PIXELS`` foreground pixels is replaced by the whole image (full box), as in the authors'
evaluation. Training applies the same rule to (rare) empty ground-truth masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MIN_REFERENCE_PIXELS = 9
FOURIER_SCALE = 3.0
"""Standard deviation of the random frequencies (per unit of the [-1, 1] box coordinates)."""


@dataclass
class Reference:
    """The crop (square uint8, zero padding) and the normalised box ``[xmin/W, ymin/H, xmax/W, ymax/H]``."""

    crop: np.ndarray
    box: np.ndarray
    whole_image: bool


def reference_from_mask(image: np.ndarray, mask: np.ndarray | None) -> Reference:
    """Mask the image with ``mask``, crop to its bounding box and zero-pad to a square (bottom/right).

    The box uses exclusive right/bottom edges, so the whole image is ``[0, 0, 1, 1]``. A missing mask or
    one with <= 9 pixels means the whole image.
    """
    height, width = image.shape[:2]
    if mask is None or int(np.count_nonzero(mask)) <= MIN_REFERENCE_PIXELS:
        keep = np.ones((height, width), dtype=bool)
        whole = True
    else:
        keep = np.asarray(mask, dtype=bool)
        if keep.shape != (height, width):
            raise ValueError(f"reference mask shape {keep.shape} differs from image shape {(height, width)}")
        whole = False
    rows = np.flatnonzero(keep.any(axis=1))
    cols = np.flatnonzero(keep.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # Cut the box first: masking the whole image costs a pass over every pixel of a large slice.
    region = np.where(keep[top:bottom, left:right, None], image[top:bottom, left:right], 0)
    side = max(region.shape[0], region.shape[1])
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    crop[: region.shape[0], : region.shape[1]] = region
    box = np.array([left / width, top / height, right / width, bottom / height], dtype=np.float32)
    return Reference(crop=crop, box=box, whole_image=whole)


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
