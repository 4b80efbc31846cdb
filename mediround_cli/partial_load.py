"""``--allow-partial-load`` for every command that loads weights, and the table of what it left random."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from mediround_cli.common import err_console

MAX_SHOWN = 4

allow_partial_load_option = click.option(
    "--allow-partial-load", is_flag=True,
    help="Load weight files that miss or add keys or have mis-shaped tensors: what does not match stays at "
         "its random initialisation (or is ignored) and a table says which keys. Without it, any such key "
         "is an error.",
)


def _shown(keys: list[str]) -> str:
    more = f" (+{len(keys) - MAX_SHOWN} more)" if len(keys) > MAX_SHOWN else ""
    return ", ".join(keys[:MAX_SHOWN]) + more


def load_report_table(reports: Iterable[Any]) -> Table:
    """Per weight file (by name; the error lines give full paths), one row for each kind of surprise: keys
    left at random init (missing or mis-shaped) and keys ignored (unexpected); a file that matched gets one
    green row.

    Takes ``LoadReport`` objects or their ``asdict`` form (a training log's ``load`` event)."""
    table = Table(title="--allow-partial-load: weights left at random init / ignored", title_justify="left")
    table.add_column("weights file", no_wrap=True)
    table.add_column("what", no_wrap=True)
    table.add_column("keys", overflow="fold")
    for report in reports:
        fields = report if isinstance(report, Mapping) else vars(report)
        name = Path(fields["source"]).name
        rows = [
            ("missing (random)", list(fields["missing"])),
            ("mis-shaped (random)",
             [f"{key} {list(found)} vs {list(wanted)}" for key, found, wanted in fields["mismatched"]]),
            ("unexpected (ignored)", list(fields["unexpected"])),
        ]
        rows = [(what, keys) for what, keys in rows if keys]
        if not rows:
            table.add_row(name, "all keys matched", "-", style="green")
        for index, (what, keys) in enumerate(rows):
            table.add_row("" if index else name, f"{len(keys)} {what}", _shown(keys), style="yellow")
    return table


def print_load_reports(reports: Iterable[Any]) -> None:
    """Print the table on stderr (beside the progress bars), or one line when nothing was read from files."""
    reports = list(reports)
    if reports:
        err_console.print(load_report_table(reports))
    else:
        err_console.print("--allow-partial-load: no weight file was read (every part built from its config)")
