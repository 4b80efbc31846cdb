"""``mediround infer``: predict masks round by round, chaining the model's own masks (Algorithm 1)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mediround_cli.common import console, err_console, handle_errors
from mediround_cli.partial_load import allow_partial_load_option, print_load_reports

if TYPE_CHECKING:
    from mediround.inference.runner import InferenceSummary


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


def launch_settings(gpus: int | None, cpu: bool, num_processes: int | None) -> tuple[str, int]:
    """(device, processes) from the launch flags, with the training launcher's rules for contradictions."""
    from mediround.launch import plan_launch

    plan = plan_launch(gpus=gpus, cpu=cpu, num_processes=num_processes)
    return ("cpu" if plan.cpu else "cuda"), plan.world_size


@contextlib.contextmanager
def prediction_progress(name: str) -> Iterator[tuple[Callable[[Any], None], Callable[[int], None]]]:
    """A transient "predicting" bar on stderr; yields the ``on_plan`` and ``on_progress`` callbacks that
    ``run_inference`` takes."""
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(name, total=None)
        yield (lambda plan: progress.update(task, total=len(plan.todo)),
               lambda finished: progress.update(task, completed=finished))


def summary_table(summary: InferenceSummary) -> Table:
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


@click.command()
@click.argument("data", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Checkpoint folder (from `mediround train` / `train-jcm`) [default: the shipped tiny model].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Predictions folder to write.")
@click.option("--beta", default=None, metavar="BETA|off",
              help="JCM threshold: q > BETA decodes the raw [SEG], otherwise the refined one; 'off' disables "
                   "JCM. [default: 0.6 when the checkpoint has trained JCM weights, else off]")
@click.option("--gpus", type=click.IntRange(min=1), help="Shard dialogues over N GPUs (one process each).")
@click.option("--cpu", is_flag=True, help="Run on CPU (with --num-processes N for several processes).")
@click.option("--num-processes", type=click.IntRange(min=1), help="Number of CPU processes with --cpu.")
@click.option("--resume", is_flag=True, help="Keep the dialogues already complete in --out and predict the rest.")
@click.option("--generate", is_flag=True,
              help="Let the model write its answers (greedy) and keep them in the history, instead of "
                   "feeding the dialogue's own answers.")
@click.option("--no-cache", is_flag=True,
              help="Re-run the whole model (image encoders included) for every round, as the authors do.")
@click.option("--overlays", is_flag=True, help="Write one PNG per dialogue under OUT/overlays/.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder that image and mask paths are relative to [default: the data file's folder].")
@click.option("--allow-outside-root", is_flag=True, help="Accept image/mask paths that leave the root.")
@allow_partial_load_option
@click.option("--worker-plan", type=click.Path(exists=True, dir_okay=False), hidden=True)
@handle_errors
def infer(
    data: Path | None,
    model_path: Path | None,
    out: Path | None,
    beta: str | None,
    gpus: int | None,
    cpu: bool,
    num_processes: int | None,
    resume: bool,
    generate: bool,
    no_cache: bool,
    overlays: bool,
    root: Path | None,
    allow_outside_root: bool,
    allow_partial_load: bool,
    worker_plan: str | None,
) -> None:
    """Predict every round of DATA (JSONL, MR-MedSeg JSON or an SA-Med2D folder), chaining predicted masks."""
    from mediround.inference.runner import InferenceConfig, run_inference, run_worker, score_outputs

    if worker_plan is not None:
        import os

        reports = run_worker(worker_plan)
        if allow_partial_load and os.environ.get("RANK", "0") == "0":
            print_load_reports(reports)
        return
    if data is None or out is None:
        raise click.UsageError("DATA and --out are required")
    if model_path is None:
        from mediround.default_model import default_checkpoint, default_model_notice

        model_path = default_checkpoint()
        err_console.print(default_model_notice(model_path), soft_wrap=True)
    device, processes = launch_settings(gpus, cpu, num_processes)
    config = InferenceConfig(
        data=str(data), model=str(model_path), out=str(out),
        betas=() if beta is None else (parse_beta(beta),), generate=generate, use_cache=not no_cache,
        resume=resume, overlays=overlays, root=None if root is None else str(root),
        allow_outside_root=allow_outside_root, device=device, num_processes=processes,
        allow_partial_load=allow_partial_load,
    )
    with prediction_progress("infer") as (on_plan, on_progress):
        summary = run_inference(config, on_plan=on_plan, on_progress=on_progress)
    config = summary.config
    if allow_partial_load and summary.load_reports:
        print_load_reports(summary.load_reports)
    evaluations = score_outputs(config)
    for label, evaluation in evaluations.items():
        from mediround_cli.eval import _print_report

        if len(evaluations) > 1:
            console.print(f"[bold]{label}[/bold]")
        _print_report(evaluation, per_round=True)
    console.print(summary_table(summary))
    if config.betas == (None,):
        console.print("JCM off" + ("" if beta is not None else ": the checkpoint has no trained JCM weights"))
    if summary.skipped:
        err_console.print(f"[yellow]{summary.skipped} dialogue(s) skipped[/yellow]; reasons in {summary.errors_file}")
