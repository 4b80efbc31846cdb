"""MediRound's training losses as functions: answer cross-entropy, per-mask BCE and Dice, the entity
head's cross-entropy, and their weighted sum (``LossWeights``)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from mediround.model.config import LossWeights
from mediround.model.processor import IGNORE


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """1 - soft Dice on sigmoid probabilities, (2 I + s) / (P + G + s) with ``smoothing`` s
    (``heads.dice_smoothing``), per mask, averaged over masks. (n, h, w) each."""
    probs = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    intersection = (probs * targets).sum(-1)
    return (1 - (2 * intersection + smoothing) / (probs.sum(-1) + targets.sum(-1) + smoothing)).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over pixels of each mask, then over masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(-1).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (n, vocab) logits, computed in float32, against (n,) labels (``IGNORE`` skipped)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def mask_losses(logits: list[torch.Tensor], targets: list[torch.Tensor],
                dice_smoothing: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE and Dice of each (h, w) mask against its target, each averaged over the masks (at least one)."""
    pairs = list(zip(logits, targets))
    bce = torch.stack([bce_loss(lg[None], tg[None]) for lg, tg in pairs]).mean()
    dice = torch.stack([dice_loss(lg[None], tg[None], dice_smoothing) for lg, tg in pairs]).mean()
    return bce, dice


LOSS_KEYS = tuple(weight.name for weight in dataclasses.fields(LossWeights))
"""The components of stage 1's objective, one per weight of ``LossWeights``: ce, bce, dice, entity."""


def weighted_loss(weights: LossWeights, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training objective of stage 1, ``ce * CE + bce * BCE + dice * Dice + entity * entity``: each
    component of ``losses`` (one per ``LOSS_KEYS``) times its weight, summed in that order."""
    return sum(getattr(weights, key) * losses[key] for key in LOSS_KEYS)
