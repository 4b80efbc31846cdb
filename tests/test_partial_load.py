"""``--allow-partial-load`` through the CLI: a renamed or missing key fails in one line naming it; with the flag
the command runs and its table names what was left at random init."""

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mediround.data.synth import generate
from mediround.model import build_model, preset
from mediround.model.checkpoint import _sha256, save_checkpoint
from mediround.model.segmenter import build_sam
from mediround_cli.main import cli

RENAMED = "box_encoder.linear.weight"
SAM_MISSING = "mask_decoder.output_upscaling.0.weight"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth"), 1, seed=3, split="test").files["test"]


@pytest.fixture(scope="module")
def renamed_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose heads file has ``RENAMED`` under another name, manifest resealed."""
    torch.set_num_threads(2)
    folder = save_checkpoint(build_model(preset("tiny")), tmp_path_factory.mktemp("ckpt") / "tiny")
    heads = load_file(folder / "heads.safetensors")
    heads[f"{RENAMED}_renamed"] = heads.pop(RENAMED)
    save_file(heads, folder / "heads.safetensors")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {name: _sha256(folder / name) for name in manifest["files"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _row(result, what):
    """The cells of the report table's row whose second cell is ``what`` (folded cells joined back)."""
    lines = [line for line in result.output.splitlines() if line.startswith("│")]
    for index, line in enumerate(lines):
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if cells[1] == what:
            for more in lines[index + 1:]:
                extra = [cell.strip() for cell in more.strip("│").split("│")]
                if extra[1]:
                    break
                cells = [cell + part for cell, part in zip(cells, extra, strict=True)]
            return cells
    raise AssertionError(f"no row {what!r} in:\n{result.output}")


def _error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("command", ["infer", "eval"])
def test_renamed_key_fails_in_one_line_and_loads_with_the_flag(command, renamed_checkpoint, data, tmp_path):
    def args(out):
        where = ["--out", str(out)] if command == "infer" else ["--predictions-out", str(out)]
        return [command, str(data), "--model", str(renamed_checkpoint), "--cpu", *where]

    runner = CliRunner()
    refused = runner.invoke(cli, args(tmp_path / "refused"))
    assert refused.exit_code != 0
    assert refused.exception is None or isinstance(refused.exception, SystemExit)
    [line] = _error_lines(refused)
    assert "heads.safetensors" in line and f"{RENAMED}_renamed" in line and f"missing key(s): {RENAMED}" in line
    assert "Traceback" not in refused.output

    loaded = runner.invoke(cli, [*args(tmp_path / "out"), "--allow-partial-load"])
    assert loaded.exit_code == 0, loaded.output
    assert "left at random init" in loaded.output
    assert _row(loaded, "1 missing (random)") == ["heads.safetensors", "1 missing (random)", RENAMED]
    assert _row(loaded, "1 unexpected (ignored)")[2] == f"{RENAMED}_renamed"
    assert loaded.output.count("--allow-partial-load: weights left at random init") == 1
    assert (tmp_path / "out" / "predictions.jsonl").is_file()


def test_export_with_a_renamed_key(renamed_checkpoint, tmp_path):
    refused = CliRunner().invoke(cli, ["export", str(renamed_checkpoint), str(tmp_path / "refused")])
    assert refused.exit_code != 0 and f"{RENAMED}_renamed" in _error_lines(refused)[0]
    assert not (tmp_path / "refused").exists()
    exported = CliRunner().invoke(cli, ["export", str(renamed_checkpoint), str(tmp_path / "out"), "--no-merge",
                                        "--allow-partial-load"])
    assert exported.exit_code == 0, exported.output
    assert _row(exported, "1 missing (random)")[2] == RENAMED
    assert RENAMED in load_file(tmp_path / "out" / "heads.safetensors")


def test_train_with_a_sam_pth_missing_a_key(tmp_path):
    """The recipe's SAM .pth lacks one key: refused naming it; with the flag one step trains and the table
    (and the training log's ``load`` event) names it."""
    torch.set_num_threads(2)
    data = generate(tmp_path / "synth", 2, seed=4, split="train").files["train"]
    state = build_sam(preset("tiny").segmenter).state_dict()
    del state[SAM_MISSING]
    torch.save(state, tmp_path / "sam.pth")
    recipe = {
        "output": str(tmp_path / "run"),
        "model": {"preset": "tiny", "segmenter": {"checkpoint": str(tmp_path / "sam.pth")}},
        "data": {"train": str(data), "val": None},
        "train": {"batch_size": 1, "max_steps": 1, "threads": 2, "mixed_precision": "no", "warmup_steps": 0},
        "validation": {"every": 0, "at_start": False},
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    runner = CliRunner()

    refused = runner.invoke(cli, ["train", str(path), "--cpu"])
    assert refused.exit_code != 0
    [line] = _error_lines(refused)
    assert "sam.pth" in line and f"missing key(s): {SAM_MISSING}" in line
    shutil.rmtree(tmp_path / "run", ignore_errors=True)

    trained = runner.invoke(cli, ["train", str(path), "--cpu", "--allow-partial-load"])
    assert trained.exit_code == 0, trained.output
    assert _row(trained, "1 missing (random)")[::2] == ["sam.pth", SAM_MISSING]
    assert "1 / 1" in trained.output
    events = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    [load] = [event for event in events if event["event"] == "load"]
    assert load["reports"][0]["missing"] == [SAM_MISSING]
    assert (tmp_path / "run" / "model" / "manifest.json").is_file()


def test_train_jcm_on_a_checkpoint_with_a_renamed_key(renamed_checkpoint, tmp_path):
    torch.set_num_threads(2)
    data = generate(tmp_path / "synth", 2, seed=5, split="train").files["train"]
    recipe = {
        "output": str(tmp_path / "run"),
        "model": str(renamed_checkpoint),
        "data": {"train": str(data), "val": None},
        "train": {"batch_size": 1, "max_steps": 1, "threads": 2, "warmup_steps": 0},
        "validation": {"every": 0},
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 1},
    }
    path = tmp_path / "jcm.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    runner = CliRunner()

    refused = runner.invoke(cli, ["train-jcm", str(path), "--cpu"])
    assert refused.exit_code != 0
    [line] = _error_lines(refused)
    assert "heads.safetensors" in line and f"{RENAMED}_renamed" in line
    shutil.rmtree(tmp_path / "run", ignore_errors=True)

    trained = runner.invoke(cli, ["train-jcm", str(path), "--cpu", "--allow-partial-load"])
    assert trained.exit_code == 0, trained.output
    assert _row(trained, "1 missing (random)") == ["heads.safetensors", "1 missing (random)", RENAMED]
    assert (tmp_path / "run" / "model" / "manifest.json").is_file()
