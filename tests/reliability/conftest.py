"""Fixtures of the reliability tests: a tiny untrained checkpoint and a small valid dataset, once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_fixtures import save_tiny_checkpoint, write_dataset


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("reliability") / "data")
