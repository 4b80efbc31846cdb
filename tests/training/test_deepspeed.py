"""DeepSpeed ZeRO-2 on two CPU processes (gloo, DS_ACCELERATOR=cpu): the loss curve of two-process DDP and of
one process with the same global batch, two real ranks, kill + --resume equal to
the uninterrupted run, a checkpoint without pickle that infer loads without DeepSpeed, and train-jcm under
ZeRO-2 against its one-process run. Slow: four launches of two processes (DeepSpeed JIT-builds a comm op
on first use); the one-process references run in this process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mediround.training.logging import read_events
from mediround.training.recipe import SHIPPED_RECIPES, load_jcm_recipe, load_recipe
from mediround.training.stage1 import run_training
from mediround.training.stage2 import run_jcm_training
from mediround_cli.main import cli

STEPS = 5
ZERO2 = SHIPPED_RECIPES / "zero2.json"
# Two processes x 2 dialogues x 2 accumulation steps = 8 per step. LoRA dropout off: ZeRO-2 and one process
# then compute the same thing and only the order of float sums differs.
SECTIONS = {"train": {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2},
            "model": {"preset": "tiny", "lora": {"dropout": 0.0}}, "checkpoint": {"every": 4, "keep_last": 5}}
# Same data, initial weights and fp32 AdamW: ZeRO reduces gradients in buckets over two processes and
# updates flat fp32 partitions, one process sums its micro-batch of 4 at once. That moved the step-5 loss by
# 4e-8 relative here; 1e-4 leaves room for other CPUs and stays far below what a step changes (~5 %).
LOSS_TOLERANCE = 1e-4


def launch(*arguments: str, deepspeed: bool = True) -> None:
    """Two CPU processes of ``mediround ARGUMENTS``: ZeRO-2, or plain DDP over gloo."""
    completed = subprocess.run(
        [sys.executable, "-m", "mediround_cli.main", *arguments, "--cpu", "--num-processes", "2",
         *(["--deepspeed", str(ZERO2)] if deepspeed else [])],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def logged(output: Path, kind: str) -> list[dict]:
    return [e for e in read_events(output / "train_log.jsonl") if e["event"] == kind]


def losses(output: Path) -> list[float]:
    return [e["loss"] for e in logged(output, "step")]


def assert_ran_on_two_ranks(output: Path, steps: int, global_batch: int) -> Path:
    """The run started with world size 2, and each process wrote its own RNG state and ZeRO partition."""
    start = logged(output, "start")[0]
    assert start["world_size"] == 2 and start["global_batch"] == global_batch
    final = output / "checkpoints" / f"step-{steps:08d}"
    names = {path.name for path in final.iterdir()}
    assert {"optimizer-rank0.safetensors", "optimizer-rank1.safetensors", "rng-rank0.json", "rng-rank1.json"} <= names
    assert not any(path.suffix in (".pt", ".pth", ".bin", ".pkl") for path in final.rglob("*"))
    partition = json.loads((final / "optimizer-rank1.json").read_text(encoding="utf-8"))
    assert "single_partition_of_fp32_groups" in json.dumps(partition)
    return final


@pytest.mark.slow
def test_zero2_trains_like_one_process_resumes_exactly_and_writes_plain_checkpoints(
        write_recipe, tmp_path, monkeypatch):
    zero = write_recipe("zero2", **SECTIONS)
    launch("train", str(zero))
    zero_out = Path(load_recipe(zero).output)
    final = assert_ran_on_two_ranks(zero_out, STEPS, 8)

    ddp = write_recipe("ddp", **SECTIONS)
    launch("train", str(ddp), deepspeed=False)
    ddp_out = Path(load_recipe(ddp).output)
    assert logged(ddp_out, "start")[0]["world_size"] == 2
    one = load_recipe(write_recipe("one", **SECTIONS), ["train.batch_size=4"])
    run_training(one, cpu=True)
    one_out = Path(one.output)
    assert len(losses(zero_out)) == len(losses(ddp_out)) == len(losses(one_out)) == STEPS
    # The reference is two-process DDP; one process with the same global batch must agree too.
    assert losses(zero_out) == pytest.approx(losses(ddp_out), rel=LOSS_TOLERANCE)
    assert losses(zero_out) == pytest.approx(losses(one_out), rel=LOSS_TOLERANCE)
    one_weights = load_file(str(one_out / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))
    zero_weights = load_file(str(final / "trainable.safetensors"))
    assert one_weights.keys() == zero_weights.keys()
    for name, weight in one_weights.items():
        torch.testing.assert_close(zero_weights[name], weight, rtol=1e-4, atol=1e-4, msg=name)

    # A run killed after its step-4 checkpoint leaves that checkpoint (and no final model): resume it.
    killed = tmp_path / "killed"
    shutil.copytree(zero_out, killed)
    shutil.rmtree(killed / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(killed / "model")
    launch("train", str(write_recipe("zero2", **{**SECTIONS, "output": str(killed)})), "--resume")
    resumed_weights = load_file(str(killed / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))
    for name, weight in zero_weights.items():
        assert torch.equal(resumed_weights[name], weight), name

    # train-jcm under ZeRO-2 on the trained model: two ranks, the losses of one process with the same batch.
    def jcm_recipe(name: str, batch_size: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "output": str(tmp_path / f"out-{name}"), "model": str(zero_out / "model"),
            "data": {"train": one.data.train}, "checkpoint": {"every": 0},
            "train": {"batch_size": batch_size, "max_steps": 2, "threads": 1, "lr": 1.0e-3, "warmup_steps": 1},
        }), encoding="utf-8")
        return path

    launch("train-jcm", str(jcm_recipe("jcm-zero2", 2)))
    jcm_out = tmp_path / "out-jcm-zero2"
    assert_ran_on_two_ranks(jcm_out, 2, 4)
    jcm_one = load_jcm_recipe(jcm_recipe("jcm-one", 4))
    run_jcm_training(jcm_one, cpu=True)
    assert len(losses(jcm_out)) == 2
    assert losses(jcm_out) == pytest.approx(losses(Path(jcm_one.output)), rel=LOSS_TOLERANCE)

    # The trained model loads and predicts with DeepSpeed unimportable.
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    predictions = tmp_path / "predictions"
    result = CliRunner().invoke(cli, ["infer", one.data.train, "--model", str(zero_out / "model"),
                                      "--out", str(predictions), "--cpu"])
    assert result.exit_code == 0, result.output
    assert (predictions / "predictions.jsonl").is_file()
