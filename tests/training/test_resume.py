"""A run killed mid-way (SIGKILL) or interrupted (SIGINT) and resumed ends with the same weights as an
uninterrupted run, and no half-written checkpoint ever carries a final name."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mediround.atomic import write_json
from mediround.doctor.files import check_output as doctor_output_rows
from mediround.errors import CheckpointError, RecipeError
from mediround.model.checkpoint import load_checkpoint
from mediround.training.checkpointing import CHECKPOINT_PATTERN, TRAINER_STATE
from mediround.training.engine import check_resumable
from mediround.training.events import Event, StepLogged
from mediround.training.logging import read_events
from mediround.training.recipe import (
    RESUMABLE_KEYS,
    RUN_FILE,
    check_output,
    load_recipe,
    run_record,
    without_keys,
)
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


def record_as_earlier_release(recipe, record: dict, absent: list[str], extra: dict | None = None) -> str:
    """Rewrite ``recipe``'s run.json (from ``record``) and its checkpoints' trainer states as a release
    without the keys ``absent`` wrote them (``extra``: recorded keys, dotted, that this release changed or
    lacks); returns the recorded hash."""
    earlier = json.loads(json.dumps(record))
    earlier["recipe"] = without_keys(earlier["recipe"], absent)
    for dotted, value in (extra or {}).items():
        *sections, name = dotted.split(".")
        node = earlier["recipe"]
        for section in sections:
            node = node[section]
        node[name] = value
    earlier.pop("earlier_hashes")
    # The hash of the run's identity as the earlier release computed it: its recipe without the resumable
    # keys, as sorted compact JSON, the first 16 hex digits of its sha256.
    text = json.dumps(without_keys(earlier["recipe"], RESUMABLE_KEYS), sort_keys=True, separators=(",", ":"))
    earlier["recipe_hash"] = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    output = Path(recipe.output)
    write_json(output / RUN_FILE, earlier)
    for folder in final_checkpoints(output / "checkpoints").values():
        state = json.loads((folder / TRAINER_STATE).read_text())
        write_json(folder / TRAINER_STATE, {**state, "recipe_hash": earlier["recipe_hash"]})
    return earlier["recipe_hash"]


def test_a_run_of_an_earlier_release_resumes_when_the_new_keys_are_at_their_defaults(write_recipe):
    path = write_recipe("upgraded", train={"max_steps": 2}, checkpoint={"every": 2})
    recipe = load_recipe(path)
    assert run_training(recipe, cpu=True).step == 2
    output = Path(recipe.output)
    record = json.loads((output / RUN_FILE).read_text())
    old_hash = record_as_earlier_release(recipe, record, ["train.loss_averaging"])
    assert old_hash != recipe.hash

    # The doctor still sees this run (with checkpoints), not another one.
    [folder_row, _disk] = doctor_output_rows(recipe, None)
    assert "already holds checkpoints of this recipe" in folder_row.detail

    # First resume: the run is at its end, so no checkpoint is written and the step-2 one keeps the old hash.
    first = CliRunner().invoke(cli, ["train", str(path), "--cpu", "--resume"])
    assert first.exit_code == 0, first.output
    assert ("this run was started by an earlier release; new keys at their defaults: train.loss_averaging"
            in first.output)
    rewritten = json.loads((output / RUN_FILE).read_text())
    assert rewritten["recipe_hash"] == recipe.hash and rewritten["earlier_hashes"] == [old_hash]
    assert rewritten["recipe"]["train"]["loss_averaging"] == "weighted"
    assert json.loads((output / "checkpoints" / "step-00000002" / TRAINER_STATE).read_text())["recipe_hash"] == old_hash

    # Second resume before any new checkpoint: the old checkpoint is accepted through run.json's earlier hashes.
    second = CliRunner().invoke(cli, ["train", str(path), "--cpu", "--resume", "train.max_steps=3"])
    assert second.exit_code == 0, second.output
    assert "earlier release" not in second.output
    assert "resumed from" in second.output and "step-00000002" in second.output
    assert sorted(final_checkpoints(output / "checkpoints")) == [2, 3]
    assert json.loads((output / "checkpoints" / "step-00000003" / TRAINER_STATE).read_text())["recipe_hash"] == recipe.hash
    assert json.loads((output / RUN_FILE).read_text())["earlier_hashes"] == [old_hash]
    steps = [e["step"] for e in read_events(output / "train_log.jsonl") if e["event"] == "step"]
    assert steps == [1, 2, 3]


def test_an_earlier_record_is_refused_when_a_new_key_is_not_at_its_default_or_a_key_differs(write_recipe):
    recipe = load_recipe(write_recipe("changed", train={"loss_averaging": "micro-batch-mean"}))
    output = Path(recipe.output)
    output.mkdir()
    checkpoint = output / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    write_json(checkpoint / TRAINER_STATE, {"step": 1, "world_size": 1, "recipe_hash": "0" * 16})

    # The record lacks loss_averaging, which this recipe sets to another value than the default.
    old_hash = record_as_earlier_release(recipe, run_record(recipe), ["train.loss_averaging"])
    with pytest.raises(RecipeError, match=r"holds another run .*first difference: 'train.loss_averaging'"):
        check_output(recipe, resume=True, overwrite=False)
    result = CliRunner().invoke(cli, ["train", str(recipe.source), "--cpu", "--resume"])
    assert result.exit_code != 0 and "first difference: 'train.loss_averaging'" in result.output
    with pytest.raises(CheckpointError, match=f"written by recipe {old_hash}, not this one"):
        check_resumable({"step": 1, "world_size": 1, "recipe_hash": old_hash}, recipe, 1, checkpoint, 3)
    [folder_row, _disk] = doctor_output_rows(recipe, None)
    assert "holds another run" in folder_row.detail and "train.loss_averaging" in folder_row.detail

    # The default here, but the record also holds another value of a key both releases have.
    default = load_recipe(write_recipe("changed"))
    record_as_earlier_release(default, run_record(default), ["train.loss_averaging"], {"train.lr": 5.0e-4})
    with pytest.raises(RecipeError, match=r"first difference: 'train.lr'"):
        check_output(default, resume=True, overwrite=False)

    # A key recorded by the earlier release that this one no longer has.
    record_as_earlier_release(default, run_record(default), ["train.loss_averaging"], {"train.retired": 1})
    with pytest.raises(RecipeError, match=r"first difference: 'train.retired'"):
        check_output(default, resume=True, overwrite=False)

    # Every key as recorded, the new one at its default: accepted (only the checkpoint rule remains).
    record_as_earlier_release(default, run_record(default), ["train.loss_averaging"])
    with pytest.raises(RecipeError, match="already holds checkpoints of this recipe"):
        check_output(default, resume=False, overwrite=False)
    check_output(default, resume=True, overwrite=False)
