"""The regression gate: a planted drop fails, an equal run passes, the allowed drop is respected."""

from __future__ import annotations

import pytest

from mediround.errors import DataError
from mediround.metrics import MaskCounts
from mediround.reports.gate import GateSettings, check_scores, coverage_checks, read_baseline
from mediround.reports.rows import write_rows


def _row(dialogue_id: str, number: int, intersection: int, union: int, pred_area: int, gt_area: int) -> dict:
    counted = MaskCounts(intersection, union, pred_area, gt_area)
    return {"dialogue_id": dialogue_id, "round": number, "intersection": intersection, "union": union,
            "pred_area": pred_area, "gt_area": gt_area, "iou": counted.iou, "dice": counted.dice}


def compare_rows(current: list[dict], baseline: list[dict], max_drop: float) -> list:
    """The scores that failed the plain threshold of ``max_drop`` points (default scopes)."""
    return [check for check in check_scores(current, baseline, GateSettings(max_drop=max_drop)) if check.failed]


def coverage_failures(current: list[dict], baseline: list[dict], skipped: int) -> list[str]:
    return [check.failure for check in coverage_checks(current, baseline, skipped) if check.failure is not None]


BASELINE = [
    _row("a", 1, 8, 10, 9, 9),
    _row("a", 2, 5, 10, 7, 8),
    _row("b", 1, 10, 10, 10, 10),
    _row("b", 2, 6, 10, 8, 8),
]


def test_equal_run_passes_through_parquet(tmp_path):
    write_rows(tmp_path / "baseline.parquet", BASELINE)
    assert compare_rows(BASELINE, read_baseline(tmp_path / "baseline.parquet"), 0.0) == []


def test_planted_round_two_regression_is_reported_with_points(tmp_path):
    write_rows(tmp_path / "baseline.parquet", BASELINE)
    current = [*BASELINE[:3], _row("b", 2, 2, 10, 4, 8)]
    regressions = compare_rows(current, read_baseline(tmp_path / "baseline.parquet"), 1.0)
    found = {(r.scope, r.metric): r for r in regressions}
    assert set(found) == {("round 2", "ciou"), ("round 2", "giou"), ("round 2", "dice"),
                          ("overall", "ciou"), ("overall", "giou"), ("overall", "dice")}
    assert found[("round 2", "ciou")].baseline == pytest.approx(100 * 11 / 20)
    assert found[("round 2", "ciou")].current == pytest.approx(100 * 7 / 20)
    assert found[("round 2", "ciou")].drop == pytest.approx(20.0)
    assert found[("overall", "ciou")].drop == pytest.approx(100 * 4 / 40)


def test_drop_within_the_allowance_passes_and_beyond_fails():
    current = [*BASELINE[:3], _row("b", 2, 5, 10, 7, 8)]
    # round 2: cIoU 55.0 -> 50.0 (5 points, 55.00000000000001 in floats), gIoU 4.99995 points, Dice 4.17;
    # overall: cIoU 72.5 -> 70.0, gIoU 2.5, Dice 2.08
    assert compare_rows(current, BASELINE, 5.0) == []
    beyond = {(r.scope, r.metric) for r in compare_rows(current, BASELINE, 4.9)}
    assert beyond == {("round 2", "ciou"), ("round 2", "giou")}
    assert {(r.scope, r.metric) for r in compare_rows(current, BASELINE, 2.4)} == {
        ("round 2", "ciou"), ("round 2", "giou"), ("round 2", "dice"), ("overall", "ciou"), ("overall", "giou")}


def test_improvement_and_rounds_only_in_one_run_do_not_lower_the_scores():
    better = [_row("a", 1, 10, 10, 10, 10), *BASELINE[1:], _row("c", 3, 10, 10, 10, 10)]
    assert compare_rows(better, BASELINE, 0.0) == []
    only_round_one = [BASELINE[0], BASELINE[2]]
    assert compare_rows(only_round_one, BASELINE, 0.0) == []
    assert compare_rows(BASELINE, only_round_one, 0.0) != []


def test_bad_allowance_and_bad_baseline_are_refused(tmp_path):
    with pytest.raises(ValueError):
        GateSettings(max_drop=-1.0)
    with pytest.raises(DataError, match="no such metrics file"):
        read_baseline(tmp_path / "absent.parquet")
    write_rows(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match="no rows"):
        read_baseline(tmp_path / "empty.parquet")


def test_the_same_coverage_passes_the_coverage_check():
    assert coverage_failures(BASELINE, BASELINE, skipped=0) == []


def test_fewer_pairs_other_ids_no_match_and_skipped_dialogues_each_fail_with_their_reason():
    only_a = BASELINE[:2]
    fewer = coverage_failures(only_a, BASELINE, skipped=0)
    assert len(fewer) == 2
    assert "covers 2 (dialogue, round) pairs, fewer than the baseline's 4" in fewer[0]
    assert "0 only in this run" in fewer[1] and "1 only in the baseline (b)" in fewer[1]

    other_set = [{**row, "dialogue_id": "x" + row["dialogue_id"]} for row in BASELINE]
    [reason] = coverage_failures(other_set, BASELINE, skipped=0)
    assert "dialogue ids differ" in reason and "2 only in this run (xa, xb)" in reason

    unmatched = [{**row, "missing": True, "intersection": 0} for row in BASELINE]
    [reason] = coverage_failures(unmatched, BASELINE, skipped=0)
    assert reason.startswith("no prediction matched a round of the data")

    [reason] = coverage_failures(BASELINE, BASELINE, skipped=1)
    assert reason.startswith("1 dialogue(s) skipped")
