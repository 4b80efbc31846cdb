"""docs/architecture.md names every module of the library and the command line, and no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _listed() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    layers = text[text.index("layer 0"): text.index("```", text.index("layer 0"))]
    return set(re.findall(r"\b(mediround(?:_cli)?/[\w/]+\.py)\b", layers))


def test_every_module_is_listed_and_every_listed_module_exists():
    modules = {str(path.relative_to(REPO)) for package in ("mediround", "mediround_cli")
               for path in (REPO / package).rglob("*.py")}
    listed = _listed()
    assert not modules - listed, f"modules missing from docs/architecture.md: {sorted(modules - listed)}"
    assert not listed - modules, f"docs/architecture.md lists modules that do not exist: {sorted(listed - modules)}"
