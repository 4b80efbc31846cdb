"""Batched dialogues (continuous batching) predict what one dialogue at a time predicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from inference_fixtures import write_dialogues

from mediround.data.formats import load_dialogues
from mediround.data.images import load_image, load_mask
from mediround.errors import DataError
from mediround.inference.chain import Track, chain_batched, chain_dialogue
from mediround.inference.runner import run_inference
from mediround.inference.settings import InferenceConfig

TRACKS = [Track(None), Track(0.3), Track(0.5), Track(0.7), Track(0.5, teacher_forcing=True)]


def _truth(dialogue):
    return {r.ref: load_mask(dialogue.mask_path(r.ref)) for r in dialogue.rounds if r.ref is not None}


@pytest.fixture
def dialogues(tmp_path):
    """Five dialogues of 1 to 4 rounds, so that they finish at different steps and others join."""
    loaded = load_dialogues(write_dialogues(tmp_path, n_dialogues=5, n_rounds=4)).dialogues
    for dialogue, rounds in zip(loaded, (4, 1, 3, 2, 4)):
        dialogue.rounds = dialogue.rounds[:rounds]
    return loaded


def _assert_same_predictions(expected, got):
    assert expected.keys() == got.keys()
    for track in expected:
        for one, batched in zip(expected[track], got[track], strict=True):
            np.testing.assert_array_equal(one.mask, batched.mask)
            assert (one.round, one.answer, one.ref_round, one.refined, one.seg_found) == \
                   (batched.round, batched.answer, batched.ref_round, batched.refined, batched.seg_found)
            assert (one.jcm_score is None) == (batched.jcm_score is None)
            if one.jcm_score is not None:
                assert abs(one.jcm_score - batched.jcm_score) < 1e-5


@pytest.mark.parametrize(("generate", "jcm_rounds"), [(False, "all"), (True, "all"), (False, "referred")])
def test_batched_dialogues_equal_one_at_a_time(model, dialogues, generate, jcm_rounds):
    def prepare(dialogue):
        return load_image(dialogue.image_path), _truth(dialogue)

    outcomes = list(chain_batched(model, dialogues, prepare, TRACKS, batch_size=2, generate=generate,
                                  jcm_rounds=jcm_rounds))
    assert sorted(o.dialogue.id for o in outcomes) == sorted(d.id for d in dialogues)
    # dlg-1 (one round) leaves after the first step and dlg-2 takes its place while dlg-0 goes on.
    assert [o.dialogue.id for o in outcomes] == ["dlg-1", "dlg-0", "dlg-2", "dlg-3", "dlg-4"]
    for outcome in outcomes:
        assert outcome.error is None
        expected = chain_dialogue(model, outcome.dialogue, outcome.image, TRACKS, generate=generate,
                                  reference_truth=_truth(outcome.dialogue), jcm_rounds=jcm_rounds)
        _assert_same_predictions(expected, outcome.results)


def test_a_failing_dialogue_leaves_its_batch_mates_alone(model, dialogues):
    def prepare(dialogue):
        if dialogue.id == "dlg-1":
            raise DataError("data.jsonl", dialogue.id, "image", "unreadable")
        # dlg-2 lacks the truth its referring round needs: it fails mid-way, in the batch.
        return load_image(dialogue.image_path), {} if dialogue.id == "dlg-2" else _truth(dialogue)

    outcomes = {o.dialogue.id: o for o in chain_batched(model, dialogues, prepare, TRACKS, batch_size=3)}
    assert outcomes["dlg-1"].error.reason == "unreadable"
    assert "ground-truth mask of round 1" in outcomes["dlg-2"].error.reason
    for dialogue in dialogues:
        if dialogue.id in ("dlg-1", "dlg-2"):
            continue
        expected = chain_dialogue(model, dialogue, outcomes[dialogue.id].image, TRACKS,
                                  reference_truth=_truth(dialogue))
        _assert_same_predictions(expected, outcomes[dialogue.id].results)


def test_runs_with_batches_write_what_batch_size_one_writes(model, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=5, n_rounds=3)
    folders = {}
    for batch_size in (1, 4):
        config = InferenceConfig(data=str(data), model="unused", out=str(tmp_path / f"b{batch_size}"),
                                 betas=(None, 0.5), batch_size=batch_size)
        summary = run_inference(config, model=model)
        assert summary.predicted == 5 and summary.skipped == 0
        folders[batch_size] = tmp_path / f"b{batch_size}"
    for track in ("jcm-off", "beta-0.5"):
        one, four = folders[1] / track, folders[4] / track
        lines = (one / "predictions.jsonl").read_text(), (four / "predictions.jsonl").read_text()
        assert lines[0] == lines[1]
        for record in map(json.loads, lines[0].splitlines()):
            assert (one / record["mask"]).read_bytes() == (four / record["mask"]).read_bytes()
