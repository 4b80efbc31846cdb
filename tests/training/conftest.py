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


def recipe_writer(folder: Path, synth_data: Path):
    """``write(name, **sections)``: a tiny-preset recipe YAML in ``folder`` on the synthetic data, one thread."""

    def write(name: str = "recipe", **sections) -> Path:
        recipe = {
            "output": str(folder / f"out-{name}"),
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
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_recipe(tmp_path, synth_data):
    """``write_recipe(name, **sections)``: a recipe file in the test's own folder (``recipe_writer``)."""
    return recipe_writer(tmp_path, synth_data)


@pytest.fixture(scope="module")
def write_module_recipe(tmp_path_factory, synth_data):
    """Like ``write_recipe``, for module fixtures: one folder per test module."""
    return recipe_writer(tmp_path_factory.mktemp("recipes"), synth_data)
