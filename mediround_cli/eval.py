"""``mediround eval``: score a predictions folder per round, write metric rows, gate against a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from mediround.data.predictions import PREDICTIONS_FILE, is_predictions_folder
from mediround.data.run_manifest import MANIFEST_FILE, find_predictions_folder
from mediround.default_model import default_checkpoint, default_model_notice
from mediround.error_log import ERRORS_FILE
from mediround.errors import DataError
from mediround.reports.scoring import EvalConfig, Evaluation, evaluate_predictions, scoring_inputs
from mediround_cli.common import console, err_console, exit_skipped, handle_errors
from mediround_cli.eval_model import ModelOptions, evaluate_with_model, model_options
from mediround_cli.eval_volume import evaluate_volume
from mediround_cli.gate_options import GateOptions, finish_gate, gate_options
from mediround_cli.output import print_report, progress_bar, write_folder_report


def _summary_table(n_dialogues: int, evaluation: Evaluation, n_problems: int) -> Table:
    table = Table(title="eval summary", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("dialogues", str(n_dialogues))
    table.add_row("rounds scored", str(len(evaluation.rows)))
    table.add_row("missing predictions (scored empty)", str(len(evaluation.missing)),
                  style="yellow" if evaluation.missing else None)
    table.add_row("predictions matching no round of the data", str(evaluation.unmatched),
                  style="yellow" if evaluation.unmatched else None)
    table.add_row("problems", str(n_problems), style="yellow" if n_problems else None)
    table.add_row("metric rows", str(evaluation.out))
    if evaluation.plot is not None:
        table.add_row("per-round curve", str(evaluation.plot))
    return table


@click.command("eval", epilog="""\b
Examples:
  mediround eval --per-round                    # the ./*-predictions folder infer wrote, its own data
  mediround eval --predictions preds --baseline base.parquet --max-drop 1 --junit-xml junit.xml  # CI: docs/ci.md
  mediround eval dialogues.jsonl --model runs/x/model --beta 0.2,0.4,0.6,0.8""")
@click.argument("data", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--predictions", "predictions_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Predictions folder written by `mediround infer` [default without DATA: the one "
                   "./*-predictions folder; its run manifest names the data].")
@click.option("--per-round", is_flag=True, help="Also print the per-round table (one row per round).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Metric rows as Parquet [default: PREDICTIONS/metrics.parquet].")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder that image and mask paths are relative to [default: the data file's folder].")
@click.option("--allow-outside-root", is_flag=True, help="Accept image/mask paths that leave the root.")
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Metrics Parquet of an earlier run; exit 1 if a score fell by more than --max-drop.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Allowed drop in x100 points of each gated score (Dice/gIoU/cIoU of each --gate-scopes group).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write the per-round curve PNG here.")
@click.option("--force", is_flag=True,
              help="Score against DATA even when its SHA-256 differs from the data the predictions were made from.")
@click.option("--overwrite", is_flag=True, help="Replace an --out file that holds the metrics of other data.")
@click.option("--report", is_flag=True, help="Write PREDICTIONS/report.html (scores, each dialogue's rounds and overlay).")
@click.option("--round-labels", metavar="R=L[+L],...|FILE.json",
              help="Score a `chat VOLUME` output (--predictions) against the label volume DATA: each round R against "
                   "label value(s) L, e.g. 1=6,2=6+7; Dice per round in 3-D and per axial slice.")
@model_options
@handle_errors
@gate_options
def eval_command(
    data: Path | None,
    predictions_dir: Path | None,
    per_round: bool,
    out: Path | None,
    root: Path | None,
    allow_outside_root: bool,
    baseline: Path | None,
    max_drop: float,
    plot: Path | None,
    force: bool,
    overwrite: bool,
    report: bool,
    round_labels: str | None,
    model_path: Path | None,
    gate: GateOptions,
    **model_settings: Any,
) -> None:
    """Score predicted masks against the ground truth of DATA (JSONL, MR-MedSeg JSON or an SA-Med2D folder).

    Without DATA, scores the predictions folder of `mediround infer` against the data its run manifest
    names. Exit codes: 0 done; 1 the --baseline gate failed; 2 bad input (e.g. data whose SHA-256 differs
    from the predictions' run manifest); 3 some dialogue was skipped."""
    if round_labels is not None:
        evaluate_volume(click.get_current_context(), per_round)
        return
    if model_path is not None and predictions_dir is not None:
        raise click.UsageError("--predictions and --model exclude each other")
    if data is None and model_path is not None:
        raise click.UsageError("--model needs DATA")
    if data is not None and is_predictions_folder(data):
        # Without a run manifest the folder does not name its data, so DATA must still be given.
        data_argument = "" if (data / MANIFEST_FILE).is_file() else "DATA "
        raise DataError(str(data), None, None, f"is a predictions folder (it holds {PREDICTIONS_FILE}), not data with "
                        f"ground truth: score it with `mediround eval {data_argument}--predictions {data}`")
    if data is not None and predictions_dir is None:
        if model_path is None:
            model_path = default_checkpoint()
            err_console.print(default_model_notice(model_path), soft_wrap=True)
        scoring = EvalConfig(out=out, baseline=baseline, gate=gate.settings(max_drop), plot=plot, overwrite=overwrite,
                             write_baseline=gate.write_baseline)
        options = ModelOptions(**model_settings)
        evaluate_with_model(options.evaluation_config(data, model_path, root, allow_outside_root, scoring), per_round,
                            gate)
        return
    predictions_dir = predictions_dir or find_predictions_folder()
    scored = scoring_inputs(predictions_dir, data, force, root, allow_outside_root)
    config = EvalConfig(out=out or predictions_dir / "metrics.parquet", baseline=baseline,
                        gate=gate.settings(max_drop), plot=plot, beta=scored.beta, references=scored.references,
                        manifest=scored.manifest, overwrite=overwrite, write_baseline=gate.write_baseline)
    loaded = scored.loaded
    config.skipped = len(loaded.problems) + scored.skipped_by_infer
    with progress_bar("scoring") as progress:
        task = progress.add_task("scoring", total=len(loaded.dialogues))
        evaluation = evaluate_predictions(loaded.dialogues, predictions_dir, config,
                                          advance=lambda: progress.advance(task))

    console.print(f"data: {scored.data}; predictions: {predictions_dir}", soft_wrap=True)
    print_report(evaluation.summary, evaluation.missing, per_round)
    problems = [*loaded.problems, *evaluation.problems]
    for problem in problems:
        err_console.print(f"problem: {problem.one_line()}", soft_wrap=True, markup=False)
    console.print(_summary_table(len(loaded.dialogues), evaluation, len(problems)))
    if report:
        page = write_folder_report(predictions_dir, scored.data, root, allow_outside_root, evaluation.rows)
        console.print(f"report: {page}", soft_wrap=True)
    finish_gate(evaluation.gate, gate, scored.manifest, evaluation.plot, evaluation.baseline_written)
    exit_skipped(evaluation.skipped, "dialogue(s)", f"the problems above and {predictions_dir / ERRORS_FILE}")
