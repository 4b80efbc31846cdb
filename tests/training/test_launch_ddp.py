"""Two gloo DDP processes on CPU train like one process with the same global batch (and like one process
with gradient accumulation)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mediround.model import build_model
from mediround.training.logging import read_events
from mediround.training.recipe import load_recipe
from mediround.training.stage1 import run_training

STEPS = 3


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))


def test_two_processes_and_accumulation_match_one_process_with_the_same_global_batch(write_recipe):
    common = {"train": {"max_steps": STEPS, "batch_size": 2}, "model": {"preset": "tiny", "lora": {"dropout": 0.0}}}
    two = write_recipe("two", **common)
    completed = subprocess.run(
        [sys.executable, "-m", "mediround_cli.main", "train", str(two), "--cpu", "--num-processes", "2"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    two_output = Path(load_recipe(two).output)
    start = next(e for e in read_events(two_output / "train_log.jsonl") if e["event"] == "start")
    assert start["world_size"] == 2
    assert start["global_batch"] == 4

    one = load_recipe(write_recipe("one", **common), ["train.batch_size=4"])
    result = run_training(one, cpu=True, expected_processes=1)
    assert result.world_size == 1 and result.step == STEPS

    accumulated = load_recipe(write_recipe("accumulated", **common), ["train.grad_accum=2"])
    assert run_training(accumulated, cpu=True, expected_processes=1).step == STEPS
    for name, weight in final_weights(Path(accumulated.output)).items():
        torch.testing.assert_close(weight, final_weights(Path(one.output))[name], rtol=1e-5, atol=1e-5, msg=name)

    two_weights, one_weights = final_weights(two_output), final_weights(Path(one.output))
    assert two_weights.keys() == one_weights.keys()
    for name, weight in one_weights.items():
        # atol covers key biases: their true gradient is 0, and Adam turns float noise into tiny steps.
        torch.testing.assert_close(two_weights[name], weight, rtol=1e-5, atol=1e-5, msg=name)
    two_vector = torch.cat([two_weights[name].flatten() for name in one_weights])
    one_vector = torch.cat([weight.flatten() for weight in one_weights.values()])
    assert (two_vector - one_vector).norm() / one_vector.norm() < 1e-5
    model = build_model(one.model)
    initial = dict(model.named_parameters())
    initial_vector = torch.cat([initial[name].detach().flatten() for name in one_weights])
    assert (one_vector - initial_vector).norm() > 1000 * (two_vector - one_vector).norm()

    losses = {
        name: [e["loss"] for e in read_events(output / "train_log.jsonl") if e["event"] == "step"]
        for name, output in (("two", two_output), ("one", Path(one.output)))
    }
    assert len(losses["one"]) == STEPS
    torch.testing.assert_close(torch.tensor(losses["two"]), torch.tensor(losses["one"]), rtol=1e-5, atol=0.0)
