"""The JCM threshold plot (the paper's Figure 7): overall score x100 against beta, drawn with pillow."""

from __future__ import annotations

import os
from collections.abc import Mapping

from PIL import Image, ImageDraw, ImageFont

from mediround.atomic import atomic_path
from mediround.metrics import METRIC_LABELS, Scores
from mediround.reports.plots import (
    CURVE_COLOURS,
    HEIGHT,
    MARGIN_BOTTOM,
    MARGIN_LEFT,
    MARGIN_RIGHT,
    MARGIN_TOP,
    WIDTH,
)


def beta_curve(
    beta_scores: Mapping[float, Scores],
    path: str | os.PathLike,
    metrics: tuple[str, ...] = ("ciou", "giou", "dice"),
    title: str = "Score against the JCM threshold beta",
) -> None:
    """Draw ``metrics`` (x100, overall) against beta in [0, 1], marking the best beta of the first metric."""
    if not beta_scores:
        raise ValueError("no betas to plot")
    betas = sorted(beta_scores)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    label_font, title_font = ImageFont.load_default(size=14), ImageFont.load_default(size=18)
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM

    def x_of(beta: float) -> float:
        return left + 20 + (right - left - 40) * beta

    def y_of(points: float) -> float:
        return bottom - (bottom - top) * points / 100.0

    for tick in range(0, 101, 20):
        y = y_of(tick)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225))
        draw.text((left - 9, y), str(tick), fill="black", font=label_font, anchor="rm")
    for tenth in range(0, 11, 2):
        x = x_of(tenth / 10)
        draw.line([(x, bottom), (x, bottom + 5)], fill="black")
        draw.text((x, bottom + 9), f"{tenth / 10:.1f}", fill="black", font=label_font, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    draw.text(((left + right) / 2, HEIGHT - 20), "beta", fill="black", font=label_font, anchor="mm")
    draw.text((left, top - 10), "overall score (x100)", fill="black", font=label_font, anchor="lb")
    draw.text((WIDTH / 2, 22), title, fill="black", font=title_font, anchor="mm")

    for metric in metrics:
        colour = CURVE_COLOURS[metric]
        points = [(x_of(beta), y_of(beta_scores[beta].points(metric))) for beta in betas]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([(x - 4, y - 4), (x + 4, y + 4)], fill=colour)
    best = max(betas, key=lambda beta: beta_scores[beta].points(metrics[0]))
    best_x, best_y = x_of(best), y_of(beta_scores[best].points(metrics[0]))
    draw.text((best_x, best_y - 10), f"best {METRIC_LABELS[metrics[0]]}: beta={best:g}", fill="black",
              font=label_font, anchor="mb")

    legend_x, legend_y = right - 130, top + 10
    draw.rectangle([(legend_x - 10, legend_y - 8), (right - 10, legend_y + 22 * len(metrics))],
                   fill="white", outline=(150, 150, 150))
    for index, metric in enumerate(metrics):
        y = legend_y + 6 + 22 * index
        draw.line([(legend_x, y), (legend_x + 30, y)], fill=CURVE_COLOURS[metric], width=3)
        draw.text((legend_x + 40, y), METRIC_LABELS[metric], fill="black", font=label_font, anchor="lm")

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
