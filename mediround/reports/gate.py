"""Regression gate: compare a run's scores with a baseline metrics file, in x100 points, and refuse a run
that does not cover what the baseline covers.

Scores (``check_scores``): Dice, gIoU and cIoU of every group of the gated scopes present in both runs:
``overall``, each ``round N`` (the default scopes), and each ``modality X`` and ``scenario Y`` the data
carries when those scopes are asked for. A group with fewer baseline dialogues than
``GateSettings.min_group_size`` is reported but not gated (``overall`` is always gated). Two rules:

- plain threshold (the default): a score fails when it fell by more than ``max_drop`` points;
- statistical (``confidence`` set): a paired bootstrap over dialogues (``mediround.reports.bootstrap``)
  gives each drop a confidence interval, and a score fails only when the whole interval lies above
  ``max_drop``, so the drop exceeds the allowance at that confidence (one-sided, at (1 + c) / 2).

Coverage (``coverage_checks``): the gate also fails, one reason each, when the run has fewer
(dialogue, round) pairs than the baseline, when its dialogue ids differ from the baseline's, when no
prediction matched a round (every round scored as missing), or when any dialogue was skipped, so a
broken data file or the wrong baseline can never pass. Without a baseline (a first baseline) only the
skipped dialogues are checked and every score is reported, not gated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mediround.errors import DataError
from mediround.metrics import METRIC_LABELS, METRICS, aggregate
from mediround.reports.bootstrap import DEFAULT_RESAMPLES, paired_drop_intervals
from mediround.reports.rows import read_rows

FLOAT_SLACK = 1e-9  # so a drop of exactly the allowance (55.00000000000001 - 50.0 > 5.0) passes
GATE_SCOPES = ("overall", "round", "modality", "scenario")
DEFAULT_GATE_SCOPES = ("overall", "round")


@dataclass(frozen=True)
class GateSettings:
    """How the gate compares scores: the allowed drop in x100 points, the confidence of the statistical
    rule (None: plain threshold), the scopes, and the fewest baseline dialogues a group needs to be gated."""

    max_drop: float = 0.0
    confidence: float | None = None
    scopes: tuple[str, ...] = DEFAULT_GATE_SCOPES
    min_group_size: int = 1
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_drop < 0:
            raise ValueError(f"the allowed drop must be >= 0 points, got {self.max_drop}")
        if self.confidence is not None and not 0 < self.confidence < 1:
            raise ValueError(f"the confidence must lie strictly between 0 and 1, got {self.confidence}")
        unknown = set(self.scopes) - set(GATE_SCOPES)
        if unknown or not self.scopes:
            raise ValueError(f"gate scopes must be some of {', '.join(GATE_SCOPES)}, got {', '.join(self.scopes)}")
        if self.min_group_size < 1:
            raise ValueError(f"the minimum group size must be >= 1 dialogue, got {self.min_group_size}")


@dataclass(frozen=True)
class ScoreCheck:
    """One metric of one scope (all values x100): the current score, the baseline's (None without one),
    the baseline dialogues of the group, the confidence interval of the drop (statistical rule only), why
    the score is reported but not gated (None when gated), and whether it failed."""

    scope: str
    metric: str
    current: float
    baseline: float | None
    dialogues: int
    interval: tuple[float, float] | None = None
    not_gated: str | None = None
    failed: bool = False

    @property
    def drop(self) -> float | None:
        return None if self.baseline is None else self.baseline - self.current

    @property
    def verdict(self) -> str:
        """``fail``, ``pass`` or ``not gated`` (a group too small, not in the baseline, or no baseline)."""
        return "not gated" if self.not_gated is not None else ("fail" if self.failed else "pass")


@dataclass(frozen=True)
class CoverageCheck:
    """One coverage condition of the gate, and why it failed (None when it holds)."""

    name: str
    failure: str | None = None


@dataclass
class GateReport:
    """The gate's verdict on one run: every score checked or reported, every coverage condition."""

    settings: GateSettings
    scores: list[ScoreCheck]
    coverage: list[CoverageCheck]
    baseline: str | None = None
    """The baseline file compared with (None: a first baseline, nothing gated but the skipped dialogues)."""

    @property
    def regressions(self) -> list[ScoreCheck]:
        return [check for check in self.scores if check.failed]

    @property
    def coverage_failures(self) -> list[str]:
        return [check.failure for check in self.coverage if check.failure is not None]

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.coverage_failures


def regressions_first(checks: Sequence[ScoreCheck]) -> list[ScoreCheck]:
    """Failed scores, then the other gated ones, then those only reported, each in scope order."""
    return sorted(checks, key=lambda check: (not check.failed, check.not_gated is not None))


def rule_text(settings: GateSettings) -> str:
    """When a score fails, in words: ``its drop exceeds 1 point``, or ``the 95% interval of its drop lies
    above 1 point``."""
    points = f"{settings.max_drop:g} point{'' if settings.max_drop == 1 else 's'}"
    if settings.confidence is None:
        return f"its drop exceeds {points}"
    return f"the {settings.confidence:.0%} interval of its drop lies above {points}"


def interval_text(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f"{interval[0]:.2f} to {interval[1]:.2f}"


def check_message(check: ScoreCheck, settings: GateSettings) -> str:
    """One line on a score: the baseline and current values, the drop (and its interval) against
    ``--max-drop``, or why the score is not gated."""
    label = f"{METRIC_LABELS[check.metric]} of {check.scope}"
    if check.baseline is None:
        return f"{label}: {check.current:.2f}; reported, not gated: {check.not_gated}"
    values = f"baseline {check.baseline:.2f}, current {check.current:.2f}, drop {check.drop:.2f}"
    if check.interval is not None:
        values += f", {settings.confidence:.0%} interval {interval_text(check.interval)}"
    if check.not_gated is not None:
        return f"{label}: {values}; reported, not gated: {check.not_gated}"
    limit = f"--max-drop {settings.max_drop:g}"
    if check.interval is None:
        comparison = f"> {limit}" if check.failed else f"<= {limit}"
    else:
        comparison = f"all above {limit}" if check.failed else f"not all above {limit}"
    if check.failed:
        return f"{label} fell {check.drop:.2f} points: {values} {comparison}"
    return f"{label}: {values} {comparison}"


def scope_groups(rows: Sequence[Mapping[str, Any]], scopes: Sequence[str]) -> dict[str, list[Mapping[str, Any]]]:
    """The rows of each group of ``scopes``, in order: ``overall``, ``round 1``, ..., ``modality CT``, ...,
    ``scenario ...``; rows whose modality or scenario is unknown belong to no group of that scope."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    if "overall" in scopes and rows:
        groups["overall"] = list(rows)
    for scope in ("round", "modality", "scenario"):
        if scope not in scopes:
            continue
        members: dict[Any, list[Mapping[str, Any]]] = {}
        for row in rows:
            if row.get(scope) is not None:
                members.setdefault(row[scope], []).append(row)
        for value in sorted(members):
            groups[f"{scope} {value}"] = members[value]
    return groups


def _dialogue_count(rows: Sequence[Mapping[str, Any]]) -> int:
    return len({row["dialogue_id"] for row in rows})


def _is_failure(drop: float, interval: tuple[float, float] | None, max_drop: float) -> bool:
    lowest_drop = drop if interval is None else interval[0]
    return lowest_drop > max_drop + FLOAT_SLACK


def check_scores(
    current_rows: Sequence[Mapping[str, Any]], baseline_rows: Sequence[Mapping[str, Any]] | None,
    settings: GateSettings,
) -> list[ScoreCheck]:
    """Every (scope, metric) of the current run: compared with the baseline where both runs have the group
    and it is large enough, reported only otherwise (groups only in the baseline are not listed: the
    coverage checks catch what is missing)."""
    current = scope_groups(current_rows, settings.scopes)
    baseline = scope_groups(baseline_rows or [], settings.scopes)
    checks = []
    for scope, rows in current.items():
        now = aggregate(rows)
        before_rows = baseline.get(scope)
        if before_rows is None:
            reason = "no baseline" if baseline_rows is None else "not in the baseline"
            checks += [ScoreCheck(scope, metric, now.points(metric), None, _dialogue_count(rows), not_gated=reason)
                       for metric in METRICS]
            continue
        before = aggregate(before_rows)
        dialogues = _dialogue_count(before_rows)
        intervals = (paired_drop_intervals(before_rows, rows, settings.confidence, settings.resamples,
                                           settings.seed, stream=scope)
                     if settings.confidence is not None else {})
        not_gated = None
        if scope != "overall" and dialogues < settings.min_group_size:
            not_gated = f"{dialogues} dialogue(s), fewer than the minimum group size {settings.min_group_size}"
        for metric in METRICS:
            points_before, points_now, interval = before.points(metric), now.points(metric), intervals.get(metric)
            failed = not_gated is None and _is_failure(points_before - points_now, interval, settings.max_drop)
            checks.append(ScoreCheck(scope, metric, points_now, points_before, dialogues, interval, not_gated, failed))
    return checks


def _examples(ids: set[str]) -> str:
    shown = sorted(ids)[:3]
    return ", ".join(shown) + (", ..." if len(ids) > len(shown) else "")


def coverage_checks(
    current_rows: Sequence[Mapping[str, Any]], baseline_rows: Sequence[Mapping[str, Any]] | None, skipped: int
) -> list[CoverageCheck]:
    """Each coverage condition and why it failed: skipped dialogues, and with a baseline, fewer (dialogue,
    round) pairs, other dialogue ids, and no prediction matching a round."""
    checks = [CoverageCheck("skipped dialogues", f"{skipped} dialogue(s) skipped (reasons listed above and in "
                                                 f"errors.jsonl)" if skipped else None)]
    if baseline_rows is None:
        return checks
    current = {(r["dialogue_id"], r["round"]) for r in current_rows}
    baseline = {(r["dialogue_id"], r["round"]) for r in baseline_rows}
    fewer = len(current) < len(baseline)
    checks.append(CoverageCheck("(dialogue, round) pairs", f"the run covers {len(current)} (dialogue, round) pairs, "
                                f"fewer than the baseline's {len(baseline)}" if fewer else None))
    current_ids = {dialogue_id for dialogue_id, _ in current}
    baseline_ids = {dialogue_id for dialogue_id, _ in baseline}
    differ = current_ids != baseline_ids
    checks.append(CoverageCheck("dialogue ids", f"dialogue ids differ from the baseline's: "
                                f"{len(current_ids - baseline_ids)} only in this run "
                                f"({_examples(current_ids - baseline_ids)}), {len(baseline_ids - current_ids)} only "
                                f"in the baseline ({_examples(baseline_ids - current_ids)})" if differ else None))
    unmatched = bool(current_rows) and all(r.get("missing") for r in current_rows)
    checks.append(CoverageCheck("predictions matched", "no prediction matched a round of the data (every round "
                                "scored as missing): wrong data file?" if unmatched else None))
    return checks


def run_gate(
    current_rows: Sequence[Mapping[str, Any]], baseline_rows: Sequence[Mapping[str, Any]] | None, skipped: int,
    settings: GateSettings, baseline: str | os.PathLike | None = None,
) -> GateReport:
    """The gate's verdict on ``current_rows`` against ``baseline_rows`` (None: a first baseline) read from
    ``baseline``, with ``skipped`` dialogues skipped before or during scoring."""
    return GateReport(settings=settings, scores=check_scores(current_rows, baseline_rows, settings),
                      coverage=coverage_checks(current_rows, baseline_rows, skipped),
                      baseline=None if baseline is None else str(baseline))


def read_baseline(baseline_parquet: str | os.PathLike) -> list[dict]:
    """The rows of a baseline Parquet file written by ``mediround eval``; ``DataError`` when it has none."""
    baseline_rows = read_rows(baseline_parquet)
    if not baseline_rows:
        raise DataError(str(baseline_parquet), None, None, "the baseline has no rows")
    return baseline_rows
