"""The synthetic benchmark: determinism, mask and reference guarantees, no name leaks, splits, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mediround.data.images import load_image, load_mask
from mediround.data.synth import (
    SCENARIOS,
    Wording,
    generate,
    iter_dialogues,
    make_dialogue,
    split_sizes,
    text_corpus,
)
from mediround.data.synth.anatomy import entity_names, sample_scene
from mediround.data.synth.generator import difficulty_of, plan_rounds
from mediround.data.synth.scenarios import PLAIN_ANSWERS, RELATIONS
from mediround.data.synth.shapes import Blob, split_by_line
from mediround.data.validate import validate
from mediround.errors import DataError
from mediround_cli.main import cli


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sample():
    return list(iter_dialogues(60, seed=3, split="train"))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = generate(out, 20, seed=7)
    return out, summary


def test_same_seed_gives_byte_identical_files(written, tmp_path):
    out, _ = written
    generate(tmp_path, 20, seed=7)
    assert _digest(tmp_path) == _digest(out)


def test_different_seed_gives_different_files(written, tmp_path):
    out, _ = written
    generate(tmp_path, 20, seed=8)
    first, second = _digest(out), _digest(tmp_path)
    assert first["train.jsonl"] != second["train.jsonl"]
    assert first["images/synth-train-00000.png"] != second["images/synth-train-00000.png"]


def test_masks_are_non_empty_and_image_sized(sample):
    for item in sample:
        assert item.image.dtype == np.uint8 and item.image.shape == (128, 128)
        assert len(item.masks) == len(item.dialogue.rounds)
        for mask in item.masks:
            assert mask.shape == item.image.shape
            assert mask.sum() >= 0.004 * mask.size


def test_every_mask_is_one_part_so_the_stray_fragment_rule_changes_no_training_reference(sample):
    """The tiny recipes leave parts under 10% of a reference mask out of its crop and box
    (``heads.reference_min_fragment``); on the synthetic benchmark that must not touch a ground-truth mask,
    so training with the rule is training without it (docs/model.md)."""
    from mediround.model.references import without_small_fragments

    masks = [np.asarray(mask, dtype=bool) for item in sample for mask in item.masks]
    assert len(masks) > 200
    for mask in masks:
        np.testing.assert_array_equal(without_small_fragments(mask, 0.1), mask)
        np.testing.assert_array_equal(without_small_fragments(mask, 0.9), mask)


def test_refs_point_to_earlier_rounds_with_different_targets(sample):
    for item in sample:
        rounds = item.dialogue.rounds
        assert 2 <= len(rounds) <= 8
        assert rounds[0].ref is None
        for number, round_ in enumerate(rounds, start=1):
            if round_.ref is not None:
                assert 1 <= round_.ref < number
                assert item.masks[round_.ref - 1].sum() > 0
        assert len({r.entity for r in rounds}) == len(rounds)


def test_names_target_means_the_text_names_the_entity(sample):
    for item in sample:
        for round_ in item.dialogue.rounds:
            assert round_.answer.count("[SEG]") == 1
            named = round_.entity in round_.query or round_.entity in round_.answer
            assert round_.names_target == (named or round_.ref is None), round_


def test_reference_only_rounds_exist_and_hide_the_name(sample):
    reference_only = [r for item in sample for r in item.dialogue.rounds if not r.names_target]
    assert len(reference_only) > len(sample) // 2
    unnamed_openings = [
        r
        for item in sample
        for r in item.dialogue.rounds
        if r.ref is None and r.entity not in r.query + r.answer
    ]
    assert unnamed_openings
    for round_ in reference_only:
        assert round_.ref is not None
        for word in ("left", "right"):
            if word in round_.entity:
                assert word not in round_.query.lower() and word not in round_.answer.lower()


def test_every_relation_used_is_ambiguous_without_the_reference():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        scene = sample_scene(rng, 64)
        planned = plan_rounds(rng, scene, SCENARIOS[checked % 5], hard=True)
        if planned is None:
            continue
        for round_ in planned:
            if round_.ref is None:
                continue
            relation = next(r for r in RELATIONS if r.key == round_.relation)
            assert relation.resolve(scene, planned[round_.ref - 1].target) is round_.target
            assert round_.target.name in relation.blind_targets(scene)
            assert len(relation.blind_targets(scene)) >= 2
            checked += 1
    assert checked > 40


def test_other_kidney_resolves_to_the_mirrored_partner():
    mirror = next(r for r in RELATIONS if r.key == "mirror")
    scene = sample_scene(np.random.default_rng(1), 64, region="abdomen")
    assert mirror.resolve(scene, scene.entities["left kidney"]).name == "right kidney"
    assert mirror.resolve(scene, scene.entities["liver"]) is None
    assert mirror.blind_targets(scene) == {"left kidney", "right kidney"}


def test_difficulty_rule(sample):
    for item in sample:
        dialogue = item.dialogue
        deep = any(r.difficulty == "hard" for r in dialogue.rounds)
        expected = "hard" if len(dialogue.rounds) >= 5 or deep else "regular"
        assert dialogue.difficulty == expected
        for round_ in dialogue.rounds:
            parent = dialogue.rounds[round_.ref - 1] if round_.ref else None
            assert (round_.difficulty == "hard") == bool(parent is not None and parent.ref is not None)
    assert {item.dialogue.difficulty for item in sample} == {"regular", "hard"}
    assert difficulty_of([]) == "regular"


def test_all_scenarios_and_several_modalities(sample):
    assert {item.dialogue.scenario for item in sample} == set(SCENARIOS)
    assert len({item.dialogue.modality for item in sample}) >= 3


def test_splits_are_independent():
    assert split_sizes(400) == {"train": 320, "val": 40, "test": 40}
    val_alone = make_dialogue(5, "val", 2)
    assert make_dialogue(5, "val", 2).dialogue == val_alone.dialogue
    assert make_dialogue(5, "train", 2).dialogue.rounds != val_alone.dialogue.rounds
    assert np.array_equal(make_dialogue(5, "val", 2).image, val_alone.image)


def test_written_set_validates_and_matches_summary(written):
    out, summary = written
    assert dict(summary.dialogues) == {"train": 16, "val": 2, "test": 2}
    assert summary.reference_only_rounds > 20 and summary.text_resolvable_reference_only_rounds == 0
    for split in ("train", "val", "test"):
        report = validate(out / f"{split}.jsonl")
        assert report.problems == []
        assert report.stats.valid == summary.dialogues[split]
    record = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert record["image"] == "images/synth-train-00000.png"
    assert (out / record["rounds"][0]["mask"]).is_file()


def test_cli_writes_one_split(tmp_path):
    result = CliRunner().invoke(
        cli, ["synth", str(tmp_path), "--dialogues", "3", "--split", "val", "--size", "64"]
    )
    assert result.exit_code == 0, result.output
    assert "reference-only rounds" in result.output
    lines = (tmp_path / "val.jsonl").read_text().splitlines()
    assert len(lines) == 3 and not (tmp_path / "train.jsonl").exists()
    assert len(list((tmp_path / "images").glob("*.png"))) == 3


def test_text_corpus_covers_every_generated_sentence(sample):
    corpus = set(text_corpus())
    assert text_corpus() == sorted(corpus)
    for item in sample:
        for round_ in item.dialogue.rounds:
            assert round_.query in corpus and round_.answer in corpus
    assert all(any(name in sentence for sentence in corpus) for name in entity_names())


def test_blob_mask_matches_a_hand_counted_disc():
    # Pixel centres sit at odd multiples of 1/16 from the middle; within radius 1/4 are the 2x2 centre
    # and the 8 pixels one step out along an axis: (1/16)^2 + (3/16)^2 <= 1/16, (3/16)^2 * 2 > 1/16.
    disc = Blob(0.5, 0.5, 0.25, 0.25).mask(8)
    expected = np.zeros((8, 8), bool)
    expected[3:5, 2:6] = True
    expected[2:6, 3:5] = True
    assert np.array_equal(disc, expected)
    assert not Blob(2.0, 2.0, 0.1, 0.1).mask(8).any()


def test_split_by_line_partitions_the_mask():
    full = np.ones((4, 4), bool)
    upper, lower = split_by_line(full, (0.5, 0.5), 0.0)
    assert upper[:2].all() and not upper[2:].any()
    assert np.array_equal(upper | lower, full) and not (upper & lower).any()


def test_written_pixels_round_trip_through_the_loaders(written):
    out, _ = written
    item = make_dialogue(7, "val", 1)
    image = load_image(out / item.dialogue.image)
    assert image.shape == (128, 128, 3)
    assert np.array_equal(image[..., 0], item.image)
    for round_, mask in zip(item.dialogue.rounds, item.masks):
        assert np.array_equal(load_mask(out / round_.mask), mask)


def test_an_output_path_that_is_a_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="is not a folder") as raised:
        generate(blocker, 2, seed=0)
    assert raised.value.file == str(blocker)
    result = CliRunner().invoke(cli, ["synth", str(blocker), "--dialogues", "2"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


FIRST_BENCHMARK_TRAIN_SHA256 = "a1e02dadfeea843115ef133b2c4b31333919e3457632d0df36effd269d443793"
"""train.jsonl of ``generate(out, 20, seed=7)`` as the generator wrote it before MR-MedSeg-style answers."""


def test_mr_medseg_answers_never_name_the_target_and_no_text_resolves_a_reference_only_round(sample):
    for item in sample:
        text = ""
        for round_, planned in zip(item.dialogue.rounds, item.planned):
            candidates = planned.text_candidates
            text += f" {round_.query} {round_.answer}"
            assert round_.answer in PLAIN_ANSWERS
            assert round_.entity in candidates
            if round_.ref is not None:
                assert not round_.names_target and len(candidates) >= 2, round_
                assert round_.entity not in text


def test_the_named_style_reproduces_the_first_benchmark_and_its_summary_counts_text_resolvable_rounds(tmp_path):
    summary = generate(tmp_path, 20, seed=7, wording=Wording(answers="named"))
    assert hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest() == FIRST_BENCHMARK_TRAIN_SHA256
    assert 0 < summary.text_resolvable_reference_only_rounds < summary.reference_only_rounds


def test_phrasing_halves_word_the_same_rounds_with_disjoint_templates():
    halves = {name: list(iter_dialogues(30, seed=3, wording=Wording(phrasings=name))) for name in ("a", "b")}
    queries = {}
    for name, items in halves.items():
        queries[name] = {r.query for item in items for r in item.dialogue.rounds}
        assert {r.answer for item in items for r in item.dialogue.rounds} <= set(PLAIN_ANSWERS[("a", "b").index(name) :: 2])
    assert not queries["a"] & queries["b"]
    for first, second in zip(halves["a"], halves["b"]):
        assert np.array_equal(first.image, second.image)
        assert [(r.entity, r.ref, r.mask) for r in first.dialogue.rounds] == [
            (r.entity, r.ref, r.mask) for r in second.dialogue.rounds
        ]


def test_cli_refuses_an_unknown_wording(tmp_path):
    result = CliRunner().invoke(cli, ["synth", str(tmp_path), "--phrasings", "c"])
    assert result.exit_code == 2 and "--phrasings" in result.output
