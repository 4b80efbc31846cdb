"""Query-only inference (issue #13, section 1): rounds without answers get the model's own answers, in
JSONL and in MR-MedSeg JSON; ``eval`` still names every round without a mask; the end-of-run counts are
dialogues, not problems."""

from __future__ import annotations

import json

from click.testing import CliRunner
from inference_fixtures import write_dialogues

from mediround.data.formats import load_dialogues
from mediround.data.images import load_image, load_mask
from mediround.inference.runner import run_inference
from mediround.inference.settings import InferenceConfig
from mediround.model import DialogueSession
from mediround_cli.main import cli


def _config(data, out, **overrides) -> InferenceConfig:
    return InferenceConfig(data=str(data), model="unused", out=str(out), **{"betas": (None,), **overrides})


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def _masks(folder) -> list:
    return [load_mask(folder / record["mask"]) for record in _records(folder)]


def _drop_answers(data, keep_first: bool = False) -> None:
    """Remove ``answer`` from every round of a JSONL file (the first round keeps it with ``keep_first``)."""
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    for line in lines:
        for number, round_ in enumerate(line["rounds"], start=1):
            if not (keep_first and number == 1):
                del round_["answer"]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_questions_only_are_answered_by_the_model_as_with_generate(model, tmp_path):
    answered = write_dialogues(tmp_path / "data", n_dialogues=2, n_rounds=3, with_masks=False)
    questions = write_dialogues(tmp_path / "data", n_dialogues=2, n_rounds=3, with_masks=False, name="q.jsonl")
    _drop_answers(questions)
    assert all(r.answer is None for d in load_dialogues(questions).dialogues for r in d.rounds)

    summary = run_inference(_config(questions, tmp_path / "q"), model=model)
    generated = run_inference(_config(answered, tmp_path / "g", generate=True), model=model)

    assert (summary.predicted, summary.skipped) == (2, 0) and generated.predicted == 2
    records = _records(tmp_path / "q")
    assert [(r["id"], r["round"], r["ref_round"]) for r in records] == [
        (f"dlg-{d}", n, None if n == 1 else n - 1) for d in range(2) for n in range(1, 4)]
    assert [r["answer"] for r in records] == [r["answer"] for r in _records(tmp_path / "g")]
    assert all(r["answer"] != "It is [SEG]." for r in records)
    for mine, theirs in zip(_masks(tmp_path / "q"), _masks(tmp_path / "g")):
        assert (mine == theirs).all()


def test_a_round_with_an_answer_is_fed_and_one_without_is_generated(model, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=1, n_rounds=2, with_masks=False)
    _drop_answers(data, keep_first=True)
    run_inference(_config(data, tmp_path / "out"), model=model)

    dialogue = load_dialogues(data).dialogues[0]
    session = DialogueSession.for_image(model, load_image(dialogue.image_path))
    first = session.step(dialogue.rounds[0].query, "It is [SEG].")
    second = session.step(dialogue.rounds[1].query, None, first.mask_logits[0].numpy() > 0)
    records = _records(tmp_path / "out")
    assert [r["answer"] for r in records] == ["It is [SEG].", second.answer.replace(model.tokenizer.eos_token, "").strip()]
    expected = second.mask_logits[0].numpy() > 0
    assert (load_mask(tmp_path / "out" / records[1]["mask"]) == expected).all()


def test_mrmedseg_with_empty_gpt_turns_is_answered_by_the_model(model, tmp_path):
    questions = write_dialogues(tmp_path / "data", n_dialogues=2, n_rounds=2, with_masks=False, with_refs=False)
    _drop_answers(questions)
    items = [{"task": "segmentation", "base": "[null]", "id": line["id"], "conversations": [
        turn for number, round_ in enumerate(line["rounds"]) for turn in (
            {"from": "human", "value": (f"[IMAGE256:{line['image']}] " if number == 0 else "") + round_["query"]},
            {"from": "gpt", "value": ""})]}
        for line in map(json.loads, questions.read_text().splitlines())]
    mrmedseg = tmp_path / "data" / "mr.json"
    mrmedseg.write_text(json.dumps(items))
    loaded = load_dialogues(mrmedseg)
    assert loaded.format == "mrmedseg" and not loaded.problems
    assert all(r.answer is None and r.mask is None for d in loaded.dialogues for r in d.rounds)

    run_inference(_config(mrmedseg, tmp_path / "mr"), model=model)
    run_inference(_config(questions, tmp_path / "jsonl"), model=model)
    assert _records(tmp_path / "mr") == _records(tmp_path / "jsonl")
    for mine, theirs in zip(_masks(tmp_path / "mr"), _masks(tmp_path / "jsonl")):
        assert (mine == theirs).all()


def test_training_refuses_a_dialogue_whose_round_has_no_answer(tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=2, n_rounds=2)
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    del lines[1]["rounds"][1]["answer"]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    loaded = load_dialogues(data, require_labels=True)
    assert [d.id for d in loaded.dialogues] == ["dlg-0"]
    [problem] = loaded.problems
    assert (problem.item, problem.field) == ("line 2: id dlg-1", "rounds[1].answer")
    assert "no answer" in problem.reason


def test_summary_counts_dialogues_not_problems(model, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=3, n_rounds=2, with_masks=False)
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    lines[1].update(colour="red", size=3, owner="x")
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(cli, ["infer", str(data), "--out", str(tmp_path / "out"), "--beta", "off"],
                                catch_exceptions=False)
    assert "1 dialogue(s) skipped" in result.stderr
    table = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in result.stdout.splitlines() if line.count("│") == 3}
    assert table["dialogues in data"] == "3"
    assert table["predicted now"] == "2"
    assert table["skipped (see errors.jsonl)"] == "1"
    assert len((tmp_path / "out" / "errors.jsonl").read_text().splitlines()) == 3


def test_eval_of_question_only_data_names_every_round_without_a_mask(model, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=1, n_rounds=2)
    _drop_answers(data)
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    del lines[0]["rounds"][1]["mask"]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_inference(_config(data, tmp_path / "out"), model=model)
    result = CliRunner().invoke(cli, ["eval", str(data), "--predictions", str(tmp_path / "out")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "problem: dlg-0: round 2: field 'mask': no ground-truth mask; round not scored" in result.stderr
