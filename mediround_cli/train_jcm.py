"""``mediround train-jcm RECIPE.yaml --model CKPT [--rollout] [key=value ...]``: stage 2 (JCM) training."""

from __future__ import annotations

import dataclasses
import math
import os

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


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--model", "model_path", default=None,
              help="The frozen MediRound checkpoint folder (from `mediround train`); overrides the recipe's.")
@click.option("--rollout", is_flag=True,
              help="Train on [SEG] features of chains of the model's own masks (jcm.rollout=true).")
@click.option("--gpus", type=int, default=None, help="Train on N GPUs of this machine (N processes).")
@click.option("--cpu", is_flag=True, help="Train on CPU (gloo DDP when --num-processes > 1).")
@click.option("--num-processes", type=int, default=None, help="Processes per machine (with --cpu, or = --gpus).")
@click.option("--num-machines", type=int, default=1, show_default=True, help="Machines taking part.")
@click.option("--machine-rank", type=int, default=0, show_default=True, help="This machine's rank.")
@click.option("--main-process-ip", default=None, help="Address of machine rank 0 (multi-node).")
@click.option("--main-process-port", type=int, default=None, help="Port of machine rank 0 (multi-node).")
@click.option("--resume", is_flag=True, help="Continue from the output folder's latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Empty an output folder that holds another run first.")
@allow_partial_load_option
@handle_errors
def train_jcm(
    recipe_path: str,
    overrides: tuple[str, ...],
    model_path: str | None,
    rollout: bool,
    gpus: int | None,
    cpu: bool,
    num_processes: int | None,
    num_machines: int,
    machine_rank: int,
    main_process_ip: str | None,
    main_process_port: int | None,
    resume: bool,
    overwrite: bool,
    allow_partial_load: bool,
) -> None:
    """Train the JCM judge and refine MLPs on a frozen MediRound from a YAML RECIPE and write a new
    checkpoint (<output>/model) that `infer`/`eval` use with --beta. KEY=VALUE overrides any recipe field."""
    from mediround.training.jcm_loop import check_jcm_output, load_jcm_recipe
    from mediround.training.launch import (
        expected_world_size,
        is_launched_child,
        launched_on_cpu,
        plan_launch,
        relaunch,
    )

    flags = ([f"model={model_path}"] if model_path else []) + (["jcm.rollout=true"] if rollout else [])
    recipe = load_jcm_recipe(recipe_path, [*overrides, *flags])
    if is_launched_child():
        _run(recipe, resume, cpu=os.environ.get("MEDIROUND_LAUNCH_CPU") == "1", processes=expected_world_size(),
             allow_partial_load=allow_partial_load)
        return
    if resume and overwrite:
        raise LaunchError("--resume and --overwrite exclude each other")
    plan = plan_launch(gpus, cpu, num_processes, num_machines, machine_rank, main_process_ip, main_process_port)
    plan = dataclasses.replace(plan, mixed_precision=recipe.resolved_mixed_precision(on_gpu=not plan.cpu))
    check_jcm_output(recipe, resume=resume, overwrite=overwrite)
    if not plan.needs_launcher:
        _run(recipe, resume, cpu=launched_on_cpu(plan), processes=expected_world_size(plan),
             allow_partial_load=allow_partial_load)
        return
    console.print(f"launching {plan.world_size} process(es) on {'CPU' if plan.cpu else 'GPU'} "
                  f"through accelerate ({plan.num_machines} machine(s))")
    module_args = (["--debug"] if _debug_enabled() else []) + ["train-jcm", recipe_path, *overrides]
    module_args += (["--model", model_path] if model_path else []) + (["--rollout"] if rollout else [])
    module_args += ["--allow-partial-load"] if allow_partial_load else []
    relaunch(plan, module_args + (["--resume"] if resume else []))


def _run(recipe, resume: bool, cpu: bool, processes: int, allow_partial_load: bool = False) -> None:
    from mediround.training.jcm_loop import run_jcm_training

    progress = Progress(TextColumn("[bold]train-jcm[/bold]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console)
    state: dict = {}

    def on_event(kind: str, payload: dict) -> None:
        if kind == "load":
            print_load_reports(payload["reports"])
        elif kind == "start":
            source = (f"rollout features ({payload['rollout_fraction']:.0%} of dialogues)" if payload["rollout"]
                      else "teacher-forced features")
            console.print(
                f"world size {payload['world_size']}, global batch {payload['global_batch']}, "
                f"{payload['train_dialogues']} training / {payload['val_dialogues']} validation dialogues, "
                f"{payload['total_steps']} steps, {source}"
                + (f", resumed from {payload['resumed_from']}" if payload["resumed_from"] else "")
            )
            for problem in payload["data_problems"]:
                console.print(f"[yellow]skipped:[/yellow] {problem}", soft_wrap=True)
            progress.start()
            state["task"] = progress.add_task("jcm", total=payload["total_steps"], completed=payload["step"],
                                              status="computing features")
        elif kind == "step":
            progress.update(state["task"], completed=payload["step"], status=(
                f"loss {payload['loss']:.4f} (judge {payload['judge']:.3f} refine bce {payload['refine_bce']:.3f} "
                f"dice {payload['refine_dice']:.3f})"))
        elif kind == "validation":
            progress.console.print(_validation_line(payload))
        elif kind == "checkpoint":
            progress.console.print(f"[dim]checkpoint {payload['path']}[/dim]")

    try:
        result = run_jcm_training(recipe, resume=resume, cpu=cpu, expected_processes=processes, on_event=on_event,
                                  allow_partial_load=allow_partial_load)
    finally:
        progress.stop()
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    table = Table(title="train-jcm", show_header=False)
    table.add_row("stopped", result.stopped)
    table.add_row("steps", f"{result.step} / {result.total_steps}")
    table.add_row("processes", str(result.world_size))
    if result.first_loss is not None:
        for key in ("judge", "refine_bce", "refine_dice"):
            table.add_row(f"{key} (first -> last step)", f"{result.first_loss[key]:.4f} -> {result.last_loss[key]:.4f}")
    if result.validations:
        last = result.validations[-1]
        table.add_row("judge Spearman (rollout / teacher-forced)",
                      f"{_number(last['spearman_rollout'])} / {_number(last['spearman_teacher-forced'])}")
        table.add_row(f"chained Dice JCM off -> beta {last['beta']:g}", f"{last['off_dice']:.4f} -> {last['jcm_dice']:.4f}")
        table.add_row(f"chained cIoU JCM off -> beta {last['beta']:g}", f"{last['off_ciou']:.4f} -> {last['jcm_ciou']:.4f}")
    if result.data_problems:
        table.add_row("skipped dialogues", str(result.data_problems))
    table.add_row("checkpoint", str(result.checkpoint))
    table.add_row("model (use with infer/eval --beta)", str(result.model))
    console.print(table)
    if result.stopped == "interrupted":
        console.print("[yellow]interrupted:[/yellow] checkpoint written; continue with --resume")


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _validation_line(payload: dict) -> str:
    return (f"validation step {payload['step']}: judge Spearman rollout {_number(payload['spearman_rollout'])} "
            f"teacher-forced {_number(payload['spearman_teacher-forced'])} | chained Dice off "
            f"{payload['off_dice']:.4f} -> beta {payload['beta']:g} {payload['jcm_dice']:.4f}, cIoU "
            f"{payload['off_ciou']:.4f} -> {payload['jcm_ciou']:.4f} ({payload['refined_share']:.0%} refined)")
