"""A beta sweep in one pass equals separate single-beta runs; model-based eval writes and gates its rows."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from inference_fixtures import write_dialogues

from mediround.data.formats import load_dialogues
from mediround.data.images import load_image, load_mask
from mediround.inference.chain import Track, chain_dialogue
from mediround.inference.model_eval import round_gaps
from mediround.metrics import aggregate
from mediround.model.checkpoint import save_checkpoint
from mediround_cli.main import cli


def _spread_judge(model, monkeypatch, dialogues) -> None:
    """Replace the judge by a function of the feature whose scores spread over (0.05, 0.95) on these dialogues.

    A random tiny model gives nearly equal [SEG] features every round, so its own judge scores all fall
    on one side of every beta; the spread makes the tracks disagree round by round.
    """
    sums = []
    original = model.jcm.judge
    monkeypatch.setattr(model.jcm, "judge", lambda f: (sums.append(float(f.sum())), original(f))[1])
    for dialogue in dialogues:
        chain_dialogue(model, dialogue, load_image(dialogue.image_path), [Track(0.5)])
    ranks = np.sort(np.array(sums))
    levels = np.linspace(0.05, 0.95, len(ranks))
    monkeypatch.setattr(model.jcm, "judge", lambda f: torch.tensor([np.interp(float(f.sum()), ranks, levels)]))


def test_one_pass_sweep_equals_separate_runs(model, tmp_path, monkeypatch):
    loaded = load_dialogues(write_dialogues(tmp_path, n_dialogues=2, n_rounds=4))
    _spread_judge(model, monkeypatch, loaded.dialogues)
    tracks = [Track(b) for b in (0.2, 0.4, 0.6, 0.8)] + [Track(None), Track(0.4, teacher_forcing=True)]
    patterns, scores = set(), set()
    for dialogue in loaded.dialogues:
        image = load_image(dialogue.image_path)
        truth = {r: load_mask(dialogue.mask_path(r)) for r in (1, 2, 3)}
        before = model.encoder_calls.copy()
        swept = chain_dialogue(model, dialogue, image, tracks, reference_truth=truth)
        assert model.encoder_calls["sam"] - before["sam"] == 1
        for track in tracks:
            alone = chain_dialogue(model, dialogue, image, [track], reference_truth=truth)[track]
            assert [p.refined for p in swept[track]] == [p.refined for p in alone]
            # Forked tracks are rows of one batched forward: equal up to the order of float additions.
            assert [p.jcm_score for p in swept[track]] == pytest.approx([p.jcm_score for p in alone], abs=1e-5)
            for a, b in zip(swept[track], alone):
                np.testing.assert_array_equal(a.mask, b.mask)
            patterns.add(tuple(p.refined for p in alone))
            scores.update(p.jcm_score for p in alone if p.jcm_score is not None)
    assert max(scores) - min(scores) > 0.5
    assert len(patterns) >= 3, "the judge did not split the tracks; the sweep was not exercised"


def test_round_gaps_are_ground_truth_minus_predicted():
    def row(number, intersection, union):
        return {"round": number, "intersection": intersection, "union": union, "iou": intersection / union,
                "dice": 2 * intersection / (intersection + union)}

    predicted = [row(1, 5, 10), row(2, 2, 10)]
    forced = [row(1, 5, 10), row(2, 6, 10)]
    gaps = round_gaps(predicted, forced)
    assert [g.round for g in gaps] == [1, 2]
    assert gaps[0].gap("ciou") == pytest.approx(0.0)
    assert gaps[1].gap("ciou") == pytest.approx(40.0)
    assert gaps[1].predicted == aggregate([predicted[1]])


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("sweep") / "ckpt")


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_eval_sweep_rows_plot_and_gate(checkpoint, tmp_path):
    data = write_dialogues(tmp_path / "data", n_dialogues=2, n_rounds=2)
    sweep = tmp_path / "sweep"
    result = _run("eval", data, "--model", checkpoint, "--beta", "0.3,0.7,off", "--compare-tf",
                  "--predictions-out", sweep, "--per-round")
    assert result.exit_code == 0, result.output
    table = pq.read_table(sweep / "metrics.parquet").to_pylist()
    tracks = {(r["beta"], r["references"]) for r in table}
    assert tracks == {(b, ref) for b in (0.3, 0.7, None) for ref in ("predicted", "ground-truth")}
    assert len(table) == 6 * 4
    assert (sweep / "beta_curve.png").stat().st_size > 0
    assert "Error propagation per round" in result.output

    single = tmp_path / "single"
    assert _run("infer", data, "--model", checkpoint, "--beta", "0.7", "--out", single).exit_code == 0
    assert (single / "predictions.jsonl").read_bytes() == (sweep / "beta-0.7" / "predictions.jsonl").read_bytes()
    for mask in (single / "masks").iterdir():
        assert mask.read_bytes() == (sweep / "beta-0.7" / "masks" / mask.name).read_bytes()

    baseline = tmp_path / "baseline.parquet"
    perfect = [{**r, "intersection": r["gt_area"], "union": r["gt_area"], "pred_area": r["gt_area"], "iou": 1.0,
                "dice": 1.0} for r in table]
    pq.write_table(pq.read_table(sweep / "metrics.parquet").from_pylist(perfect,
                                                                         schema=pq.read_schema(sweep / "metrics.parquet")),
                   baseline)
    result = _run("eval", data, "--model", checkpoint, "--beta", "0.3", "--predictions-out", tmp_path / "planted",
                  "--baseline", baseline, "--max-drop", "1")
    assert result.exit_code == 1
    assert "gate failed" in result.output and "beta-0.3" in result.output
    result = _run("eval", data, "--model", checkpoint, "--beta", "0.3", "--predictions-out", tmp_path / "same",
                  "--baseline", sweep / "metrics.parquet", "--max-drop", "0")
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output
