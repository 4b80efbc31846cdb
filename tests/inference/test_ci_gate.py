"""Issue #13 sections 3-4 end to end: the design's `infer`/`eval` commands verbatim, the run manifest, and
a CI gate that a deleted image, another data set or the wrong data file cannot turn green."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from inference_fixtures import SIZE, write_dialogues, write_png
from junitparser import JUnitXml

from mediround import __version__
from mediround.data.formats import load_dialogues
from mediround.data.run_manifest import data_sha256, referenced_files_sha256
from mediround.model.checkpoint import save_checkpoint
from mediround.reports.rows import ROW_SCHEMA, read_rows, read_run_metadata
from mediround_cli.common import SKIPPED_EXIT_CODE
from mediround_cli.main import cli


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("checkpoint") / "jcm")


def _run(*args):
    return CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)


@pytest.fixture
def first_run(checkpoint, tmp_path, monkeypatch):
    """`mediround infer dialogues.jsonl --beta 0.6` from the folder the data is in, as the design writes it."""
    monkeypatch.chdir(tmp_path)
    data = write_dialogues(tmp_path, n_dialogues=3, n_rounds=2, name="dialogues.jsonl")
    result = _run("infer", "dialogues.jsonl", "--beta", "0.6", "--model", checkpoint, "--cpu")
    assert result.exit_code == 0, result.output
    return data, tmp_path / "dialogues-predictions", result.output


def test_infer_without_out_writes_the_default_folder_with_its_manifest(first_run, checkpoint):
    data, folder, output = first_run
    assert "dialogues-predictions" in output and (folder / "predictions.jsonl").is_file()
    manifest = json.loads((folder / "run.json").read_text())
    assert manifest["data"] == str(data.resolve()) and manifest["data_sha256"] == data_sha256(data)
    assert manifest["model"] == str(checkpoint.resolve()) and len(manifest["model_manifest_sha256"]) == 64
    assert manifest["betas"] == [0.6] and manifest["mediround_version"] == __version__
    assert manifest["started"] <= manifest["finished"]
    metadata = read_run_metadata(folder / "metrics.parquet")
    assert metadata["data_sha256"] == manifest["data_sha256"] and metadata["scored_data_sha256"] == data_sha256(data)


def test_infer_refuses_an_earlier_run_and_overwrite_replaces_it(first_run, checkpoint):
    _, folder, _ = first_run
    (folder / "masks" / "stale.png").write_bytes(b"old")
    refused = _run("infer", "dialogues.jsonl", "--model", checkpoint, "--cpu")
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    replaced = _run("infer", "dialogues.jsonl", "--model", checkpoint, "--cpu", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert not (folder / "masks" / "stale.png").exists() and len(read_rows(folder / "metrics.parquet")) == 6


def test_eval_without_data_scores_the_folder_against_its_own_data(first_run):
    _, folder, _ = first_run
    result = _run("eval", "--per-round")
    assert result.exit_code == 0, result.output
    assert "Per round" in result.output and "dialogues-predictions" in result.output
    rows = read_rows(folder / "metrics.parquet")
    assert len(rows) == 6 and {r["beta"] for r in rows} == {0.6} and {r["references"] for r in rows} == {"predicted"}


def test_every_metrics_file_has_one_schema_with_track_and_difficulty_columns(first_run):
    _, folder, _ = first_run
    schema = pq.read_schema(folder / "metrics.parquet")
    assert schema.names == ROW_SCHEMA.names
    for column in ("beta", "references", "dialogue_difficulty", "round_difficulty"):
        assert column in schema.names


def test_eval_refuses_other_data_and_leaves_the_metrics_untouched(first_run, tmp_path):
    _, folder, _ = first_run
    good = (folder / "metrics.parquet").read_bytes()
    other = write_dialogues(tmp_path / "other", n_dialogues=2, n_rounds=2, seed=5, name="dialogues.jsonl")
    refused = _run("eval", str(other), "--predictions", folder)
    assert refused.exit_code == 2 and "differs" in refused.output and "--force" in refused.output
    assert (folder / "metrics.parquet").read_bytes() == good
    forced = _run("eval", str(other), "--predictions", folder, "--force")
    assert forced.exit_code == 2 and "--overwrite" in forced.output  # still never replaces the good rows
    assert (folder / "metrics.parquet").read_bytes() == good
    elsewhere = _run("eval", str(other), "--predictions", folder, "--force", "--out", tmp_path / "other.parquet")
    assert elsewhere.exit_code == 0, elsewhere.output


def test_gate_passes_on_the_same_run_and_fails_on_a_deleted_image(first_run, checkpoint, tmp_path):
    _, folder, _ = first_run
    baseline = tmp_path / "baseline.parquet"
    shutil.copy(folder / "metrics.parquet", baseline)
    same = _run("eval", "--baseline", baseline, "--max-drop", "0")
    assert same.exit_code == 0, same.output
    assert "gate passed" in same.output

    (tmp_path / "images" / "d1.png").unlink()
    rerun = _run("infer", "dialogues.jsonl", "--model", checkpoint, "--cpu", "--overwrite")
    assert rerun.exit_code == SKIPPED_EXIT_CODE, rerun.output
    assert "1 dialogue(s) skipped" in rerun.output
    gated = _run("eval", "--baseline", baseline, "--max-drop", "0", "--force")
    assert gated.exit_code == 1, gated.output
    assert "gate passed" not in gated.output
    assert "gate failed: 1 dialogue(s) skipped" in gated.output


def test_gate_fails_against_a_baseline_of_another_data_set(first_run, checkpoint, tmp_path):
    _, folder, _ = first_run
    other = write_dialogues(tmp_path / "other", n_dialogues=2, n_rounds=2, seed=5)
    renamed = other.read_text().replace('"dlg-', '"other-')
    other.write_text(renamed)
    out = tmp_path / "other-predictions"
    assert _run("infer", other, "--model", checkpoint, "--cpu", "--out", out).exit_code == 0
    gated = _run("eval", "--predictions", folder, "--baseline", out / "metrics.parquet", "--max-drop", "100")
    assert gated.exit_code == 1, gated.output
    assert "gate failed: dialogue ids differ from the baseline's" in gated.output


def test_the_manifest_hashes_the_images_and_masks_and_eval_refuses_a_changed_mask(first_run, tmp_path):
    data, folder, _ = first_run
    manifest = json.loads((folder / "run.json").read_text())
    assert manifest["data_files_sha256"] == referenced_files_sha256(load_dialogues(data).dialogues)

    # The same bytes elsewhere (data moved to another machine) are the same data.
    moved = tmp_path / "moved"
    for part in ("images", "masks", "dialogues.jsonl"):
        (shutil.copytree if (tmp_path / part).is_dir() else shutil.copy)(tmp_path / part, moved / part)
    assert _run("eval", moved / "dialogues.jsonl", "--predictions", folder).exit_code == 0
    good = (folder / "metrics.parquet").read_bytes()

    mask = tmp_path / "masks" / "d0_r1.png"
    write_png(mask, np.full((SIZE, SIZE), 255, dtype=np.uint8))  # the data file itself is unchanged
    assert data_sha256(data) == manifest["data_sha256"]
    refused = _run("eval")
    assert refused.exit_code == 2, refused.output
    assert "SHA-256 of the images and masks it names" in refused.output and "--force" in refused.output
    assert (folder / "metrics.parquet").read_bytes() == good
    assert _run("eval", "--force").exit_code == 0


def test_eval_with_a_model_never_replaces_metrics_of_other_data(first_run, checkpoint, tmp_path):
    _, folder, _ = first_run
    metrics = folder / "metrics.parquet"
    good = metrics.read_bytes()
    other = write_dialogues(tmp_path / "other", n_dialogues=2, n_rounds=2, seed=5, name="dialogues.jsonl")
    args = ["eval", other, "--model", checkpoint, "--cpu", "--out", metrics, "--predictions-out", tmp_path / "run"]
    refused = _run(*args)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    assert metrics.read_bytes() == good and not (tmp_path / "run").exists()  # refused before inference ran
    replaced = _run(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert read_run_metadata(metrics)["scored_data_sha256"] == data_sha256(other)
    # Metrics of the same data are replaced without --overwrite (--resume keeps the predictions folder).
    again = _run(*args, "--resume")
    assert again.exit_code == 0, again.output


def test_a_refused_run_still_writes_its_junit_and_markdown_saying_why(first_run, tmp_path):
    _, folder, _ = first_run
    other = write_dialogues(tmp_path / "other", n_dialogues=2, n_rounds=2, seed=5, name="dialogues.jsonl")
    junit, summary = tmp_path / "reports" / "junit.xml", tmp_path / "reports" / "summary.md"
    refused = _run("eval", other, "--predictions", folder, "--baseline", folder / "metrics.parquet",
                   "--junit-xml", junit, "--summary-md", summary)
    assert refused.exit_code == 2, refused.output
    [suite] = list(JUnitXml.fromfile(str(junit)))
    [case] = list(suite)
    assert (case.classname, case.name, suite.failures) == ("mediround.gate", "input", 1)
    assert "differs" in case.result[0].message and "--force" in case.result[0].message
    assert summary.read_text().startswith("### MediRound eval: refused") and "differs" in summary.read_text()


def test_the_junit_properties_carry_the_run_manifest(first_run, tmp_path):
    data, folder, _ = first_run
    junit = tmp_path / "junit.xml"
    result = _run("eval", "--baseline", folder / "metrics.parquet", "--junit-xml", junit)
    assert result.exit_code == 0, result.output
    [suite] = list(JUnitXml.fromfile(str(junit)))
    properties = {prop.name: prop.value for prop in suite.properties()}
    manifest = json.loads((folder / "run.json").read_text())
    assert properties["data_sha256"] == data_sha256(data) == manifest["data_sha256"]
    assert properties["model_manifest_sha256"] == manifest["model_manifest_sha256"]
    assert properties["mediround_version"] == properties["gate.mediround_version"] == __version__
    assert suite.failures == 0 and suite.tests == 3 * 3 + 4  # overall, rounds 1-2; four coverage checks


def test_eval_with_a_model_writes_the_reports_and_the_next_baseline(first_run, checkpoint, tmp_path):
    data, folder, _ = first_run
    junit, summary, next_baseline = tmp_path / "junit.xml", tmp_path / "summary.md", tmp_path / "next.parquet"
    result = _run("eval", data, "--model", checkpoint, "--cpu", "--beta", "0.6", "--predictions-out", tmp_path / "run",
                  "--baseline", folder / "metrics.parquet", "--junit-xml", junit, "--summary-md", summary,
                  "--write-baseline", next_baseline)
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output and "next baseline written" in result.output
    assert read_rows(next_baseline) == read_rows(tmp_path / "run" / "metrics.parquet")
    [suite] = list(JUnitXml.fromfile(str(junit)))
    assert suite.failures == 0 and {prop.name for prop in suite.properties()} >= {"data_sha256", "model_manifest_sha256"}
    assert summary.read_text().startswith("### MediRound eval: gate passed")
