"""The one round path: rows of a BatchSession of different lengths, joining, forked and leaving, compute
what the training forward computes for their dialogues (teacher-forced) and what a lone one-row session
computes (generated answers)."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import perturb_lora, sample, tiny_model

from mediround.model import MASK_THRESHOLD, DialogueSession
from mediround.model.session import BatchSession, encode_images

# Rows differ from a lone dialogue only in the order of float additions inside batched matrix products
# (measured: logits within 2e-7, [SEG] features within 4e-7 on the tiny preset in fp32); the training
# forward reads the whole dialogue in one sequence (measured within 3e-6).
LOGIT_TOLERANCE = 1e-5
FORWARD_TOLERANCE = 1e-4


def _lone(model, item, generate: bool):
    session = DialogueSession.for_image(model, item.image)
    results = []
    for round_ in item.dialogue.rounds:
        reference = None if round_.ref is None else item.masks[round_.ref - 1]
        results.append(session.step(round_.query, None if generate else round_.answer, reference,
                                    round_.ref is not None, max_new_tokens=5))
    return results


def _assert_same(lone, batched):
    assert len(lone) == len(batched)
    for expected, got in zip(lone, batched):
        assert expected.answer_ids == got.answer_ids and expected.seg_fed == got.seg_fed
        assert (expected.seg_feature - got.seg_feature).abs().max() < LOGIT_TOLERANCE
        assert (expected.mask_logits - got.mask_logits).abs().max() < LOGIT_TOLERANCE
        assert torch.equal(expected.mask_logits > MASK_THRESHOLD, got.mask_logits > MASK_THRESHOLD)


def _assert_as_training_forward(model, item, batched):
    """Teacher-forced rounds: the [SEG] features and mask logits of the training forward over the whole
    dialogue (128-px images: the supervision frame is the original size)."""
    with torch.no_grad():
        whole = model(model.processor.collate([item]))
    features = torch.stack([result.seg_feature for result in batched])
    logits = torch.cat([result.mask_logits for result in batched])
    assert (features - whole.seg_features[0]).abs().max() < FORWARD_TOLERANCE
    assert (logits - whole.mask_logits[0]).abs().max() < FORWARD_TOLERANCE


@pytest.mark.parametrize("seg_state", ["at_seg", "before_seg"])
def test_rows_joining_forking_and_leaving_match_the_training_forward_and_lone_rows(seg_state):
    torch.set_num_threads(1)
    model = tiny_model(seed=3)
    model.config.heads.seg_state = seg_state  # h_c read at [SEG] (tiny preset) or before it (the authors')
    perturb_lora(model)
    model.eval()
    items = [sample(4, seed=21), sample(2, seed=22), sample(3, seed=23)]
    for generate in (False, True):
        batch = BatchSession(model, max_new_tokens=5)
        rows = dict(enumerate(batch.add(encode_images(model, [items[0].image, items[1].image]))))
        got = {0: [], 1: [], 2: [], "fork": []}
        for step in range(4):
            if step == 1:  # a dialogue joins mid-way; another is forked (as JCM tracks fork)
                rows[2] = batch.add(encode_images(model, [items[2].image]))[0]
                rows["fork"] = rows[0].fork()
                got["fork"] = list(got[0])
            prepared = []
            for key, row in rows.items():
                item = items[0 if key == "fork" else key]
                round_ = item.dialogue.rounds[row.rounds]
                reference = None if round_.ref is None else item.masks[round_.ref - 1]
                prepared.append(batch.prepare(row, round_.query, None if generate else round_.answer, reference,
                                              round_.ref is not None))
            for key, result in zip(rows, batch.step(prepared)):
                got[key].append(result)
            finished = [key for key, row in rows.items() if row.rounds == len(items[0 if key == "fork" else key].dialogue.rounds)]
            batch.remove([rows.pop(key) for key in finished])
        assert not rows and batch.cache is None
        for key, results in got.items():
            item = items[0 if key == "fork" else key]
            if generate:
                _assert_same(_lone(model, item, generate), results)
            else:
                _assert_as_training_forward(model, item, results)


def test_leaving_rows_free_the_columns_no_one_else_uses():
    torch.set_num_threads(1)
    model = tiny_model(seed=4).eval()
    items = [sample(1, seed=31), sample(1, seed=32)]
    batch = BatchSession(model)
    (first,) = batch.add(encode_images(model, [items[0].image]))
    batch.step([batch.prepare(first, "A long query " * 8, "It is [SEG].", None, False)])
    batch.add(encode_images(model, [items[1].image]))  # the second row joins left-padded to the first's width
    assert not bool(batch.mask[1, 0])
    width = batch.mask.shape[1]
    batch.remove([first])
    assert batch.cache.layers[0].keys.shape[:3:2] == (1, batch.mask.shape[1])
    assert batch.mask.shape[1] < width and bool(batch.mask[0].all())  # only the joined row's prefix is left


def test_undo_of_one_row_leaves_what_a_row_without_that_round_computes():
    torch.set_num_threads(1)
    model = tiny_model(seed=5).eval()
    items = [sample(2, seed=41), sample(2, seed=42)]
    batch = BatchSession(model, max_new_tokens=4)
    first, second = batch.add(encode_images(model, [item.image for item in items]))
    rounds = [item.dialogue.rounds[0] for item in items]
    batch.step([batch.prepare(row, r.query, r.answer, None, False) for row, r in zip((first, second), rounds)])
    width = batch.mask.shape[1]
    batch.step([batch.prepare(first, "An extra question that will be taken back.", "It is [SEG].", None, False)])
    batch.undo(first)
    assert first.rounds == 1 and batch.mask.shape[1] == width  # the undone columns no row uses are gone
    follow_up = items[0].dialogue.rounds[1]
    (got,) = batch.step([batch.prepare(first, follow_up.query, follow_up.answer, items[0].masks[0], True)])
    lone = DialogueSession.for_image(model, items[0].image)
    lone.step(rounds[0].query, rounds[0].answer)
    expected = lone.step(follow_up.query, follow_up.answer, items[0].masks[0])
    assert (expected.seg_feature - got.seg_feature).abs().max() < LOGIT_TOLERANCE
    (fresh,) = batch.add(encode_images(model, [items[1].image]))
    with pytest.raises(ValueError, match="no round to undo"):
        batch.undo(fresh)
