"""Regression gate: compare a run's scores with a baseline metrics file, in x100 points.

Scopes compared: ``overall`` and every round present in both runs; metrics: Dice, gIoU, cIoU.
A round present in only one of the runs is not compared (its data differ, not its quality).
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


def compare(
    current_rows: Sequence[Mapping[str, Any]], baseline_parquet: str | os.PathLike, max_drop_points: float
) -> list[Regression]:
    """``compare_rows`` against the rows of a baseline Parquet file written by ``mediround eval``."""
    baseline_rows = read_rows(baseline_parquet)
    if not baseline_rows:
        raise DataError(str(baseline_parquet), None, None, "the baseline has no rows")
    return compare_rows(current_rows, baseline_rows, max_drop_points)
