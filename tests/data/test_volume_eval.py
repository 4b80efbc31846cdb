"""``mediround eval TRUTH --predictions OUT --round-labels ...``: a ``chat VOLUME`` output (made here with the
stub segmenter of test_scans) scored against a label volume, Dice per round in 3-D and per slice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
from click.testing import CliRunner
from test_scans import QUESTIONS, WINDOW, coronal_series, nifti_scan, stub_segmenter

from mediround.data.scans import ScanOptions, read_scan, run_scan
from mediround.errors import DataError
from mediround.reports.volume_scoring import parse_round_labels
from mediround_cli.common import BAD_INPUT_EXIT_CODE
from mediround_cli.main import cli


def run(*args: object):
    return CliRunner().invoke(cli, [*map(str, args)])


def truth_volume(folder: Path) -> Path:
    """Labels on the scan's grid: 6 where the bright blob is, 7 where the dim one is, 3 elsewhere on a slab."""
    data, affine, _ = nifti_scan(folder / "scan.nii.gz")
    labels = np.where(data == 1000, 6, np.where(data == 400, 7, 0)).astype(np.uint8)
    labels[0:2, 0:2, 0:2] = 3
    nibabel.save(nibabel.Nifti1Image(labels, affine), folder / "truth.nii.gz")
    return folder / "truth.nii.gz"


def test_round_labels_inline_or_json_and_bad_mappings(tmp_path: Path) -> None:
    assert parse_round_labels("1=6,2=6+7") == {1: (6,), 2: (6, 7)}
    (tmp_path / "map.json").write_text(json.dumps({"1": 6, "2": [6, 7]}))
    assert parse_round_labels(str(tmp_path / "map.json")) == {1: (6,), 2: (6, 7)}
    for bad in ("1=", "1=liver", "a=1", "1=6,1=7"):
        with pytest.raises(DataError):
            parse_round_labels(bad)


def test_eval_scores_each_round_in_3d_and_per_slice(tmp_path: Path) -> None:
    truth = truth_volume(tmp_path)
    for name, per_round in (("whole", True), ("labels", False)):
        run_scan(read_scan(tmp_path / "scan.nii.gz"), QUESTIONS, stub_segmenter([]), tmp_path / name,
                 ScanOptions(window=WINDOW, per_round=per_round))
    result = run("eval", truth, "--predictions", tmp_path / "whole", "--round-labels", "1=6,2=7", "--per-round")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "whole" / "scan_eval.json").read_text())
    assert scores["masks_from"] == "per-round NIfTI files" and scores["notes"] == []
    first, second = scores["rounds"]
    assert (first["dice"], first["truth_voxels"], first["predicted_voxels"]) == (1.0, 18, 18)
    # round 2 marks both blobs (30 voxels) against label 7 (12): 2 * 12 / (30 + 12)
    assert second["dice"] == pytest.approx(24 / 42) and second["labels"] == [7]
    assert [(s["slice"], s["dice"]) for s in second["slices"]] == [(5, 0.0), (6, 0.0), (7, 0.0), (8, 1.0), (9, 1.0)]
    assert second["mean_slice_dice"] == pytest.approx(0.4) and "57.14" in result.output
    # Without --per-round the label volume shows round 2 over round 1: said, and scored as missed.
    hidden = run("eval", truth, "--predictions", tmp_path / "labels", "--round-labels", "1=6")
    assert hidden.exit_code == 0, hidden.output
    assert "round 1: 18 of its 18 voxels lie under a later round's label" in " ".join(hidden.output.split())
    assert json.loads((tmp_path / "labels" / "scan_eval.json").read_text())["rounds"][0]["dice"] == 0.0


def test_eval_of_a_volume_refuses_what_it_cannot_score(tmp_path: Path) -> None:
    truth = truth_volume(tmp_path)
    run_scan(read_scan(tmp_path / "scan.nii.gz"), QUESTIONS, stub_segmenter([]), tmp_path / "out", ScanOptions(window=WINDOW))
    lacks = run("eval", truth, "--predictions", tmp_path / "out", "--round-labels", "1=6,2=9")
    assert lacks.exit_code == BAD_INPUT_EXIT_CODE
    assert f"error: {truth}: field '--round-labels': round 2 maps to label 9, which the volume lacks (labels: 3, 6, 7)" \
        in " ".join(lacks.output.split())
    assert "round 3" in run("eval", truth, "--predictions", tmp_path / "out", "--round-labels", "3=6").output
    other = tmp_path / "other.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((20, 12, 16), np.uint8) + 6, np.eye(4)), other)
    moved = run("eval", other, "--predictions", tmp_path / "out", "--round-labels", "1=6")
    assert moved.exit_code == BAD_INPUT_EXIT_CODE and "lies on another grid" in moved.output
    mixed = run("eval", truth, "--predictions", tmp_path / "out", "--round-labels", "1=6", "--baseline", truth)
    assert mixed.exit_code == BAD_INPUT_EXIT_CODE and "--baseline: not for a volume evaluation" in mixed.output


def test_a_dicom_seg_output_is_scored_on_its_series(tmp_path: Path) -> None:
    coronal_series(tmp_path / "series")
    result = run_scan(read_scan(tmp_path / "series"), QUESTIONS, stub_segmenter([]), tmp_path / "out",
                      ScanOptions(window=WINDOW))
    # The truth: the output's own DICOM-SEG beside the slices, read as build-dialogues reads a SEG (the
    # higher segment wins where they overlap: round 2's segment covers round 1's).
    truth = tmp_path / "truth"
    shutil.copytree(tmp_path / "series", truth)
    shutil.copy(tmp_path / "out" / result.files["seg"], truth / "seg.dcm")
    scored = run("eval", truth, "--predictions", tmp_path / "out", "--round-labels", "2=2")
    assert scored.exit_code == 0, scored.output
    (score,) = json.loads((tmp_path / "out" / f"{result.scan.case}_eval.json").read_text())["rounds"]
    assert score["dice"] == 1.0 and score["truth_voxels"] == result.rounds[1].voxels > 0
    wrong = run("eval", tmp_path / "truth" / "seg.dcm", "--predictions", tmp_path / "out", "--round-labels", "2=2")
    assert wrong.exit_code == BAD_INPUT_EXIT_CODE and "not a NIfTI label volume" in wrong.output
