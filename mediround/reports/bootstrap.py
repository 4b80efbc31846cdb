"""Paired bootstrap over dialogues: how sure a drop between two runs of the same dialogues is.

Both runs are resampled with the same draws of dialogues (with replacement), so what a dialogue brings to
both runs (an easy case stays easy) cancels out and only the change between the runs varies. The dialogue
is the unit, not the round: its rounds share an image and a chain of references, so they are not
independent. The draws are over every dialogue of either run; a dialogue only one run holds (a group
whose members differ between the runs) counts on its side alone, so such a group gets the wider interval
of two unpaired samples rather than a falsely narrow one from the few dialogues both hold. A resample
that draws no dialogue of one side is left out. Each resample recomputes Dice (mean per-mask Dice), gIoU (mean per-mask IoU) and cIoU
(sum I / sum U) from per-dialogue sums, so every metric keeps its definition (``mediround.metrics``). The
interval is the percentile interval of the drop (baseline - current, x100) over the resamples.

Resampling is seeded by ``seed`` and the name of the group (``stream``), so the interval of a group is the
same on every run of the same rows, whichever other groups are gated.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mediround.metrics import METRICS

DEFAULT_RESAMPLES = 2000
_SUMMED = ("intersection", "union", "iou", "dice")


def _dialogue_sums(rows: Sequence[Mapping[str, Any]], index: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per dialogue of ``index``: the number of masks and the sums of the fields the metrics need."""
    kept = [row for row in rows if row["dialogue_id"] in index]
    positions = np.array([index[row["dialogue_id"]] for row in kept], dtype=np.int64)
    sums = {"masks": np.bincount(positions, minlength=len(index)).astype(np.float64)}
    for name in _SUMMED:
        values = np.array([row[name] for row in kept], dtype=np.float64)
        sums[name] = np.bincount(positions, weights=values, minlength=len(index))
    return sums


def _draw_counts(rng: np.random.Generator, dialogues: int, resamples: int) -> np.ndarray:
    """``counts[b, d]``: how often resample b drew dialogue d (each resample draws ``dialogues`` times)."""
    draws = rng.integers(0, dialogues, size=(resamples, dialogues))
    flat = (draws + dialogues * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * dialogues).reshape(resamples, dialogues).astype(np.float64)


def _resampled_points(weights: np.ndarray, sums: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each metric (x100) of each resample (NaN where it drew no mask of this side); ``weights[b, d]``: how
    often resample b drew dialogue d."""
    masks = weights @ sums["masks"]
    union = weights @ sums["union"]
    drawn = np.where(masks == 0, np.nan, masks)
    ciou = np.where(union == 0, 1.0, (weights @ sums["intersection"]) / np.where(union == 0, 1.0, union))
    return {"dice": 100.0 * (weights @ sums["dice"]) / drawn, "giou": 100.0 * (weights @ sums["iou"]) / drawn,
            "ciou": np.where(masks == 0, np.nan, 100.0 * ciou)}


def paired_drop_intervals(
    baseline_rows: Sequence[Mapping[str, Any]], current_rows: Sequence[Mapping[str, Any]], confidence: float,
    resamples: int = DEFAULT_RESAMPLES, seed: int = 0, stream: str = "",
) -> dict[str, tuple[float, float]]:
    """``{metric: (low, high)}``: the ``confidence`` percentile interval of each metric's drop, in x100
    points, over ``resamples`` paired resamples of the dialogues of either row set (empty when a row set is
    empty)."""
    if not 0 < confidence < 1:
        raise ValueError(f"the confidence must lie strictly between 0 and 1, got {confidence}")
    if not baseline_rows or not current_rows:
        return {}
    drawn = sorted({row["dialogue_id"] for row in baseline_rows} | {row["dialogue_id"] for row in current_rows})
    index = {dialogue_id: position for position, dialogue_id in enumerate(drawn)}
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode("utf-8"))])
    weights = _draw_counts(rng, len(drawn), resamples)
    before = _resampled_points(weights, _dialogue_sums(baseline_rows, index))
    now = _resampled_points(weights, _dialogue_sums(current_rows, index))
    tail = (1.0 - confidence) / 2.0
    intervals = {}
    for metric in METRICS:
        low, high = np.nanquantile(before[metric] - now[metric], [tail, 1.0 - tail])
        intervals[metric] = (float(low), float(high))
    return intervals
