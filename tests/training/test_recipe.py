"""Recipes: overrides with type checks, and bad recipes refused with one line before any launch."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mediround.atomic import write_json
from mediround.errors import LaunchError, RecipeError
from mediround.launch import LaunchPlan, accelerate_command, check_world_size, plan_launch
from mediround.training.recipe import (
    RUN_FILE,
    SHIPPED_RECIPES,
    RecordedRun,
    check_output,
    identity_hash,
    load_recipe,
    recorded_run,
    resolve_recipe,
    run_record,
    without_keys,
)
from mediround_cli.main import cli


def test_overrides_are_typed_and_reach_the_model_config(write_recipe):
    recipe = load_recipe(write_recipe(), ["train.lr=3e-4", "train.betas=[0.9, 0.99]", "model.lora.dropout=0"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.train.betas == (0.9, 0.99)
    assert recipe.model.lora.dropout == 0.0
    assert recipe.model.segmenter.image_size == 128  # from the tiny preset, not the dataclass default
    assert load_recipe(write_recipe(), ["train.lr=1e-3"]).hash != recipe.hash


def test_shipped_recipes_parse(synth_data):
    tiny = load_recipe(SHIPPED_RECIPES / "tiny-cpu.yaml",
                       [f"data.train={synth_data / 'train.jsonl'}", f"data.val={synth_data / 'val.jsonl'}"])
    assert tiny.model_preset == "tiny"
    assert tiny.model.heads.reference_min_fragment == 0.1
    for name in ("mediround-7b-4gpu.yaml", "mediround-7b-24gb.yaml"):
        text = (SHIPPED_RECIPES / name).read_text(encoding="utf-8")
        with pytest.raises(RecipeError, match="data.train': file not found"):
            load_recipe(SHIPPED_RECIPES / name)
        assert "preset: llava-med-7b" in text
        # The paper's reference rule (the preset's 0): the stray-fragment rule is a tiny-recipe deviation.
        assert "reference_min_fragment" not in text
    assert json.loads((SHIPPED_RECIPES / "zero2.json").read_text())["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1e-3", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("model.lora.rank=4", "unknown key 'model.lora.rank' (did you mean 'model.lora.r'?)"),
        ("train.batch_size=two", "key 'train.batch_size': expected an integer, got 'two'"),
        ("train.skip_nonfinite=3", "key 'train.skip_nonfinite': expected true/false, got 3"),
        ("data.train=/nowhere/train.jsonl", "key 'data.train': file not found: /nowhere/train.jsonl"),
        ("augment.reference_swap=1.5", "'augment.reference_swap': is a probability, from 0 to 1, got 1.5"),
    ],
)
def test_bad_recipe_is_one_line_before_launch(write_recipe, override, expected):
    recipe = write_recipe()
    result = CliRunner().invoke(cli, ["train", str(recipe), "--cpu", "--num-processes", "2", override])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert expected in lines[0]
    assert "launching" not in result.output


def test_output_holding_another_run_is_refused_unless_overwrite(write_recipe):
    first = load_recipe(write_recipe())
    output = Path(first.output)
    write_json(output / RUN_FILE, run_record(first))
    other = write_recipe()
    result = CliRunner().invoke(cli, ["train", str(other), "--cpu", "train.lr=5e-4"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "holds another run" in lines[0] and "train.lr" in lines[0], result.output
    check_output(first, resume=False, overwrite=False)
    check_output(load_recipe(other, ["train.lr=5e-4"]), resume=False, overwrite=True)
    assert not output.exists()


def test_cpu_launch_uses_multi_gpu_gloo_and_checks_world_size():
    plan = plan_launch(gpus=None, cpu=True, num_processes=2, cuda_available=False)
    command = accelerate_command(plan, ["train", "r.yaml"])
    assert "--multi_gpu" in command and "--cpu" not in command
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[-4:] == ["-m", "mediround_cli.main", "train", "r.yaml"]
    with pytest.raises(LaunchError, match="world size of 1 but 2"):
        check_world_size(1, 2, rank=0)
    with pytest.raises(LaunchError):
        plan_launch(gpus=2, cpu=True, num_processes=None, cuda_available=False)
    assert LaunchPlan(processes_per_machine=4, num_machines=2).world_size == 8
    nodes = plan_launch(gpus=4, cpu=False, num_processes=None, num_machines=2, machine_rank=1,
                        main_process_ip="10.0.0.1", main_process_port=29500, cuda_available=True)
    command = accelerate_command(nodes, ["train", "r.yaml"])
    flags = dict(itertools.pairwise(command))
    assert (flags["--num_processes"], flags["--num_machines"], flags["--machine_rank"]) == ("8", "2", "1")
    assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("10.0.0.1", "29500")
    with pytest.raises(LaunchError, match="main-process-ip"):
        plan_launch(gpus=4, cpu=False, num_processes=None, num_machines=2, cuda_available=True)


def test_a_child_that_got_fewer_processes_fails_loudly(write_recipe, monkeypatch):
    monkeypatch.setenv("MEDIROUND_LAUNCHED", "1")
    monkeypatch.setenv("MEDIROUND_EXPECTED_PROCESSES", "2")
    monkeypatch.setenv("MEDIROUND_LAUNCH_CPU", "1")
    result = CliRunner().invoke(cli, ["train", str(write_recipe())])
    assert result.exit_code == 2
    assert "sees a world size of 1 but 2 process(es) were asked for" in result.output


def test_recipes_command_lists_and_shows_the_shipped_recipes():
    listed = CliRunner().invoke(cli, ["recipes"])
    assert listed.exit_code == 0, listed.output
    names = [line.split()[0] for line in listed.output.splitlines()]
    assert names == sorted(p.stem for p in SHIPPED_RECIPES.iterdir())
    assert "mediround-7b-4gpu" in names and "tiny-cpu" in names
    shown = CliRunner().invoke(cli, ["recipes", "show", "mediround-7b-4gpu"])
    assert shown.exit_code == 0
    assert shown.output == (SHIPPED_RECIPES / "mediround-7b-4gpu.yaml").read_text(encoding="utf-8")
    unknown = CliRunner().invoke(cli, ["recipes", "show", "no-such-recipe"])
    assert unknown.exit_code == 2 and "no shipped recipe" in unknown.output and "tiny-cpu" in unknown.output


def test_a_recipe_name_or_the_docs_repository_path_finds_the_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here, as after a non-editable install
    shipped = SHIPPED_RECIPES / "tiny-cpu.yaml"
    for given in ("tiny-cpu", "tiny-cpu.yaml", "recipes/tiny-cpu.yaml"):
        assert resolve_recipe(given) == shipped
    own = tmp_path / "recipes" / "tiny-cpu.yaml"
    own.parent.mkdir()
    own.write_text("output: mine\n")
    assert resolve_recipe("recipes/tiny-cpu.yaml") == Path("recipes/tiny-cpu.yaml")  # a real file wins


def test_train_without_recipe_stops_before_launch_naming_every_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["train", "--gpus", "4"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: mediround-7b-4gpu: key 'model.mllm.source': folder not found")
    for path in ("weights/llava-med-v1.5-mistral-7b-hf", "weights/medsam_vit_b.pth", "data/mr-medseg/train.json",
                 "data/mr-medseg/val.json", "docs/real-weights.md"):
        assert path in line
    assert not (tmp_path / "runs").exists()


def test_deepspeed_without_the_package_says_how_to_install_it(write_recipe, monkeypatch):
    zero2 = SHIPPED_RECIPES / "zero2.json"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    result = CliRunner().invoke(cli, ["train", str(write_recipe()), "--cpu", "--num-processes", "2",
                                      "--deepspeed", str(zero2)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and 'pip install -e ".[deepspeed]"' in result.output


def test_without_a_terminal_each_logged_step_is_one_plain_line_and_the_sample_count_is_printed(write_recipe):
    result = CliRunner().invoke(cli, ["train", str(write_recipe(log={"every": 2}))])
    assert result.exit_code == 0, result.output
    assert "3 steps x 2 = 6 sampled dialogues" in result.output
    steps = [line for line in result.output.splitlines() if line.startswith("train step ")]
    # Logged: step 1, every log.every (2), and the last step.
    assert [line.split()[2] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(" loss " in line and " lr " in line for line in steps)


def test_a_record_without_keys_added_since_is_this_run_when_they_are_at_their_defaults(write_recipe):
    """The defaults come from the typed sections and the model config: a model key and a whole section
    absent from the record are this run's at their defaults, and another run's at any other value."""
    path = write_recipe()
    recipe = load_recipe(path)
    absent = ["model.heads.box_fourier_features", "augment"]
    earlier = run_record(recipe)
    earlier["recipe"] = without_keys(earlier["recipe"], absent)
    earlier["recipe_hash"] = identity_hash(without_keys(recipe.identity(), absent))
    earlier["earlier_hashes"] = ["0123456789abcdef"]
    assert recorded_run(recipe, earlier) == RecordedRun(("0123456789abcdef", earlier["recipe_hash"]),
                                                        ("augment", "model.heads.box_fourier_features"))
    assert recorded_run(recipe, run_record(recipe, ["0123456789abcdef"])) == RecordedRun(("0123456789abcdef",), ())
    assert recorded_run(load_recipe(path, ["model.heads.box_fourier_features=8"]), earlier) is None
    assert recorded_run(load_recipe(path, ["augment.reference_swap=0.5"]), earlier) is None
    # The hash must be the identity's without those keys: a record of other starting weights is another run.
    assert recorded_run(recipe, {**earlier, "recipe_hash": "fedcba9876543210"}) is None
