"""``mediround eval TRUTH --predictions OUT --round-labels ...``: a ``chat VOLUME`` output scored against a
ground-truth label volume (``mediround.reports.volume_scoring``); ``eval`` hands over when given
``--round-labels``."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource
from rich.markup import escape
from rich.table import Table

from mediround.reports.volume_scoring import parse_round_labels, score_volume
from mediround_cli.common import console, err_console

SCAN_OPTIONS = ("data", "predictions_dir", "round_labels", "per_round")
"""The ``eval`` parameters a volume evaluation reads; any other one given is refused."""


def _dice(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def evaluate_volume(context: click.Context, per_round: bool) -> None:
    """Score, print the per-round table (``--per-round``: also every slice's Dice) and say where the JSON is."""
    params = context.params
    others = [f"--{name.replace('_', '-')}" for name in params if name not in SCAN_OPTIONS
              and context.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if others:
        raise click.UsageError(f"{', '.join(others)}: not for a volume evaluation (--round-labels)")
    if params["data"] is None or params["predictions_dir"] is None:
        raise click.UsageError("--round-labels scores a chat VOLUME output: give the ground-truth label volume as "
                               "DATA and the output folder as --predictions")
    evaluation = score_volume(params["data"], params["predictions_dir"], parse_round_labels(params["round_labels"]))
    table = Table(title=f"Dice x100 of {evaluation.case} against {Path(evaluation.truth).name} "
                        f"(masks from the {evaluation.masks_from})")
    for column in ("round", "question", "truth labels", "truth voxels", "predicted voxels", "Dice 3-D",
                   "slices scored", "mean slice Dice"):
        table.add_column(column, justify="left" if column == "question" else "right")
    for score in evaluation.rounds:
        table.add_row(str(score.round), score.question, "+".join(map(str, score.labels)), f"{score.truth_voxels:,}",
                      f"{score.predicted_voxels:,}", _dice(score.dice), str(len(score.slices)),
                      _dice(score.mean_slice_dice))
    console.print(table)
    if per_round:
        slices = Table(title="Dice x100 per axial slice (slices where the truth or the prediction has the round)")
        for column in ("round", "slice", "truth voxels", "predicted voxels", "Dice"):
            slices.add_column(column, justify="right")
        for score in evaluation.rounds:
            for item in score.slices:
                slices.add_row(str(score.round), str(item.slice), f"{item.truth:,}", f"{item.predicted:,}", _dice(item.dice))
        console.print(slices)
    for note in evaluation.notes:
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    console.print(f"scores: {evaluation.out}", soft_wrap=True)
