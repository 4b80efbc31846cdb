"""The model-running side of ``mediround eval``: ``--model CKPT`` runs inference and scores it in one command.

``model_options`` adds the options to the ``eval`` command, which gathers their values in ``ModelOptions``,
turns them into a ``ModelEvalConfig`` and calls ``evaluate_with_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from mediround.inference import DEFAULT_BATCH_SIZE, DEFAULT_BETA
from mediround.metrics import METRIC_LABELS, METRICS
from mediround.reports.scoring import EvalConfig
from mediround_cli.common import console, err_console, exit_skipped
from mediround_cli.gate_options import GateOptions, finish_gate
from mediround_cli.output import (
    MACHINE_OPTIONS,
    inference_summary_table,
    jcm_rounds_option,
    launch_settings,
    parse_betas,
    predict_this_machines_shards,
    prediction_progress,
    print_report,
    shard_timeout_option,
)
from mediround_cli.partial_load import allow_partial_load_option, print_load_reports

if TYPE_CHECKING:
    from mediround.inference.model_eval import ModelEvalConfig, ModelEvaluation

GAP_METRICS = ("dice", "ciou")
"""The metrics of the error-propagation table (of ``mediround.metrics.METRICS``)."""
MODEL_OPTIONS = (
    click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="Run this checkpoint on DATA and score its predictions (instead of --predictions) "
                      "[default without --predictions: the shipped tiny model]."),
    click.option("--beta", "betas", metavar="LIST",
                 help="JCM thresholds, comma-separated (e.g. 0.2,0.4,0.6,0.8; 'off' allowed), all in one pass; "
                      f"writes a beta-vs-score PNG. [default: {DEFAULT_BETA:g} with trained JCM weights, else off]"),
    click.option("--teacher-forcing", is_flag=True,
                 help="Chain ground-truth reference masks instead of the model's own."),
    click.option("--compare-tf", is_flag=True,
                 help="Run predicted and ground-truth references in one pass and report the per-round gap."),
    click.option("--generate", is_flag=True, help="Let the model write its answers (greedy)."),
    click.option("--no-cache", is_flag=True, help="Re-run the whole model per round (the authors' way)."),
    jcm_rounds_option,
    click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
                 help="Dialogues that advance together, round by round, sharing each forward pass."),
    *MACHINE_OPTIONS,
    shard_timeout_option,
    click.option("--resume", is_flag=True, help="Keep predictions already complete in --predictions-out."),
    click.option("--predictions-out", type=click.Path(file_okay=False, path_type=Path),
                 help="Where --model writes its predictions (one folder per beta/reference track when several) "
                      "[default: ./mediround-eval]."),
    click.option("--beta-plot", type=click.Path(dir_okay=False, path_type=Path),
                 help="Beta-vs-score PNG for a sweep [default: PREDICTIONS_OUT/beta_curve.png]."),
    allow_partial_load_option,
)


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the model-running options to a click command."""
    for option in reversed(MODEL_OPTIONS):
        command = option(command)
    return command


def tracks_table(evaluation: ModelEvaluation) -> Table:
    table = Table(title="Overall per track (x100)")
    for column in ("beta", "references", "masks", *(METRIC_LABELS[metric] for metric in METRICS), "refined"):
        table.add_column(column, justify="left" if column in ("beta", "references") else "right")
    for track in evaluation.tracks:
        scores = evaluation.summaries[track]["overall"][None]
        rows = [r for r in evaluation.rows if r["beta"] == track.beta and r["references"] == track.references]
        refined = sum(1 for r in rows if r.get("refined"))
        style = "bold" if track == evaluation.primary else None
        table.add_row("off" if track.beta is None else f"{track.beta:g}", track.references, str(scores.count),
                      *(f"{scores.points(metric):.1f}" for metric in METRICS), f"{refined}/{len(rows)}", style=style)
    return table


def gap_table(evaluation: ModelEvaluation) -> Table:
    table = Table(title=f"Error propagation per round ({evaluation.primary.label}; x100, ground truth - predicted)")
    table.add_column("round", justify="right")
    for metric in GAP_METRICS:
        for column in ("pred", "GT-ref", "gap"):
            table.add_column(f"{METRIC_LABELS[metric]} {column}", justify="right")
    for gap in evaluation.tf_gap:
        table.add_row(str(gap.round), *(cell for metric in GAP_METRICS for cell in (
            f"{gap.predicted.points(metric):.1f}", f"{gap.teacher_forced.points(metric):.1f}", f"{gap.gap(metric):+.1f}")))
    return table


@dataclass
class ModelOptions:
    """The values of ``MODEL_OPTIONS`` as click passes them (``--model`` aside)."""

    betas: str | None = None
    teacher_forcing: bool = False
    compare_tf: bool = False
    generate: bool = False
    no_cache: bool = False
    jcm_rounds: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    gpus: int | None = None
    cpu: bool = False
    num_processes: int | None = None
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    shard_timeout: float = 1800.0
    resume: bool = False
    predictions_out: Path | None = None
    beta_plot: Path | None = None
    allow_partial_load: bool = False

    def evaluation_config(self, data: Path, model_path: Path, root: Path | None, allow_outside_root: bool,
                          scoring: EvalConfig) -> ModelEvalConfig:
        """The checked settings of a model-based evaluation of ``data`` with these options."""
        from mediround.inference.model_eval import ModelEvalConfig
        from mediround.inference.settings import InferenceConfig

        if self.teacher_forcing and self.compare_tf:
            raise click.UsageError("--teacher-forcing and --compare-tf exclude each other (--compare-tf runs both)")
        launch = launch_settings(self.gpus, self.cpu, self.num_processes, self.num_machines, self.machine_rank,
                                 self.main_process_ip, self.main_process_port)
        predictions_out = self.predictions_out or Path("mediround-eval")
        inference = InferenceConfig.from_dict({
            "data": str(data), "model": str(model_path), "out": str(predictions_out),
            "betas": parse_betas(self.betas),
            "teacher_forcing": (False, True) if self.compare_tf else (self.teacher_forcing,),
            "generate": self.generate, "use_cache": not self.no_cache, "jcm_rounds": self.jcm_rounds,
            "batch_size": self.batch_size, "resume": self.resume, "overwrite": scoring.overwrite,
            "root": None if root is None else str(root), "allow_outside_root": allow_outside_root,
            "allow_partial_load": self.allow_partial_load, "shard_timeout": self.shard_timeout, **launch,
        }, "the command line")
        return ModelEvalConfig(inference, scoring, self.beta_plot or predictions_out / "beta_curve.png")


def evaluate_with_model(config: ModelEvalConfig, per_round: bool, gate: GateOptions) -> None:
    """Run the checkpoint, score every track, print the tables, write the ``gate`` reports and apply the gate
    (exit 1); on a machine of rank > 0, only predict its shards (machine rank 0 scores)."""
    from mediround.inference.model_eval import evaluate_model

    if config.inference.machine_rank > 0:
        predict_this_machines_shards(config.inference, "eval")
        return

    with prediction_progress("eval") as events:
        evaluation = evaluate_model(config, events=events)
    if config.inference.allow_partial_load and evaluation.inference.load_reports:
        print_load_reports(evaluation.inference.load_reports)
    primary = evaluation.primary
    references = "ground-truth" if primary.teacher_forcing else "predicted"
    console.print(f"[bold]{primary.label}[/bold] ({references} references)")
    print_report(evaluation.summaries[primary], evaluation.missing, per_round)
    if len(evaluation.tracks) > 1:
        console.print(tracks_table(evaluation))
    if evaluation.tf_gap:
        console.print(gap_table(evaluation))
    for problem in evaluation.problems:
        err_console.print(f"problem: {problem.one_line()}", soft_wrap=True, markup=False)
    console.print(inference_summary_table(evaluation.inference))
    written = [f"metric rows: {evaluation.out}"]
    if evaluation.beta_plot is not None:
        written.append(f"beta curve: {evaluation.beta_plot}")
    if evaluation.round_plot is not None:
        written.append(f"round curve: {evaluation.round_plot}")
    console.print("; ".join(written), soft_wrap=True)
    finish_gate(evaluation.gate, gate, evaluation.manifest, evaluation.round_plot, evaluation.baseline_written,
                scores=f"scores of {primary.label}")
    exit_skipped(evaluation.inference.skipped, "dialogue(s)", evaluation.inference.errors_file)
