"""The tiny recipe really learns: a short CPU run cuts the training loss and lifts validation Dice, teacher-forced
and chained from the model's own masks."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mediround.data.synth.generator import generate
from mediround.training.logging import read_events
from mediround.training.recipe import SHIPPED_RECIPES, load_recipe
from mediround.training.stage1 import run_training

ROOT = Path(__file__).resolve().parents[2]
STEPS = 120


@pytest.fixture(scope="module")
def learning_data(tmp_path_factory) -> Path:
    """100 synthetic dialogues: 80 to train on, 10 held out for validation."""
    out = tmp_path_factory.mktemp("learning")
    generate(out, 100, seed=0)
    return out


def test_tiny_recipe_learns_in_a_short_run(learning_data, tmp_path):
    recipe = load_recipe(SHIPPED_RECIPES / "tiny-cpu.yaml", [
        f"output={tmp_path / 'run'}",
        f"data.train={learning_data / 'train.jsonl'}",
        f"data.val={learning_data / 'val.jsonl'}",
        f"train.max_steps={STEPS}",
        "train.batch_size=2",
        "train.warmup_steps=10",
        "train.threads=1",
        f"validation.every={STEPS}",
        "validation.max_dialogues=10",
        f"checkpoint.every={STEPS}",
        "log.every=10",
    ])
    result = run_training(recipe, cpu=True)
    assert result.stopped == "finished" and result.step == STEPS

    events = [e for e in read_events(Path(recipe.output) / "train_log.jsonl") if e["event"] == "step"]
    first, last = events[0]["loss"], sum(e["loss"] for e in events[-3:]) / 3
    assert last <= 0.7 * first, (first, last)

    rows = pq.read_table(Path(recipe.output) / "validation.parquet").to_pylist()
    chained = {row["step"]: row for row in rows if row["track"] == "chained" and row["split"] == "all"}
    assert set(chained) == {0, STEPS}
    # Chained from the model's own masks (what `mediround eval` scores), the trained model must clearly beat
    # the untrained one on the same dialogues: measured 0.09 -> 0.26 Dice.
    before, after = chained[0]["dice"], chained[STEPS]["dice"]
    assert chained[0]["count"] == chained[STEPS]["count"] > 20
    assert after >= max(2 * before, before + 0.1), (before, after)
    rows = [row for row in rows if row["track"] == "teacher_forced"]
    overall = {row["step"]: row for row in rows if row["split"] == "all"}
    assert set(overall) == {0, STEPS}
    untrained, trained = overall[0]["dice"], overall[STEPS]["dice"]
    assert overall[0]["count"] == overall[STEPS]["count"] > 20
    assert trained >= 2 * untrained, (untrained, trained)
    assert {row["round"] for row in rows if row["split"] == "round"} >= {1, 2}
