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
    ("mediround.doctor", "mediround.demo", "mediround.app"),
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


# Start-up: what runs at import time. Importing any module runs its packages' ``__init__`` first, so an
# ``__init__`` that imports the model stack makes every module below it heavy (``mediround.model`` once made
# ``model.config``, and so recipe validation and ``mediround --help``, import peft). The commands that build
# no model import it nowhere. tests/test_startup.py checks the same in a real interpreter.
HEAVY = {"torch", "transformers", "peft", "accelerate", "segment_anything"}
LIGHT_ENTRIES = ("mediround_cli.main", "mediround_cli.recipes", "mediround.training.recipe")
MODULE_PATHS = {module_name(path): path for path in SOURCES}
PACKAGES = [module for module, path in MODULE_PATHS.items() if path.name == "__init__.py"]


def parents(module: str) -> list[str]:
    return [".".join(module.split(".")[:depth]) for depth in range(1, len(module.split(".")))]


def import_time_modules(module: str) -> list[str]:
    """Every module the import of ``module`` runs: its statements outside function bodies and outside
    ``if TYPE_CHECKING:``, with the packages above each imported module and above ``module`` itself."""
    path = MODULE_PATHS[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = parents(module)

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = (package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else [])
                origin = ".".join(base + ([node.module] if node.module else []))
                names.append(origin)
                # ``from package import module`` imports that module too.
                names.extend(f"{origin}.{alias.name}" for alias in node.names if f"{origin}.{alias.name}" in MODULE_PATHS)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, []))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    expanded = [part for name in names for part in [*parents(name), name]]
    return list(dict.fromkeys(name for name in expanded if name in MODULE_PATHS or name.split(".")[0] in HEAVY))


def heavy_chain(module: str, skipped: tuple[str, ...] = ()) -> list[str]:
    """The import chain from ``module`` to a heavy package ([] when its import pulls in none), not counting
    the modules in ``skipped``."""
    seen = {*skipped, module}

    def walk(current: str) -> list[str]:
        for name in import_time_modules(current):
            if name.split(".")[0] in HEAVY:
                return [current, name]
            if name not in seen:
                seen.add(name)
                if chain := walk(name):
                    return [current, *chain]
        return []

    return walk(module)


@pytest.mark.parametrize("module", LIGHT_ENTRIES)
def test_light_commands_import_no_model_stack(module: str):
    assert heavy_chain(module) == [], " -> ".join(heavy_chain(module))


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_init_leaves_its_light_modules_light(package: str):
    # A package whose every module needs the stack anyway (mediround.convert: the converter) may re-export.
    made_heavy = [module for module in MODULE_PATHS if module.startswith(package + ".") and heavy_chain(package)
                  and not heavy_chain(module, skipped=(package, *parents(package)))]
    assert made_heavy == [], f"{' -> '.join(heavy_chain(package))} makes these heavy: {made_heavy}"


def test_the_chain_check_follows_imports_into_the_stack():
    assert heavy_chain("mediround.model.build")[-1].split(".")[0] in HEAVY
    chain = heavy_chain("mediround_cli.train")  # a command that trains imports the stack when imported
    assert chain[0] == "mediround_cli.train" and chain[-1].split(".")[0] in HEAVY and len(chain) > 2
    # A package that re-exports a heavy module is heavy; skipping it, its light module is not.
    assert heavy_chain("mediround.convert") and not heavy_chain("mediround.model.config", skipped=("mediround.model",))
