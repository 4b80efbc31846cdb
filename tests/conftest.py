"""Fixtures for every test folder: the shared data that sits beside the repository."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""``../shared/data`` seen from the repository root: real demo slices that are not shipped in the repo."""


@pytest.fixture
def shared_data() -> Callable[..., Path]:
    """``shared_data("sam-med2d-demo")`` is that folder of ``../shared/data``. A missing folder fails the
    test, so a machine without the data reports it instead of silently skipping the test."""

    def locate(*parts: str) -> Path:
        path = SHARED_DATA.joinpath(*parts)
        if not path.exists():
            pytest.fail(f"shared test data missing: {path} (the repository must sit beside shared/data)")
        return path

    return locate
