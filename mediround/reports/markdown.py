"""The gate as a short Markdown summary for a CI job page (GitHub's ``$GITHUB_STEP_SUMMARY``, a
merge-request comment): the verdict, one line per coverage failure, one table of the scores against the
baseline with the regressions first (x100, two decimals as in the JUnit messages; the confidence
interval of each drop under the statistical rule), and the per-round curve as an image link.
"""

from __future__ import annotations

import os
from pathlib import Path

from mediround.atomic import atomic_open
from mediround.metrics import METRIC_LABELS
from mediround.reports.gate import GateReport, interval_text, regressions_first, rule_text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _headline(report: GateReport) -> str:
    if report.baseline is None:
        return "scores (no baseline)" if report.passed else "scores (no baseline), dialogues skipped"
    return "gate passed" if report.passed else "gate failed"


def _description(report: GateReport) -> str:
    settings = report.settings
    scopes = ", ".join(settings.scopes)
    if report.baseline is None:
        return f"No baseline: every score is reported, none gated. Scopes: {scopes}."
    rule = "plain threshold" if settings.confidence is None else (
        f"paired bootstrap over dialogues, {settings.resamples} resamples, seed {settings.seed}")
    text = f"Against `{report.baseline}`: a score fails when {rule_text(settings)} ({rule}). Scopes: {scopes}"
    if settings.min_group_size > 1:
        text += f"; groups with fewer than {settings.min_group_size} dialogues are reported, not gated"
    return text + "."


def gate_markdown(report: GateReport, plot_link: str | None = None) -> str:
    """The Markdown summary of ``report``; ``plot_link``: where the per-round curve PNG is, as the link to
    write (relative to the summary's folder, say)."""
    lines = [f"### MediRound eval: {_headline(report)}", "", _description(report), ""]
    lines += [f"- **coverage:** {_cell(failure)}" for failure in report.coverage_failures]
    if report.coverage_failures:
        lines.append("")
    statistical = report.settings.confidence is not None
    if report.baseline is None:
        lines += ["| scope | metric | dialogues | score |", "|---|---|---:|---:|"]
        lines += [f"| {_cell(check.scope)} | {METRIC_LABELS[check.metric]} | {check.dialogues} | {check.current:.2f} |"
                  for check in report.scores]
    else:
        header = ["result", "scope", "metric", "dialogues", "baseline", "current", "drop"]
        if statistical:
            header.append(f"{report.settings.confidence:.0%} interval of the drop")
        lines += ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
        for check in regressions_first(report.scores):
            verdict = "**fail**" if check.failed else check.verdict
            baseline = "" if check.baseline is None else f"{check.baseline:.2f}"
            drop = "" if check.drop is None else f"{check.drop:.2f}"
            cells = [verdict, _cell(check.scope), METRIC_LABELS[check.metric], str(check.dialogues), baseline,
                     f"{check.current:.2f}", drop]
            if statistical:
                cells.append(interval_text(check.interval))
            lines.append("| " + " | ".join(cells) + " |")
    if plot_link is not None:
        lines += ["", f"![Score per round]({plot_link})"]
    return "\n".join(lines) + "\n"


def plot_link(plot: str | os.PathLike, summary: str | os.PathLike | None) -> str:
    """The link to ``plot`` from a summary written to the file ``summary`` (relative to its folder), or the
    path as given when the summary goes to stdout (``summary`` None) or lies on another Windows drive."""
    if summary is None:
        return Path(plot).as_posix()
    try:
        return Path(os.path.relpath(Path(plot).resolve(), Path(summary).resolve().parent)).as_posix()
    except ValueError:  # no relative path between two drives
        return Path(plot).resolve().as_posix()


def write_gate_markdown(path: str | os.PathLike, text: str) -> None:
    """Write a summary atomically (a CI system reads the file only after the step, whole)."""
    with atomic_open(path) as handle:
        handle.write(text)
