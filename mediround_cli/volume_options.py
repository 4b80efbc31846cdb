"""The volume options ``build-dialogues`` and ``chat VOLUME`` share, with one spelling and one parser each:
``--slices every|largest|A:B`` and ``--window auto|abdomen|lung|bone|brain|percentile|LEVEL,WIDTH``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mediround.data.build.volumes import CT_WINDOWS, check_window, parse_slices

WINDOW_HELP = ("CT window ({}; level,width in HU), percentile (0.5-99.5th percentile of the volume) or a "
               "numeric LEVEL,WIDTH; auto: abdomen for CT, percentile otherwise.").format(
    ", ".join(f"{name} {level:g},{width:g}" for name, (level, width) in CT_WINDOWS.items()))


def _slices(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, tuple[int | None, int | None] | None]:
    try:
        return parse_slices(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None


def _window(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_window(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None


def slices_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--slices``, parsed to (rule, span) (``mediround.data.build.volumes.parse_slices``)."""
    return click.option("--slices", "slices", default="every", show_default=True, metavar="every|largest|A:B",
                        callback=_slices, help=help_text)


window_option = click.option("--window", "window", default="auto", show_default=True,
                             metavar="auto|abdomen|lung|bone|brain|percentile|LEVEL,WIDTH", callback=_window,
                             help=WINDOW_HELP)
