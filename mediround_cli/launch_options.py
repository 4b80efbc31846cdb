"""What ``train`` and ``train-jcm`` share: the launch flags, the run-here-or-relaunch flow, the progress
display of the training events and the summary table. A command supplies a ``StageView``: how its own
events and results read."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mediround.errors import LaunchError
from mediround.launch import (
    CPU_ENV,
    expected_world_size,
    is_launched_child,
    launched_deepspeed_config,
    launched_on_cpu,
    plan_launch,
    relaunch,
)
from mediround.training.engine import TrainingResult
from mediround.training.events import (
    BestKept,
    CheckpointSaved,
    Event,
    JCMValidated,
    RunStarted,
    StepLogged,
    StepSkipped,
    Validated,
    WeightsLoaded,
)
from mediround.training.recipe import RunRecipe, resolve_recipe
from mediround_cli.common import console, debug_enabled
from mediround_cli.output import MACHINE_OPTIONS
from mediround_cli.partial_load import allow_partial_load_option, print_load_reports

# Created in the output folder by the launching process's first Ctrl-C; the workers stop at the next step.
STOP_FILE = ".stop-requested"


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """Where a training run goes (this machine's GPUs or CPU, N processes, M machines) and whether it
    continues or replaces the run already in its output folder."""

    gpus: int | None
    cpu: bool
    num_processes: int | None
    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int | None
    deepspeed_config: str | None
    resume: bool
    overwrite: bool
    allow_partial_load: bool

    def child_flags(self) -> list[str]:
        """The flags a re-launched process needs besides the command's own arguments."""
        return (["--resume"] if self.resume else []) + (["--allow-partial-load"] if self.allow_partial_load else [])


_MACHINE_OPTIONS = (
    *MACHINE_OPTIONS,
    click.option("--deepspeed", "deepspeed_config", default=None, metavar="JSON",
                 help="Run under DeepSpeed with this config (recipes/zero2.json: ZeRO-2); its batch, accumulation, "
                      "clipping and bf16 settings are taken from the recipe. Needs pip install -e \".[deepspeed]\"."),
)
_RUN_OPTIONS = (
    click.option("--resume", is_flag=True, help="Continue from the output folder's latest checkpoint."),
    click.option("--overwrite", is_flag=True, help="Empty an output folder that holds another run first."),
    allow_partial_load_option,
)


def launch_options(*between: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    """Add the launch flags to a click command (``between`` are options listed after the machine flags and
    before ``--resume``); the command receives them as one ``launch: LaunchOptions`` argument."""
    names = [field.name for field in dataclasses.fields(LaunchOptions)]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            launch = LaunchOptions(**{name: kwargs.pop(name) for name in names})
            return command(*args, launch=launch, **kwargs)

        for option in reversed((*_MACHINE_OPTIONS, *between, *_RUN_OPTIONS)):
            wrapper = option(wrapper)
        return wrapper

    return decorate


@dataclasses.dataclass(frozen=True)
class StageView:
    """How one training command shows its run: its name (progress label, table title), the first status,
    what its start line adds, the status of a logged step, the lines of a validation, its own summary rows
    and the label of the model row."""

    command: str
    first_status: str
    start_detail: Callable[[RunStarted], str]
    step_status: Callable[[StepLogged], str]
    validation_lines: Callable[[Any], list[str]]
    summary_rows: Callable[[TrainingResult], list[tuple[str, str]]]
    model_row: str


def run_training_command(
    view: StageView,
    train: Callable[..., TrainingResult],
    command_args: Sequence[str],
    recipe_path: str,
    recipe: RunRecipe,
    launch: LaunchOptions,
    check_output: Callable[..., None],
) -> None:
    """Run ``train`` (``run_training`` or ``run_jcm_training``) here, or re-launch the command over the
    planned processes (``run_or_relaunch``), and print its progress and summary."""

    def run(cpu: bool, processes: int) -> None:
        display = TrainingDisplay(view)
        try:
            result = train(recipe, resume=launch.resume, cpu=cpu, expected_processes=processes, on_event=display,
                           allow_partial_load=launch.allow_partial_load, deepspeed_config=launched_deepspeed_config())
        finally:
            display.progress.stop()
        # RANK is set by the launcher in every process: only rank 0 prints the summary.
        if int(os.environ.get("RANK", "0")) == 0:
            print_summary(view, result)

    run_or_relaunch(view.command, recipe_path, command_args, recipe, launch, check_output, run)


def run_or_relaunch(
    command: str,
    recipe_path: str,
    command_args: Sequence[str],
    recipe: Any,
    launch: LaunchOptions,
    check_output: Callable[..., None],
    run: Callable[[bool, int], None],
) -> None:
    """Run ``run(cpu, processes)`` in this process when it is a launched child or one process is enough;
    otherwise check the output folder on machine rank 0 (``check_output(recipe, resume=, overwrite=)``) and re-launch
    ``mediround COMMAND RECIPE COMMAND_ARGS...`` over the planned processes through Accelerate, with the
    output folder's stop file for the first Ctrl-C."""
    if is_launched_child():
        run(os.environ.get(CPU_ENV) == "1", expected_world_size())
        return
    if launch.resume and launch.overwrite:
        raise LaunchError("--resume and --overwrite exclude each other")
    # The docs' `--deepspeed recipes/zero2.json` names a shipped file: resolved as recipes are.
    deepspeed_config = None if launch.deepspeed_config is None else str(resolve_recipe(launch.deepspeed_config))
    plan = plan_launch(launch.gpus, launch.cpu, launch.num_processes, launch.num_machines, launch.machine_rank,
                       launch.main_process_ip, launch.main_process_port, deepspeed_config)
    plan = dataclasses.replace(plan, mixed_precision=recipe.resolved_mixed_precision(on_gpu=not plan.cpu))
    if plan.machine_rank == 0:
        # Machine rank 0 alone owns the shared output folder: another machine's --overwrite would empty it
        # under a running rank 0, and its check would race with the files rank 0 has started writing.
        check_output(recipe, resume=launch.resume, overwrite=launch.overwrite)
    if not plan.needs_launcher:
        run(launched_on_cpu(plan), expected_world_size(plan))
        return
    console.print(f"launching {plan.world_size} process(es) on {'CPU' if plan.cpu else 'GPU'} "
                  f"through accelerate ({plan.num_machines} machine(s))")
    module_args = (["--debug"] if debug_enabled() else []) + [command, recipe_path, *command_args]
    relaunch(plan, module_args + launch.child_flags(), stop_file=Path(recipe.output) / STOP_FILE)


class TrainingDisplay:
    """The event handler of a training command: a progress bar with the step status, and a line for the
    start, each validation, checkpoint and skipped step."""

    def __init__(self, view: StageView):
        self.view = view
        self.progress = Progress(TextColumn(f"[bold]{view.command}[/bold]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console)
        self.task: Any = None
        self.total_steps = 0

    def __call__(self, event: Event) -> None:
        match event:
            case WeightsLoaded():
                print_load_reports(event.reports)
            case RunStarted():
                console.print(
                    f"world size {event.world_size} (checked in every process), global batch {event.global_batch}, "
                    f"{event.train_dialogues} training / {event.val_dialogues} validation dialogues, "
                    f"{event.total_steps} steps x {event.global_batch} = {event.total_steps * event.global_batch:,} "
                    f"sampled dialogues{self.view.start_detail(event)}"
                    + (f", resumed from {event.resumed_from}" if event.resumed_from else "")
                )
                for problem in event.data_problems:
                    console.print(f"[yellow]skipped:[/yellow] {problem}", soft_wrap=True)
                self.total_steps = event.total_steps
                self.progress.start()
                self.task = self.progress.add_task(self.view.command, total=event.total_steps, completed=event.step,
                                                   status=self.view.first_status)
            case StepLogged():
                self.progress.update(self.task, completed=event.step, status=self.view.step_status(event))
                if not console.is_terminal:
                    # SLURM, nohup, a pipe: no live progress bar, so one plain line per logged step.
                    console.print(f"{self.view.command} step {event.step}/{self.total_steps} "
                                  f"{self.view.step_status(event)}", soft_wrap=True, highlight=False)
            case Validated() | JCMValidated():
                for line in self.view.validation_lines(event):
                    self.progress.console.print(line)
            case BestKept():
                self.progress.console.print(f"[dim]best {event.metric} ({event.best_of}) {event.value:.4f} at step "
                                            f"{event.step}: {event.path}[/dim]")
            case CheckpointSaved():
                self.progress.console.print(f"[dim]checkpoint {event.path}[/dim]")
                if self.task is not None:
                    self.progress.update(self.task, completed=event.step)
            case StepSkipped():
                self.progress.console.print(f"[yellow]skipped step {event.step}:[/yellow] {event.reason} "
                                            f"({event.where})")


def print_summary(view: StageView, result: TrainingResult) -> None:
    """The summary table of a run (how it stopped, its steps, processes, the stage's rows, what it wrote)
    and, for an interrupted run, how to continue it."""
    table = Table(title=view.command, show_header=False)
    table.add_row("stopped", result.stopped)
    table.add_row("steps", f"{result.step} / {result.total_steps}")
    table.add_row("processes", str(result.world_size))
    for name, value in view.summary_rows(result):
        table.add_row(name, value)
    if result.skipped_steps:
        table.add_row("skipped non-finite steps", str(result.skipped_steps))
    if result.data_problems:
        table.add_row("skipped dialogues", str(result.data_problems))
    table.add_row("checkpoint", str(result.checkpoint))
    if result.model is not None:
        table.add_row(view.model_row, str(result.model))
    table.add_row("output", str(result.output))
    console.print(table)
    if result.stopped == "interrupted":
        console.print("[yellow]interrupted:[/yellow] checkpoint written; continue with --resume")
