"""DeepSpeed ZeRO-2 on two CPU processes (gloo, DS_ACCELERATOR=cpu), on the shipped tiny-cpu and
jcm-tiny-cpu recipes with validation on: the loss curve and the validation scores of two-process DDP and of
one process with the same global batch, two real ranks, kill + --resume equal to the uninterrupted run, a
checkpoint without pickle that infer loads without DeepSpeed, and train-jcm under ZeRO-2 (its evaluation
gathered from both processes) against its one-process run. Slow: four launches of two processes (DeepSpeed
JIT-builds a comm op on first use); the one-process references run in this process. Fast: the check that
refuses a process Accelerate counts otherwise than torch.distributed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mediround.data.formats import load_dialogues
from mediround.default_model import default_checkpoint
from mediround.errors import LaunchError
from mediround.training.engine import process_group
from mediround.training.logging import read_events
from mediround.training.recipe import SHIPPED_RECIPES, load_jcm_recipe, load_recipe
from mediround.training.stage1 import run_training
from mediround.training.stage2 import run_jcm_training
from mediround_cli.main import cli

STEPS = 5
ZERO2 = SHIPPED_RECIPES / "zero2.json"
# Same data, initial weights and fp32 AdamW: ZeRO reduces gradients in buckets over two processes and
# updates flat fp32 partitions, one process sums its micro-batch of 4 at once. That moved the step-5 loss by
# 4e-8 relative here; 1e-4 leaves room for other CPUs and stays far below what a step changes (~5 %).
LOSS_TOLERANCE = 1e-4
SCORES = ("dice", "giou", "ciou")


def tiny_cpu(synth_data: Path, output: Path, batch_size: int = 2) -> list[str]:
    """Overrides that make the shipped tiny-cpu recipe a 5-step run on the test data, validated at the start
    and at the end on both validation dialogues. Two processes x 2 dialogues x 2 accumulation steps = 8 per
    step. One validation dialogue per forward, so that one and two processes run the same forwards. LoRA dropout
    off: ZeRO-2 and one process then compute the same thing and only the order of float sums differs."""
    return [f"output={output}", f"data.train={synth_data / 'train.jsonl'}", f"data.val={synth_data / 'val.jsonl'}",
            f"train.max_steps={STEPS}", f"train.batch_size={batch_size}", "train.grad_accum=2", "train.threads=1",
            "train.warmup_steps=2", "model.lora.dropout=0.0", "validation.every=0", "validation.at_start=true",
            "validation.batch_size=1", "checkpoint.every=4", "checkpoint.keep_last=5", "log.every=1"]


def jcm_tiny_cpu(synth_data: Path, model: Path, output: Path, batch_size: int) -> list[str]:
    """Overrides that make the shipped jcm-tiny-cpu recipe a 2-step run on ``model``, evaluated at the start and
    at the end on both validation dialogues."""
    return [f"output={output}", f"model={model}", f"data.train={synth_data / 'train.jsonl'}",
            f"data.val={synth_data / 'val.jsonl'}", f"train.batch_size={batch_size}", "train.max_steps=2",
            "train.threads=1", "train.warmup_steps=1", "checkpoint.every=0"]


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


def validation_rows(output: Path, step: int) -> list[dict]:
    """The rows ``validation.parquet`` holds for ``step``: each track's scores overall, per round and per kind
    of round, with the number of masks scored."""
    return [row for row in pq.read_table(output / "validation.parquet").to_pylist() if row["step"] == step]


def assert_same_validation(run: Path, reference: Path, step: int, scores: bool) -> None:
    """The validation rows of ``run`` at ``step`` are those of ``reference``: same tracks, rounds and mask
    counts, and (``scores``) the same scores up to the order of float sums."""
    rows, expected = validation_rows(run, step), validation_rows(reference, step)
    assert [{k: v for k, v in r.items() if k not in SCORES} for r in rows] == \
        [{k: v for k, v in r.items() if k not in SCORES} for r in expected]
    for row, want in zip(rows, expected):
        if scores:
            assert [row[k] for k in SCORES] == pytest.approx([want[k] for k in SCORES], rel=1e-6, abs=1e-12), row


def test_a_process_accelerate_counts_otherwise_than_torch_distributed_is_refused(monkeypatch):
    """What the run checks before training: Accelerate's gather_object would size its results by its count."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert process_group(SimpleNamespace(num_processes=2, process_index=1)) == (2, 1)
    with pytest.raises(LaunchError, match="process rank 1 of 2: Accelerate counts it as rank 0 of 1"):
        process_group(SimpleNamespace(num_processes=1, process_index=0))


@pytest.mark.slow
def test_zero2_trains_and_validates_like_one_process_resumes_exactly_and_writes_plain_checkpoints(
        synth_data, tmp_path, monkeypatch):
    val_masks = sum(r.mask is not None for d in load_dialogues(synth_data / "val.jsonl").dialogues for r in d.rounds)
    zero_out = tmp_path / "out-zero2"
    launch("train", "tiny-cpu", *tiny_cpu(synth_data, zero_out))
    final = assert_ran_on_two_ranks(zero_out, STEPS, 8)
    # Validation ran at the start and at the end, on the masks of both processes' dialogues.
    validations = logged(zero_out, "validation")
    assert [v["step"] for v in validations] == [0, STEPS]
    assert all(v["masks"] == val_masks and v["loss"] > 0 for v in validations)
    assert {(r["track"], r["count"]) for r in validation_rows(zero_out, STEPS) if r["split"] == "all"} == {
        ("teacher_forced", val_masks), ("chained", val_masks)}

    ddp_out = tmp_path / "out-ddp"
    launch("train", "tiny-cpu", *tiny_cpu(synth_data, ddp_out), deepspeed=False)
    assert logged(ddp_out, "start")[0]["world_size"] == 2
    one = load_recipe(SHIPPED_RECIPES / "tiny-cpu.yaml", tiny_cpu(synth_data, tmp_path / "out-one", batch_size=4))
    run_training(one, cpu=True)
    one_out = Path(one.output)
    assert len(losses(zero_out)) == len(losses(ddp_out)) == len(losses(one_out)) == STEPS
    # The reference is two-process DDP; one process with the same global batch must agree too.
    assert losses(zero_out) == pytest.approx(losses(ddp_out), rel=LOSS_TOLERANCE)
    assert losses(zero_out) == pytest.approx(losses(one_out), rel=LOSS_TOLERANCE)
    # At step 0 every run scores the same initial weights with the same forwards (Dice ~0.14 here). At the
    # end the weights differ by the order of float sums, which can move a pixel across the mask threshold:
    # the loss is compared there (5 steps from random weights leave the masks empty anyway).
    for reference in (ddp_out, one_out):
        assert_same_validation(zero_out, reference, 0, scores=True)
        assert_same_validation(zero_out, reference, STEPS, scores=False)
        assert logged(zero_out, "validation")[-1]["loss"] == pytest.approx(
            logged(reference, "validation")[-1]["loss"], rel=LOSS_TOLERANCE)
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
    launch("train", "tiny-cpu", *tiny_cpu(synth_data, killed), "--resume")
    resumed_weights = load_file(str(killed / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))
    for name, weight in zero_weights.items():
        assert torch.equal(resumed_weights[name], weight), name

    # train-jcm under ZeRO-2: two ranks, the losses and evaluations of one process with the same batch. On the
    # shipped model, whose masks (Dice ~0.4 here) and trained judge (Spearman ~0.6) give the evaluation
    # something to gather; 5 steps from random weights leave every mask empty.
    jcm_out = tmp_path / "out-jcm-zero2"
    launch("train-jcm", "jcm-tiny-cpu", *jcm_tiny_cpu(synth_data, default_checkpoint(), jcm_out, 2))
    assert_ran_on_two_ranks(jcm_out, 2, 4)
    jcm_one = load_jcm_recipe(SHIPPED_RECIPES / "jcm-tiny-cpu.yaml",
                              jcm_tiny_cpu(synth_data, default_checkpoint(), tmp_path / "out-jcm-one", 4))
    run_jcm_training(jcm_one, cpu=True)
    assert len(losses(jcm_out)) == 2
    assert losses(jcm_out) == pytest.approx(losses(Path(jcm_one.output)), rel=LOSS_TOLERANCE)
    evaluations, one_evaluations = logged(jcm_out, "validation"), logged(Path(jcm_one.output), "validation")
    assert [e["step"] for e in evaluations] == [0, 2]
    assert all(e["off_masks"] == e["jcm_masks"] == val_masks and e["off_dice"] > 0.1 for e in evaluations)
    for evaluation, reference in zip(evaluations, one_evaluations, strict=True):
        assert evaluation.keys() == reference.keys()
        scores = {key: value for key, value in reference.items() if key not in ("event", "time")}
        assert {key: evaluation[key] for key in scores} == pytest.approx(scores, rel=LOSS_TOLERANCE, nan_ok=True)

    # The trained model loads and predicts with DeepSpeed unimportable.
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    predictions = tmp_path / "predictions"
    result = CliRunner().invoke(cli, ["infer", one.data.train, "--model", str(zero_out / "model"),
                                      "--out", str(predictions), "--cpu"])
    assert result.exit_code == 0, result.output
    assert (predictions / "predictions.jsonl").is_file()


@pytest.mark.slow
def test_zero2_with_bf16_trains_and_validates(synth_data, tmp_path):
    """The 7B recipes' setting: DeepSpeed's bf16 holds the model in bf16, while SAM's positional encoding is
    computed in fp32. The first forward used to fail in the mask decoder (float vs bfloat16, found by
    benchmarks/paper_path_rehearsal.py); now a step and both validation tracks run."""
    output = tmp_path / "out-zero2-bf16"
    launch("train", "tiny-cpu", *tiny_cpu(synth_data, output), "train.mixed_precision=bf16", "train.max_steps=1",
           "checkpoint.every=1")
    steps = logged(output, "step")
    assert len(steps) == 1 and torch.isfinite(torch.tensor(steps[0]["loss"]))
    assert [v["step"] for v in logged(output, "validation")] == [0, 1]
    assert {r["track"] for r in validation_rows(output, 1)} == {"teacher_forced", "chained"}
