"""Fixtures of the training tests: a small synthetic benchmark per session and recipe files per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mediround.data.synth.generator import generate


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """20 synthetic dialogues (16 train / 2 val / 2 test), 128 px."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, 20, seed=0)
    return out


@pytest.fixture
def write_recipe(tmp_path, synth_data):
    """``write_recipe(name, **sections)``: a tiny-preset recipe YAML on the synthetic data, one thread."""

    def write(name: str = "recipe", **sections) -> Path:
        recipe = {
            "output": str(tmp_path / f"out-{name}"),
            "model": {"preset": "tiny"},
            "data": {"train": str(synth_data / "train.jsonl"), "val": None},
            "train": {"batch_size": 2, "max_steps": 3, "threads": 1, "mixed_precision": "no", "lr": 1.0e-3,
                      "warmup_steps": 2},
            "validation": {"every": 0, "at_start": False},
            "checkpoint": {"every": 0, "keep_last": 2},
            "log": {"every": 1},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                recipe[section] = {**recipe.get(section, {}), **values}
            else:
                recipe[section] = values
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        return path

    return write
