"""``mediround infer`` end to end: checkpoints, formats, flags, a SIGKILLed run resumed, two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from inference_fixtures import write_dialogues

from mediround.data.formats import load_dialogues, write_mrmedseg
from mediround.model.checkpoint import save_checkpoint
from mediround.reports.rows import read_rows
from mediround_cli.main import cli


@pytest.fixture(scope="module")
def checkpoints(model, tmp_path_factory):
    """Two checkpoints of the session model: JCM marked trained, and JCM untrained."""
    root = tmp_path_factory.mktemp("checkpoints")
    trained = save_checkpoint(model, root / "jcm")
    model.config.trainable.jcm = False
    try:
        untrained = save_checkpoint(model, root / "no-jcm")
    finally:
        model.config.trainable.jcm = True
    return {"jcm": trained, "no-jcm": untrained}


def _infer(*args: str):
    return CliRunner().invoke(cli, ["infer", *map(str, args)], catch_exceptions=False)


def _folder(out) -> tuple[bytes, dict[str, bytes]]:
    masks = {p.name: p.read_bytes() for p in sorted((out / "masks").glob("*.png"))}
    return (out / "predictions.jsonl").read_bytes(), masks


def test_infer_writes_predictions_metrics_and_overlays(checkpoints, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=2, n_rounds=2)
    out = tmp_path / "out"
    result = _infer(data, "--model", checkpoints["jcm"], "--out", out, "--overlays", "--cpu")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(isinstance(r["jcm_score"], float) for r in records)
    rows = read_rows(out / "metrics.parquet")
    assert sorted((r["dialogue_id"], r["round"]) for r in rows) == [
        ("dlg-0", 1), ("dlg-0", 2), ("dlg-1", 1), ("dlg-1", 2)]
    assert [r["refined"] for r in rows] == [r["refined"] for r in records]
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert "Per round" in result.output and "predictions (beta-0.6)" in result.output


def test_mrmedseg_input_gives_the_jsonl_predictions(checkpoints, tmp_path):
    root = tmp_path / "data"
    jsonl = write_dialogues(root, n_dialogues=2, n_rounds=2)
    data = root / "mr.json"
    write_mrmedseg(load_dialogues(jsonl).dialogues, data)
    from_jsonl, from_mr = tmp_path / "jsonl", tmp_path / "mr"
    assert _infer(jsonl, "--model", checkpoints["jcm"], "--out", from_jsonl, "--beta", "off").exit_code == 0
    result = _infer(data, "--model", checkpoints["jcm"], "--out", from_mr, "--beta", "off")
    assert result.exit_code == 0, result.output
    assert "predictions (jcm-off)" in result.output
    assert len(_folder(from_mr)[1]) == 4 and _folder(from_mr)[1] == _folder(from_jsonl)[1]
    assert (from_mr / "metrics.parquet").exists()


def test_dialogues_without_masks_are_predicted_and_not_scored(checkpoints, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=2, n_rounds=2, with_masks=False, with_refs=False)
    out = tmp_path / "out"
    result = _infer(data, "--model", checkpoints["jcm"], "--out", out)
    assert result.exit_code == 0, result.output
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    assert not (out / "metrics.parquet").exists()


def test_untrained_jcm_means_off_by_default_and_refuses_a_threshold(checkpoints, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=1, n_rounds=1)
    result = _infer(data, "--model", checkpoints["no-jcm"], "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "JCM off: the checkpoint has no trained JCM weights" in result.output
    result = _infer(data, "--model", checkpoints["no-jcm"], "--out", tmp_path / "b", "--beta", "0.6")
    assert result.exit_code == 2
    assert "no trained JCM weights" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--beta", "1.5"), "outside [0, 1]"),
        (("--gpus", "1", "--cpu"), "--gpus and --cpu exclude each other"),
        (("--cpu", "--num-machines", "2"), "--num-machines > 1 needs --main-process-ip"),
        (("--cpu", "--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "127.0.0.1"),
         "--machine-rank 2 must be in [0, --num-machines 2)"),
    ],
)
def test_bad_options_give_one_line_errors(checkpoints, tmp_path, args, message):
    data = write_dialogues(tmp_path / "data", n_dialogues=1, n_rounds=1)
    model_args = () if not args else ("--model", str(checkpoints["jcm"]))
    result = _infer(data, "--out", tmp_path / "out", *model_args, *args)
    assert result.exit_code == 2
    assert message in result.output


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_sigkilled_run_resumes_to_the_uninterrupted_output(checkpoints, tmp_path):
    # Batches of 2 among 12 dialogues: when the second dialogue is recorded, five more batches are still to
    # run, so the kill lands mid-run however fast a batch is (one batch of all would finish at once).
    data = write_dialogues(tmp_path / "data", n_dialogues=12, n_rounds=3)
    reference = tmp_path / "reference"
    batching = ("--batch-size", "2")
    assert _infer(data, "--model", checkpoints["jcm"], "--out", reference, "--cpu", *batching).exit_code == 0

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mediround_cli.main", "infer", str(data), "--model", str(checkpoints["jcm"]),
               "--out", str(out), "--cpu", *batching]
    process = subprocess.Popen(command, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / ".parts" / "rank-0" / "progress.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if progress.exists() and progress.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "predictions.jsonl").exists()

    result = _infer(data, "--model", checkpoints["jcm"], "--out", out, "--cpu", "--resume", *batching)
    assert result.exit_code == 0, result.output
    assert _folder(out) == _folder(reference)
    assert not (out / ".parts").exists()


def test_two_processes_write_what_one_process_writes(checkpoints, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=3, n_rounds=2)
    one = tmp_path / "one"
    assert _infer(data, "--model", checkpoints["jcm"], "--out", one, "--cpu").exit_code == 0
    two = tmp_path / "two"
    command = [sys.executable, "-m", "mediround_cli.main", "infer", str(data), "--model", str(checkpoints["jcm"]),
               "--out", str(two), "--cpu", "--num-processes", "2"]
    completed = subprocess.run(command, check=False, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert _folder(two) == _folder(one)
    assert (two / "metrics.parquet").exists()


def test_a_training_run_folder_stands_for_its_model_checkpoint(checkpoints, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoints["no-jcm"], run / "model")
    data = write_dialogues(tmp_path / "data", n_dialogues=1, n_rounds=2)
    result = _infer(data, "--model", run, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 2
    result = _infer(data, "--model", tmp_path / "data", "--out", tmp_path / "none")
    assert result.exit_code == 2 and "not a MediRound checkpoint" in result.output
