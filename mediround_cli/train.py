"""``mediround train RECIPE.yaml [key=value ...]``: stage-1 training, re-launched over N processes."""

from __future__ import annotations

from pathlib import Path

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

STOP_FILE = ".stop-requested"


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@launch_options(click.option("--deepspeed", "deepspeed_config", default=None,
                             help="A DeepSpeed JSON config (recipes/zero2.json); refused for now, see docs/training.md."))
@handle_errors
def train(recipe_path: str, overrides: tuple[str, ...], deepspeed_config: str | None, launch: LaunchOptions) -> None:
    """Train MediRound with teacher forcing from a YAML RECIPE; KEY=VALUE overrides any recipe field
    (e.g. train.lr=1e-3). Multi-process runs re-launch this command through Accelerate."""
    from mediround.training.recipe import check_output, load_recipe

    recipe = load_recipe(recipe_path, overrides)
    run_or_relaunch("train", recipe_path, overrides, recipe, launch, check_output,
                    lambda cpu, processes: _run(recipe, launch.resume, cpu, processes, launch.allow_partial_load),
                    deepspeed_config=deepspeed_config, stop_file=Path(recipe.output) / STOP_FILE)


def _run(recipe, resume: bool, cpu: bool, processes: int, allow_partial_load: bool = False) -> None:
    from mediround.training.loop import run_training

    progress = training_progress("train")
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
            print_skipped_dialogues(payload["data_problems"])
            progress.start()
            state["task"] = progress.add_task("train", total=payload["total_steps"], completed=payload["step"],
                                              status="")
        elif kind == "step":
            entity = f" entity {payload['entity']:.3f}" if payload["entity"] else ""
            status = (f"loss {payload['loss']:.4f} (ce {payload['ce']:.3f} bce {payload['bce']:.3f} "
                      f"dice {payload['dice']:.3f}{entity}) lr {payload['lr']:.2e} {payload['samples_per_s']:.1f} samples/s")
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

    result = train_with_progress(progress, lambda: run_training(
        recipe, resume=resume, cpu=cpu, expected_processes=processes, on_event=on_event,
        allow_partial_load=allow_partial_load))
    if result is None:
        return
    table = summary_table("training", result)
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
    print_summary(table, result)
