"""Shared CLI plumbing: one-line errors, exit codes, the console, summary tables."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mediround.errors import InputWarning, MediRoundError

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

GATE_FAILED_EXIT_CODE = 1
"""``eval --baseline``: a score fell, or the run does not cover what the baseline covers."""
BAD_INPUT_EXIT_CODE = 2
"""Bad input or usage, refused before any work (one ``error:`` line)."""
SKIPPED_EXIT_CODE = 3
"""A batch command (infer, eval, build-dialogues) finished but skipped bad input (listed, and in its
errors.jsonl): never 0, so a broken data file cannot make CI green; distinct from 1 and 2, and from an
unexpected crash (a Python traceback, exit 1 as Python sets it)."""


def exit_skipped(skipped: int, what: str, where: str) -> None:
    """When a batch skipped input: say how much and where the reasons are, and exit ``SKIPPED_EXIT_CODE``."""
    if skipped:
        err_console.print(f"[yellow]{skipped} {what} skipped[/yellow]; reasons in {where}", soft_wrap=True)
        sys.exit(SKIPPED_EXIT_CODE)


def count_table(title: str) -> Table:
    """The empty (what, count) table a batch command's summary fills."""
    table = Table(title=title)
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    return table


def add_count_rows(table: Table, groups: Iterable[tuple[str, Mapping[str, int]]]) -> None:
    """A ``title: name`` row per name of each (title, counts) group, names in order."""
    for title, counter in groups:
        for name, count in sorted(counter.items()):
            table.add_row(f"{title}: {name}", str(count))


def debug_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("debug"))


def _show_warning(fallback: Callable[..., None], message: Warning | str, category: type[Warning],
                  *args: Any, **kwargs: Any) -> None:
    """An ``InputWarning`` is one yellow line on stderr; other warnings keep Python's format."""
    if issubclass(category, InputWarning):
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True)
    else:
        fallback(message, category, *args, **kwargs)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors, and file system errors that escaped them (disk full, no permission), into one
    red line on stderr and a non-zero exit (full traceback with --debug); input warnings into one yellow
    line each."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default", InputWarning)
                previous = warnings.showwarning
                warnings.showwarning = functools.partial(_show_warning, previous)
                return func(*args, **kwargs)
        except MediRoundError as error:
            if debug_enabled():
                raise
            err_console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
            sys.exit(error.exit_code)
        except OSError as error:
            if debug_enabled():
                raise
            where = f"{error.filename}: " if error.filename else ""
            err_console.print(f"[red]error:[/red] {escape(where + (error.strerror or str(error)))}", soft_wrap=True)
            sys.exit(BAD_INPUT_EXIT_CODE)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]")
            sys.exit(130)

    return wrapper
