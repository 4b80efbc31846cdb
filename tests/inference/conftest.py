"""Fixtures of the inference tests: one random tiny model per session, dialogue files per test."""

from __future__ import annotations

import pytest
from inference_fixtures import tiny_model


@pytest.fixture(scope="session")
def model():
    return tiny_model()
