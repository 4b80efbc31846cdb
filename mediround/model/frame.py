"""SAM's frame of one image, and the way back (as segment-anything's ``ResizeLongestSide`` beside
``Sam.postprocess_masks``): the one place that resizes, pads or thresholds for the segmenter.

Three sizes belong to an image: the ``original`` (H, W); the ``resized`` (h, w), the image scaled so its
longest side is SAM's input size; and the padded square (size, size) that SAM's image encoder reads,
the resized image in its top-left corner. Training supervises masks in the resized frame (ground truth
resized with nearest-exact, the model's logits cropped out of the padded square) or, with
``heads.mask_loss_frame: original``, at the original size (the logits brought back as at inference, the
ground truth as it is); inference returns logits at the original size (the resized-frame logits resized
once more, bilinear).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0
"""A pixel is foreground when its mask logit is above this (logit > 0, probability > 0.5)."""


def mask_from_logits(logits: torch.Tensor) -> np.ndarray:
    """Mask logits (..., H, W) -> bool masks (..., H, W) as numpy: foreground where logit > ``MASK_THRESHOLD``."""
    return (logits.detach().float() > MASK_THRESHOLD).cpu().numpy()


@dataclass(frozen=True)
class ImageFrame:
    """An image of ``original`` (H, W) pixels in SAM's frame of ``size`` pixels a side."""

    original: tuple[int, int]
    size: int

    @classmethod
    def of(cls, image: np.ndarray, size: int) -> ImageFrame:
        """The frame of an (H, W, ...) image."""
        return cls((int(image.shape[0]), int(image.shape[1])), size)

    @property
    def resized(self) -> tuple[int, int]:
        """(h, w): the longest side scaled to ``size``, rounded to the nearest pixel."""
        height, width = self.original
        scale = self.size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def pixels(self, image: np.ndarray, normalisation: str, resize: str = "torch") -> torch.Tensor:
        """(H, W, 3) uint8 -> SAM's (1, 3, size, size) input: resized, normalised, padded bottom-right.
        ``resize``: ``torch`` (bilinear, antialiased, on the float image) or ``pil`` (PIL's bilinear filter on
        the uint8 image, as segment-anything's ``ResizeLongestSide.apply_image``). ``sam``: ImageNet mean/std
        on 0-255 (authors, LISA); ``medsam``: min-max to [0, 1]."""
        height, width = self.resized
        if resize == "pil":
            resized = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((width, height), Image.BILINEAR)
            tensor = torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1)[None]
        else:
            tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
            tensor = F.interpolate(tensor, size=self.resized, mode="bilinear", align_corners=False, antialias=True)
        if normalisation == "sam":
            tensor = (tensor - torch.tensor(SAM_MEAN).view(1, 3, 1, 1)) / torch.tensor(SAM_STD).view(1, 3, 1, 1)
        else:
            low, high = tensor.min(), tensor.max()
            tensor = (tensor - low) / (high - low).clamp(min=1e-8)
        return F.pad(tensor, (0, self.size - width, 0, self.size - height))

    def resized_masks(self, masks: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W) masks of the image -> (n, h, w) bool in the resized frame (nearest-exact)."""
        if not masks:
            return torch.zeros(0, *self.resized, dtype=torch.bool)
        stacked = torch.from_numpy(np.stack([np.asarray(mask, dtype=np.float32) for mask in masks]))[:, None]
        return F.interpolate(stacked, size=self.resized, mode="nearest-exact")[:, 0] > 0.5

    def supervision_size(self, where: str) -> tuple[int, int]:
        """The (rows, cols) of masks supervised ``where`` (``heads.mask_loss_frame``: resized or original)."""
        return self.original if where == "original" else self.resized

    def supervised_masks(self, masks: Sequence[np.ndarray], where: str) -> torch.Tensor:
        """(H, W) ground-truth masks -> (n, rows, cols) bool where they are supervised: resized
        (``resized_masks``) or as they are."""
        if where != "original":
            return self.resized_masks(masks)
        if not masks:
            return torch.zeros(0, *self.original, dtype=torch.bool)
        return torch.from_numpy(np.stack([np.asarray(mask, dtype=bool) for mask in masks]))

    def supervised_logits(self, low_res: torch.Tensor, where: str) -> torch.Tensor:
        """SAM's low-res logits (n, 1, g, g) -> (n, rows, cols) float logits where masks are supervised:
        ``resized_logits``, or ``original_logits`` (as segment-anything's ``postprocess_masks``)."""
        return self.original_logits(low_res) if where == "original" else self.resized_logits(low_res)

    def resized_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """SAM's low-res logits (n, 1, g, g) -> (n, h, w) float logits in the resized frame: upsampled to the
        padded square (bilinear), the padding cropped."""
        logits = F.interpolate(low_res.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        height, width = self.resized
        return logits[:, 0, :height, :width]

    def to_original(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, h, w) resized-frame logits -> (n, H, W) at the original size (bilinear; as is when equal)."""
        if tuple(logits.shape[-2:]) == self.original:
            return logits
        return F.interpolate(logits[:, None].float(), size=self.original, mode="bilinear", align_corners=False)[:, 0]

    def original_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """SAM's low-res logits (n, 1, g, g) -> (n, H, W) float logits at the original image size."""
        return self.to_original(self.resized_logits(low_res))
