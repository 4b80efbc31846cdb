"""The regression gate: a planted drop fails, an equal run passes, the allowed drop is respected."""

from __future__ import annotations

import numpy as np
import pytest

from mediround.errors import DataError
from mediround.metrics import MaskCounts
from mediround.reports.gate import GateSettings, check_scores, coverage_checks, read_baseline, run_gate
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


MODALITIES = ("CT", "MRI", "X-ray", "ultrasound")
SCENARIOS = ("anatomy", "lesion", "spatial", "attribute", "reasoning")


def _cohort(n_dialogues: int = 80, n_rounds: int = 3, seed: int = 0) -> list[dict]:
    """Dialogues of every modality (cycled by 4) and scenario (by 5), 1000-pixel masks on both sides whose
    overlap varies: per-mask Dice = I / 1000, so lowering I by 100 lowers a mask's Dice by 10 points."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_dialogues):
        for number in range(1, n_rounds + 1):
            intersection = int(rng.integers(300, 900))
            rows.append({**_row(f"d{index:03d}", number, intersection, 2000 - intersection, 1000, 1000),
                         "modality": MODALITIES[index % 4], "scenario": SCENARIOS[index % 5]})
    return rows


def _lowered(rows: list[dict], modality: str, pixels: int) -> list[dict]:
    """``rows`` with the overlap of every mask of ``modality`` lowered by ``pixels``."""
    return [{**_row(r["dialogue_id"], r["round"], r["intersection"] - pixels, r["union"] + pixels, 1000, 1000),
             "modality": r["modality"], "scenario": r["scenario"]} if r["modality"] == modality else r for r in rows]


ALL_SCOPES = ("overall", "round", "modality", "scenario")


def test_the_bootstrap_gate_never_fails_a_run_compared_with_itself():
    rows = _cohort()
    checks = check_scores(rows, rows, GateSettings(max_drop=0.0, confidence=0.95, scopes=ALL_SCOPES))
    assert {check.scope for check in checks} == {"overall", "round 1", "round 2", "round 3",
                                                 *(f"modality {m}" for m in MODALITIES),
                                                 *(f"scenario {s}" for s in SCENARIOS)}
    assert not any(check.failed for check in checks)
    assert {check.interval for check in checks} == {(0.0, 0.0)} and {check.drop for check in checks} == {0.0}


def test_a_planted_drop_in_one_modality_fails_that_modality_and_only_it():
    baseline = _cohort()
    current = _lowered(baseline, "MRI", 100)  # MRI Dice -10 points; a quarter of the dialogues: overall -2.5
    settings = GateSettings(max_drop=3.0, confidence=0.95, scopes=ALL_SCOPES, min_group_size=10)
    checks = {(check.scope, check.metric): check for check in check_scores(current, baseline, settings)}
    assert {key for key, check in checks.items() if check.failed} == {("modality MRI", m) for m in ("dice", "giou", "ciou")}
    dice = checks[("modality MRI", "dice")]
    assert dice.drop == pytest.approx(10.0) and dice.interval == pytest.approx((10.0, 10.0))  # the same shift in every resample
    assert checks[("overall", "dice")].drop == pytest.approx(2.5)
    for scope in ("modality CT", "modality X-ray", "modality ultrasound"):
        assert checks[(scope, "dice")].drop == 0.0 and checks[(scope, "dice")].interval == (0.0, 0.0)
    # The default scopes (overall and rounds) cannot see it at this allowance.
    assert not any(check.failed for check in check_scores(current, baseline, GateSettings(max_drop=3.0, confidence=0.95)))


def test_a_group_below_the_minimum_size_is_reported_but_not_gated():
    baseline = _cohort(n_dialogues=12)
    current = _lowered(baseline, "X-ray", 300)  # 3 X-ray dialogues, Dice -30 points
    settings = GateSettings(max_drop=1.0, scopes=("overall", "modality"), min_group_size=4)
    checks = {(check.scope, check.metric): check for check in check_scores(current, baseline, settings)}
    xray = checks[("modality X-ray", "dice")]
    assert xray.dialogues == 3 and xray.drop == pytest.approx(30.0) and not xray.failed
    assert xray.not_gated == "3 dialogue(s), fewer than the minimum group size 4"
    assert checks[("overall", "dice")].failed  # overall is gated whatever its size: 7.5 points
    assert {scope for scope, _ in checks if scope.startswith("modality")} == {f"modality {m}" for m in MODALITIES}


def test_the_interval_of_a_score_is_reproducible_on_a_fixed_seed():
    baseline, current = _cohort(seed=1), _cohort(seed=2)
    first = check_scores(current, baseline, GateSettings(confidence=0.9, seed=7))
    again = check_scores(current, baseline, GateSettings(confidence=0.9, seed=7))
    other_seed = check_scores(current, baseline, GateSettings(confidence=0.9, seed=8))
    assert [check.interval for check in first] == [check.interval for check in again]
    assert [check.interval for check in first] != [check.interval for check in other_seed]
    # A group's interval does not depend on which other scopes are gated.
    overall_only = check_scores(current, baseline, GateSettings(confidence=0.9, seed=7, scopes=("overall",)))
    assert [check.interval for check in overall_only] == [check.interval for check in first[:3]]


def test_noise_fails_the_plain_threshold_but_not_the_bootstrap_gate():
    """Two independent draws of the same distribution: no real drop, yet small groups move by points."""
    baseline, current = _cohort(n_dialogues=40, seed=1), _cohort(n_dialogues=40, seed=2)
    plain = check_scores(current, baseline, GateSettings(max_drop=1.0, scopes=ALL_SCOPES))
    statistical = check_scores(current, baseline, GateSettings(max_drop=1.0, confidence=0.95, scopes=ALL_SCOPES))
    assert any(check.failed for check in plain)
    assert not any(check.failed for check in statistical)
    for check in statistical:
        low, high = check.interval
        assert low <= check.drop <= high


def test_gate_settings_refuse_what_cannot_be_gated():
    for bad in ({"confidence": 1.0}, {"confidence": 0.0}, {"scopes": ("overall", "site")}, {"scopes": ()},
                {"min_group_size": 0}):
        with pytest.raises(ValueError):
            GateSettings(**bad)


def test_without_a_baseline_every_score_is_reported_and_only_skipped_dialogues_fail():
    report = run_gate(BASELINE, None, skipped=0, settings=GateSettings())
    assert report.passed and report.baseline is None
    assert [check.name for check in report.coverage] == ["skipped dialogues"]
    assert {check.not_gated for check in report.scores} == {"no baseline"}
    assert len(report.scores) == 3 * 3  # overall, round 1, round 2
    skipped = run_gate(BASELINE, None, skipped=2, settings=GateSettings())
    assert not skipped.passed and skipped.coverage_failures[0].startswith("2 dialogue(s) skipped")


def test_a_group_whose_dialogues_differ_between_runs_gets_the_wide_interval_of_two_unpaired_samples():
    baseline = _cohort(n_dialogues=40, seed=1)
    # The same masks, each dialogue relabelled with the next modality: every modality group of the current
    # run holds dialogues its baseline group does not.
    current = [{**row, "modality": MODALITIES[(MODALITIES.index(row["modality"]) + 1) % 4]} for row in baseline]
    settings = GateSettings(max_drop=0.0, confidence=0.95, scopes=("modality",))
    for check in check_scores(current, baseline, settings):
        low, high = check.interval  # 10 dialogues a side, per-mask Dice spread over 30-90: several points wide
        assert low <= check.drop <= high and high - low > 5.0, check
