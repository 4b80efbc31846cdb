"""SIGKILL at three distinct points of train, train-jcm, infer and eval --model, then ``--resume``: the
outputs equal an uninterrupted run's, and after every kill each file under a final name is whole.

The kill points are the moments just before a final name appears (``reliability_kill_driver.py``):
inside a checkpoint being written, the checkpoint folder's rename, the final model folder, a mask of a
part folder, the merge into the output folder, the metric rows. The owners' tests cover one kill each
(tests/training/test_resume.py, tests/inference/test_infer_cli.py); these add the other points, the
wholeness check and eval. Ctrl-C: training's is tested in test_resume.py; infer's here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from reliability_fixtures import record, write_lines
from safetensors.torch import load_file

from mediround_cli.main import cli

DRIVER = Path(__file__).with_name("reliability_kill_driver.py")


def _deliver_sigint() -> None:
    """A child of a shell that runs pytest in the background inherits an ignored SIGINT; a terminal's Ctrl-C
    reaches a foreground program, which is what these tests simulate."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_killed(mode: str, suffix: str, count: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(DRIVER), mode, suffix, str(count), *args],
                          check=False, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_deliver_sigint)


def _assert_killed(process: subprocess.CompletedProcess) -> None:
    assert process.returncode == -signal.SIGKILL, f"not killed (exit {process.returncode}):\n{process.stderr[-3000:]}"


def assert_whole(folder: Path) -> None:
    """Every file under a final name (not a dot-named temporary) parses completely."""
    for path in folder.rglob("*"):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            data = path.read_text(encoding="utf-8")
            assert not data or data.endswith("\n"), f"{path}: last line cut"
            [json.loads(line) for line in data.splitlines()]
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        elif path.suffix == ".parquet":
            pq.read_table(path)


def _tree(folder: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in suffixes and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory, dataset) -> Path:
    """Three 2-round dialogues."""
    return write_lines(dataset / "kills.jsonl", [record(f"d{i}") for i in range(3)])


def _model_files(output: Path) -> dict[str, str]:
    """The sha256 of every file of the finished run's model checkpoint, from its manifest."""
    return json.loads((output / "model" / "manifest.json").read_text())["files"]


TRAIN_POINTS = [("trainer_state.json", 2), ("step-00000003", 1), ("/model", 1)]


@pytest.fixture(scope="module")
def training_references(tmp_path_factory, kill_data, tiny_checkpoint):
    """``reference(command)``: the uninterrupted run's output folder, trained once per command."""
    folder = tmp_path_factory.mktemp("training-references")
    done: dict[str, Path] = {}

    def reference(command: str) -> Path:
        if command not in done:
            result = CliRunner().invoke(cli, [command, str(_recipe(command, folder, command, kill_data,
                                                                   tiny_checkpoint)), "--cpu"])
            assert result.exit_code == 0, result.output
            done[command] = folder / f"out-{command}"
        return done[command]

    return reference


def _recipe(command: str, folder: Path, name: str, train_data: Path, model: Path) -> Path:
    """4 steps with a checkpoint after each: stage 1 of the tiny preset (``train``) or JCM on ``model``."""
    stage1 = command == "train"
    train = {"batch_size": 1, "max_steps": 4, "threads": 1, "lr": 1.0e-3, "warmup_steps": 1}
    if stage1:
        train["mixed_precision"] = "no"
    recipe = {
        "output": str(folder / f"out-{name}"),
        "model": {"preset": "tiny"} if stage1 else str(model),
        "data": {"train": str(train_data), "val": None},
        "train": train,
        "validation": {"every": 0, "at_start": False},
        "checkpoint": {"every": 1, "keep_last": 2},
        "log": {"every": 1},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.mark.parametrize(("command", "point"), [(c, p) for c in ("train", "train-jcm") for p in TRAIN_POINTS],
                         ids=[f"{c}-{s.strip('/')}-{n}" for c in ("train", "train-jcm") for s, n in TRAIN_POINTS])
def test_killed_training_resumes_to_the_uninterrupted_model(command, point, tmp_path, kill_data, tiny_checkpoint,
                                                            training_references):
    killed = _recipe(command, tmp_path, "killed", kill_data, tiny_checkpoint)
    _assert_killed(_run_killed("KILL", point[0], point[1], command, str(killed), "--cpu"))
    output = tmp_path / "out-killed"
    assert_whole(output)
    result = CliRunner().invoke(cli, [command, str(killed), "--cpu", "--resume"])
    assert result.exit_code == 0, result.output
    assert_whole(output)
    assert _model_files(output) == _model_files(training_references(command))
    assert not [p for p in (output / "checkpoints").iterdir() if p.name.startswith(".")]


INFER_POINTS = [(".png", 2), (".png", 8), ("predictions.jsonl", 1)]


@pytest.fixture(scope="module")
def infer_reference(tmp_path_factory, kill_data, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("infer-reference") / "out"
    result = CliRunner().invoke(cli, ["infer", str(kill_data), "--model", str(tiny_checkpoint), "--out", str(out),
                                      "--cpu"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("point", INFER_POINTS, ids=[f"{s}-{n}" for s, n in INFER_POINTS])
def test_killed_infer_resumes_to_the_uninterrupted_predictions(point, tmp_path, kill_data, tiny_checkpoint,
                                                                 infer_reference):
    out = tmp_path / "out"
    argv = ["infer", str(kill_data), "--model", str(tiny_checkpoint), "--out", str(out), "--cpu"]
    _assert_killed(_run_killed("KILL", point[0], point[1], *argv))
    assert_whole(out)
    result = CliRunner().invoke(cli, [*argv, "--resume"])
    assert result.exit_code == 0, result.output
    assert _tree(out, (".png", ".jsonl")) == _tree(infer_reference, (".png", ".jsonl"))


EVAL_POINTS = [(".png", 3), ("predictions.jsonl", 1), ("metrics.parquet", 1)]


def _eval_argv(data: Path, checkpoint: Path, folder: Path) -> list[str]:
    return ["eval", str(data), "--model", str(checkpoint), "--cpu", "--predictions-out", str(folder / "predictions"),
            "--out", str(folder / "metrics.parquet")]


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory, kill_data, tiny_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("eval-reference")
    result = CliRunner().invoke(cli, _eval_argv(kill_data, tiny_checkpoint, folder))
    assert result.exit_code == 0, result.output
    return folder / "metrics.parquet"


@pytest.mark.parametrize("point", EVAL_POINTS, ids=[f"{s}-{n}" for s, n in EVAL_POINTS])
def test_killed_eval_resumes_to_the_uninterrupted_scores(point, tmp_path, kill_data, tiny_checkpoint, eval_reference):
    argv = _eval_argv(kill_data, tiny_checkpoint, tmp_path)
    _assert_killed(_run_killed("KILL", point[0], point[1], *argv))
    assert_whole(tmp_path)
    result = CliRunner().invoke(cli, [*argv, "--resume"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "metrics.parquet").equals(pq.read_table(eval_reference))


def test_ctrl_c_in_infer_keeps_the_finished_dialogues(tmp_path, kill_data, tiny_checkpoint, infer_reference):
    out = tmp_path / "out"
    argv = ["infer", str(kill_data), "--model", str(tiny_checkpoint), "--out", str(out), "--cpu"]
    process = _run_killed("INT", ".png", 3, *argv)
    assert process.returncode == 130, process.stderr[-3000:]
    assert "interrupted" in process.stderr and "Traceback" not in process.stderr
    assert_whole(out)
    finished = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert finished == ["d0", "d0"] and not (out / ".parts").exists()
    result = CliRunner().invoke(cli, [*argv, "--resume"])
    assert result.exit_code == 0, result.output
    assert "already complete (--resume) │ 1" in result.output
    assert _tree(out, (".png", ".jsonl")) == _tree(infer_reference, (".png", ".jsonl"))
