"""PNG plots drawn with pillow: the per-round curve (score x100 against the round number), and the one
line chart that it, the beta curve and the benchmark pages are drawn with."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from mediround.atomic import atomic_path
from mediround.metrics import METRIC_LABELS, Scores

CURVE_COLOURS = {"ciou": (31, 119, 180), "dice": (214, 39, 40), "giou": (44, 160, 44)}
WIDTH, HEIGHT = 800, 500
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 80, 30, 50, 70
LEGEND_MIN_WIDTH = 130


@dataclass
class Curve:
    """One line of a chart: its legend label, colour and (x offset, score x100) points."""

    label: str
    colour: tuple[int, int, int]
    points: Sequence[tuple[float, float]]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def metric_curves(points: Mapping[str, Sequence[tuple[float, float]]]) -> list[Curve]:
    """Curves of metrics (``ciou``, ``dice``, ``giou``), in their usual labels and colours."""
    return [Curve(METRIC_LABELS[metric], CURVE_COLOURS[metric], curve) for metric, curve in points.items()]


def line_chart(
    path: str | os.PathLike,
    curves: Sequence[Curve],
    *,
    x_extent: float,
    x_ticks: Sequence[tuple[float, str]],
    x_label: str,
    y_label: str,
    title: str,
    y_range: tuple[int, int] = (0, 100),
    y_step: int = 20,
    y_tick_marks: bool = False,
    note: tuple[float, float, str] | None = None,
    width: int = WIDTH,
    legend_beside: bool = False,
) -> None:
    """Write a PNG line chart of scores x100 with grid, axes, a boxed legend top right and a title.

    Each curve's x is an offset in [0, ``x_extent``] from the left end (an extent of 0: one point, drawn
    in the middle); ``x_ticks`` are (x, label) pairs; y runs over ``y_range`` with a grid line every
    ``y_step``; ``note`` writes a text above the point (x, score), after the curves. ``legend_beside``
    keeps the curves left of the legend (for long labels) instead of drawing the legend over the plot.
    """
    image = Image.new("RGB", (width, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    label_font, title_font = _font(14), _font(18)
    left, right = MARGIN_LEFT, width - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM
    legend_width = max([LEGEND_MIN_WIDTH] + [draw.textlength(c.label, font=label_font) + 50 for c in curves])
    plot_right = right - legend_width - 10 if legend_beside else right
    low, high = y_range

    def x_of(offset: float) -> float:
        if x_extent == 0:
            return (left + plot_right) / 2
        return left + 20 + (plot_right - left - 40) * offset / x_extent

    def y_of(points: float) -> float:
        return bottom - (bottom - top) * (points - low) / (high - low)

    for tick in range(low, high + 1, y_step):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        if y_tick_marks:
            draw.line([(left - 5, y), (left, y)], fill="black")
        draw.text((left - 9, y), str(tick), fill="black", font=label_font, anchor="rm")
    for offset, label in x_ticks:
        x = x_of(offset)
        draw.line([(x, bottom), (x, bottom + 5)], fill="black")
        draw.text((x, bottom + 9), label, fill="black", font=label_font, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    draw.text(((left + right) / 2, HEIGHT - 20), x_label, fill="black", font=label_font, anchor="mm")
    draw.text((left, top - 10), y_label, fill="black", font=label_font, anchor="lb")
    draw.text((width / 2, 22), title, fill="black", font=title_font, anchor="mm")

    for curve in curves:
        points = [(x_of(offset), y_of(value)) for offset, value in curve.points]
        if len(points) > 1:
            draw.line(points, fill=curve.colour, width=3)
        for x, y in points:
            draw.ellipse([(x - 4, y - 4), (x + 4, y + 4)], fill=curve.colour)
    if note is not None:
        offset, value, text = note
        draw.text((x_of(offset), y_of(value) - 10), text, fill="black", font=label_font, anchor="mb")

    legend_x, legend_y = right - legend_width, top + 10
    draw.rectangle([(legend_x - 10, legend_y - 8), (right - 10, legend_y + 22 * len(curves))],
                   fill="white", outline=(150, 150, 150))
    for index, curve in enumerate(curves):
        y = legend_y + 6 + 22 * index
        draw.line([(legend_x, y), (legend_x + 30, y)], fill=curve.colour, width=3)
        draw.text((legend_x + 40, y), curve.label, fill="black", font=label_font, anchor="lm")

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def round_curve(
    round_scores: Mapping[int, Scores],
    path: str | os.PathLike,
    metrics: tuple[str, ...] = ("ciou", "dice"),
    title: str = "Score per round",
) -> None:
    """Draw ``metrics`` (x100) against the round number, with axes, ticks, grid and a legend; write a PNG.

    ``round_scores`` maps 1-based round numbers to their aggregates (``summarize(rows)["round"]``).
    """
    if not round_scores:
        raise ValueError("no rounds to plot")
    rounds = sorted(round_scores)
    curves = {metric: [(number - rounds[0], round_scores[number].points(metric)) for number in rounds]
              for metric in metrics}
    line_chart(path, metric_curves(curves), x_extent=rounds[-1] - rounds[0],
                x_ticks=[(number - rounds[0], str(number)) for number in rounds], x_label="round",
                y_label="score (x100)", title=title, y_tick_marks=True)
