"""Regression gate: compare a run's scores with a baseline metrics file, in x100 points, and refuse a run
that does not cover what the baseline covers.

Scores (``compare_rows``): ``overall`` and every round present in both runs; metrics: Dice, gIoU, cIoU.
Coverage (``coverage_failures``): the gate also fails, one reason each, when the run has fewer
(dialogue, round) pairs than the baseline, when its dialogue ids differ from the baseline's, when no
prediction matched a round (every round scored as missing), or when any dialogue was skipped, so a
broken data file or the wrong baseline can never pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mediround.errors import DataError
from mediround.metrics import METRICS, Scores, aggregate, group_scores
from mediround.reports.rows import read_rows

FLOAT_SLACK = 1e-9  # so a drop of exactly the allowance (55.00000000000001 - 50.0 > 5.0) passes


@dataclass(frozen=True)
class Regression:
    """One metric of one scope that fell by more than the allowed drop (all values x100)."""

    scope: str
    metric: str
    baseline: float
    current: float

    @property
    def drop(self) -> float:
        return self.baseline - self.current


def _scopes(rows: Sequence[Mapping[str, Any]]) -> dict[str, Scores]:
    scopes = {"overall": aggregate(rows)}
    for number, scores in sorted(group_scores(rows, "round").items()):
        scopes[f"round {number}"] = scores
    return scopes


def compare_rows(
    current_rows: Sequence[Mapping[str, Any]], baseline_rows: Sequence[Mapping[str, Any]], max_drop_points: float
) -> list[Regression]:
    """Every (scope, metric) whose score fell by more than ``max_drop_points`` x100 points."""
    if max_drop_points < 0:
        raise ValueError(f"the allowed drop must be >= 0 points, got {max_drop_points}")
    current = _scopes(current_rows)
    baseline = _scopes(baseline_rows)
    regressions = []
    for scope, base_scores in baseline.items():
        if scope not in current:
            continue
        for metric in METRICS:
            before, after = base_scores.points(metric), current[scope].points(metric)
            if before - after > max_drop_points + FLOAT_SLACK:
                regressions.append(Regression(scope=scope, metric=metric, baseline=before, current=after))
    return regressions


def _examples(ids: set[str]) -> str:
    shown = sorted(ids)[:3]
    return ", ".join(shown) + (", ..." if len(ids) > len(shown) else "")


def coverage_failures(
    current_rows: Sequence[Mapping[str, Any]], baseline_rows: Sequence[Mapping[str, Any]], skipped: int
) -> list[str]:
    """Why the run cannot be compared with the baseline (empty when it can): one reason per line."""
    reasons = []
    if skipped:
        reasons.append(f"{skipped} dialogue(s) skipped (reasons listed above and in errors.jsonl)")
    current = {(r["dialogue_id"], r["round"]) for r in current_rows}
    baseline = {(r["dialogue_id"], r["round"]) for r in baseline_rows}
    if len(current) < len(baseline):
        reasons.append(f"the run covers {len(current)} (dialogue, round) pairs, fewer than the baseline's {len(baseline)}")
    current_ids = {dialogue_id for dialogue_id, _ in current}
    baseline_ids = {dialogue_id for dialogue_id, _ in baseline}
    if current_ids != baseline_ids:
        reasons.append(f"dialogue ids differ from the baseline's: {len(current_ids - baseline_ids)} only in this run "
                       f"({_examples(current_ids - baseline_ids)}), {len(baseline_ids - current_ids)} only in the "
                       f"baseline ({_examples(baseline_ids - current_ids)})")
    if current_rows and all(r.get("missing") for r in current_rows):
        reasons.append("no prediction matched a round of the data (every round scored as missing): wrong data file?")
    return reasons


def read_baseline(baseline_parquet: str | os.PathLike) -> list[dict]:
    """The rows of a baseline Parquet file written by ``mediround eval``; ``DataError`` when it has none."""
    baseline_rows = read_rows(baseline_parquet)
    if not baseline_rows:
        raise DataError(str(baseline_parquet), None, None, "the baseline has no rows")
    return baseline_rows

