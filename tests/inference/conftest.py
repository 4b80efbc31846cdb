"""Fixtures of the inference tests: one random tiny model per session, dialogue files per test."""

from __future__ import annotations

import copy

import pytest
from inference_fixtures import tiny_model


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture
def jcm_model(model):
    """The session model with its JCM weights restored after the test."""
    saved = copy.deepcopy(model.jcm.state_dict())
    yield model
    model.jcm.load_state_dict(saved)
