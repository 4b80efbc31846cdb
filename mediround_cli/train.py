"""``mediround train RECIPE.yaml [key=value ...]``: stage-1 training, re-launched over N processes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

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
from mediround_cli.common import _debug_enabled, console, handle_errors
from mediround_cli.partial_load import allow_partial_load_option, print_load_reports

STOP_FILE = ".stop-requested"


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--gpus", type=int, default=None, help="Train on N GPUs of this machine (N processes).")
@click.option("--cpu", is_flag=True, help="Train on CPU (gloo DDP when --num-processes > 1).")
@click.option("--num-processes", type=int, default=None, help="Processes per machine (with --cpu, or = --gpus).")
@click.option("--num-machines", type=int, default=1, show_default=True, help="Machines taking part.")
@click.option("--machine-rank", type=int, default=0, show_default=True, help="This machine's rank.")
@click.option("--main-process-ip", default=None, help="Address of machine rank 0 (multi-node).")
@click.option("--main-process-port", type=int, default=None, help="Port of machine rank 0 (multi-node).")
@click.option("--deepspeed", "deepspeed_config", default=None,
              help="A DeepSpeed JSON config (recipes/zero2.json); refused for now, see docs/training.md.")
@click.option("--resume", is_flag=True, help="Continue from the output folder's latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Empty an output folder that holds another run first.")
@allow_partial_load_option
@handle_errors
def train(
    recipe_path: str,
    overrides: tuple[str, ...],
    gpus: int | None,
    cpu: bool,
    num_processes: int | None,
    num_machines: int,
    machine_rank: int,
    main_process_ip: str | None,
    main_process_port: int | None,
    deepspeed_config: str | None,
    resume: bool,
    overwrite: bool,
    allow_partial_load: bool,
) -> None:
    """Train MediRound with teacher forcing from a YAML RECIPE; KEY=VALUE overrides any recipe field
    (e.g. train.lr=1e-3). Multi-process runs re-launch this command through Accelerate."""
    from mediround.training.launch import (
        expected_world_size,
        is_launched_child,
        launched_on_cpu,
        plan_launch,
        relaunch,
    )
    from mediround.training.recipe import check_output, load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if is_launched_child():
        _run(recipe, resume, cpu=os.environ.get("MEDIROUND_LAUNCH_CPU") == "1", processes=expected_world_size(),
             allow_partial_load=allow_partial_load)
        return
    if resume and overwrite:
        raise LaunchError("--resume and --overwrite exclude each other")
    if deepspeed_config is not None:
        raise LaunchError(
            "--deepspeed: not supported by `mediround train` yet (ZeRO optimizer shards cannot be checkpointed "
            "without pickle); run plain DDP with --gpus N: with LoRA, ZeRO-2 has little state to partition"
        )
    plan = plan_launch(gpus, cpu, num_processes, num_machines, machine_rank, main_process_ip,
                       main_process_port, deepspeed_config)
    plan = dataclasses.replace(plan, mixed_precision=recipe.resolved_mixed_precision(on_gpu=not plan.cpu))
    check_output(recipe, resume=resume, overwrite=overwrite)
    if not plan.needs_launcher:
        _run(recipe, resume, cpu=launched_on_cpu(plan), processes=expected_world_size(plan),
             allow_partial_load=allow_partial_load)
        return
    console.print(f"launching {plan.world_size} process(es) on {'CPU' if plan.cpu else 'GPU'} "
                  f"through accelerate ({plan.num_machines} machine(s))")
    module_args = (["--debug"] if _debug_enabled() else []) + ["train", recipe_path, *overrides]
    stop_file = Path(recipe.output) / STOP_FILE
    flags = (["--resume"] if resume else []) + (["--allow-partial-load"] if allow_partial_load else [])
    relaunch(plan, module_args + flags, stop_file=stop_file)


def _run(recipe, resume: bool, cpu: bool, processes: int, allow_partial_load: bool = False) -> None:
    from mediround.training.loop import run_training

    progress = Progress(
        TextColumn("[bold]train[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    state: dict = {}

    def on_event(kind: str, payload: dict) -> None:
        if kind == "load":
            print_load_reports(payload["reports"])
        elif kind == "start":
            console.print(
                f"world size {payload['world_size']} (checked in every process), global batch "
                f"{payload['global_batch']}, {payload['train_dialogues']} training / {payload['val_dialogues']} "
                f"validation dialogues, {payload['total_steps']} steps"
                + (f", resumed from {payload['resumed_from']}" if payload["resumed_from"] else "")
            )
            for problem in payload["data_problems"]:
                console.print(f"[yellow]skipped:[/yellow] {problem}", soft_wrap=True)
            progress.start()
            state["task"] = progress.add_task("train", total=payload["total_steps"], completed=payload["step"],
                                              status="")
        elif kind == "step":
            status = (f"loss {payload['loss']:.4f} (ce {payload['ce']:.3f} bce {payload['bce']:.3f} "
                      f"dice {payload['dice']:.3f}) lr {payload['lr']:.2e} {payload['samples_per_s']:.1f} samples/s")
            state["last_step"] = payload
            progress.update(state["task"], completed=payload["step"], status=status)
        elif kind == "validation":
            state.setdefault("validations", []).append(payload)
            rounds = " ".join(f"r{number}:{dice:.3f}" for number, dice in sorted(payload["rounds"].items()))
            progress.console.print(
                f"validation step {payload['step']}: teacher-forced Dice {payload['dice']:.4f} gIoU "
                f"{payload['giou']:.4f} cIoU {payload['ciou']:.4f} loss {payload['loss']:.4f} | per round Dice {rounds}"
            )
            if "chained_dice" in payload:
                chained = " ".join(f"r{n}:{d:.3f}" for n, d in sorted(payload["chained_rounds"].items()))
                progress.console.print(
                    f"  chained from own masks: Dice {payload['chained_dice']:.4f} gIoU {payload['chained_giou']:.4f} "
                    f"cIoU {payload['chained_ciou']:.4f} | per round Dice {chained}"
                )
        elif kind == "checkpoint":
            progress.console.print(f"[dim]checkpoint {payload['path']}[/dim]")
            if "task" in state:
                progress.update(state["task"], completed=payload["step"])
        elif kind == "skip":
            progress.console.print(f"[yellow]skipped step {payload['step']}:[/yellow] {payload['reason']} "
                                   f"({payload['where']})")

    try:
        result = run_training(recipe, resume=resume, cpu=cpu, expected_processes=processes, on_event=on_event,
                              allow_partial_load=allow_partial_load)
    finally:
        progress.stop()
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    table = Table(title="training", show_header=False)
    table.add_row("stopped", result.stopped)
    table.add_row("steps", f"{result.step} / {result.total_steps}")
    table.add_row("processes", str(result.world_size))
    if result.first_loss is not None:
        table.add_row("loss (first -> last step)", f"{result.first_loss:.4f} -> {result.last_loss:.4f}")
    validations = [v for v in result.validations if "dice" in v]
    if validations:
        table.add_row("validation Dice (teacher-forced)", " -> ".join(f"{v['dice']:.4f} (step {v['step']})"
                                                                       for v in (validations[0], validations[-1])))
        chained = [v for v in validations if "chained_dice" in v]
        if chained:
            table.add_row("validation Dice (chained)", " -> ".join(f"{v['chained_dice']:.4f} (step {v['step']})"
                                                                 for v in (chained[0], chained[-1])))
    if result.skipped_steps:
        table.add_row("skipped non-finite steps", str(result.skipped_steps))
    if result.data_problems:
        table.add_row("skipped dialogues", str(result.data_problems))
    table.add_row("checkpoint", str(result.checkpoint))
    if result.model is not None:
        table.add_row("model (for infer, eval, train-jcm)", str(result.model))
    table.add_row("output", str(result.output))
    console.print(table)
    if result.stopped == "interrupted":
        console.print("[yellow]interrupted:[/yellow] checkpoint written; continue with --resume")
