"""The JCM threshold plot (the paper's Figure 7): overall score x100 against beta, drawn with pillow."""

from __future__ import annotations

import os
from collections.abc import Mapping

from mediround.metrics import METRIC_LABELS, Scores
from mediround.reports.plots import line_chart, metric_curves


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
    curves = {metric: [(beta, beta_scores[beta].points(metric)) for beta in betas] for metric in metrics}
    best = max(betas, key=lambda beta: beta_scores[beta].points(metrics[0]))
    line_chart(path, metric_curves(curves), x_extent=1, x_ticks=[(tenth / 10, f"{tenth / 10:.1f}") for tenth in range(0, 11, 2)],
                x_label="beta", y_label="overall score (x100)", title=title,
                note=(best, beta_scores[best].points(metrics[0]), f"best {METRIC_LABELS[metrics[0]]}: beta={best:g}"))
