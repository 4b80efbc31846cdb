"""Rich tables of scores (x100, one decimal, as in the paper). Each function returns a renderable."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from mediround.metrics import METRIC_LABELS, METRICS, Scores
from mediround.reports.gate import GateSettings, ScoreCheck, interval_text, regressions_first, rule_text

NAMES_TARGET_LABELS = {True: "named in the text", False: "reference only", None: "unknown"}
GROUP_TITLES = {
    "scenario": "Per scenario",
    "modality": "Per modality",
    "difficulty": "Per difficulty",
    "names_target": "Target named vs reference only",
}
GROUP_COLUMNS = {"names_target": "target"}
DIFFICULTY_ORDER = ("regular", "hard")


def _points(scores: Scores, metric: str) -> str:
    return f"{scores.points(metric):.1f}"


def _label(grouping: str, value: Any) -> str:
    if grouping == "names_target":
        return NAMES_TARGET_LABELS[value]
    return "unknown" if value is None else str(value)


def _sorted_groups(groups: Mapping[Any, Scores]) -> list[tuple[Any, Scores]]:
    """Known values in order (``regular`` before ``hard`` as in the paper, named before reference-only), None last."""

    def order(item: tuple[Any, Scores]) -> tuple:
        value = item[0]
        if isinstance(value, bool):
            rank = 0 if value else 1
        else:
            rank = DIFFICULTY_ORDER.index(value) if value in DIFFICULTY_ORDER else len(DIFFICULTY_ORDER)
        return (value is None, rank, str(value))

    return sorted(groups.items(), key=order)


def _table(title: str) -> Table:
    """A table at least as wide as its title, so narrow tables do not wrap their title."""
    return Table(title=title, min_width=len(title) + 4)


def overall_table(summary: Mapping[str, Mapping[Any, Scores]], title: str = "Overall (x100)") -> Table:
    """Dice, gIoU and cIoU over all scored rounds, with the number of masks."""
    overall = summary["overall"][None]
    table = _table(title=title)
    table.add_column("masks", justify="right")
    for metric in METRICS:
        table.add_column(METRIC_LABELS[metric], justify="right")
    table.add_row(str(overall.count), *(_points(overall, metric) for metric in METRICS))
    return table


def round_table(summary: Mapping[str, Mapping[Any, Scores]], title: str = "Per round (x100)") -> Table:
    """Table 2 of the paper, transposed so that 12 rounds fit a terminal: one row per round, then overall."""
    overall = summary["overall"][None]
    table = _table(title)
    table.add_column("round")
    table.add_column("masks", justify="right")
    for metric in METRICS:
        table.add_column(METRIC_LABELS[metric], justify="right")
    for number, scores in sorted(summary["round"].items()):
        table.add_row(f"Round #{number}", str(scores.count), *(_points(scores, metric) for metric in METRICS))
    table.add_section()
    table.add_row("overall", str(overall.count), *(_points(overall, metric) for metric in METRICS), style="bold")
    return table


def group_table(summary: Mapping[str, Mapping[Any, Scores]], grouping: str, title: str | None = None) -> Table:
    """One row per value of ``grouping`` (scenario, modality, difficulty, names_target), unknown last."""
    table = _table(title or f"{GROUP_TITLES.get(grouping, grouping)} (x100)")
    table.add_column(GROUP_COLUMNS.get(grouping, grouping))
    table.add_column("masks", justify="right")
    for metric in METRICS:
        table.add_column(METRIC_LABELS[metric], justify="right")
    for value, scores in _sorted_groups(summary[grouping]):
        table.add_row(_label(grouping, value), str(scores.count), *(_points(scores, metric) for metric in METRICS))
    return table


def difficulty_table(summary: Mapping[str, Mapping[Any, Scores]], title: str = "Overall and per difficulty (x100)") -> Table:
    """Table 1 layout: column groups ``overall``, then each difficulty (regular, hard, ...), each Dice/gIoU/cIoU.

    The group name heads only its first column, like the paper's merged header cells.
    """
    groups = [("overall", summary["overall"][None])]
    groups += [(_label("difficulty", value), scores) for value, scores in _sorted_groups(summary["difficulty"])]
    table = _table(title)
    for name, scores in groups:
        for index, metric in enumerate(METRICS):
            table.add_column(f"{name if index == 0 else ''}\n{METRIC_LABELS[metric]}", justify="right")
    table.add_row(*(_points(scores, metric) for _, scores in groups for metric in METRICS))
    table.add_row(*(f"n={scores.count}" if metric == "dice" else "" for _, scores in groups for metric in METRICS),
                  style="dim")
    return table


def missing_table(missing: Sequence[tuple[str, int]], limit: int = 20) -> Table:
    """Rounds scored as empty masks because their prediction was absent or unusable (first ``limit``)."""
    table = _table(title=f"Missing predictions scored as empty: {len(missing)}")
    table.add_column("dialogue")
    table.add_column("round", justify="right")
    for dialogue_id, number in missing[:limit]:
        table.add_row(dialogue_id, str(number))
    if len(missing) > limit:
        table.add_row(f"... and {len(missing) - limit} more", "")
    return table


def regression_table(regressions: Sequence[ScoreCheck], max_drop: float) -> Table:
    """What fell by more than ``max_drop`` points against the baseline (with the interval of each drop
    under the statistical gate)."""
    table = _table(title=f"Regressions (drop > {max_drop:g} points)")
    intervals = any(regression.interval is not None for regression in regressions)
    table.add_column("scope")
    table.add_column("metric")
    table.add_column("baseline", justify="right")
    table.add_column("current", justify="right")
    table.add_column("drop", justify="right", style="red")
    if intervals:
        table.add_column("interval", justify="right", style="red")
    for regression in regressions:
        cells = [regression.scope, METRIC_LABELS[regression.metric], f"{regression.baseline:.2f}",
                 f"{regression.current:.2f}", f"{regression.drop:.2f}"]
        table.add_row(*cells, *([interval_text(regression.interval)] if intervals else []))
    return table


def interval_table(checks: Sequence[ScoreCheck], settings: GateSettings) -> Table:
    """The statistical gate: the drop of every compared score with its confidence interval, failures first
    (n: the group's baseline dialogues)."""
    table = _table(title=f"Gate (x100 points): a score fails when {rule_text(settings)}")
    table.add_column("scope", overflow="fold", min_width=16)
    for column in ("metric", "n", "drop", f"{settings.confidence:.0%} interval", "result"):
        table.add_column(column, justify="left" if column in ("metric", "result") else "right", no_wrap=True)
    for check in regressions_first(checks):
        if check.baseline is None:
            continue
        table.add_row(check.scope, METRIC_LABELS[check.metric], str(check.dialogues), f"{check.drop:.2f}",
                      interval_text(check.interval), check.verdict,
                      style="red" if check.failed else ("dim" if check.not_gated else None))
    return table
