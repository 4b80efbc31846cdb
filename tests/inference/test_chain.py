"""Algorithm 1 on a random tiny model: predicted-mask chaining, JCM branches, encoders once, cache parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_fixtures import SIZE, rect, set_judge_score, write_dialogues

from mediround.data.formats import load_dialogues
from mediround.data.images import load_image, load_mask
from mediround.errors import DataError
from mediround.inference.chain import Track, chain_dialogue, check_dialogue
from mediround.model import DialogueSession
from mediround.model import session as session_module
from mediround.model.processor import DialogueProcessor
from mediround.model.references import PredictedMask


@pytest.fixture
def dialogue(tmp_path):
    loaded = load_dialogues(write_dialogues(tmp_path, n_dialogues=1, n_rounds=3))
    dialogue = loaded.dialogues[0]
    return dialogue, load_image(dialogue.image_path)


def _spy_references(monkeypatch, given: list | None = None) -> list:
    """Record every (reference mask, crop, box) the model builds in ``step`` (and in ``given`` what the chain
    passed: a ground-truth mask or a ``PredictedMask``)."""
    seen = []
    original = DialogueProcessor.reference

    def spy(processor, image, mask):
        reference = original(processor, image, mask)
        if given is not None:
            given.append(mask)
        plain = mask.mask if isinstance(mask, PredictedMask) else mask
        seen.append((None if plain is None else np.array(plain), reference.crop.copy(), reference.box.copy()))
        return reference

    monkeypatch.setattr(DialogueProcessor, "reference", spy)
    return seen


def _force_first_mask(monkeypatch, mask: np.ndarray) -> None:
    """Make the first mask decode of the run return logits whose foreground is exactly ``mask``."""
    original = session_module.decode_features
    calls = {"n": 0}

    def decode(model, embeddings, features, frames):
        calls["n"] += 1
        logits = original(model, embeddings, features, frames)
        if calls["n"] == 1:
            return [torch.where(torch.from_numpy(mask), 5.0, -5.0).to(logits[0].dtype)[None]]
        return logits

    monkeypatch.setattr(session_module, "decode_features", decode)


def test_round_references_come_from_the_predicted_mask(model, dialogue, monkeypatch):
    dialogue, image = dialogue
    seen = _spy_references(monkeypatch)
    free = chain_dialogue(model, dialogue, image, [Track(None)])[Track(None)]
    np.testing.assert_array_equal(seen[0][0], free[0].mask)

    seen.clear()
    forced = rect(4, 8, 14, 28)
    _force_first_mask(monkeypatch, forced)
    chained = chain_dialogue(model, dialogue, image, [Track(None)])[Track(None)]
    np.testing.assert_array_equal(chained[0].mask, forced)
    reference_mask, crop, box = seen[0]
    np.testing.assert_array_equal(reference_mask, forced)
    np.testing.assert_allclose(box, [8 / SIZE, 4 / SIZE, 28 / SIZE, 14 / SIZE])
    assert crop.shape == (20, 20, 3)
    np.testing.assert_array_equal(crop[:10, :20], image[4:14, 8:28])
    assert not crop[10:].any()
    assert not np.allclose(box, _box_of(free[0].mask))


def _box_of(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0] / SIZE, rows[0] / SIZE, (cols[-1] + 1) / SIZE, (rows[-1] + 1) / SIZE])


def test_tiny_predicted_mask_falls_back_to_the_whole_image(model, dialogue, monkeypatch):
    dialogue, image = dialogue
    seen = _spy_references(monkeypatch)
    _force_first_mask(monkeypatch, rect(0, 0, 3, 3))
    chain_dialogue(model, dialogue, image, [Track(None)])
    _, crop, box = seen[0]
    np.testing.assert_allclose(box, [0, 0, 1, 1])
    np.testing.assert_array_equal(crop, image)


def test_teacher_forcing_feeds_the_ground_truth_reference(model, dialogue, monkeypatch):
    dialogue, image = dialogue
    truth = {1: load_mask(dialogue.mask_path(1)), 2: load_mask(dialogue.mask_path(2))}
    seen = _spy_references(monkeypatch)
    chain_dialogue(model, dialogue, image, [Track(None, teacher_forcing=True)], reference_truth=truth)
    np.testing.assert_array_equal(seen[0][0], truth[1])
    np.testing.assert_array_equal(seen[1][0], truth[2])
    np.testing.assert_allclose(seen[0][2], _box_of(truth[1]))


def test_predicted_references_carry_the_ground_truth_for_the_authors_fallback(model, dialogue, monkeypatch):
    """A predicted track hands the session its own mask as a ``PredictedMask`` with the referred round's ground
    truth beside it (``heads.predicted_reference: masked-image`` falls back to it); teacher forcing hands the
    ground truth itself, which is cut by its mask whatever the rule."""
    dialogue, image = dialogue
    truth = {1: load_mask(dialogue.mask_path(1)), 2: load_mask(dialogue.mask_path(2))}
    given: list = []
    _spy_references(monkeypatch, given)
    predicted = chain_dialogue(model, dialogue, image, [Track(None)], reference_truth=truth)[Track(None)]
    assert [type(mask) for mask in given] == [PredictedMask, PredictedMask]
    np.testing.assert_array_equal(given[0].mask, predicted[0].mask)
    np.testing.assert_array_equal(given[1].truth, truth[2])
    given.clear()
    chain_dialogue(model, dialogue, image, [Track(None, teacher_forcing=True)], reference_truth=truth)
    assert not any(isinstance(mask, PredictedMask) for mask in given)


def _manual_round_one(model, dialogue, image):
    session = DialogueSession.for_image(model, image)
    result = session.step(dialogue.rounds[0].query, dialogue.rounds[0].answer)
    raw = (result.mask_logits[0] > 0).numpy()
    refined = (session.decode(model.jcm.refine(result.seg_feature))[0] > 0).numpy()
    return raw, refined


@pytest.mark.parametrize("score", [0.7, 0.5])
def test_jcm_branch_follows_the_judge_score(jcm_model, dialogue, score):
    dialogue, image = dialogue
    set_judge_score(jcm_model, score)
    raw, refined = _manual_round_one(jcm_model, dialogue, image)
    assert not np.array_equal(raw, refined)
    tracks = [Track(0.0), Track(0.5), Track(1.0)]
    results = chain_dialogue(jcm_model, dialogue, image, tracks)
    for track in tracks:
        first = results[track][0]
        assert first.jcm_score == pytest.approx(score, abs=1e-6)
        expect_refined = not score > track.beta
        assert first.refined is expect_refined
        np.testing.assert_array_equal(first.mask, refined if expect_refined else raw)
        assert all(r.refined is expect_refined for r in results[track])


def test_jcm_off_never_refines_and_records_no_score(model, dialogue):
    dialogue, image = dialogue
    raw, _ = _manual_round_one(model, dialogue, image)
    rounds = chain_dialogue(model, dialogue, image, [Track(None)])[Track(None)]
    assert [r.refined for r in rounds] == [False, False, False]
    assert [r.jcm_score for r in rounds] == [None, None, None]
    assert [r.ref_round for r in rounds] == [None, 1, 2]
    np.testing.assert_array_equal(rounds[0].mask, raw)


def test_image_encoders_run_once_per_dialogue(model, tmp_path):
    loaded = load_dialogues(write_dialogues(tmp_path, n_dialogues=2, n_rounds=4))
    tracks = [Track(0.2), Track(0.6), Track(None), Track(0.6, teacher_forcing=True)]
    for dialogue in loaded.dialogues:
        image = load_image(dialogue.image_path)
        truth = {r: load_mask(dialogue.mask_path(r)) for r in (1, 2, 3)}
        before = model.encoder_calls.copy()
        chain_dialogue(model, dialogue, image, tracks, reference_truth=truth)
        assert model.encoder_calls["sam"] - before["sam"] == 1
        assert model.encoder_calls["clip"] - before["clip"] == 1
        before = model.encoder_calls.copy()
        chain_dialogue(model, dialogue, image, [Track(None)], use_cache=False)
        assert model.encoder_calls["sam"] - before["sam"] == 4
        assert model.encoder_calls["clip"] - before["clip"] == 4


def test_cached_and_uncached_chains_predict_the_same_masks(model, tmp_path):
    loaded = load_dialogues(write_dialogues(tmp_path, n_dialogues=1, n_rounds=4))
    dialogue = loaded.dialogues[0]
    image = load_image(dialogue.image_path)
    tracks = [Track(0.45), Track(None)]
    cached = chain_dialogue(model, dialogue, image, tracks)
    uncached = chain_dialogue(model, dialogue, image, tracks, use_cache=False)
    for track in tracks:
        for a, b in zip(cached[track], uncached[track]):
            assert a.refined == b.refined
            assert a.jcm_score == b.jcm_score
            np.testing.assert_array_equal(a.mask, b.mask)


def test_generated_answers_stay_in_the_history(model, dialogue):
    dialogue, image = dialogue
    rounds = chain_dialogue(model, dialogue, image, [Track(None)], generate=True)[Track(None)]
    assert len(rounds) == 3
    for prediction in rounds:
        assert prediction.answer != dialogue.rounds[0].answer
        assert "[SEG]" in prediction.answer
        assert prediction.mask.shape == image.shape[:2]


def test_references_to_missing_rounds_are_refused(dialogue):
    dialogue, _ = dialogue
    dialogue.rounds[1].ref = 2
    with pytest.raises(DataError, match=r"round 2 refers to round 2") as caught:
        check_dialogue(dialogue, "data.jsonl")
    assert caught.value.field == "rounds[1].ref"


def test_answers_with_two_seg_tokens_are_refused_unless_generating(dialogue):
    dialogue, _ = dialogue
    dialogue.rounds[2].answer = "Left [SEG] and right [SEG]."
    with pytest.raises(DataError, match=r"2 \[SEG\] tokens") as caught:
        check_dialogue(dialogue, "data.jsonl")
    assert caught.value.field == "rounds[2].answer"
    check_dialogue(dialogue, "data.jsonl", generate=True)


@pytest.mark.parametrize("jcm_rounds, judged", [("all", [True, True, True]), ("referred", [True, True, False])])
def test_jcm_rounds_referred_decodes_unreferred_rounds_raw(jcm_model, dialogue, jcm_rounds, judged):
    dialogue, image = dialogue
    set_judge_score(jcm_model, 0.5)
    track = Track(1.0)
    refined = chain_dialogue(jcm_model, dialogue, image, [track], jcm_rounds=jcm_rounds)[track]
    raw = chain_dialogue(jcm_model, dialogue, image, [Track(None)])[Track(None)]
    # Rounds 1 and 2 are referred to by rounds 2 and 3; the final round is referred to by none.
    assert [r.refined for r in refined] == judged
    assert [r.jcm_score is not None for r in refined] == judged
    assert not np.array_equal(refined[0].mask, raw[0].mask)
    # Every mask is the decode of h_c itself (unjudged) or of refine(h_c) (judged and refined).
    decoder = DialogueSession.for_image(jcm_model, image)
    for prediction in refined:
        feature = jcm_model.jcm.refine(prediction.seg_feature) if prediction.refined else prediction.seg_feature
        np.testing.assert_array_equal(prediction.mask, (decoder.decode(feature)[0] > 0).numpy())


def test_jcm_rounds_default_comes_from_the_model_config(jcm_model, dialogue, monkeypatch):
    dialogue, image = dialogue
    set_judge_score(jcm_model, 0.5)
    monkeypatch.setattr(jcm_model.config.heads, "jcm_rounds", "referred")
    rounds = chain_dialogue(jcm_model, dialogue, image, [Track(1.0)])[Track(1.0)]
    assert [r.refined for r in rounds] == [True, True, False]
