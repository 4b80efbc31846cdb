"""The CI side of ``mediround eval``: how the gate judges (``--confidence``, ``--gate-scopes``,
``--min-group-size``), the reports a CI system reads (``--junit-xml``, ``--summary-md``) and
``--write-baseline``. Both ways of scoring (a predictions folder, or ``--model``) take them.

Light on purpose, like ``output``: no torch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import click

from mediround.errors import MediRoundError
from mediround.reports.gate import DEFAULT_GATE_SCOPES, GATE_SCOPES, GateReport, GateSettings
from mediround.reports.junit import write_junit, write_refusal_junit
from mediround.reports.markdown import gate_markdown, plot_link, write_gate_markdown
from mediround_cli.common import console, err_console
from mediround_cli.output import print_gate

STDOUT = "-"


def _parse_scopes(ctx: click.Context, param: click.Parameter, text: str) -> tuple[str, ...]:
    scopes = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [scope for scope in scopes if scope not in GATE_SCOPES]
    if unknown or not scopes:
        raise click.BadParameter(f"'{text}': give some of {', '.join(GATE_SCOPES)}, comma-separated")
    return tuple(dict.fromkeys(scopes))


GATE_OPTIONS = (
    click.option("--confidence", type=click.FloatRange(0.5, 1.0, max_open=True), default=None,
                 help="Statistical gate: fail a score only when its drop exceeds --max-drop at this confidence "
                      "(paired bootstrap over dialogues, e.g. 0.95; docs/ci.md). [default: plain threshold]"),
    click.option("--gate-scopes", default=",".join(DEFAULT_GATE_SCOPES), show_default=True, callback=_parse_scopes,
                 metavar="LIST", help=f"Scopes gated, comma-separated: {', '.join(GATE_SCOPES)} (each modality or "
                                      "scenario the data carries)."),
    click.option("--min-group-size", type=click.IntRange(min=1), default=1, show_default=True, metavar="DIALOGUES",
                 help="A group (round, modality, scenario) with fewer baseline dialogues is reported, not gated."),
    click.option("--junit-xml", type=click.Path(dir_okay=False, path_type=Path),
                 help="Write the gate as JUnit XML (one case per score and coverage check), pass or fail; also "
                      "when the run is refused before scoring."),
    click.option("--summary-md", metavar="FILE|-",
                 help="Write a Markdown summary (scores against the baseline, regressions first; e.g. "
                      "\"$GITHUB_STEP_SUMMARY\"); '-': to stdout, the rest of the output to stderr."),
    click.option("--write-baseline", type=click.Path(dir_okay=False, path_type=Path),
                 help="Write the metric rows here as the next baseline when the gate passes (without --baseline: "
                      "when no dialogue was skipped); refused, with the gate's exit code, otherwise."),
)


@dataclass
class GateOptions:
    """The values of ``GATE_OPTIONS``, and whether the reports were written."""

    confidence: float | None = None
    gate_scopes: tuple[str, ...] = DEFAULT_GATE_SCOPES
    min_group_size: int = 1
    junit_xml: Path | None = None
    summary_md: str | None = None
    write_baseline: Path | None = None
    reports_written: bool = field(default=False, init=False)

    def settings(self, max_drop: float) -> GateSettings:
        return GateSettings(max_drop=max_drop, confidence=self.confidence, scopes=self.gate_scopes,
                            min_group_size=self.min_group_size)

    def write_reports(self, report: GateReport, manifest: Mapping[str, Any] | None, plot: Path | None) -> None:
        """The JUnit XML and Markdown reports asked for (the plot linked from the Markdown when drawn)."""
        if self.junit_xml is not None:
            write_junit(self.junit_xml, report, manifest)
        if self.summary_md is not None:
            to_file = self.summary_md != STDOUT
            link = None if plot is None else plot_link(plot, self.summary_md if to_file else None)
            self._write_markdown(gate_markdown(report, link))
        self.reports_written = True

    def write_refusal(self, reason: str) -> None:
        """Reports saying that the run was refused before any score, unless the full ones were written."""
        if self.reports_written:
            return
        if self.junit_xml is not None:
            write_refusal_junit(self.junit_xml, reason)
        if self.summary_md is not None:
            self._write_markdown(f"### MediRound eval: refused\n\n{reason}\n")

    def _write_markdown(self, text: str) -> None:
        if self.summary_md == STDOUT:
            click.echo(text, nl=False)
        else:
            write_gate_markdown(self.summary_md, text)


@contextlib.contextmanager
def _human_output_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--summary-md -``, stdout carries the Markdown alone: tables and lines go to stderr meanwhile."""
    previous = console.stderr
    console.stderr = previous or enabled
    try:
        yield
    finally:
        console.stderr = previous


def gate_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``GATE_OPTIONS`` to a click command (below ``handle_errors``) and hand their values to it as one
    ``GateOptions`` argument, ``gate``. A run refused with bad input (exit 2) still writes its reports,
    each saying why, so that a CI job shows the reason beside the red mark."""
    names = [option.name for option in fields(GateOptions) if option.init]

    @functools.wraps(command)
    def gathered(*args: Any, **kwargs: Any) -> Any:
        gate = GateOptions(**{name: kwargs.pop(name) for name in names})
        with _human_output_to_stderr(gate.summary_md == STDOUT):
            try:
                return command(*args, gate=gate, **kwargs)
            except (MediRoundError, click.UsageError) as error:
                gate.write_refusal(str(error))
                raise

    for option in reversed(GATE_OPTIONS):
        gathered = option(gathered)
    return gathered


def finish_gate(report: GateReport, gate: GateOptions, manifest: Mapping[str, Any] | None, plot: Path | None,
                baseline_written: Path | None, scores: str = "scores") -> None:
    """Write the reports, say whether the next baseline was written, then, with a baseline, print the gate's
    verdict (exit 1 when it failed)."""
    gate.write_reports(report, manifest, plot)
    if gate.write_baseline is not None:
        if baseline_written is not None:
            console.print(f"next baseline written: {baseline_written}", soft_wrap=True)
        else:
            why = "the gate failed" if report.baseline is not None else "dialogues were skipped"
            err_console.print(f"[red]next baseline not written[/red] to {gate.write_baseline}: {why}", soft_wrap=True)
    if report.baseline is not None:
        print_gate(report, scores)
