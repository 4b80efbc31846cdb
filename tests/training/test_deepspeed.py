"""DeepSpeed ZeRO-2 on two CPU processes (gloo, DS_ACCELERATOR=cpu): the same losses as two-process DDP,
two real ranks, kill + --resume equal to the uninterrupted run, checkpoints without pickle that load
without DeepSpeed. Slow: each launch starts two processes and DeepSpeed JIT-builds a comm op once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mediround.training.logging import read_events
from mediround.training.recipe import load_recipe

pytest.importorskip("deepspeed", reason="deepspeed is in the dev extra: pip install -e '.[dev]'")

STEPS = 5
ZERO2 = Path(__file__).resolve().parents[2] / "recipes" / "zero2.json"
# LoRA dropout off: DDP and ZeRO-2 then compute the same thing and only float summation order differs.
SECTIONS = {"train": {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2},
            "model": {"preset": "tiny", "lora": {"dropout": 0.0}}, "checkpoint": {"every": 2, "keep_last": 5}}


def train(recipe: Path, *flags: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "mediround_cli.main", "train", str(recipe), "--cpu", "--num-processes", "2", *flags],
        check=False, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def losses(output: Path) -> list[float]:
    return [e["loss"] for e in read_events(output / "train_log.jsonl") if e["event"] == "step"]


@pytest.mark.slow
def test_zero2_trains_like_ddp_resumes_exactly_and_writes_plain_checkpoints(write_recipe, tmp_path):
    ddp = write_recipe("ddp", **SECTIONS)
    zero = write_recipe("zero2", **SECTIONS)
    train(ddp)
    train(zero, "--deepspeed", str(ZERO2))
    ddp_out, zero_out = Path(load_recipe(ddp).output), Path(load_recipe(zero).output)

    start = next(e for e in read_events(zero_out / "train_log.jsonl") if e["event"] == "start")
    assert start["world_size"] == 2 and start["global_batch"] == 8
    final = zero_out / "checkpoints" / f"step-{STEPS:08d}"
    # Each process wrote its own RNG state and its own ZeRO partition: ranks 0 and 1 both ran.
    names = {path.name for path in final.iterdir()}
    assert {"optimizer-rank0.safetensors", "optimizer-rank1.safetensors", "rng-rank0.json", "rng-rank1.json"} <= names
    assert not any(path.suffix in (".pt", ".pth", ".bin", ".pkl") for path in final.rglob("*"))
    partition = json.loads((final / "optimizer-rank1.json").read_text(encoding="utf-8"))
    assert "single_partition_of_fp32_groups" in json.dumps(partition)

    ddp_losses, zero_losses = losses(ddp_out), losses(zero_out)
    assert len(ddp_losses) == len(zero_losses) == STEPS
    # Same data, same initial weights, same fp32 AdamW: only the order of float sums differs (ZeRO reduces
    # gradients in buckets and updates flat fp32 partitions), which moves losses by ~1e-6 relative.
    for a, b in zip(ddp_losses, zero_losses):
        assert b == pytest.approx(a, rel=1e-4)
    ddp_weights = load_file(str(ddp_out / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))
    zero_weights = load_file(str(final / "trainable.safetensors"))
    assert ddp_weights.keys() == zero_weights.keys()
    for name, weight in ddp_weights.items():
        torch.testing.assert_close(zero_weights[name], weight, rtol=1e-4, atol=1e-4, msg=name)

    # A run killed after its step-4 checkpoint leaves that checkpoint (and no final model): resume it.
    killed = tmp_path / "killed"
    shutil.copytree(zero_out, killed)
    shutil.rmtree(killed / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(killed / "model")
    resumed = write_recipe("zero2", **{**SECTIONS, "output": str(killed)})
    train(resumed, "--deepspeed", str(ZERO2), "--resume")
    resumed_weights = load_file(str(killed / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))
    for name, weight in zero_weights.items():
        torch.testing.assert_close(resumed_weights[name], weight, rtol=0, atol=0, msg=name)

    # The trained model loads and predicts without DeepSpeed.
    data = Path(load_recipe(zero).data.train)
    predict = ("import sys; sys.modules['deepspeed'] = None; from mediround_cli.main import cli; "
               f"cli(['infer', {str(data)!r}, '--model', {str(zero_out / 'model')!r}, "
               f"'--out', {str(tmp_path / 'predictions')!r}, '--cpu'])")
    completed = subprocess.run([sys.executable, "-c", predict], check=False, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert (tmp_path / "predictions" / "predictions.jsonl").is_file()
