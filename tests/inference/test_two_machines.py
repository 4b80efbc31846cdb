"""``mediround infer`` on two simulated machines (two launchers on one host, gloo over loopback): the merged
folder equals a 1-process run byte for byte; a machine that dies is named, and ``--resume`` finishes."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from inference_fixtures import write_dialogues
from two_machines import finish_all, kill_machine, machines

from mediround.model.checkpoint import save_checkpoint
from mediround_cli.main import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("checkpoint") / "jcm")


def _folder(out) -> tuple[bytes, dict[str, bytes]]:
    masks = {p.name: p.read_bytes() for p in sorted((out / "masks").glob("*.png"))}
    return (out / "predictions.jsonl").read_bytes(), masks


def _one_process(data, checkpoint, out, *options: str) -> tuple[bytes, dict[str, bytes]]:
    result = CliRunner().invoke(cli, ["infer", str(data), "--model", str(checkpoint), "--out", str(out), "--cpu",
                                      *options], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return _folder(out)


def test_two_machines_merge_what_one_process_writes(checkpoint, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=3, n_rounds=2)
    reference = _one_process(data, checkpoint, tmp_path / "one")
    out = tmp_path / "two"
    with machines(["infer", str(data), "--model", str(checkpoint), "--out", str(out)], tmp_path) as started:
        logs = finish_all(started)
    assert "machine rank 1: its shards are complete" in logs[1]
    assert _folder(out) == reference
    assert (out / "metrics.parquet").exists() and not (out / ".parts").exists()
    shards = json.loads((out / "run.json").read_text())["shards"]
    # Each process wrote the world size torch.distributed gave it, and the machine it ran on.
    assert shards == [{"rank": 0, "world_size": 2, "machine_rank": 0, "dialogues": 2},
                      {"rank": 1, "world_size": 2, "machine_rank": 1, "dialogues": 1}]


def test_a_killed_machine_is_named_and_resume_on_both_finishes_the_run(checkpoint, tmp_path):
    # Six dialogues a machine, one at a time: five are still to run when rank 1 has recorded its first.
    data = write_dialogues(tmp_path / "data", n_dialogues=12, n_rounds=3)
    # The same batch size as the machines: batch 64 and batch 1 may differ in the last float digits of a
    # JCM score (batched products sum in another order), which is not what this test is about.
    reference = _one_process(data, checkpoint, tmp_path / "one", "--batch-size", "1")
    out = tmp_path / "two"
    command = ["infer", str(data), "--model", str(checkpoint), "--out", str(out), "--batch-size", "1",
               "--shard-timeout", "120"]
    progress = out / ".parts" / "rank-1" / "progress.jsonl"
    with machines(command, tmp_path) as (first, second):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and second.process.poll() is None:
            if progress.exists() and progress.read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        assert second.process.poll() is None, "machine rank 1 stopped before it could be killed"
        kill_machine(second.process)
        assert not (out / ".parts" / "rank-1" / "done.json").exists(), "rank 1 finished before it was killed"
        code, log = first.finish()
    assert code != 0
    assert "shard rank-1 of 2 (machine rank 1) did not complete" in log, log[-3000:]
    assert "--resume" in log and not (out / "predictions.jsonl").exists()

    with machines([*command, "--resume"], tmp_path) as started:
        finish_all(started)
    assert _folder(out) == reference
