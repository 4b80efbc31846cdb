"""Two gloo DDP processes on CPU train like one process with the same global batch (and like one process
with gradient accumulation); two simulated machines with one process each train like those two processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from two_machines import finish_all, machines

from mediround.model import build_model
from mediround.training.logging import read_events
from mediround.training.recipe import load_recipe
from mediround.training.stage1 import run_training

STEPS = 3
COMMON = {"train": {"max_steps": STEPS, "batch_size": 2}, "model": {"preset": "tiny", "lora": {"dropout": 0.0}}}

pytestmark = pytest.mark.slow


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))


def check_two_processes(output: Path) -> None:
    """The run saw a world size of 2 (every process checks it against torch.distributed before training)
    and each of ranks 0 and 1 wrote its own RNG state into the checkpoint."""
    start = next(e for e in read_events(output / "train_log.jsonl") if e["event"] == "start")
    assert (start["world_size"], start["global_batch"]) == (2, 4)
    final = output / "checkpoints" / f"step-{STEPS:08d}"
    assert sorted(p.name for p in final.glob("rng-rank*.safetensors")) == ["rng-rank0.safetensors", "rng-rank1.safetensors"]


def assert_same_weights(actual: dict[str, torch.Tensor],
                        expected: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every tensor and the whole flattened weights agree within 1e-5 relative; returns both vectors."""
    assert actual.keys() == expected.keys()
    for name, weight in expected.items():
        # atol covers key biases: their true gradient is 0, and Adam turns float noise into tiny steps.
        torch.testing.assert_close(actual[name], weight, rtol=1e-5, atol=1e-5, msg=name)
    actual_vector = torch.cat([actual[name].flatten() for name in expected])
    expected_vector = torch.cat([weight.flatten() for weight in expected.values()])
    assert (actual_vector - expected_vector).norm() / expected_vector.norm() < 1e-5
    return actual_vector, expected_vector


@pytest.fixture(scope="module")
def two_processes(write_module_recipe) -> Path:
    """The output folder of a 1-machine 2-process run."""
    two = write_module_recipe("two", **COMMON)
    completed = subprocess.run(
        [sys.executable, "-m", "mediround_cli.main", "train", str(two), "--cpu", "--num-processes", "2"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return Path(load_recipe(two).output)


def test_two_processes_and_accumulation_match_one_process_with_the_same_global_batch(write_recipe, two_processes):
    check_two_processes(two_processes)

    one = load_recipe(write_recipe("one", **COMMON), ["train.batch_size=4"])
    result = run_training(one, cpu=True, expected_processes=1)
    assert result.world_size == 1 and result.step == STEPS

    accumulated = load_recipe(write_recipe("accumulated", **COMMON), ["train.grad_accum=2"])
    assert run_training(accumulated, cpu=True, expected_processes=1).step == STEPS
    for name, weight in final_weights(Path(accumulated.output)).items():
        torch.testing.assert_close(weight, final_weights(Path(one.output))[name], rtol=1e-5, atol=1e-5, msg=name)

    one_weights = final_weights(Path(one.output))
    two_vector, one_vector = assert_same_weights(final_weights(two_processes), one_weights)
    model = build_model(one.model)
    initial = dict(model.named_parameters())
    initial_vector = torch.cat([initial[name].detach().flatten() for name in one_weights])
    assert (one_vector - initial_vector).norm() > 1000 * (two_vector - one_vector).norm()

    losses = {
        name: [e["loss"] for e in read_events(output / "train_log.jsonl") if e["event"] == "step"]
        for name, output in (("two", two_processes), ("one", Path(one.output)))
    }
    assert len(losses["one"]) == STEPS
    torch.testing.assert_close(torch.tensor(losses["two"]), torch.tensor(losses["one"]), rtol=1e-5, atol=0.0)


def test_two_machines_train_like_two_processes_on_one(write_recipe, two_processes, tmp_path):
    recipe = write_recipe("machines", **COMMON)
    with machines(["train", str(recipe)], tmp_path) as started:
        finish_all(started)
    output = Path(load_recipe(recipe).output)
    check_two_processes(output)
    assert_same_weights(final_weights(output), final_weights(two_processes))


def test_micro_batch_means_weigh_the_same_over_processes_as_over_accumulation(write_recipe):
    """``train.loss_averaging: micro-batch-mean`` (the authors' DeepSpeed averaging): DDP's gradient average
    over 2 processes and the 1/2 of each of 2 accumulation steps weigh the same two micro-batch means, so
    both runs end with the same weights (the micro-batches are the same slices of the same shuffle)."""
    sections = {**COMMON, "train": {**COMMON["train"], "loss_averaging": "micro-batch-mean"}}
    two = write_recipe("two-mean", **sections)
    completed = subprocess.run(
        [sys.executable, "-m", "mediround_cli.main", "train", str(two), "--cpu", "--num-processes", "2"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    accumulated = load_recipe(write_recipe("accumulated-mean", **sections), ["train.grad_accum=2"])
    assert run_training(accumulated, cpu=True, expected_processes=1).step == STEPS
    assert_same_weights(final_weights(Path(load_recipe(two).output)), final_weights(Path(accumulated.output)))
