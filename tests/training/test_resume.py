"""A run killed mid-way (SIGKILL) or interrupted (SIGINT) and resumed ends with the same weights as an
uninterrupted run, and no half-written checkpoint ever carries a final name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mediround.model.checkpoint import load_checkpoint
from mediround.training.checkpointing import CHECKPOINT_PATTERN
from mediround.training.events import Event, StepLogged
from mediround.training.logging import read_events
from mediround.training.recipe import load_recipe
from mediround.training.stage1 import run_training
from mediround_cli.main import cli

STEPS = 8
CHECKPOINT_FILES = {"trainer_state.json", "trainable.safetensors", "optimizer.json", "optimizer.safetensors",
                    "scheduler.json", "rng-rank0.json", "rng-rank0.safetensors", "model"}
# LoRA dropout stays on (0.05): equal weights then also need the RNG states restored. Reference swaps are on:
# the resumed run must swap the same references as the uninterrupted one.
SECTIONS = {"train": {"max_steps": STEPS, "batch_size": 2}, "checkpoint": {"every": 2, "keep_last": 2},
            "augment": {"reference_swap": 0.5}}


def final_checkpoints(checkpoints: Path) -> dict[int, Path]:
    if not checkpoints.is_dir():
        return {}
    return {int(m.group(1)): p for p in checkpoints.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))}


def assert_complete(folder: Path) -> None:
    try:
        names = {p.name for p in folder.iterdir()}
    except FileNotFoundError:
        return  # pruned between listing and reading
    assert CHECKPOINT_FILES <= names, f"{folder.name} is incomplete: {sorted(names)}"


def test_killed_and_interrupted_runs_resume_to_the_same_weights(write_recipe):
    reference = load_recipe(write_recipe("reference", **SECTIONS))
    assert run_training(reference, cpu=True).step == STEPS

    recipe_path = write_recipe("killed", **SECTIONS)
    recipe = load_recipe(recipe_path)
    checkpoints = Path(recipe.output) / "checkpoints"
    process = subprocess.Popen(
        [sys.executable, "-m", "mediround_cli.main", "train", str(recipe_path), "--cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        while process.poll() is None and not final_checkpoints(checkpoints):
            time.sleep(0.01)
        for folder in final_checkpoints(checkpoints).values():
            assert_complete(folder)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    killed_at = max(final_checkpoints(checkpoints))
    assert killed_at < STEPS

    def interrupt_at_step_5(event: Event) -> None:
        if isinstance(event, StepLogged) and event.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)
    interrupted = run_training(recipe, resume=True, cpu=True, on_event=interrupt_at_step_5)
    assert interrupted.stopped == "interrupted" and interrupted.step == 5
    assert 5 in final_checkpoints(checkpoints)
    assert signal.getsignal(signal.SIGINT) is handler_before

    finished = run_training(recipe, resume=True, cpu=True)
    assert finished.stopped == "finished" and finished.step == STEPS
    for folder in final_checkpoints(checkpoints).values():
        assert_complete(folder)
    assert sorted(final_checkpoints(checkpoints)) == [6, 8]  # keep_last: 2
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert finished.model == Path(recipe.output) / "model"
    assert load_checkpoint(finished.model).config == recipe.model

    resumed = load_file(str(checkpoints / f"step-{STEPS:08d}" / "trainable.safetensors"))
    expected = load_file(str(Path(reference.output) / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))
    assert resumed.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(resumed[name], weight), name

    events = read_events(Path(recipe.output) / "train_log.jsonl")
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))
    starts = [e for e in events if e["event"] == "start"]
    assert [Path(e["resumed_from"]).name if e["resumed_from"] else None for e in starts] == [
        None, f"step-{killed_at:08d}", "step-00000005"]


def test_non_finite_loss_stops_or_skips_and_never_reaches_a_checkpoint(write_recipe):
    # lr 1e30: step 1 is finite, then the weights are ~1e30 and the loss of step 2 overflows.
    sections = {"train": {"max_steps": 3, "lr": 1.0e30, "warmup_steps": 0}, "checkpoint": {"every": 1}}
    stopping = write_recipe("stop", **sections)
    result = CliRunner().invoke(cli, ["train", str(stopping), "--cpu"])
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "non-finite loss or gradient at step 2 (epoch 0, batch 1)" in error[0]
    assert "synth-train-" in error[0]
    assert sorted(final_checkpoints(Path(load_recipe(stopping).output) / "checkpoints")) == [1]

    skipping = load_recipe(write_recipe("skip", **sections), ["train.skip_nonfinite=true"])
    outcome = run_training(skipping, cpu=True)
    assert outcome.stopped == "finished" and outcome.skipped_steps == 2
    weights = load_file(str(outcome.checkpoint / "trainable.safetensors"))
    assert all(torch.isfinite(weight).all() for weight in weights.values())
    skips = [e for e in read_events(Path(skipping.output) / "train_log.jsonl") if e["event"] == "skip"]
    assert [e["step"] for e in skips] == [2, 3]
