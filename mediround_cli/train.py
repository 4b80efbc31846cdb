"""``mediround train RECIPE.yaml [key=value ...]``: stage-1 training, re-launched over N processes."""

from __future__ import annotations

import click

from mediround.metrics import METRIC_LABELS, METRICS
from mediround.training.engine import TrainingResult
from mediround.training.events import CHAINED_TRACK, TEACHER_FORCED_TRACK, StepLogged, TrackScores, Validated
from mediround.training.recipe import PAPER_RECIPE, check_output, load_recipe, recorded_init_from
from mediround.training.stage1 import run_training
from mediround_cli.common import handle_errors
from mediround_cli.launch_options import LaunchOptions, StageView, launch_options, run_training_command


@click.command(epilog="""\b
Examples:
  mediround train --gpus 4 --deepspeed recipes/zero2.json   # the paper's recipe (mediround-7b-4gpu)
  mediround train tiny-cpu --cpu --init-from runs/tiny/model output=runs/tiny-ft   # fine-tune a checkpoint
  mediround train tiny-cpu --cpu --resume train.max_steps=400              # continue, or extend a finished run""")
@click.argument("recipe_path", metavar="[RECIPE]", required=False, default=PAPER_RECIPE)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--init-from", "init_from", default=None, metavar="CKPT",
              help="Fine-tune from this MediRound checkpoint folder (new optimizer and schedule; its model must "
                   "have the recipe's architecture). --resume of such a run takes it from run.json.")
@launch_options()
@handle_errors
def train(recipe_path: str, overrides: tuple[str, ...], init_from: str | None, launch: LaunchOptions) -> None:
    """Train MediRound with teacher forcing from a YAML RECIPE (a file, or a shipped recipe's name from
    `mediround recipes`; default: the paper's 4-GPU recipe); KEY=VALUE overrides any recipe field
    (e.g. train.lr=1e-3). Every weight and data file must be on this machine: the run stops before any
    launch naming each missing one. Multi-process runs re-launch this command through Accelerate.
    --resume may raise train.max_steps to extend a run (the LR schedule follows the new total)."""
    args = [*overrides, *([f"init_from={init_from}"] if init_from else [])]
    recipe = load_recipe(recipe_path, args, require_weights=True)
    if launch.resume and recipe.init_from is None and (recorded := recorded_init_from(recipe)):
        args.append(f"init_from={recorded}")
        recipe = load_recipe(recipe_path, args, require_weights=True)
    run_training_command(VIEW, run_training, args, recipe_path, recipe, launch, check_output)


def _step_status(event: StepLogged) -> str:
    parts = event.components
    entity = f" entity {parts['entity']:.3f}" if parts["entity"] else ""
    return (f"loss {event.loss:.4f} (ce {parts['ce']:.3f} bce {parts['bce']:.3f} dice {parts['dice']:.3f}{entity}) "
            f"lr {event.lr:.2e} {event.samples_per_s:.1f} samples/s")


def _per_round(rounds: dict[int, float]) -> str:
    return " ".join(f"r{number}:{dice:.3f}" for number, dice in sorted(rounds.items()))


def _validation_lines(event: Validated) -> list[str]:
    forced = event.tracks[TEACHER_FORCED_TRACK]
    lines = [(f"validation step {event.step}: teacher-forced {_scores(forced)} loss {event.loss:.4f} | per round "
              f"Dice {_per_round(forced.rounds)}")]
    chained = event.tracks.get(CHAINED_TRACK)
    if chained is not None:
        lines.append(f"  chained from own masks: {_scores(chained)} | per round Dice {_per_round(chained.rounds)}")
    return lines


def _scores(track: TrackScores) -> str:
    return " ".join(f"{METRIC_LABELS[metric]} {getattr(track, metric):.4f}" for metric in METRICS)


def _summary_rows(result: TrainingResult) -> list[tuple[str, str]]:
    rows = []
    if result.first_step is not None:
        rows.append(("loss (first -> last step)", f"{result.first_step.loss:.4f} -> {result.last_step.loss:.4f}"))
    for track, name in ((TEACHER_FORCED_TRACK, "teacher-forced"), (CHAINED_TRACK, "chained")):
        scored = [v for v in result.validations if track in v.tracks]
        if scored:
            rows.append((f"validation Dice ({name})", " -> ".join(f"{v.tracks[track].dice:.4f} (step {v.step})"
                                                               for v in (scored[0], scored[-1]))))
    return rows


VIEW = StageView(command="train", first_status="", start_detail=lambda event: "", step_status=_step_status,
                 validation_lines=_validation_lines, summary_rows=_summary_rows,
                 model_row="model (for infer, eval, train-jcm)")
