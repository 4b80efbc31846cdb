"""A full disk or a folder that refuses writes gives one line naming the file; earlier outputs stay intact.

Tests run as root, where a chmod'ed folder still accepts writes, and no small file system can be
mounted here: a full disk is simulated by making ``os.replace`` or ``os.fsync`` raise ``ENOSPC`` (the
calls the atomic writer makes after writing), and a folder that cannot hold files is real: an output
path under a regular file (``ENOTDIR``).
"""

from __future__ import annotations

import errno
import json
import os

import pytest
from click.testing import CliRunner
from reliability_fixtures import one_round, record, write_lines

from mediround.atomic import append_jsonl_line, write_json
from mediround.errors import OutputError
from mediround_cli.main import cli


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing_call", ["replace", "fsync"])
def test_a_failed_atomic_write_raises_output_error_and_keeps_the_earlier_file(tmp_path, monkeypatch, failing_call):
    path = tmp_path / "out" / "run.json"
    write_json(path, {"version": 1})
    monkeypatch.setattr(os, failing_call, _no_space)
    with pytest.raises(OutputError, match=r"run\.json: cannot write: No space left on device"):
        write_json(path, {"version": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]


def test_a_failed_line_append_names_the_file(tmp_path, monkeypatch):
    with open(tmp_path / "errors.jsonl", "a", encoding="utf-8") as handle:
        append_jsonl_line(handle, {"id": "a"})
        monkeypatch.setattr(os, "fsync", _no_space)
        with pytest.raises(OutputError, match=r"errors\.jsonl: cannot write: No space left"):
            append_jsonl_line(handle, {"id": "b"})


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_convert_on_a_full_disk_is_one_line_and_the_earlier_output_stays(tmp_path, dataset, monkeypatch):
    data = write_lines(dataset / "disk.jsonl", [record("a"), record("b")])
    out = dataset / "converted.jsonl"
    assert CliRunner().invoke(cli, ["convert", str(data), str(out)]).exit_code == 0
    before = out.read_bytes()
    write_lines(data, [record("c")])
    monkeypatch.setattr(os, "replace", _no_space)
    result = CliRunner().invoke(cli, ["convert", str(data), str(out), "--overwrite"])
    monkeypatch.undo()
    assert result.exit_code == 2
    assert "converted.jsonl: cannot write: No space left on device" in _one_error_line(result.output)
    assert out.read_bytes() == before
    assert not [p for p in dataset.iterdir() if p.name.startswith(".converted")]


def test_infer_stopped_by_a_full_disk_resumes_to_every_dialogue(tmp_path, dataset, tiny_checkpoint, monkeypatch):
    data = write_lines(dataset / "disk-infer.jsonl", [one_round(f"d{i}") for i in range(3)])
    out = tmp_path / "out"
    argv = ["infer", str(data), "--model", str(tiny_checkpoint), "--out", str(out), "--cpu"]
    real_replace = os.replace
    masks_written = []

    def full_after_two_masks(source, destination):
        if str(destination).endswith(".png"):
            if len(masks_written) == 2:
                _no_space()
            masks_written.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", full_after_two_masks)
    result = CliRunner().invoke(cli, argv)
    monkeypatch.undo()
    assert result.exit_code == 2
    assert "cannot write: No space left on device" in _one_error_line(result.output)
    assert not (out / "predictions.jsonl").exists()

    resumed = CliRunner().invoke(cli, [*argv, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["d0", "d1", "d2"]


def test_an_output_folder_that_cannot_exist_is_one_line(tmp_path, dataset, tiny_checkpoint):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = write_lines(dataset / "disk-enotdir.jsonl", [one_round("d0")])
    result = CliRunner().invoke(
        cli, ["infer", str(data), "--model", str(tiny_checkpoint), "--out", str(blocker / "out"), "--cpu"])
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "a-file/out" in line and "Not a directory" in line
    assert blocker.read_text() == "not a folder"
