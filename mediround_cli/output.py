"""What several commands print or parse alike: report tables, the gate verdict, progress bars, the JCM
threshold and the launch flags (``MACHINE_OPTIONS``: train, train-jcm, infer and eval take the same ones).
Commands import from here, never from one another.

Light on purpose: ``mediround eval --predictions`` imports this module and must not load torch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mediround.inference.events import InferenceEvents
from mediround.launch import plan_launch
from mediround.metrics import Scores
from mediround.reports.gate import GateReport
from mediround.reports.tables import (
    difficulty_table,
    group_table,
    interval_table,
    missing_table,
    overall_table,
    regression_table,
    round_table,
)
from mediround_cli.common import GATE_FAILED_EXIT_CODE, console, err_console

if TYPE_CHECKING:
    from mediround.inference.plan import Plan
    from mediround.inference.runner import InferenceSummary
    from mediround.inference.settings import InferenceConfig


jcm_rounds_option = click.option(
    "--jcm-rounds", type=click.Choice(["referred", "all"]), default=None,
    help="Rounds JCM judges and refines: 'referred' (only rounds a later round refers to; the others decode raw, "
         "as the authors do) or 'all'. [default: the checkpoint's heads.jcm_rounds]")


def parse_beta(text: str) -> float | None:
    """A JCM threshold in [0, 1], or None for ``off``/``none``."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a number in [0, 1] or 'off'", param_hint="--beta") from None
    if not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"{value:g} is outside [0, 1]", param_hint="--beta")
    return value


def load_chat_model(model_path: Path | None, beta: str | None) -> tuple[Any, float | None]:
    """``chat``'s and ``app``'s model: the checkpoint (the shipped one by default, saying so on stderr) in
    eval mode, and its JCM threshold (None: off)."""
    from mediround.default_model import default_checkpoint, default_model_notice
    from mediround.inference.checkpoint_policy import checked_betas, model_folder
    from mediround.model.checkpoint import load_checkpoint

    if model_path is None:
        model_path = default_checkpoint()
        err_console.print(default_model_notice(model_path), soft_wrap=not err_console.is_terminal)
    model = load_checkpoint(model_folder(model_path)).eval()
    [threshold] = checked_betas(() if beta is None else (parse_beta(beta),), model.config, str(model_path))
    return model, threshold


def parse_betas(text: str | None) -> tuple[float | None, ...]:
    """``"0.2,0.4,off"`` -> ``(0.2, 0.4, None)``; empty means the checkpoint's default."""
    if text is None:
        return ()
    values = tuple(parse_beta(part) for part in text.split(",") if part.strip())
    if not values:
        raise click.BadParameter("give at least one threshold", param_hint="--beta")
    if len(set(values)) != len(values):
        raise click.BadParameter(f"'{text}' repeats a threshold", param_hint="--beta")
    return values


MACHINE_OPTIONS = (
    click.option("--gpus", type=click.IntRange(min=1), default=None,
                 help="Use N GPUs of this machine (one process each)."),
    click.option("--cpu", is_flag=True, help="Run on CPU (gloo when there are several processes)."),
    click.option("--num-processes", type=click.IntRange(min=1), default=None,
                 help="Processes per machine (with --cpu, or = --gpus)."),
    click.option("--num-machines", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Machines taking part (one command per machine, the same flags but --machine-rank)."),
    click.option("--machine-rank", type=click.IntRange(min=0), default=0, show_default=True,
                 help="This machine's rank (0: the machine at --main-process-ip)."),
    click.option("--main-process-ip", default=None, help="Address of machine rank 0 (multi-node)."),
    click.option("--main-process-port", type=click.IntRange(1, 65535), default=None,
                 help="Port of machine rank 0 (multi-node) [default: 29500]."),
)
"""The launch flags of every command that runs the model (``machine_options``; train adds --deepspeed)."""

shard_timeout_option = click.option(
    "--shard-timeout", type=click.FloatRange(min=1), default=1800, show_default=True, metavar="SECONDS",
    help="With several processes: how long a finished process waits for the others' shards; machine rank 0 "
         "then merges, or names the shards that did not complete and exits non-zero.")


def machine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``MACHINE_OPTIONS`` to a click command."""
    for option in reversed(MACHINE_OPTIONS):
        command = option(command)
    return command


def launch_settings(gpus: int | None, cpu: bool, num_processes: int | None, num_machines: int = 1,
                    machine_rank: int = 0, main_process_ip: str | None = None,
                    main_process_port: int | None = None) -> dict[str, Any]:
    """The launch fields of an ``InferenceConfig`` from the launch flags (``MACHINE_FLAGS``), with the
    training launcher's rules for contradictions."""
    plan = plan_launch(gpus=gpus, cpu=cpu, num_processes=num_processes, num_machines=num_machines,
                       machine_rank=machine_rank, main_process_ip=main_process_ip,
                       main_process_port=main_process_port)
    return {"device": "cpu" if plan.cpu else "cuda", "num_processes": plan.processes_per_machine,
            "num_machines": plan.num_machines, "machine_rank": plan.machine_rank,
            "main_process_ip": plan.main_process_ip, "main_process_port": plan.main_process_port}


def progress_bar(label: str) -> Progress:
    """A transient bar on stderr: ``label``, bar, done/total, elapsed time."""
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=err_console, transient=True)


class _BarEvents(InferenceEvents):
    """Moves a progress bar as an inference run plans and finishes dialogues."""

    def __init__(self, progress: Progress, name: str):
        self.progress = progress
        self.task = progress.add_task(name, total=None)

    def planned(self, plan: Plan) -> None:
        self.progress.update(self.task, total=len(plan.todo))

    def progressed(self, finished: int) -> None:
        self.progress.update(self.task, completed=finished)


@contextlib.contextmanager
def prediction_progress(name: str, label: str = "predicting") -> Iterator[InferenceEvents]:
    """A transient ``label`` bar on stderr; yields the events object that ``run_inference`` takes."""
    with progress_bar(label) as progress:
        yield _BarEvents(progress, name)


def predict_this_machines_shards(config: InferenceConfig, name: str) -> None:
    """The whole run of a machine of rank > 0: its workers predict their shards of machine rank 0's plan;
    machine rank 0 merges and scores."""
    from mediround.inference.workers import join_inference

    console.print(f"machine rank {config.machine_rank} of {config.num_machines}: predicting this machine's "
                  f"shards; machine rank 0 merges them into {config.out}", soft_wrap=True)
    with prediction_progress(name) as events:
        join_inference(config, events)
    console.print(f"machine rank {config.machine_rank}: its shards are complete", soft_wrap=True)


def inference_summary_table(summary: InferenceSummary) -> Table:
    """Counts and folders of one inference run."""
    table = Table(title="mediround infer", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("dialogues in data", str(summary.total))
    table.add_row("predicted now", str(summary.predicted))
    table.add_row("already complete (--resume)", str(summary.resumed))
    table.add_row("skipped (see errors.jsonl)", str(summary.skipped), style="yellow" if summary.skipped else None)
    if summary.seg_missing:
        table.add_row("generated answers without [SEG]", str(summary.seg_missing), style="yellow")
    for label, folder in summary.folders.items():
        table.add_row(f"predictions ({label})", folder)
    return table


def _has_known_groups(summary: Mapping[str, Mapping[Any, Scores]], grouping: str) -> bool:
    return any(value is not None for value in summary[grouping])


def print_report(summary: Mapping[str, Mapping[Any, Scores]], missing: Sequence[tuple[str, int]],
                 per_round: bool) -> None:
    """The score tables of one scored predictions folder: overall (by difficulty when known), per round,
    per known grouping, and the rounds that had no usable prediction."""
    console.print(difficulty_table(summary) if _has_known_groups(summary, "difficulty") else overall_table(summary))
    if per_round:
        console.print(round_table(summary))
    for grouping in ("scenario", "modality", "names_target"):
        if _has_known_groups(summary, grouping):
            console.print(group_table(summary, grouping))
    if missing:
        console.print(missing_table(missing))


def print_gate(report: GateReport, scores: str = "scores") -> None:
    """Say whether the regression gate passed against ``report.baseline``; when it failed, exit 1 after one
    line per coverage failure and the table of the ``scores`` that fell by more than the allowed drop (the
    statistical gate: the table of every score with the interval of its drop)."""
    settings = report.settings
    at_confidence = "" if settings.confidence is None else f" at {settings.confidence:.0%} confidence"
    for reason in report.coverage_failures:
        err_console.print(f"[red]gate failed:[/red] {escape(reason)}", soft_wrap=True)
    if settings.confidence is not None:
        console.print(interval_table(report.scores, settings))
    if report.regressions:
        console.print(regression_table(report.regressions, settings.max_drop))
    if report.regressions:
        err_console.print(f"[red]gate failed:[/red] {len(report.regressions)} {scores} fell by more than "
                          f"{settings.max_drop:g} points{at_confidence} against {report.baseline}", soft_wrap=True)
    small = list(dict.fromkeys(check.scope for check in report.scores
                               if check.baseline is not None and check.not_gated is not None))
    if small:
        console.print(f"{len(small)} group(s) reported, not gated: {', '.join(small)} "
                      f"(fewer than {settings.min_group_size} dialogues)", soft_wrap=True)
    if not report.passed:
        sys.exit(GATE_FAILED_EXIT_CODE)
    console.print(f"[green]gate passed:[/green] same coverage, and no score fell by more than {settings.max_drop:g} "
                  f"points{at_confidence} against {report.baseline}", soft_wrap=True)


def write_folder_report(folder: str | Path, data: str | Path, root: str | Path | None, allow_outside_root: bool,
                        rows: Sequence[Mapping[str, Any]]) -> Path:
    """``FOLDER/report.html`` for the predictions in ``folder`` of the dialogues in ``data`` (``--report``)."""
    from mediround.data.formats import load_dialogues
    from mediround.reports.html import REPORT_FILE, write_predictions_report

    dialogues = load_dialogues(data, root=root, allow_outside_root=allow_outside_root).dialogues
    notes = [f"Data: {data}. Predictions: {folder}. Scores x100."]
    return write_predictions_report(Path(folder) / REPORT_FILE, folder, dialogues, rows, "MediRound predictions",
                                    notes)
