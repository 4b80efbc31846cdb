"""The repository's one copy of the shipped recipes (top-level ``recipes/``) is what a source checkout
(editable install) reads and what a built wheel carries inside the package as ``mediround/recipes/``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import mediround
from mediround.training.recipe import resolve_recipe, shipped_recipes
from mediround_cli.main import cli

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
PACKAGES = ("mediround", "mediround_cli")
BUILD_INPUTS = ("pyproject.toml", "README.md", "recipes", *PACKAGES)
"""What the build reads: copied to a temporary folder, so that the build leaves nothing in the checkout."""


def source_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from this checkout without network (setuptools comes from the dev extra)."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--no-index", "--quiet", "--wheel-dir", str(out)], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = out.glob("mediround-*.whl")
    return built


def test_the_source_checkout_reads_the_top_level_recipes(tmp_path, monkeypatch):
    # Editable install or PYTHONPATH: the package is this checkout's, and it has no second copy.
    assert Path(mediround.__file__).resolve().parents[1] == REPO
    assert not (REPO / "mediround" / "recipes").exists()
    expected = {p.stem: p for p in source_files(RECIPES)}
    assert len(expected) >= 8 and {"mediround-7b-4gpu", "tiny-cpu", "zero2"} <= set(expected)
    assert shipped_recipes() == dict(sorted(expected.items()))
    monkeypatch.chdir(tmp_path)  # found by name or by the README's path from any folder
    assert resolve_recipe("recipes/mediround-7b-24gb.yaml") == RECIPES / "mediround-7b-24gb.yaml"
    assert resolve_recipe("jcm-7b-4gpu") == RECIPES / "jcm-7b-4gpu.yaml"
    listed = CliRunner().invoke(cli, ["recipes"])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.output.splitlines()] == sorted(expected)


@pytest.mark.slow
def test_the_wheel_holds_every_recipe_and_source_file_byte_identical(wheel):
    with zipfile.ZipFile(wheel) as archive:
        held = {name: archive.read(name) for name in archive.namelist() if ".dist-info/" not in name}
    recipes = {f"mediround/recipes/{p.name}": p.read_bytes() for p in source_files(RECIPES)}
    assert {name: data for name, data in held.items() if name.startswith("mediround/recipes/")} == recipes
    # The package list in pyproject.toml is written out: a package folder left off it fails here.
    files = [p.relative_to(REPO) for package in PACKAGES for p in source_files(REPO / package)]
    sources = {p.as_posix(): (REPO / p).read_bytes() for p in files if p.suffix == ".py" or "assets" in p.parts}
    assert sorted(set(sources) - set(held)) == []
    assert [name for name in sources if held[name] != sources[name]] == []


@pytest.mark.slow
def test_the_installed_wheel_lists_shows_and_resolves_its_recipes(wheel, tmp_path):
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(installed)
    # -S: no site hooks (such as an editable install's finder) import anything for the package; the
    # dependencies come from this interpreter's path, after the wheel's own files.
    paths = [str(installed), *filter(None, sys.path)]
    probe = textwrap.dedent("""
        import contextlib, io, json
        from mediround_cli.main import cli

        def run(*args):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                cli.main(list(args), prog_name="mediround")
            return out.getvalue()

        # The commands first, as the console script runs them: nothing else imported before.
        listed, shown = run("recipes"), run("recipes", "show", "mediround-7b-4gpu")
        from mediround.training.recipe import SHIPPED_RECIPES, resolve_recipe
        print(json.dumps({"folder": str(SHIPPED_RECIPES), "resolved": str(resolve_recipe("recipes/tiny-cpu.yaml")),
                          "listed": [line.split()[0] for line in listed.splitlines()], "shown": shown}))
    """)
    run = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=False,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)})
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["folder"] == str(installed / "mediround" / "recipes")
    assert report["resolved"] == str(installed / "mediround" / "recipes" / "tiny-cpu.yaml")
    assert report["listed"] == sorted(p.stem for p in source_files(RECIPES))
    assert report["shown"] == (RECIPES / "mediround-7b-4gpu.yaml").read_text(encoding="utf-8")


CORE = {"torch", "transformers", "peft", "segment-anything", "accelerate", "click", "rich", "pyarrow", "numpy",
        "pillow", "safetensors", "pyyaml", "pydantic", "tokenizers", "scipy"}
"""What ``pip install mediround`` pulls in: a new core dependency is a decision, made here too."""


@pytest.mark.slow
def test_the_app_and_its_browser_test_are_extras_and_the_core_install_does_not_grow(wheel):
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode("utf-8").splitlines()
    requires = [line.removeprefix("Requires-Dist: ") for line in lines if line.startswith("Requires-Dist: ")]

    def name(requirement: str) -> str:
        return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()

    core = {name(r) for r in requires if "extra ==" not in r}
    assert core == CORE
    extras = {name(r): r.split("extra ==")[1].strip().strip("'\"") for r in requires if "extra ==" in r}
    assert extras["gradio"] == "app" and extras["selenium"] == "app-test"
