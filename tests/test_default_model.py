"""The shipped tiny model: small, complete, retrainable from its record, used when ``--model`` is absent,
and gated in CI: its scores on a fixed synthetic split may not fall below the committed baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mediround.data.synth import generate
from mediround.default_model import default_checkpoint, training_record
from mediround.model.checkpoint import verify_manifest
from mediround.model.config import MediRoundConfig
from mediround.reports.rows import read_rows
from mediround.training.recipe import resolve_recipe
from mediround_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "baselines" / "ci-eval.parquet"
CI_SEED, CI_DIALOGUES, MAX_DROP = 11, 24, 1.0
"""The CI split: the first 24 test-split dialogues of seed 11 (baselines/README.md regenerates the baseline)."""
MAX_BYTES = 25 * 2**20


@pytest.fixture(scope="module")
def ci_data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("ci-eval"), CI_DIALOGUES, CI_SEED, split="test").files["test"]


def test_shipped_checkpoint_is_small_intact_and_has_trained_jcm():
    folder = default_checkpoint()
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size <= MAX_BYTES, f"{size / 2**20:.1f} MB"
    manifest = verify_manifest(folder)
    assert all(name.endswith((".safetensors", ".json")) for name in manifest["files"])
    assert MediRoundConfig.from_json(folder / "config.json").trainable.jcm


def test_training_record_matches_the_committed_recipes():
    record = training_record()
    for stage in ("stage1", "jcm"):
        recipe = resolve_recipe(record[stage]["recipe"])
        assert yaml.safe_load(recipe.read_text()) == record[stage]["settings"], (
            f"{recipe} changed since the shipped model was trained: retrain it (benchmarks/reproduce.py --train "
            "--pack) or restore the recipe")
    assert record["stage1"]["settings"]["train"]["seed"] == record["seed"]


def test_infer_without_model_uses_the_shipped_one_with_jcm(ci_data, tmp_path):
    data = ci_data.with_name("first-two.jsonl")
    data.write_text("".join(ci_data.read_text().splitlines(keepends=True)[:2]))
    result = CliRunner().invoke(cli, ["infer", str(data), "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "no --model given: using the shipped tiny model" in result.output
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    n_rounds = sum(len(json.loads(line)["rounds"]) for line in data.read_text().splitlines())
    assert len(records) == n_rounds and all(isinstance(r["jcm_score"], float) for r in records)


def test_shipped_model_does_not_regress_against_the_ci_baseline(ci_data, tmp_path):
    rows_file = tmp_path / "rows.parquet"
    result = CliRunner().invoke(cli, [
        "eval", str(ci_data), "--baseline", str(BASELINE), "--max-drop", str(MAX_DROP),
        "--predictions-out", str(tmp_path / "predictions"), "--out", str(rows_file), "--cpu",
    ], catch_exceptions=False)
    assert "gate passed" in result.output and result.exit_code == 0, result.output
    current, baseline = read_rows(rows_file), read_rows(BASELINE)
    assert sorted((r["dialogue_id"], r["round"]) for r in current) == sorted(
        (r["dialogue_id"], r["round"]) for r in baseline)
    assert {r["beta"] for r in current} == {0.6}
