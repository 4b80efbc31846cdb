"""The predictions folder: safe names, atomic masks + fsynced lines, resume, and recovery after a kill."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mediround.data.predictions import (
    PREDICTIONS_FILE,
    PredictionWriter,
    mask_relative_path,
    read_predictions,
    safe_name,
)
from mediround.errors import DataError


def test_safe_names_keep_plain_ids_and_hash_sanitised_ones():
    assert safe_name("case_001.v2-a") == "case_001.v2-a"
    slash, underscore = safe_name("ct/case 1"), safe_name("ct_case_1")
    assert underscore == "ct_case_1"
    assert slash.startswith("ct_case_1-") and len(slash) == len("ct_case_1-") + 12
    assert slash != underscore
    assert safe_name("../etc") != safe_name("__etc")
    assert not safe_name("../etc").startswith(".")
    assert "/" not in safe_name("a/b/c") and "\\" not in safe_name("a\\b")
    long_id = "x" * 300
    assert len(safe_name(long_id)) == 80 + 1 + 12
    assert safe_name(long_id) != safe_name("x" * 299)
    assert safe_name("ü") != safe_name("é")
    assert mask_relative_path("ct/case 1", 3) == f"masks/{slash}_r3.png"


def test_writer_writes_mask_png_and_line_then_reader_reads_it(tmp_path):
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:5] = True
    with PredictionWriter(tmp_path) as writer:
        record = writer.write("d/1", 1, mask, answer="It is the liver.", jcm_score=0.75, refined=False)
    assert record["mask"] == mask_relative_path("d/1", 1)
    pixels = np.asarray(Image.open(tmp_path / record["mask"]))
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 6)
    assert set(np.unique(pixels)) == {0, 255}
    assert np.array_equal(pixels == 255, mask)
    lines = (tmp_path / PREDICTIONS_FILE).read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {"id": "d/1", "round": 1, "mask": record["mask"], "answer": "It is the liver.",
                                    "jcm_score": 0.75, "refined": False}
    assert read_predictions(tmp_path) == {("d/1", 1): json.loads(lines[0])}


def test_writer_refuses_bad_round_numbers_and_reserved_fields(tmp_path):
    with PredictionWriter(tmp_path) as writer:
        with pytest.raises(ValueError):
            writer.write("a", 0, np.zeros((2, 2), bool))
        with pytest.raises(ValueError):
            writer.write("a", 1, np.zeros((2, 2), bool), id="other")
    assert (tmp_path / PREDICTIONS_FILE).read_text() == ""


def test_complete_ids_for_resume_and_reopen_keeps_records(tmp_path):
    mask = np.ones((2, 2), dtype=bool)
    with PredictionWriter(tmp_path) as writer:
        writer.write("a", 1, mask)
        writer.write("a", 2, mask)
        writer.write("b", 1, mask)
        assert writer.complete_ids({"a": 2, "b": 2, "c": 1}) == {"a"}
    with PredictionWriter(tmp_path) as reopened:
        assert reopened.complete_ids({"a": 2, "b": 2}) == {"a"}
        reopened.write("b", 2, mask)
        assert reopened.complete_ids({"a": 2, "b": 2}) == {"a", "b"}
    assert len((tmp_path / PREDICTIONS_FILE).read_text().splitlines()) == 4


def test_half_written_line_after_a_kill_is_ignored_then_truncated(tmp_path):
    with PredictionWriter(tmp_path) as writer:
        writer.write("a", 1, np.ones((2, 2), bool))
    file = tmp_path / PREDICTIONS_FILE
    good = file.read_bytes()
    file.write_bytes(good + b'{"id": "a", "round": 2, "ma')
    assert set(read_predictions(tmp_path)) == {("a", 1)}
    with PredictionWriter(tmp_path) as writer:
        assert file.read_bytes() == good
        writer.write("a", 2, np.zeros((2, 2), bool))
    assert set(read_predictions(tmp_path)) == {("a", 1), ("a", 2)}
    assert all(json.loads(line) for line in file.read_text().splitlines())


def test_later_line_wins_when_a_round_is_redone(tmp_path):
    with PredictionWriter(tmp_path) as writer:
        writer.write("a", 1, np.zeros((2, 2), bool), jcm_score=0.1)
        writer.write("a", 1, np.ones((2, 2), bool), jcm_score=0.9)
    assert read_predictions(tmp_path)[("a", 1)]["jcm_score"] == 0.9


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"id": "a", "round": 0, "mask": "masks/a_r0.png"}', "round"),
        ('{"id": "a", "round": true, "mask": "masks/a_r1.png"}', "round"),
        ('{"id": "", "round": 1, "mask": "masks/a_r1.png"}', "id"),
        ('{"id": "a", "round": 1, "mask": "../outside.png"}', "mask"),
        ('{"id": "a", "round": 1, "mask": "/abs/path.png"}', "mask"),
        ('{"id": "a", "round": 1}', "mask"),
        ("[1, 2]", None),
        ("{not json", None),
    ],
)
def test_bad_complete_line_names_file_line_and_field(tmp_path, line, field):
    good = '{"id": "a", "round": 1, "mask": "masks/a_r1.png"}'
    (tmp_path / PREDICTIONS_FILE).write_text(good + "\n\n" + line + "\n")
    with pytest.raises(DataError) as caught:
        read_predictions(tmp_path)
    assert caught.value.item == "line 3"
    assert caught.value.field == field
    assert caught.value.file.endswith(PREDICTIONS_FILE)


def test_folder_without_predictions_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no predictions file"):
        read_predictions(tmp_path)
