"""The runner in one process: outputs, skipped dialogues, merge order, resume of a killed run's parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from inference_fixtures import write_dialogues

from mediround.data.images import load_mask
from mediround.data.predictions import read_predictions
from mediround.error_log import ERRORS_FILE
from mediround.errors import DataError, RecipeError
from mediround.inference.chain import Track
from mediround.inference.outputs import PARTS_FOLDER
from mediround.inference.plan import load_plan
from mediround.inference.runner import run_inference
from mediround.inference.settings import InferenceConfig
from mediround.inference.sharding import run_shard


def _config(data, out, **overrides) -> InferenceConfig:
    settings = {"betas": (None,), **overrides}
    return InferenceConfig(data=str(data), model="unused", out=str(out), **settings)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _snapshot(folder) -> tuple[str, dict[str, bytes]]:
    masks = {p.name: p.read_bytes() for p in sorted((folder / "masks").glob("*.png"))}
    return (folder / "predictions.jsonl").read_text(), masks


def test_one_process_run_writes_every_round_in_input_order(model, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=3, n_rounds=2)
    out = tmp_path / "out"
    summary = run_inference(_config(data, out, overlays=True), model=model)
    lines = _lines(out / "predictions.jsonl")
    assert [(r["id"], r["round"]) for r in lines] == [
        ("dlg-0", 1), ("dlg-0", 2), ("dlg-1", 1), ("dlg-1", 2), ("dlg-2", 1), ("dlg-2", 2)]
    assert [r["ref_round"] for r in lines[:2]] == [None, 1]
    assert all(r["answer"] == "It is [SEG]." and r["refined"] is False and r["jcm_score"] is None for r in lines)
    for record in lines:
        assert load_mask(out / record["mask"]).shape == (48, 48)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["dlg-0.png", "dlg-1.png", "dlg-2.png"]
    assert not (out / PARTS_FOLDER).exists()
    assert (out / ERRORS_FILE).read_text() == ""
    assert (summary.total, summary.predicted, summary.skipped, summary.resumed) == (3, 3, 0, 0)


def test_bad_dialogues_are_skipped_and_recorded(model, tmp_path):
    root = tmp_path / "data"
    data = write_dialogues(root, n_dialogues=3, n_rounds=2)
    (root / "images" / "d1.png").write_bytes(b"not a png")
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records.append({"id": "no-rounds", "image": "images/d0.png", "rounds": []})
    records.append({"id": "two-segs", "image": "images/d0.png",
                    "rounds": [{"query": "Both kidneys.", "answer": "Left [SEG], right [SEG]."}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    summary = run_inference(_config(data, out), model=model)
    assert {key[0] for key in read_predictions(out)} == {"dlg-0", "dlg-2"}
    errors = _lines(out / ERRORS_FILE)
    assert len(errors) == 3
    by_id = {e["id"]: e for e in errors}
    assert by_id["two-segs"]["field"] == "rounds[0].answer" and by_id["two-segs"]["item"] == 5
    assert by_id["dlg-1"]["field"] == "image" and by_id["dlg-1"]["item"] == 2
    assert "not a readable image" in by_id["dlg-1"]["reason"]
    load_problem = next(e for e in errors if e["id"] is None)
    assert load_problem["file"] == str(data) and load_problem["reason"]
    assert (summary.predicted, summary.skipped) == (2, 3)


def test_existing_output_needs_resume(model, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=1, n_rounds=1)
    run_inference(_config(data, tmp_path / "out"), model=model)
    with pytest.raises(DataError, match="--resume"):
        run_inference(_config(data, tmp_path / "out"), model=model)


def test_resume_merges_a_killed_runs_parts_and_redoes_partial_dialogues(model, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=4, n_rounds=3)
    reference = tmp_path / "uninterrupted"
    run_inference(_config(data, reference, betas=(0.5,)), model=model)

    out = tmp_path / "killed"
    config = _config(data, out, betas=(0.5,))
    plan = load_plan(config)
    partial = type(plan)(plan.dialogues, plan.problems, plan.todo[:2], 0, plan.data_format)
    run_shard(config, partial, model)
    part_file = out / PARTS_FOLDER / "rank-0" / "predictions.jsonl"
    lines = part_file.read_bytes().split(b"\n")
    part_file.write_bytes(b"\n".join(lines[:4]) + b"\n" + lines[4][:20])

    resumed = _config(data, out, betas=(0.5,), resume=True)
    summary = run_inference(resumed, model=model)
    assert summary.resumed == 1 and summary.predicted == 3
    assert _snapshot(out) == _snapshot(reference)
    again = run_inference(resumed, model=model)
    assert again.resumed == 4 and again.predicted == 0
    assert _snapshot(out) == _snapshot(reference)
    with pytest.raises(DataError, match=r"--resume with other settings.*betas: \[0.5\] -> \[0.6\]"):
        run_inference(_config(data, out, betas=(0.6,), resume=True), model=model)


def test_several_tracks_write_one_folder_each(model, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=2, n_rounds=2)
    out = tmp_path / "out"
    config = _config(data, out, teacher_forcing=(False, True))
    config.betas = (0.3, None)
    run_inference(config, model=model)
    labels = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert labels == ["beta-0.3", "beta-0.3-tf", "jcm-off", "jcm-off-tf"]
    assert [t.label for t in config.tracks] == ["beta-0.3", "jcm-off", "beta-0.3-tf", "jcm-off-tf"]
    assert config.tracks[2] == Track(0.3, teacher_forcing=True)
    first = read_predictions(out / "jcm-off")
    forced = read_predictions(out / "jcm-off-tf")
    assert np.array_equal(load_mask(out / "jcm-off" / first[("dlg-0", 1)]["mask"]),
                          load_mask(out / "jcm-off-tf" / forced[("dlg-0", 1)]["mask"]))


def test_teacher_forcing_skips_dialogues_whose_reference_truth_is_unusable(model, tmp_path):
    from inference_fixtures import write_png

    root = tmp_path / "data"
    data = write_dialogues(root, n_dialogues=2, n_rounds=2)
    write_png(root / "masks" / "d1_r1.png", np.zeros((10, 12), dtype=np.uint8))
    out = tmp_path / "out"
    summary = run_inference(_config(data, out, teacher_forcing=(True,)), model=model)
    assert {key[0] for key in read_predictions(out)} == {"dlg-0"}
    (error,) = _lines(out / ERRORS_FILE)
    assert error["id"] == "dlg-1" and error["field"] == "rounds[0].mask"
    assert "differs from the image's 48x48" in error["reason"]
    assert summary.skipped == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"betas": [1.5]}, "key 'betas[0]': must be at most 1, got 1.5"),
    ({"betas": [0.2, 0.2]}, "key 'betas': Value error, repeats a value"),
    ({"teacher_forcing": []}, "key 'teacher_forcing'"),
    ({"num_processes": 0}, "key 'num_processes': must be at least 1, got 0"),
    ({"device": "gpu"}, "key 'device': Value error, expected 'cpu', 'cuda' or 'cuda:N'"),
    ({"beta": 0.5}, "unknown key 'beta' (did you mean 'betas'?)"),
])
def test_inference_settings_refuse_bad_values_in_one_line(change, message):
    settings = {"data": "d.jsonl", "model": "m", "out": "o", **change}
    with pytest.raises(RecipeError) as caught:
        InferenceConfig.from_dict(settings, "plan.json")
    assert str(caught.value).startswith("plan.json: ") and message in str(caught.value)


def test_inference_settings_round_trip_through_json():
    config = InferenceConfig(data="d.jsonl", model="m", out="o", betas=(0.2, None), teacher_forcing=(False, True),
                             device="cuda:1", num_processes=2)
    assert InferenceConfig.from_dict(json.loads(json.dumps(config.to_dict())), "plan.json") == config
