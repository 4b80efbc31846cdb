"""What ``train`` and ``train-jcm`` share: the launch flags, the run-here-or-relaunch flow, the progress bar
and the first and last rows of the summary table."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
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
from mediround_cli.common import _debug_enabled, console
from mediround_cli.partial_load import allow_partial_load_option


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
    resume: bool
    overwrite: bool
    allow_partial_load: bool

    def child_flags(self) -> list[str]:
        """The flags a re-launched process needs besides the command's own arguments."""
        return (["--resume"] if self.resume else []) + (["--allow-partial-load"] if self.allow_partial_load else [])


_MACHINE_OPTIONS = (
    click.option("--gpus", type=int, default=None, help="Train on N GPUs of this machine (N processes)."),
    click.option("--cpu", is_flag=True, help="Train on CPU (gloo DDP when --num-processes > 1)."),
    click.option("--num-processes", type=int, default=None, help="Processes per machine (with --cpu, or = --gpus)."),
    click.option("--num-machines", type=int, default=1, show_default=True, help="Machines taking part."),
    click.option("--machine-rank", type=int, default=0, show_default=True, help="This machine's rank."),
    click.option("--main-process-ip", default=None, help="Address of machine rank 0 (multi-node)."),
    click.option("--main-process-port", type=int, default=None, help="Port of machine rank 0 (multi-node)."),
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


def run_or_relaunch(
    command: str,
    recipe_path: str,
    command_args: Sequence[str],
    recipe: Any,
    launch: LaunchOptions,
    check_output: Callable[..., None],
    run: Callable[[bool, int], None],
    *,
    deepspeed_config: str | None = None,
    stop_file: str | os.PathLike | None = None,
) -> None:
    """Run ``run(cpu, processes)`` in this process when it is a launched child or one process is enough;
    otherwise check the output folder (``check_output(recipe, resume=, overwrite=)``) and re-launch
    ``mediround COMMAND RECIPE COMMAND_ARGS...`` over the planned processes through Accelerate."""
    from mediround.launch import (
        expected_world_size,
        is_launched_child,
        launched_on_cpu,
        plan_launch,
        relaunch,
    )

    if is_launched_child():
        run(os.environ.get("MEDIROUND_LAUNCH_CPU") == "1", expected_world_size())
        return
    if launch.resume and launch.overwrite:
        raise LaunchError("--resume and --overwrite exclude each other")
    if deepspeed_config is not None:
        raise LaunchError(
            f"--deepspeed: not supported by `mediround {command}` yet (ZeRO optimizer shards cannot be checkpointed "
            "without pickle); run plain DDP with --gpus N: with LoRA, ZeRO-2 has little state to partition"
        )
    plan = plan_launch(launch.gpus, launch.cpu, launch.num_processes, launch.num_machines, launch.machine_rank,
                       launch.main_process_ip, launch.main_process_port, deepspeed_config)
    plan = dataclasses.replace(plan, mixed_precision=recipe.resolved_mixed_precision(on_gpu=not plan.cpu))
    check_output(recipe, resume=launch.resume, overwrite=launch.overwrite)
    if not plan.needs_launcher:
        run(launched_on_cpu(plan), expected_world_size(plan))
        return
    console.print(f"launching {plan.world_size} process(es) on {'CPU' if plan.cpu else 'GPU'} "
                  f"through accelerate ({plan.num_machines} machine(s))")
    module_args = (["--debug"] if _debug_enabled() else []) + [command, recipe_path, *command_args]
    relaunch(plan, module_args + launch.child_flags(), stop_file=stop_file)


def training_progress(label: str) -> Progress:
    """The progress bar of a training command: steps done of all, a status line, elapsed and remaining time."""
    return Progress(TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)


def train_with_progress(progress: Progress, train: Callable[[], Any]) -> Any | None:
    """``train()`` with the progress bar stopped after it, even on an error; its result on the main
    process, None on the others (which print nothing)."""
    try:
        result = train()
    finally:
        progress.stop()
    from accelerate import PartialState

    return result if PartialState().is_main_process else None


def print_skipped_dialogues(problems: Sequence[str]) -> None:
    for problem in problems:
        console.print(f"[yellow]skipped:[/yellow] {problem}", soft_wrap=True)


def summary_table(title: str, result: Any) -> Table:
    """The summary table of a training run, opened with how it stopped, its steps and processes."""
    table = Table(title=title, show_header=False)
    table.add_row("stopped", result.stopped)
    table.add_row("steps", f"{result.step} / {result.total_steps}")
    table.add_row("processes", str(result.world_size))
    return table


def print_summary(table: Table, result: Any) -> None:
    """Print ``table`` and, for an interrupted run, how to continue it."""
    console.print(table)
    if result.stopped == "interrupted":
        console.print("[yellow]interrupted:[/yellow] checkpoint written; continue with --resume")
