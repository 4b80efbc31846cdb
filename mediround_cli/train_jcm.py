"""``mediround train-jcm RECIPE.yaml --model CKPT [--rollout] [key=value ...]``: stage 2 (JCM) training."""

from __future__ import annotations

import math

import click

from mediround_cli.common import console, handle_errors
from mediround_cli.launch_options import (
    LaunchOptions,
    launch_options,
    print_skipped_dialogues,
    print_summary,
    run_or_relaunch,
    summary_table,
    train_with_progress,
    training_progress,
)
from mediround_cli.partial_load import print_load_reports


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--model", "model_path", default=None,
              help="The frozen MediRound checkpoint folder (from `mediround train`); overrides the recipe's.")
@click.option("--rollout", is_flag=True,
              help="Train on [SEG] features of chains of the model's own masks (jcm.rollout=true).")
@launch_options()
@handle_errors
def train_jcm(recipe_path: str, overrides: tuple[str, ...], model_path: str | None, rollout: bool,
              launch: LaunchOptions) -> None:
    """Train the JCM judge and refine MLPs on a frozen MediRound from a YAML RECIPE and write a new
    checkpoint (<output>/model) that `infer`/`eval` use with --beta. KEY=VALUE overrides any recipe field."""
    from mediround.training.jcm_loop import check_jcm_output, load_jcm_recipe

    flags = ([f"model={model_path}"] if model_path else []) + (["jcm.rollout=true"] if rollout else [])
    recipe = load_jcm_recipe(recipe_path, [*overrides, *flags])
    command_args = [*overrides, *(["--model", model_path] if model_path else []), *(["--rollout"] if rollout else [])]
    run_or_relaunch("train-jcm", recipe_path, command_args, recipe, launch, check_jcm_output,
                    lambda cpu, processes: _run(recipe, launch.resume, cpu, processes, launch.allow_partial_load))


def _run(recipe, resume: bool, cpu: bool, processes: int, allow_partial_load: bool = False) -> None:
    from mediround.training.jcm_loop import run_jcm_training

    progress = training_progress("train-jcm")
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
            print_skipped_dialogues(payload["data_problems"])
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

    result = train_with_progress(progress, lambda: run_jcm_training(
        recipe, resume=resume, cpu=cpu, expected_processes=processes, on_event=on_event,
        allow_partial_load=allow_partial_load))
    if result is None:
        return
    table = summary_table("train-jcm", result)
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
    print_summary(table, result)


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _validation_line(payload: dict) -> str:
    return (f"validation step {payload['step']}: judge Spearman rollout {_number(payload['spearman_rollout'])} "
            f"teacher-forced {_number(payload['spearman_teacher-forced'])} | chained Dice off "
            f"{payload['off_dice']:.4f} -> beta {payload['beta']:g} {payload['jcm_dice']:.4f}, cIoU "
            f"{payload['off_ciou']:.4f} -> {payload['jcm_ciou']:.4f} ({payload['refined_share']:.0%} refined)")
