"""Scoring a predictions folder against hand-made ground truth; rows on disk; tables and the curve PNG."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

from mediround.data.dialogue import Dialogue, Round
from mediround.data.predictions import PredictionWriter
from mediround.errors import DataError
from mediround.reports.plots import round_curve
from mediround.reports.rows import ROW_SCHEMA, read_rows, write_rows
from mediround.reports.scoring import EvalConfig, evaluate_predictions, score_predictions
from mediround.reports.tables import difficulty_table, group_table, missing_table, overall_table, round_table


def _save(path, mask: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)
    return str(path.relative_to(path.parents[1]))


def _box(rows: slice, cols: slice, shape=(8, 8)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def build_case(root):
    """Two dialogues, four rounds; returns (dialogues, predictions folder).

    d1 r1: GT rows 0-1 (16 px), pred rows 0-1 cols 0-3 (8 px)   -> I 8,  U 16
    d1 r2: GT = pred = rows 4-7 cols 0-3 (16 px)                -> I 16, U 16
    d/2 r1: GT rows 0-1 cols 0-1 (4 px), no prediction          -> I 0,  U 4 (missing)
    d/2 r2: GT empty, pred empty                                -> I 0,  U 0
    """
    Image.new("RGB", (8, 8)).save(root / "image.png")
    gt = {
        ("d1", 1): _box(slice(0, 2), slice(0, 8)),
        ("d1", 2): _box(slice(4, 8), slice(0, 4)),
        ("d/2", 1): _box(slice(0, 2), slice(0, 2)),
        ("d/2", 2): np.zeros((8, 8), bool),
    }
    paths = {key: _save(root / "gt" / f"{key[0].replace('/', '_')}_{key[1]}.png", mask) for key, mask in gt.items()}
    dialogues = [
        Dialogue(id="d1", image="image.png", root=root, scenario="anatomy", modality="CT", difficulty="regular",
                 rounds=[Round("Segment the liver.", "It is [SEG].", mask=paths[("d1", 1)], entity="liver",
                               names_target=True),
                         Round("What lies below it?", "It is [SEG].", mask=paths[("d1", 2)], ref=1,
                               entity="kidney", names_target=False)]),
        Dialogue(id="d/2", image="image.png", root=root, modality="MRI", difficulty="hard",
                 rounds=[Round("Segment the tumour.", "It is [SEG].", mask=paths[("d/2", 1)], names_target=True),
                         Round("And the lesion left of it?", "None.", mask=paths[("d/2", 2)], ref=1,
                               names_target=False)]),
    ]
    predictions = root / "predictions"
    with PredictionWriter(predictions) as writer:
        writer.write("d1", 1, _box(slice(0, 2), slice(0, 4)), jcm_score=0.4, refined=True)
        writer.write("d1", 2, gt[("d1", 2)], jcm_score=0.9, refined=False)
        writer.write("d/2", 2, np.zeros((8, 8), bool))
    return dialogues, predictions


EXPECTED_GIOU = (8 / 16.00001 + 16 / 16.00001 + 0.0 + 1.0) / 4
EXPECTED_DICE = (16 / 24 + 1.0 + 0.0 + 1.0) / 4


def test_rows_have_hand_computed_counts_and_missing_is_empty(tmp_path):
    dialogues, predictions = build_case(tmp_path)
    result = score_predictions(dialogues, predictions)
    rows = {(row["dialogue_id"], row["round"]): row for row in result.rows}
    assert len(result.rows) == 4
    first = rows[("d1", 1)]
    assert (first["intersection"], first["union"], first["pred_area"], first["gt_area"]) == (8, 16, 8, 16)
    assert first["iou"] == 8 / 16.00001
    assert first["dice"] == pytest.approx(16 / 24)
    assert (first["jcm_score"], first["refined"], first["missing"]) == (0.4, True, False)
    assert (first["scenario"], first["modality"], first["difficulty"], first["entity"]) == ("anatomy", "CT", "regular", "liver")
    assert rows[("d1", 2)]["ref_round"] == 1 and rows[("d1", 2)]["names_target"] is False
    missing = rows[("d/2", 1)]
    assert missing["missing"] is True
    assert (missing["intersection"], missing["union"], missing["pred_area"], missing["iou"], missing["dice"]) == (0, 4, 0, 0.0, 0.0)
    assert result.missing == [("d/2", 1)]
    both_empty = rows[("d/2", 2)]
    assert (both_empty["union"], both_empty["iou"], both_empty["dice"], both_empty["missing"]) == (0, 1.0, 1.0, False)
    assert result.problems == []
    assert result.unmatched == 0


def test_predictions_for_unknown_dialogues_are_counted(tmp_path):
    dialogues, predictions = build_case(tmp_path)
    with PredictionWriter(predictions) as writer:
        writer.write("other", 1, np.zeros((8, 8), bool))
        writer.write("d1", 3, np.zeros((8, 8), bool))
    result = score_predictions(dialogues, predictions)
    assert result.unmatched == 2
    assert len(result.rows) == 4


def test_unusable_prediction_and_unreadable_ground_truth_are_reported(tmp_path):
    dialogues, predictions = build_case(tmp_path)
    with PredictionWriter(predictions) as writer:
        writer.write("d1", 2, np.ones((4, 4), bool))
    (tmp_path / dialogues[1].rounds[1].mask).write_bytes(b"not a png")
    result = score_predictions(dialogues, predictions)
    assert [(row["dialogue_id"], row["round"]) for row in result.rows] == [("d1", 1), ("d1", 2)]
    assert result.rows[1]["missing"] is True and result.rows[1]["intersection"] == 0
    assert result.missing == [("d1", 2)]
    assert len(result.problems) == 2
    size_problem, skipped = result.problems
    assert "differs from the ground truth" in size_problem.reason and size_problem.field == "mask"
    assert skipped.item == "d/2" and "dialogue skipped" in skipped.reason


def test_deleted_prediction_mask_is_missing_and_named(tmp_path):
    dialogues, predictions = build_case(tmp_path)
    (predictions / "masks" / "d1_r1.png").unlink()
    result = score_predictions(dialogues, predictions)
    assert ("d1", 1) in result.missing
    [problem] = result.problems
    assert (problem.item, problem.field) == ("d1 round 1", "mask")
    assert "masks/d1_r1.png" in problem.reason and "not found" in problem.reason


def test_round_without_ground_truth_is_not_scored_but_reported(tmp_path):
    dialogues, predictions = build_case(tmp_path)
    dialogues[0].rounds[1].mask = None
    result = score_predictions(dialogues, predictions)
    assert ("d1", 2) not in {(row["dialogue_id"], row["round"]) for row in result.rows}
    assert [(p.file, p.item, p.field) for p in result.problems] == [("d1", "round 2", "mask")]


def test_evaluate_writes_rows_summary_and_plot(tmp_path):
    dialogues, predictions = build_case(tmp_path)
    ticks = []
    evaluation = evaluate_predictions(dialogues, predictions,
                                      EvalConfig(out=tmp_path / "m.parquet", plot=tmp_path / "curve.png"),
                                      advance=lambda: ticks.append(1))
    assert len(ticks) == 2
    overall = evaluation.summary["overall"][None]
    assert overall.ciou == pytest.approx(24 / 36)
    assert overall.giou == pytest.approx(EXPECTED_GIOU)
    assert overall.dice == pytest.approx(EXPECTED_DICE)
    assert evaluation.summary["round"][1].ciou == pytest.approx(8 / 20)
    assert evaluation.summary["difficulty"]["hard"].ciou == pytest.approx(0 / 4)
    assert evaluation.summary["names_target"][False].count == 2
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.schema.equals(ROW_SCHEMA)
    assert read_rows(tmp_path / "m.parquet") == evaluation.rows
    with Image.open(tmp_path / "curve.png") as image:
        assert image.size == (800, 500) and image.mode == "RGB"
        pixels = np.asarray(image)
    assert (pixels == (31, 119, 180)).all(axis=-1).sum() > 100
    assert (pixels == (214, 39, 40)).all(axis=-1).sum() > 100


def test_nothing_to_score_is_an_error(tmp_path):
    dialogues, predictions = build_case(tmp_path)
    for dialogue in dialogues:
        for round_ in dialogue.rounds:
            round_.mask = None
    with pytest.raises(DataError, match="no round could be scored"):
        evaluate_predictions(dialogues, predictions, EvalConfig())


def test_read_rows_rejects_files_that_are_not_metrics(tmp_path):
    with pytest.raises(DataError, match="no such metrics file"):
        read_rows(tmp_path / "absent.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_rows(tmp_path / "bad.parquet")
    import pyarrow as pa
    pq.write_table(pa.table({"dialogue_id": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError) as caught:
        read_rows(tmp_path / "other.parquet")
    assert caught.value.field == "round"


def test_write_rows_is_atomic_and_typed_with_all_none_columns(tmp_path):
    rows = [{"dialogue_id": "a", "round": 1, "intersection": 1, "union": 2, "iou": 0.5, "dice": 0.5}]
    write_rows(tmp_path / "rows.parquet", rows)
    assert [path.name for path in tmp_path.iterdir()] == ["rows.parquet"]
    back = read_rows(tmp_path / "rows.parquet")[0]
    assert back["scenario"] is None and back["ref_round"] is None and back["round"] == 1


def _text(renderable) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_tables_show_points_x100_in_paper_layouts(tmp_path):
    dialogues, predictions = build_case(tmp_path)
    evaluation = evaluate_predictions(dialogues, predictions, EvalConfig())
    summary = evaluation.summary
    overall = _text(overall_table(summary))
    assert f"{100 * EXPECTED_DICE:.1f}" in overall and "66.7" in overall and f"{100 * EXPECTED_GIOU:.1f}" in overall
    per_round = _text(round_table(summary))
    assert "Round #1" in per_round and "Round #2" in per_round and "40.0" in per_round and "100.0" in per_round
    by_difficulty = _text(difficulty_table(summary))
    assert "hard" in by_difficulty and "regular" in by_difficulty and "overall" in by_difficulty
    by_target = _text(group_table(summary, "names_target"))
    assert by_target.index("│ named in the text") < by_target.index("│ reference only")
    assert by_difficulty.index("regular") < by_difficulty.index("hard")
    by_scenario = _text(group_table(summary, "scenario"))
    assert by_scenario.index("anatomy") < by_scenario.index("unknown")
    assert "d/2" in _text(missing_table(evaluation.missing))
    assert "and 2 more" in _text(missing_table([("a", 1), ("b", 1), ("c", 1)], limit=1))


def test_round_curve_refuses_no_rounds(tmp_path):
    with pytest.raises(ValueError):
        round_curve({}, tmp_path / "empty.png")
