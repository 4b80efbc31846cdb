"""Metric formulas against hand-computed values (the authors' IoU = I / (U + 1e-5), Dice = 2I / (|P| + |G|))."""

from __future__ import annotations

import numpy as np
import pytest

from mediround.metrics import (
    MaskCounts,
    aggregate,
    counts,
    group_scores,
    pair_counts,
    summarize,
)


def _mask(shape: tuple[int, int], pixels: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for y, x in pixels:
        mask[y, x] = True
    return mask


def _row(intersection: int, union: int, pred_area: int, gt_area: int, **fields) -> dict:
    counted = MaskCounts(intersection, union, pred_area, gt_area)
    return {"intersection": intersection, "union": union, "iou": counted.iou, "dice": counted.dice, **fields}


def test_pair_counts_three_of_four_uses_the_epsilon():
    gt = _mask((4, 4), [(0, 0), (0, 1), (0, 2)])
    pred = _mask((4, 4), [(0, 0), (0, 1), (0, 2), (3, 3)])
    result = pair_counts(pred, gt)
    assert (result.intersection, result.union, result.pred_area, result.gt_area) == (3, 4, 4, 3)
    assert result.iou == 3 / 4.00001
    assert result.iou != 0.75
    assert result.dice == pytest.approx(2 * 3 / 7)


def test_both_empty_scores_one_and_one_empty_side_scores_zero():
    empty = np.zeros((5, 5), dtype=bool)
    assert pair_counts(empty, empty).iou == 1.0
    assert pair_counts(empty, empty).dice == 1.0
    target = _mask((5, 5), [(2, 2), (2, 3)])
    missed = pair_counts(empty, target)
    assert (missed.intersection, missed.union, missed.iou, missed.dice) == (0, 2, 0.0, 0.0)
    spurious = pair_counts(target, empty)
    assert (spurious.union, spurious.iou, spurious.dice) == (2, 0.0, 0.0)


def test_perfect_prediction_iou_is_just_below_one():
    target = _mask((3, 3), [(0, 0), (1, 1)])
    result = pair_counts(target, target)
    assert result.iou == 2 / 2.00001
    assert result.dice == 1.0


def test_batch_counts_match_pairs_and_accept_non_bool_input():
    rng = np.random.default_rng(3)
    pred = (rng.random((6, 9, 7)) < 0.4).astype(np.uint8) * 255
    gt = rng.random((6, 9, 7)) < 0.4
    gt[2] = False
    pred[2] = 0
    batch = counts(pred, gt)
    for index in range(6):
        single = pair_counts(pred[index] > 0, gt[index])
        assert batch["intersection"][index] == single.intersection
        assert batch["union"][index] == single.union
        assert batch["pred_area"][index] == single.pred_area
        assert batch["gt_area"][index] == single.gt_area
        assert batch["iou"][index] == single.iou
        assert batch["dice"][index] == single.dice
    assert batch["iou"][2] == 1.0 and batch["dice"][2] == 1.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        counts(np.zeros((2, 3, 3), bool), np.zeros((2, 3, 4), bool))
    with pytest.raises(ValueError):
        pair_counts(np.zeros((3, 3), bool), np.zeros((1, 3, 3), bool))


def test_aggregates_giou_ciou_dice_by_hand():
    rows = [_row(3, 4, 4, 3), _row(0, 2, 0, 2), _row(5, 10, 8, 7)]
    scores = aggregate(rows)
    assert scores.count == 3
    assert scores.giou == pytest.approx((3 / 4.00001 + 0 + 5 / 10.00001) / 3)
    assert scores.ciou == pytest.approx(8 / 16)
    assert scores.dice == pytest.approx((6 / 7 + 0 + 10 / 15) / 3)
    assert scores.points("ciou") == pytest.approx(50.0)


def test_ciou_of_all_empty_masks_is_one_and_empty_selection_is_refused():
    scores = aggregate([_row(0, 0, 0, 0), _row(0, 0, 0, 0)])
    assert (scores.giou, scores.ciou, scores.dice) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        aggregate([])


def test_ciou_weights_large_masks_while_giou_weights_every_mask_alike():
    rows = [_row(90, 100, 95, 95), _row(0, 10, 5, 5)]
    scores = aggregate(rows)
    assert scores.ciou == pytest.approx(90 / 110)
    assert scores.giou == pytest.approx((90 / 100.00001) / 2)


def test_grouping_by_round_names_target_and_unknown_values():
    rows = [
        _row(1, 2, 1, 2, round=1, names_target=True, scenario="a"),
        _row(2, 2, 2, 2, round=2, names_target=False, scenario=None),
        _row(0, 4, 2, 2, round=2, names_target=False, scenario="a"),
    ]
    by_round = group_scores(rows, "round")
    assert set(by_round) == {1, 2}
    assert by_round[2].count == 2
    assert by_round[2].ciou == pytest.approx(2 / 6)
    by_target = group_scores(rows, "names_target")
    assert by_target[True].ciou == pytest.approx(1 / 2)
    assert by_target[False].count == 2
    summary = summarize(rows)
    assert summary["overall"][None].ciou == pytest.approx(3 / 8)
    assert set(summary["scenario"]) == {"a", None}
    assert summary["modality"][None].count == 3
    assert group_scores(rows, lambda row: row["round"] > 1)[True].count == 2
