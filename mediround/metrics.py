"""Mask metrics exactly as the MediRound authors compute them (numpy only, no I/O).

Per mask, with P the predicted and G the ground-truth pixels:
``I = |P and G|``, ``U = |P or G|``, ``IoU = I / (U + 1e-5)``, ``Dice = 2I / (|P| + |G|)``;
both are 1.0 when ``U == 0`` (nothing predicted and nothing to find is a perfect answer).

Aggregates over a set of rows (one row per scored mask):
``gIoU`` = mean per-mask IoU, ``cIoU`` = sum(I) / sum(U), ``Dice`` = mean per-mask Dice.
When every mask of the set is empty on both sides, sum(U) is 0 and cIoU is defined as 1.0,
matching the per-mask convention. Tables multiply all three by 100, as the paper does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IOU_EPSILON = 1e-5
METRICS = ("dice", "giou", "ciou")
METRIC_LABELS = {"dice": "Dice", "giou": "gIoU", "ciou": "cIoU"}
GROUPINGS = ("round", "scenario", "modality", "difficulty", "names_target")


@dataclass(frozen=True)
class MaskCounts:
    """Pixel counts of one predicted/ground-truth pair, and the two per-mask scores derived from them."""

    intersection: int
    union: int
    pred_area: int
    gt_area: int

    @property
    def iou(self) -> float:
        return float(iou_from_counts(np.array([self.intersection]), np.array([self.union]))[0])

    @property
    def dice(self) -> float:
        return float(
            dice_from_counts(
                np.array([self.intersection]), np.array([self.pred_area]), np.array([self.gt_area])
            )[0]
        )


def iou_from_counts(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Per-mask IoU = I / (U + 1e-5), and 1.0 where U == 0."""
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    return np.where(union == 0, 1.0, intersection / (union + IOU_EPSILON))


def dice_from_counts(intersection: np.ndarray, pred_area: np.ndarray, gt_area: np.ndarray) -> np.ndarray:
    """Per-mask Dice = 2I / (|P| + |G|), and 1.0 where both masks are empty."""
    intersection = np.asarray(intersection, dtype=np.float64)
    total = np.asarray(pred_area, dtype=np.float64) + np.asarray(gt_area, dtype=np.float64)
    safe_total = np.where(total == 0, 1.0, total)
    return np.where(total == 0, 1.0, 2.0 * intersection / safe_total)


def counts(pred_stack: np.ndarray, gt_stack: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised counts of N mask pairs given as (N, H, W) arrays (non-zero = foreground).

    Returns int64 arrays of length N under ``intersection``, ``union``, ``pred_area``, ``gt_area``
    and float64 arrays under ``iou`` and ``dice``.
    """
    pred = np.asarray(pred_stack, dtype=bool)
    gt = np.asarray(gt_stack, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"expected two (N, H, W) stacks of the same shape, got {pred.shape} and {gt.shape}")
    flat_pred = pred.reshape(pred.shape[0], -1)
    flat_gt = gt.reshape(gt.shape[0], -1)
    pred_area = np.count_nonzero(flat_pred, axis=1).astype(np.int64)
    gt_area = np.count_nonzero(flat_gt, axis=1).astype(np.int64)
    intersection = np.count_nonzero(flat_pred & flat_gt, axis=1).astype(np.int64)
    union = pred_area + gt_area - intersection
    return {
        "intersection": intersection,
        "union": union,
        "pred_area": pred_area,
        "gt_area": gt_area,
        "iou": iou_from_counts(intersection, union),
        "dice": dice_from_counts(intersection, pred_area, gt_area),
    }


def pair_counts(pred: np.ndarray, gt: np.ndarray) -> MaskCounts:
    """Counts of one (H, W) prediction against its (H, W) ground truth."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"expected two (H, W) masks of the same shape, got {pred.shape} and {gt.shape}")
    batch = counts(pred[None], gt[None])
    return MaskCounts(
        intersection=int(batch["intersection"][0]),
        union=int(batch["union"][0]),
        pred_area=int(batch["pred_area"][0]),
        gt_area=int(batch["gt_area"][0]),
    )


@dataclass(frozen=True)
class Scores:
    """Aggregates of a set of masks, as fractions in [0, 1]; ``points`` gives them x100 for tables."""

    count: int
    giou: float
    ciou: float
    dice: float

    def points(self, metric: str) -> float:
        return 100.0 * getattr(self, metric)


def aggregate(rows: Sequence[Mapping[str, Any]]) -> Scores:
    """gIoU, cIoU and Dice of rows that carry ``intersection``, ``union``, ``iou`` and ``dice``.

    An empty selection has no score: it raises ValueError rather than invent one.
    """
    if not rows:
        raise ValueError("cannot aggregate an empty set of rows")
    intersection = sum(int(row["intersection"]) for row in rows)
    union = sum(int(row["union"]) for row in rows)
    return Scores(
        count=len(rows),
        giou=float(np.mean([row["iou"] for row in rows])),
        ciou=1.0 if union == 0 else intersection / union,
        dice=float(np.mean([row["dice"] for row in rows])),
    )


def group_scores(
    rows: Iterable[Mapping[str, Any]], key: str | Callable[[Mapping[str, Any]], Any]
) -> dict[Any, Scores]:
    """Aggregates per distinct value of ``key`` (a row field or a function of a row); None is a group too."""
    get = key if callable(key) else (lambda row: row.get(key))
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(get(row), []).append(row)
    return {value: aggregate(members) for value, members in groups.items()}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[Any, Scores]]:
    """``{"overall": {None: Scores}, "round": {1: ..}, "scenario": {..}, ...}`` for every grouping in GROUPINGS."""
    summary: dict[str, dict[Any, Scores]] = {"overall": {None: aggregate(rows)}}
    for grouping in GROUPINGS:
        summary[grouping] = group_scores(rows, grouping)
    return summary


def average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks, ties sharing the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, groups, sizes = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(groups, weights=ranks) / sizes)[groups]


def spearman(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either side is constant."""
    a, b = average_ranks(np.asarray(first)), average_ranks(np.asarray(second))
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
