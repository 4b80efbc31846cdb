"""``mediround chat`` (issue #13, section 2): one image, questions one at a time over one KV cache; ``@N``
references, ``:undo`` and ``:reset`` restore exactly the state of a fresh session with the same history,
and the saved dialogue reads back into ``infer`` (with ``jcm_rounds`` ``referred`` too, where a round is
judged only once a later question refers to it)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from inference_fixtures import set_judge_score, write_dialogues

from mediround.data.formats import load_dialogues
from mediround.data.images import load_image, load_mask
from mediround.inference.chain import Track, chain_dialogue
from mediround.inference.chat import ChatSession, Question, QuestionError, parse_question
from mediround.model.checkpoint import save_checkpoint
from mediround.model.mediround import MediRound
from mediround.model.processor import DialogueProcessor
from mediround_cli.main import cli

QUESTIONS = ["Segment the liver.", "@1 Segment the organ beside it.", "Segment the left kidney."]


@pytest.fixture
def image(tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=1, n_rounds=1)
    return data.parent / "images" / "d0.png"


def _same(first, second) -> None:
    assert (first.answer, first.ref, first.jcm_score, first.refined) == (
        second.answer, second.ref, second.jcm_score, second.refined)
    assert (first.mask == second.mask).all()


def test_questions_parse_their_reference():
    assert parse_question("@2 Segment what lies below it.") == Question("Segment what lies below it.", 2)
    assert parse_question("Segment the region left of @1, please") == Question("Segment the region left of , please", 1)
    assert parse_question("  Segment the liver. ") == Question("Segment the liver.")
    with pytest.raises(QuestionError, match="2 references"):
        parse_question("@1 and @2")
    with pytest.raises(QuestionError, match="no question"):
        parse_question("@1")


def test_undo_and_reset_give_what_a_fresh_session_with_that_history_gives(model, image):
    chat = ChatSession(model, image, beta=0.5)
    first = chat.ask("Segment the liver.")
    chat.ask("Segment the organ beside it.", ref=1)
    assert chat.undo().number == 2 and len(chat.rounds) == 1
    after_undo = chat.ask("Segment the left kidney.", ref=1)

    fresh = ChatSession(model, image, beta=0.5)
    _same(fresh.ask("Segment the liver."), first)
    _same(fresh.ask("Segment the left kidney.", ref=1), after_undo)
    assert chat.session.length == fresh.session.length

    chat.reset()
    assert chat.rounds == [] and chat.session.rounds == 0
    _same(chat.ask("Segment the liver."), first)
    with pytest.raises(QuestionError, match="no round 2"):
        chat.ask("Segment it again.", ref=2)
    assert len(chat.rounds) == 1


def test_a_new_question_feeds_only_its_own_tokens_and_never_encodes_the_image(model, image, monkeypatch):
    chat = ChatSession(model, image, beta=None)
    for question in QUESTIONS[:2]:
        question = parse_question(question)
        chat.ask(question.query, question.ref)
    fed: list[int] = []
    encoded: list[str] = []
    hidden_states, sam_embed, clip_features = MediRound.hidden_states, MediRound.sam_embed, MediRound.clip_features
    monkeypatch.setattr(MediRound, "hidden_states", lambda self, embeds, *a, **k: (
        fed.append(embeds.shape[1]), hidden_states(self, embeds, *a, **k))[1])
    monkeypatch.setattr(MediRound, "sam_embed", lambda self, *a: (encoded.append("sam"), sam_embed(self, *a))[1])
    monkeypatch.setattr(MediRound, "clip_features", lambda self, *a: (
        encoded.append("clip"), clip_features(self, *a))[1])
    before = chat.session.length
    third = chat.ask("Segment the left kidney.")
    assert encoded == []
    assert sum(fed) == chat.session.length - before
    assert third.seconds > 0 and third.number == 3


def test_chat_cli_on_a_real_slice_writes_masks_overlays_and_a_dialogue_infer_reads(tmp_path, shared_data,
                                                                                   monkeypatch):
    slice_ = tmp_path / "04_CT_liver.png"
    shutil.copy(shared_data("biomedparse-demo", "demo", "04_CT_liver.png"), slice_)
    encodes: list[int] = []
    sam_embed = MediRound.sam_embed
    monkeypatch.setattr(MediRound, "sam_embed", lambda self, *a: (encodes.append(1), sam_embed(self, *a))[1])
    out, saved = tmp_path / "chat", tmp_path / "session.jsonl"
    result = CliRunner().invoke(cli, ["chat", str(slice_), "--out", str(out), "--save", str(saved)],
                                input="\n".join(QUESTIONS) + "\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert encodes == [1]
    assert "using the shipped tiny model" in result.stderr
    assert "round 2 (refers to round 1)" in result.stdout and "JCM" in result.stdout and " ms" in result.stdout
    height, width = load_image(slice_).shape[:2]
    masks = [load_mask(out / f"round-{n}.png") for n in (1, 2, 3)]
    assert all(mask.shape == (height, width) for mask in masks)
    for number in (1, 2, 3):
        overlay = load_image(out / f"round-{number}-overlay.png")
        assert overlay.shape[1] == 256 * min(4, number + 1)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"round-{n}.png" for n in (1, 2, 3)] + [f"round-{n}-overlay.png" for n in (1, 2, 3)])

    [record] = [json.loads(line) for line in saved.read_text().splitlines()]
    assert record["image"] == "04_CT_liver.png"
    assert [(r["query"], r.get("ref")) for r in record["rounds"]] == [
        ("Segment the liver.", None), ("Segment the organ beside it.", 1), ("Segment the left kidney.", None)]
    assert all(r["answer"] for r in record["rounds"])

    replayed = tmp_path / "replayed"
    result = CliRunner().invoke(cli, ["infer", str(saved), "--out", str(replayed), "--generate"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (replayed / "predictions.jsonl").read_text().splitlines()]
    assert [line["answer"] for line in lines] == [r["answer"] for r in record["rounds"]]
    for line, mask in zip(lines, masks):
        assert np.array_equal(load_mask(replayed / line["mask"]), mask)


def test_a_bad_line_is_refused_in_one_line_and_the_rest_still_runs(tmp_path, shared_data):
    slice_ = shared_data("biomedparse-demo", "demo", "04_CT_liver.png")
    result = CliRunner().invoke(cli, ["chat", str(slice_), "--out", str(tmp_path / "chat"), "--beta", "off",
                                      "-q", "Segment the liver.", "-q", "@4 Segment it.", "-q", ":nope",
                                      "-q", ":undo", "-q", "Segment the spleen."], catch_exceptions=False)
    assert result.exit_code == 3
    assert "error: @4: there is no round 4 to refer to (rounds: 1..1)" in result.stderr
    assert "':nope': unknown command" in result.stderr
    assert "round 1 undone" in result.stdout and "JCM off" in result.stdout
    assert sorted(p.name for p in (tmp_path / "chat").iterdir()) == ["round-1-overlay.png", "round-1.png"]


@pytest.fixture
def referred_model(jcm_model, monkeypatch):
    """The session model with the 7B preset's ``jcm_rounds: referred`` and a judge that always says 0.5, so
    that a judged round is refined at beta 0.6."""
    monkeypatch.setattr(jcm_model.config.heads, "jcm_rounds", "referred")
    set_judge_score(jcm_model, 0.5)
    return jcm_model


def test_referred_rounds_are_judged_when_a_question_refers_to_them_as_infer_judges_them(
        referred_model, image, tmp_path, monkeypatch):
    fed: list[np.ndarray] = []
    reference = DialogueProcessor.reference
    monkeypatch.setattr(DialogueProcessor, "reference", lambda processor, pixels, mask: (
        fed.append(np.array(mask)), reference(processor, pixels, mask))[1])
    out = tmp_path / "chat"
    chat = ChatSession(referred_model, image, beta=0.6, out=out)
    first = chat.ask("Segment the liver.")
    raw_first = first.mask.copy()
    assert (first.jcm_score, first.refined, first.judged_at) == (None, False, None)
    chat.ask("Segment the spleen.")
    third = chat.ask("Segment the lesion inside it.", ref=1)

    assert chat.judged_by(3) == [first]
    assert first.jcm_score == pytest.approx(0.5, abs=1e-6) and first.refined and first.judged_at == 3
    assert not np.array_equal(first.mask, raw_first)
    np.testing.assert_array_equal(fed[0], first.mask)
    np.testing.assert_array_equal(load_mask(out / "round-1.png"), first.mask)
    assert [(r.jcm_score, r.refined) for r in chat.rounds[1:]] == [(None, False), (None, False)]

    chat.save(tmp_path / "session.jsonl")
    [dialogue] = load_dialogues(tmp_path / "session.jsonl").dialogues
    track = Track(0.6)
    predicted = chain_dialogue(referred_model, dialogue, load_image(image), [track], generate=True)[track]
    assert [(r.answer, r.jcm_score, r.refined) for r in chat.rounds] == [
        (p.answer, p.jcm_score, p.refined) for p in predicted]
    for chatted, prediction in zip(chat.rounds, predicted):
        np.testing.assert_array_equal(chatted.mask, prediction.mask)

    # A later question referring to round 1 again does not judge it again.
    chat.ask("Segment the vessel beside it.", ref=1)
    assert chat.judged_by(4) == [] and first.judged_at == 3
    chat.undo()
    assert first.judged_at == 3
    # Undoing round 3, the only round left that refers to round 1, makes round 1 raw again.
    assert chat.undo() is third
    assert (first.jcm_score, first.refined, first.judged_at) == (None, False, None)
    np.testing.assert_array_equal(first.mask, raw_first)
    np.testing.assert_array_equal(load_mask(out / "round-1.png"), raw_first)
    assert sorted(p.name for p in out.iterdir()) == [
        "round-1-overlay.png", "round-1.png", "round-2-overlay.png", "round-2.png"]


def test_chat_cli_takes_jcm_rounds_from_the_checkpoint_and_says_when_a_round_is_judged(referred_model, image,
                                                                                      tmp_path):
    folder = save_checkpoint(referred_model, tmp_path / "ckpt")
    lines = ["Segment the liver.", "Segment the spleen.", "@1 Segment the lesion inside it.", ":undo"]
    result = CliRunner().invoke(cli, ["chat", str(image), "--model", str(folder), "--out", str(tmp_path / "chat")],
                                input="\n".join(lines) + "\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "JCM at beta 0.6 on referred rounds" in result.stderr
    assert "round 1: " in result.stdout and "JCM: not referred yet" in result.stdout
    assert "round 1 judged now: JCM 0.50 <= 0.6: refined; mask updated" in result.stdout
    assert ("round 3 undone; round 1 is unjudged again (no remaining round refers to it), its raw mask restored"
            in result.stdout)

    result = CliRunner().invoke(cli, ["chat", str(image), "--model", str(folder), "--out", str(tmp_path / "all"),
                                      "--jcm-rounds", "all", "-q", "Segment the liver."], catch_exceptions=False)
    assert "JCM at beta 0.6 on every round" in result.stderr
    assert "JCM 0.50 <= 0.6: refined" in result.stdout
