"""``mediround validate``: check a dialogue file and the files it names."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mediround.data.validate import ValidationReport
from mediround.data.validate import validate as validate_data
from mediround_cli.common import console, err_console, handle_errors


def summary_table(report: ValidationReport) -> Table:
    stats = report.stats
    table = Table(title=f"{Path(report.file).name} ({report.format})", show_header=True)
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    table.add_row("dialogues", str(stats.dialogues))
    table.add_row("valid", str(stats.valid), style="green" if stats.valid == stats.dialogues else "red")
    table.add_row("problems", str(len(report.problems)))
    table.add_row("rounds", str(stats.rounds))
    for title, counter in (("scenario", stats.scenarios), ("modality", stats.modalities)):
        for name, count in sorted(counter.items()):
            table.add_row(f"{title}: {name}", str(count))
    for rounds, count in sorted(stats.rounds_per_dialogue.items()):
        table.add_row(f"dialogues with {rounds} round{'s' if rounds != 1 else ''}", str(count))
    return table


@click.command(epilog="""\b
Examples:
  mediround validate data/synth/train.jsonl
  mediround validate data/mr-medseg/train.json --root data/mr-medseg
  mediround validate data/sam-med2d                     # an SA-Med2D folder""")
@click.argument("data", type=click.Path(path_type=str))
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=str),
    help="Folder image/mask paths are relative to (default: the data file's folder).",
)
@click.option("--allow-outside-root", is_flag=True, help="Accept absolute paths and paths leaving the root.")
@handle_errors
def validate(data: str, root: str | None, allow_outside_root: bool) -> None:
    """Check DATA (JSONL, MR-MedSeg JSON or an SA-Med2D folder): syntax, rounds, refs, files, mask sizes."""
    columns = (TextColumn("checking files"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("validate", total=None)
        report = validate_data(
            data,
            root=root,
            allow_outside_root=allow_outside_root,
            on_dialogue=lambda done, total: progress.update(task, completed=done, total=total),
        )
    for problem in report.problems:
        console.print(problem.one_line(), soft_wrap=True, markup=False)
    console.print(summary_table(report))
    if not report.ok:
        console.print(
            f"[red]{len(report.problems)} problem(s); "
            f"{report.stats.dialogues - report.stats.valid} dialogue(s) invalid[/red]"
        )
        sys.exit(1)
    console.print("[green]all dialogues valid[/green]")
