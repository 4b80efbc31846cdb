"""The layers of docs/architecture.md, enforced: no module imports from a layer above its own.

Every ``import``/``from ... import`` of a ``mediround`` module is read from the source (function bodies
included), so a lazy import cannot hide a backwards edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first; a module may import from its own layer and the ones before it. Keys are module prefixes.
LAYERS: list[tuple[str, ...]] = [
    ("mediround.errors", "mediround.atomic", "mediround.typed", "mediround.error_log"),
    ("mediround.data", "mediround.metrics", "mediround.convert", "mediround.default_model"),
    ("mediround.reports",),
    ("mediround.model",),
    ("mediround.launch",),
    ("mediround.inference",),
    ("mediround.training",),
    ("mediround.doctor", "mediround.demo"),
    ("mediround_cli",),
]
# Packages that must stay importable without torch (validate, convert, scoring, tables).
TORCH_FREE = ("mediround.errors", "mediround.atomic", "mediround.typed", "mediround.error_log", "mediround.data", "mediround.metrics",
              "mediround.reports")


def layer_of(module: str) -> int:
    if module == "mediround":  # the package root holds only the version
        return 0
    for index, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"module {module} is in no layer: add it to tests/test_layers.py and docs/architecture.md")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) for each mediround import in ``source`` (a module of ``package``), relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name.split(".")[0] in ("mediround", "mediround_cli")]


SOURCES = sorted(p for folder in ("mediround", "mediround_cli") for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_from_a_layer_above(path: Path):
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    own = layer_of(module)
    upward = [f"{path.relative_to(REPO)}:{line} imports {name} (layer {layer_of(name)} > {own})"
              for line, name in imported_modules(path.read_text(encoding="utf-8"), package) if layer_of(name) > own]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("path", [p for p in SOURCES if module_name(p).startswith(TORCH_FREE)],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_light_layers_never_import_torch(path: Path):
    heavy = {"torch", "transformers", "peft", "accelerate", "segment_anything"}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level]
    assert not [name for name in names if name.split(".")[0] in heavy]


def test_the_check_sees_lazy_and_relative_imports():
    source = "def f():\n    from ..doctor.weights import hint\n\nimport mediround.data.images\n"
    assert imported_modules(source, "mediround.model") == [(4, "mediround.data.images"), (2, "mediround.doctor.weights")]
    assert layer_of("mediround.doctor.weights") > layer_of("mediround.model.segmenter")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_another_modules_private_names(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    assert not private
