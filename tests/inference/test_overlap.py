"""Inputs read ahead and outputs written behind on background threads: the same files, the same errors and
exit codes, and the same resume as doing that work in line, between the model's steps."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from inference_fixtures import write_dialogues

from mediround.data import predictions
from mediround.errors import OutputError
from mediround.inference import prediction, sharding
from mediround.inference.overlap import ReadAhead, WriteBehind
from mediround.inference.runner import run_inference
from mediround.inference.settings import InferenceConfig
from mediround.model.checkpoint import save_checkpoint
from mediround_cli.main import cli


class _InLine:
    """The serial path: ``ReadAhead`` and ``WriteBehind`` doing their work in the caller's thread, when asked."""

    def __init__(self, *args, depth: int):
        self.work = args[-1]

    def take(self, item):
        return self.work(item)

    def put(self, item):
        self.work(item)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


def _in_line(monkeypatch) -> None:
    monkeypatch.setattr(prediction, "ReadAhead", _InLine)
    monkeypatch.setattr(sharding, "WriteBehind", _InLine)


def _files(folder) -> dict[str, bytes]:
    """Every file a run wrote except the run manifest (it holds the times)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "run.json"}


def _data_with_a_bad_image(root):
    data = write_dialogues(root, n_dialogues=7, n_rounds=3)
    (root / "images" / "d2.png").write_bytes(b"not a png")
    return data


@pytest.mark.parametrize("batch_size", [1, 3])
def test_overlapped_run_writes_byte_for_byte_what_the_serial_path_writes(model, tmp_path, monkeypatch, batch_size):
    data = _data_with_a_bad_image(tmp_path / "data")
    settings = {"data": str(data), "model": "unused", "betas": (None, 0.5), "overlays": True,
                "batch_size": batch_size}
    writing_threads = set()
    save_mask = predictions.save_mask

    def recorded_save_mask(path, mask):
        writing_threads.add(threading.current_thread().name)
        save_mask(path, mask)

    monkeypatch.setattr(predictions, "save_mask", recorded_save_mask)
    overlapped = run_inference(InferenceConfig(out=str(tmp_path / "overlapped"), **settings), model=model)
    assert writing_threads == {"write-behind"}
    with monkeypatch.context() as serial:
        _in_line(serial)
        in_line = run_inference(InferenceConfig(out=str(tmp_path / "serial"), **settings), model=model)
    assert _files(tmp_path / "overlapped") == _files(tmp_path / "serial")
    assert "beta-0.5/masks/dlg-6_r3.png" in _files(tmp_path / "serial")
    errors = [json.loads(line) for line in (tmp_path / "serial" / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["field"]) for e in errors] == [("dlg-2", "image")]
    assert (overlapped.predicted, overlapped.skipped) == (in_line.predicted, in_line.skipped) == (6, 1)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("checkpoint") / "jcm")


def _infer_failing(monkeypatch, checkpoint, data, out, where: str, fail_at: int):
    """``mediround infer`` whose ``fail_at``-th mask write (``where="write"``) or image read (``"read"``)
    raises the error of a full disk; returns the exit code and stderr."""
    calls = []
    module, name = (predictions, "save_mask") if where == "write" else (prediction, "load_image")
    original = getattr(module, name)

    def failing(path, *args):
        calls.append(path)
        if len(calls) == fail_at:
            raise OutputError(str(path), OSError(28, "No space left on device"))
        return original(path, *args)

    monkeypatch.setattr(module, name, failing)
    result = CliRunner().invoke(cli, ["infer", str(data), "--model", str(checkpoint), "--out", str(out),
                                      "--cpu", "--batch-size", "2"])
    return result.exit_code, result.stderr


@pytest.mark.parametrize(("where", "fail_at"), [("write", 4), ("read", 3)])
def test_an_error_in_a_background_thread_ends_the_run_as_it_did_in_line(model, checkpoint, tmp_path, monkeypatch,
                                                                        where, fail_at):
    data = write_dialogues(tmp_path / "data", n_dialogues=5, n_rounds=2)
    code, message = _infer_failing(monkeypatch, checkpoint, data, tmp_path / "overlapped", where, fail_at)
    with monkeypatch.context() as serial:
        _in_line(serial)
        serial_code, serial_message = _infer_failing(serial, checkpoint, data, tmp_path / "serial", where, fail_at)
    assert code == serial_code != 0
    assert message.replace("overlapped", "serial") == serial_message
    assert "\n" not in message.strip() and "No space left on device" in message
    # Ctrl-C and errors merge nothing; --resume predicts the rest and gives the uninterrupted run's files.
    result = CliRunner().invoke(cli, ["infer", str(data), "--model", str(checkpoint), "--out",
                                      str(tmp_path / "overlapped"), "--cpu", "--batch-size", "2", "--resume"])
    assert result.exit_code == 0, result.output
    reference = CliRunner().invoke(cli, ["infer", str(data), "--model", str(checkpoint), "--out",
                                         str(tmp_path / "reference"), "--cpu", "--batch-size", "2"])
    assert reference.exit_code == 0
    written = {k: v for k, v in _files(tmp_path / "overlapped").items() if k != "metrics.parquet"}
    assert written == {k: v for k, v in _files(tmp_path / "reference").items() if k != "metrics.parquet"}


def test_read_ahead_hands_over_in_order_and_raises_each_items_error():
    def prepare(number):
        if number == 2:
            raise ValueError("two is bad")
        return number * 10

    with ReadAhead(range(5), prepare, depth=2) as ahead:
        assert [ahead.take(0), ahead.take(1)] == [0, 10]
        with pytest.raises(ValueError, match="two is bad"):
            ahead.take(2)
        assert ahead.take(3) == 30
        with pytest.raises(RuntimeError, match="order"):
            ahead.take(0)


def test_write_behind_writes_in_order_and_raises_the_first_failure_in_the_callers_thread():
    written = []

    def write(item):
        if item == "bad":
            raise OutputError("out/x.png", OSError(28, "No space left on device"))
        written.append(item)

    with WriteBehind(write, depth=1) as behind:
        for item in range(20):
            behind.put(item)
    assert written == list(range(20))

    behind = WriteBehind(write, depth=1)
    behind.put("bad")
    behind.put("later")  # taken, not written: the writer failed
    with pytest.raises(OutputError, match="out/x.png: cannot write: No space left on device"):
        behind.close()
    assert written == list(range(20))


def test_leaving_with_an_exception_still_writes_what_was_queued():
    written = []
    with pytest.raises(KeyboardInterrupt), WriteBehind(written.append, depth=8) as behind:
        for item in range(5):
            behind.put(np.full(3, item))
        raise KeyboardInterrupt
    assert [int(array[0]) for array in written] == [0, 1, 2, 3, 4]
