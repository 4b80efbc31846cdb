"""Runs that continue other runs: fine-tuning from a MediRound checkpoint (``--init-from``), extending a run
with a raised ``train.max_steps`` on ``--resume``, and the loss curve reported to TensorBoard."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mediround.errors import CheckpointError, RecipeError
from mediround.model import build_model, load_sample
from mediround.model.checkpoint import load_checkpoint
from mediround.training.data import ShardedStream
from mediround.training.engine import TRACKER_PROJECT, load_training_dialogues
from mediround.training.logging import read_events
from mediround.training.recipe import RUN_FILE, check_output, load_recipe
from mediround.training.stage1 import run_training
from mediround_cli.main import cli

# LoRA dropout off: a training forward then computes what an evaluation forward of the same weights does.
NO_DROPOUT = {"model": {"preset": "tiny", "lora": {"dropout": 0.0}}}


def step_losses(output: str | Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(Path(output) / "train_log.jsonl") if e["event"] == "step"}


def first_batch_loss(model, recipe) -> float:
    """The loss of ``model`` on the first global batch a one-process run of ``recipe`` reads."""
    dialogues, _ = load_training_dialogues(recipe.data.train, recipe)
    stream = ShardedStream(len(dialogues), recipe.train.batch_size, 1, 0, recipe.train.seed)
    batch = model.processor.collate([load_sample(dialogues[i]) for i in stream.next_indices()])
    with torch.no_grad():
        return float(model(batch).loss)


def test_init_from_starts_from_the_checkpoints_weights_and_resume_keeps_it(write_recipe):
    base = load_recipe(write_recipe("base", **NO_DROPOUT))
    checkpoint = run_training(base, cpu=True).model
    path = write_recipe("tuned", **NO_DROPOUT, train={"max_steps": 2, "lr": 1.0e-4})
    tuned = load_recipe(path, [f"init_from={checkpoint}"])
    result = run_training(tuned, cpu=True)

    expected = first_batch_loss(load_checkpoint(checkpoint).train(), tuned)
    fresh = first_batch_loss(build_model(tuned.model).train(), tuned)
    assert result.first_step.loss == pytest.approx(expected, rel=1e-5)
    assert abs(fresh - expected) > 100 * abs(result.first_step.loss - expected) + 1e-3
    assert json.loads((Path(tuned.output) / RUN_FILE).read_text())["recipe"]["init_from"] == str(checkpoint)

    # --resume without --init-from continues the run as run.json recorded it (here: extended by a step).
    resumed = CliRunner().invoke(cli, ["train", str(path), "--cpu", "--resume", "train.max_steps=3"])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(step_losses(tuned.output)) == [1, 2, 3]

    with pytest.raises(RecipeError, match=r"key 'model\.heads\.seg_state': the init_from checkpoint .* "
                                          r"different architecture \('at_seg' there, 'before_seg' here\)"):
        load_recipe(path, [f"init_from={checkpoint}", "model.heads.seg_state=before_seg"])


def test_a_run_extended_on_resume_equals_a_run_of_the_new_length(write_recipe):
    # warmup_steps 2: steps 1-3 get LR factors 0.5, 1, 1 whether the total is 3 or 5, so the extended run can
    # only equal the 5-step one if steps 4-5 follow the schedule recomputed for 5 steps (3 steps would give 0).
    path = write_recipe("extended")
    short = load_recipe(path, ["train.max_steps=3"])
    assert run_training(short, cpu=True).step == 3
    extended = load_recipe(path, ["train.max_steps=5"])
    check_output(extended, resume=True, overwrite=False)
    result = run_training(extended, resume=True, cpu=True)
    assert (result.first_step.step, result.step) == (4, 5)
    reference = load_recipe(write_recipe("reference"), ["train.max_steps=5"])
    run_training(reference, cpu=True)

    final = "checkpoints/step-00000005/trainable.safetensors"
    ours, theirs = load_file(str(Path(extended.output) / final)), load_file(str(Path(reference.output) / final))
    assert ours.keys() == theirs.keys()
    for name, weight in theirs.items():
        assert torch.equal(ours[name], weight), name
    assert step_losses(extended.output) == step_losses(reference.output)
    assert json.loads((Path(extended.output) / RUN_FILE).read_text())["recipe"]["train"]["max_steps"] == 5

    with pytest.raises(RecipeError, match=r"holds another run .*first difference: 'train\.lr'"):
        check_output(load_recipe(path, ["train.max_steps=6", "train.lr=5e-4"]), resume=True, overwrite=False)
    with pytest.raises(CheckpointError, match="is at step 5, past this run's 4 steps"):
        run_training(load_recipe(path, ["train.max_steps=4"]), resume=True, cpu=True)


def test_tensorboard_receives_the_logged_losses(write_recipe):
    recipe = load_recipe(write_recipe("tracked", log={"every": 1, "report_to": ["tensorboard"]}))
    run_training(recipe, cpu=True)
    events = EventAccumulator(str(Path(recipe.output) / TRACKER_PROJECT))
    events.Reload()
    logged = {scalar.step: scalar.value for scalar in events.Scalars("step/loss")}
    expected = step_losses(recipe.output)
    assert sorted(logged) == sorted(expected) == [1, 2, 3]
    for step, loss in expected.items():
        assert logged[step] == pytest.approx(loss, rel=1e-6)  # TensorBoard stores float32


def test_a_tracker_without_its_package_is_one_line_naming_the_extra(write_recipe, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    result = CliRunner().invoke(cli, ["train", str(write_recipe()), "--cpu", "log.report_to=[wandb]"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "key 'log.report_to'" in lines[0] and 'pip install -e ".[wandb]"' in lines[0], result.output
