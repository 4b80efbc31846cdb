"""A non-finite loss stops training with one line naming the step (and, in stage 1, the batch) and no
checkpoint holding non-finite weights is ever written. Stage 1's lr=1e30 stop/skip case is in
tests/training/test_resume.py; here a NaN from the very first step, and train-jcm."""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from click.testing import CliRunner
from reliability_fixtures import record, write_lines
from safetensors.torch import load_file

from mediround.model.mediround import MediRound
from mediround_cli.main import cli


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def _recipe(tmp_path: Path, train_data: Path, **extra) -> Path:
    recipe = {
        "output": str(tmp_path / "out"),
        "data": {"train": str(train_data), "val": None},
        "train": {"batch_size": 1, "max_steps": 3, "threads": 1, "mixed_precision": "no", "lr": 1.0e-3,
                  "warmup_steps": 0},
        "validation": {"every": 0, "at_start": False},
        "checkpoint": {"every": 1, "keep_last": 5},
        "log": {"every": 1},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_a_nan_loss_at_the_first_step_writes_nothing(tmp_path, dataset, monkeypatch):
    data = write_lines(dataset / "nan.jsonl", [record("a"), record("b")])
    forward = MediRound.forward

    def poisoned(self, batch):
        output = forward(self, batch)
        output.losses["ce"] = output.losses["ce"] * math.nan
        return output

    monkeypatch.setattr(MediRound, "forward", poisoned)
    result = CliRunner().invoke(cli, ["train", str(_recipe(tmp_path, data, model={"preset": "tiny"})), "--cpu"])
    assert result.exit_code == 2
    assert "non-finite loss or gradient at step 1 (epoch 0, batch 0)" in _error_line(result.output)
    checkpoints = tmp_path / "out" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    assert not (tmp_path / "out" / "model").exists()


def test_train_jcm_stops_on_an_overflowing_loss_and_keeps_only_finite_checkpoints(tmp_path, dataset,
                                                                                  tiny_checkpoint):
    data = write_lines(dataset / "nan-jcm.jsonl", [record("a"), record("b")])
    recipe = _recipe(tmp_path, data, model=str(tiny_checkpoint))
    result = CliRunner().invoke(cli, ["train-jcm", str(recipe), "--cpu", "train.lr=1e30", "train.clip_grad_norm=null"])
    assert result.exit_code == 2, result.output
    assert "non-finite JCM loss or gradient at step 2 (epoch 0, batch 1)" in _error_line(result.output)
    written = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert [p.name for p in written] == ["step-00000001"]
    for path in written[0].glob("*.safetensors"):
        assert all(bool(t.isfinite().all()) for t in load_file(str(path)).values()), path
    assert not (tmp_path / "out" / "model").exists()
