"""``mediround eval`` end to end on a tiny hand-made JSONL dataset with known masks and predictions."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from mediround.data.dialogue import Dialogue, Round
from mediround.data.formats import load_dialogues
from mediround.data.formats.jsonl import write_jsonl
from mediround.data.images import load_mask, save_mask
from mediround.data.predictions import PREDICTIONS_FILE, PredictionWriter
from mediround.reports.scoring import EvalConfig, evaluate_predictions
from mediround_cli.main import cli


def _box(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((8, 8), dtype=bool)
    mask[rows, cols] = True
    return mask


GT = {
    ("case-1", 1): _box(slice(0, 2), slice(0, 8)),
    ("case-1", 2): _box(slice(4, 8), slice(0, 4)),
    ("case 2", 1): _box(slice(0, 2), slice(0, 2)),
    ("case 2", 2): _box(slice(6, 8), slice(6, 8)),
}


@pytest.fixture
def dataset(tmp_path):
    """data.jsonl + masks; predictions: case-1 r1 half right (I 8, U 16), case-1 r2 exact (I 16, U 16),
    case 2 r1 missing (I 0, U 4), case 2 r2 exact (I 4, U 4). Overall cIoU = 28 / 40 = 70.0."""
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    for (dialogue_id, number), mask in GT.items():
        save_mask(tmp_path / "gt" / f"{dialogue_id.replace(' ', '_')}_{number}.png", mask)

    def gt_path(dialogue_id: str, number: int) -> str:
        return f"gt/{dialogue_id.replace(' ', '_')}_{number}.png"

    dialogues = [
        Dialogue(id="case-1", image="image.png", root=tmp_path, scenario="anatomy", modality="CT",
                 difficulty="regular",
                 rounds=[Round("Segment the liver.", "It is [SEG].", mask=gt_path("case-1", 1), names_target=True),
                         Round("Segment what lies below it.", "It is [SEG].", mask=gt_path("case-1", 2), ref=1,
                               names_target=False)]),
        Dialogue(id="case 2", image="image.png", root=tmp_path, scenario="lesion", modality="MRI", difficulty="hard",
                 rounds=[Round("Segment the tumour.", "It is [SEG].", mask=gt_path("case 2", 1), names_target=True),
                         Round("Segment the region across from it.", "It is [SEG].", mask=gt_path("case 2", 2),
                               ref=1, names_target=False)]),
    ]
    write_jsonl(dialogues, tmp_path / "data.jsonl")
    predictions = tmp_path / "predictions"
    with PredictionWriter(predictions) as writer:
        writer.write("case-1", 1, _box(slice(0, 2), slice(0, 4)))
        writer.write("case-1", 2, GT[("case-1", 2)])
        writer.write("case 2", 2, GT[("case 2", 2)])
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(cli, ["eval", *map(str, args)], catch_exceptions=False)


def test_eval_scores_reports_missing_and_writes_rows_and_plot(dataset):
    result = _run(dataset / "data.jsonl", "--predictions", dataset / "predictions", "--per-round",
                  "--plot", dataset / "curve.png")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(dataset / "predictions" / "metrics.parquet").to_pylist()
    by_key = {(row["dialogue_id"], row["round"]): row for row in rows}
    assert set(by_key) == set(GT)
    assert (by_key[("case-1", 1)]["intersection"], by_key[("case-1", 1)]["union"]) == (8, 16)
    assert by_key[("case 2", 1)]["missing"] is True and by_key[("case 2", 1)]["union"] == 4
    assert [key for key, row in by_key.items() if row["missing"]] == [("case 2", 1)]
    assert by_key[("case-1", 2)]["ref_round"] == 1 and by_key[("case 2", 2)]["names_target"] is False
    output = result.output
    assert "70.0" in output  # overall cIoU 28/40
    assert "40.0" in output  # round 1 cIoU 8/20
    assert "100.0" in output  # round 2 cIoU 20/20
    assert "Round #2" in output and "reference only" in output and "MRI" in output and "hard" in output
    assert "Missing predictions scored as empty: 1" in output and "case 2" in output
    assert (dataset / "curve.png").stat().st_size > 1000


def test_gate_passes_on_equal_run_and_fails_on_planted_regression(dataset):
    baseline = dataset / "baseline.parquet"
    first = _run(dataset / "data.jsonl", "--predictions", dataset / "predictions", "--out", baseline)
    assert first.exit_code == 0, first.output
    same = _run(dataset / "data.jsonl", "--predictions", dataset / "predictions", "--baseline", baseline,
                "--max-drop", "0")
    assert same.exit_code == 0, same.output
    assert "gate passed" in same.output

    lines = (dataset / "predictions" / PREDICTIONS_FILE).read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["round"] != 2 or json.loads(line)["id"] != "case-1"]
    (dataset / "predictions" / PREDICTIONS_FILE).write_text("\n".join(kept) + "\n")
    worse = _run(dataset / "data.jsonl", "--predictions", dataset / "predictions", "--baseline", baseline,
                 "--max-drop", "5")
    assert worse.exit_code == 1, worse.output
    assert "Regressions (drop > 5 points)" in worse.output
    assert "round 2" in worse.output and "overall" in worse.output
    assert "round 1" not in worse.output


def test_baseline_may_be_the_file_being_replaced(dataset):
    default_out = dataset / "predictions" / "metrics.parquet"
    assert _run(dataset / "data.jsonl", "--predictions", dataset / "predictions").exit_code == 0
    with PredictionWriter(dataset / "predictions") as writer:
        writer.write("case-1", 2, np.zeros((8, 8), bool))
    worse = _run(dataset / "data.jsonl", "--predictions", dataset / "predictions", "--baseline", default_out)
    assert worse.exit_code == 1, worse.output
    assert pq.read_table(default_out).to_pylist()[1]["intersection"] == 0


def test_without_predictions_or_model_the_shipped_model_is_run_and_named(dataset, tmp_path):
    result = CliRunner().invoke(cli, ["eval", str(dataset / "data.jsonl"), "--predictions-out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "no --model given: using the shipped tiny model" in result.output
    assert (tmp_path / "p" / "metrics.parquet").is_file()


def test_bad_predictions_file_is_one_line_error_naming_line_and_field(dataset):
    (dataset / "predictions" / PREDICTIONS_FILE).write_text('{"id": "case-1", "round": "one", "mask": "m.png"}\n')
    result = CliRunner().invoke(cli, ["eval", str(dataset / "data.jsonl"), "--predictions", str(dataset / "predictions")])
    assert result.exit_code == 2
    assert "line 1" in result.output and "field 'round'" in result.output
    assert "Traceback" not in result.output


def test_predictions_folder_given_as_data_is_named_with_the_command_that_scores_it(dataset):
    predictions = dataset / "predictions"
    result = CliRunner().invoke(cli, ["eval", str(predictions)])
    assert result.exit_code == 2
    # No run manifest (the folder was written by hand): it cannot name its data, so DATA stays in the hint.
    expected = (f"error: {predictions}: is a predictions folder (it holds predictions.jsonl), not data with ground "
                f"truth: score it with `mediround eval DATA --predictions {predictions}`")
    assert result.output.strip().splitlines() == [expected]
    (predictions / "run.json").write_text(json.dumps({"data": str(dataset / "data.jsonl")}), encoding="utf-8")
    result = CliRunner().invoke(cli, ["eval", str(predictions), "--model", str(dataset)])
    assert result.exit_code == 2
    assert result.output.strip().endswith(f"score it with `mediround eval --predictions {predictions}`")
    assert "SA-Med2D" not in result.output and len(result.output.strip().splitlines()) == 1
    # The command it suggests scores the folder.
    assert _run("--predictions", predictions).exit_code == 0


def test_scoring_path_does_not_import_torch():
    code = ("import sys, mediround_cli.eval, mediround.reports.scoring, mediround.reports.gate; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_real_ct_masks_score_as_computed_by_hand(tmp_path, shared_data):
    loaded = load_dialogues(shared_data("sam-med2d-demo", "data_demo"))
    dialogues = [d for d in loaded.dialogues if d.mask_path(1) is not None][:3]
    expected_i = expected_u = 0
    with PredictionWriter(tmp_path / "predictions") as writer:
        for dialogue in dialogues:
            gt = load_mask(dialogue.mask_path(1))
            shifted = np.roll(gt, 5, axis=0)
            writer.write(dialogue.id, 1, shifted)
            expected_i += int(np.sum(shifted & gt))
            expected_u += int(np.sum(shifted | gt))
    evaluation = evaluate_predictions(dialogues, tmp_path / "predictions", EvalConfig())
    assert expected_u > expected_i > 0
    assert evaluation.summary["overall"][None].ciou == pytest.approx(expected_i / expected_u)
    assert [row["missing"] for row in evaluation.rows if row["round"] == 1] == [False] * len(dialogues)
