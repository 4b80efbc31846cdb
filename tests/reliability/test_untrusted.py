"""Weight files are data, never code: safetensors and JSON only, ``.pth`` through ``weights_only=True``,
no remote code, local files only. A pickle payload planted anywhere would create a marker file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from reliability_fixtures import copy_checkpoint, record, write_lines

from mediround.errors import CheckpointError
from mediround.model.checkpoint import load_checkpoint
from mediround_cli.main import cli

SOURCES = [p for folder in ("mediround", "mediround_cli") for p in (Path(__file__).parents[2] / folder).rglob("*.py")]


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the marker's existence proves code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node.func, {k.arg: k.value for k in node.keywords}, node.lineno


def _is_true(value: ast.expr | None) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def test_sources_load_weights_without_pickle_code_or_remote_code():
    found = {"torch.load": 0, "from_pretrained": 0}
    for path in SOURCES:
        for func, keywords, line in _calls(path):
            where = f"{path.name}:{line}"
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if owner == "pickle":
                assert func.attr not in ("load", "loads"), f"{where}: pickle.{func.attr}"
            if owner == "torch" and func.attr == "load":
                found["torch.load"] += 1
                assert _is_true(keywords.get("weights_only")), f"{where}: torch.load without weights_only=True"
            if func.attr == "from_pretrained":
                found["from_pretrained"] += 1
                assert not _is_true(keywords.get("trust_remote_code")), f"{where}: trust_remote_code=True"
                assert _is_true(keywords.get("local_files_only")), f"{where}: from_pretrained may download"
    assert found["torch.load"] >= 2 and found["from_pretrained"] >= 4, found


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": Payload(marker)}, path)


def test_pickle_files_planted_in_a_checkpoint_folder_are_never_unpickled(tmp_path, tiny_checkpoint):
    marker = tmp_path / "pwned.txt"
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "planted")
    for name in ("pytorch_model.bin", "optimizer.pt", "training_args.bin", "adapter/adapter_model.bin",
                 "tokenizer/added.pt"):
        _plant(folder / name, marker)
    load_checkpoint(folder)
    assert not marker.exists()

    (folder / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: listed in the manifest but missing"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="LoRA adapter missing"):
        load_checkpoint(folder, verify=False)
    assert not marker.exists()


@pytest.mark.parametrize("manifest", [b"\xff\xfe", b"{\"format\": 1", b"[]"])
def test_a_broken_manifest_is_a_checkpoint_error(tmp_path, tiny_checkpoint, manifest):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "broken")
    (folder / "manifest.json").write_bytes(manifest)
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(folder)


def test_a_pickle_payload_as_sam_weights_in_a_recipe_is_refused_in_one_line(tmp_path, dataset):
    marker = tmp_path / "pwned.txt"
    payload = tmp_path / "medsam_vit_b.pth"
    torch.save({"image_encoder.pos_embed": Payload(marker)}, payload)
    recipe = {
        "output": str(tmp_path / "out"),
        "model": {"preset": "tiny", "segmenter": {"checkpoint": str(payload)}},
        "data": {"train": str(write_lines(dataset / "untrusted.jsonl", [record("a")])), "val": None},
        "train": {"batch_size": 1, "max_steps": 1, "threads": 1, "mixed_precision": "no", "warmup_steps": 0},
        "validation": {"every": 0, "at_start": False},
        "checkpoint": {"every": 0},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = CliRunner().invoke(cli, ["train", str(path), "--cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "medsam_vit_b.pth" in errors[0] and "weights_only" in errors[0], result.output
    assert not marker.exists()
