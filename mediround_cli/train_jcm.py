"""``mediround train-jcm RECIPE.yaml --model CKPT [--rollout] [key=value ...]``: stage 2 (JCM) training."""

from __future__ import annotations

import math

import click

from mediround.training.engine import TrainingResult
from mediround.training.events import JCMRunStarted, JCMValidated, StepLogged
from mediround.training.jcm_data import ROLLOUT, TEACHER_FORCED
from mediround.training.recipe import load_jcm_recipe
from mediround.training.stage2 import LOSS_KEYS, check_jcm_output, run_jcm_training
from mediround_cli.common import handle_errors
from mediround_cli.launch_options import LaunchOptions, StageView, launch_options, run_training_command


@click.command(epilog="""\b
Examples:
  mediround train-jcm jcm-tiny-cpu --model runs/tiny-cpu/model --cpu
  mediround train-jcm jcm-7b-4gpu --model runs/mediround-7b-4gpu/checkpoints/best --gpus 4 --deepspeed recipes/zero2.json
  mediround train-jcm my-jcm.yaml --model runs/x/model --rollout train.max_steps=200""")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--model", "model_path", default=None,
              help="The frozen MediRound checkpoint folder (from `mediround train`: OUTPUT/model, or "
                   "OUTPUT/checkpoints/best with checkpoint.keep_best); overrides the recipe's.")
@click.option("--rollout", is_flag=True,
              help="Train on [SEG] features of chains of the model's own masks (jcm.rollout=true).")
@launch_options()
@handle_errors
def train_jcm(recipe_path: str, overrides: tuple[str, ...], model_path: str | None, rollout: bool,
              launch: LaunchOptions) -> None:
    """Train the JCM judge and refine MLPs on a frozen MediRound from a YAML RECIPE and write a new
    checkpoint (<output>/model) that `infer`/`eval` use with --beta. KEY=VALUE overrides any recipe field."""
    flags = ([f"model={model_path}"] if model_path else []) + (["jcm.rollout=true"] if rollout else [])
    recipe = load_jcm_recipe(recipe_path, [*overrides, *flags])
    command_args = [*overrides, *(["--model", model_path] if model_path else []), *(["--rollout"] if rollout else [])]
    run_training_command(VIEW, run_jcm_training, command_args, recipe_path, recipe, launch, check_jcm_output)


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _start_detail(event: JCMRunStarted) -> str:
    if event.rollout:
        return f", rollout features ({event.rollout_fraction:.0%} of dialogues)"
    return ", teacher-forced features"


def _step_status(event: StepLogged) -> str:
    parts = event.components
    return (f"loss {event.loss:.4f} (judge {parts['judge']:.3f} refine bce {parts['refine_bce']:.3f} "
            f"dice {parts['refine_dice']:.3f})")


def _validation_lines(event: JCMValidated) -> list[str]:
    line = (f"validation step {event.step}: judge Spearman rollout {_number(event.spearman[ROLLOUT])} "
            f"teacher-forced {_number(event.spearman[TEACHER_FORCED])} | chained Dice off {event.off.dice:.4f} -> "
            f"beta {event.beta:g} {event.jcm.dice:.4f}, cIoU {event.off.ciou:.4f} -> {event.jcm.ciou:.4f} "
            f"({event.refined_share:.0%} refined)")
    return [line]


def _summary_rows(result: TrainingResult) -> list[tuple[str, str]]:
    rows = []
    if result.first_step is not None:
        first, last = result.first_step.components, result.last_step.components
        rows += [(f"{key} (first -> last step)", f"{first[key]:.4f} -> {last[key]:.4f}") for key in LOSS_KEYS]
    if result.validations:
        last_validation = result.validations[-1]
        off, jcm, beta = last_validation.off, last_validation.jcm, last_validation.beta
        rows += [
            ("judge Spearman (rollout / teacher-forced)",
             f"{_number(last_validation.spearman[ROLLOUT])} / {_number(last_validation.spearman[TEACHER_FORCED])}"),
            (f"chained Dice JCM off -> beta {beta:g}", f"{off.dice:.4f} -> {jcm.dice:.4f}"),
            (f"chained cIoU JCM off -> beta {beta:g}", f"{off.ciou:.4f} -> {jcm.ciou:.4f}"),
        ]
    return rows


VIEW = StageView(command="train-jcm", first_status="computing features", start_detail=_start_detail,
                 step_status=_step_status, validation_lines=_validation_lines, summary_rows=_summary_rows,
                 model_row="model (use with infer/eval --beta)")
