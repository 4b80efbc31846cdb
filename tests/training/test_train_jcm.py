"""train-jcm: only JCM learns, the judge loss falls, the new checkpoint says JCM is trained, rollout
features come from chaining the model's own masks, a killed run resumes to the same weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from mediround.data.formats import load_dialogues
from mediround.errors import RecipeError
from mediround.launch import STOP_FILE_ENV
from mediround.metrics import average_ranks, spearman
from mediround.model import build_model, load_sample, preset
from mediround.model.checkpoint import load_checkpoint, save_checkpoint
from mediround.training.engine import MODEL_FOLDER
from mediround.training.events import Event, StepLogged
from mediround.training.jcm_data import (
    ROLLOUT,
    TEACHER_FORCED,
    FeatureCache,
    collect_features,
    decode_at_supervision_size,
    raw_iou,
    rollout_sources,
)
from mediround.training.logging import read_events
from mediround.training.recipe import SHIPPED_RECIPES, JCMSection, load_jcm_recipe
from mediround.training.stage2 import jcm_losses, run_jcm_training
from mediround.typed import load_typed
from mediround_cli.main import cli

STEPS = 4


@pytest.fixture(scope="module")
def frozen_model(tmp_path_factory) -> Path:
    """A tiny MediRound checkpoint (random weights: its masks are poor, so their IoUs spread)."""
    torch.manual_seed(0)
    return save_checkpoint(build_model(preset("tiny")), tmp_path_factory.mktemp("frozen") / "ckpt")


@pytest.fixture(scope="module")
def jcm_recipe(tmp_path_factory, synth_data, frozen_model):
    """``jcm_recipe(name, **sections)``: a stage-2 recipe YAML on the synthetic data, one thread."""
    folder = tmp_path_factory.mktemp("jcm-recipes")

    def write(name: str, **sections) -> Path:
        recipe = {
            "output": str(folder / f"out-{name}"),
            "model": str(frozen_model),
            "data": {"train": str(synth_data / "train.jsonl"), "val": str(synth_data / "val.jsonl")},
            "train": {"batch_size": 4, "max_steps": STEPS, "threads": 1, "lr": 1.0e-3, "warmup_steps": 1},
            "validation": {"every": 0, "max_dialogues": 1},
            "checkpoint": {"every": 2, "keep_last": 3},
            "log": {"every": 1},
        }
        for section, values in sections.items():
            recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="module")
def trained(jcm_recipe):
    recipe = load_jcm_recipe(jcm_recipe("teacher-forced"))
    return recipe, run_jcm_training(recipe, cpu=True)


def test_only_jcm_changes_and_the_new_checkpoint_says_jcm_is_trained(trained, frozen_model):
    recipe, result = trained
    assert result.stopped == "finished" and result.step == STEPS
    assert result.model == Path(recipe.output) / MODEL_FOLDER
    before, after = load_checkpoint(frozen_model), load_checkpoint(result.model)
    assert not before.config.trainable.jcm and after.config.trainable.jcm
    after.config.trainable.jcm = False
    assert after.config == before.config
    old, new = before.state_dict(), after.state_dict()
    assert old.keys() == new.keys()
    changed = {name for name in old if not torch.equal(old[name], new[name])}
    assert changed and all(name.startswith("jcm.") for name in changed)
    assert changed == {name for name in old if name.startswith("jcm.")}
    saved = load_file(str(Path(recipe.output) / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))
    assert all(torch.equal(saved[name], new[f"jcm.{name}"]) for name in saved)


def test_judge_loss_falls_on_the_training_features(trained, frozen_model, synth_data):
    recipe, result = trained
    dialogues = load_dialogues(synth_data / "train.jsonl").dialogues[:8]
    before, after = load_checkpoint(frozen_model).eval(), load_checkpoint(result.model).eval()
    entries = collect_features(before, [load_sample(d) for d in dialogues], [TEACHER_FORCED])
    ious = torch.cat([e.iou[TEACHER_FORCED] for e in entries])
    assert ious.min() >= 0 and ious.max() <= 1 and ious.std() > 0
    first, last = jcm_losses(before, entries, TEACHER_FORCED), jcm_losses(after, entries, TEACHER_FORCED)
    assert last["judge"] < first["judge"]
    events = read_events(Path(recipe.output) / "train_log.jsonl")
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert steps[-1]["judge"] < steps[0]["judge"]
    validation = next(e for e in events if e["event"] == "validation")
    assert validation["jcm_masks"] == validation["off_masks"] > 0


def test_killed_run_resumes_to_the_same_weights(trained, jcm_recipe):
    recipe, _ = trained
    output = Path(recipe.output)
    killed = output.with_name("out-killed")
    shutil.copytree(output, killed)
    # What a kill after the step-2 checkpoint leaves: no later checkpoint, no model, a half-written folder.
    shutil.rmtree(killed / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(killed / MODEL_FOLDER)
    (killed / "checkpoints" / f".step-{STEPS - 1:08d}.tmp").mkdir()
    resumed_recipe = load_jcm_recipe(jcm_recipe("teacher-forced"), [f"output={killed}"])
    resumed = run_jcm_training(resumed_recipe, resume=True, cpu=True)
    assert resumed.step == STEPS and resumed.stopped == "finished"
    assert not (killed / "checkpoints" / f".step-{STEPS - 1:08d}.tmp").exists()
    name = f"step-{STEPS:08d}"
    original = load_file(str(output / "checkpoints" / name / "trainable.safetensors"))
    again = load_file(str(killed / "checkpoints" / name / "trainable.safetensors"))
    assert original.keys() == again.keys()
    assert all(torch.equal(original[key], again[key]) for key in original)
    starts = [e for e in read_events(killed / "train_log.jsonl") if e["event"] == "start"]
    assert starts[-1]["resumed_from"].endswith("step-00000002")


def test_the_stop_file_stops_stage_2_with_a_checkpoint(jcm_recipe, monkeypatch, tmp_path):
    """What the launching process's first Ctrl-C does to every worker of a multi-process train-jcm."""
    stop_file = tmp_path / "stop-requested"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop_file))

    def request_stop(event: Event) -> None:
        if isinstance(event, StepLogged) and event.step == 1:
            stop_file.touch()

    recipe = load_jcm_recipe(jcm_recipe("stop-file"), ["checkpoint.every=0"])
    result = run_jcm_training(recipe, cpu=True, on_event=request_stop)
    assert result.stopped == "interrupted" and result.step == 1 and result.model is None
    assert result.checkpoint == Path(recipe.output) / "checkpoints" / "step-00000001"
    assert not (Path(recipe.output) / MODEL_FOLDER).exists()


def test_rollout_features_follow_the_models_own_masks(frozen_model, synth_data):
    model = load_checkpoint(frozen_model).eval()
    dialogues = load_dialogues(synth_data / "train.jsonl").dialogues
    dialogue = next(d for d in dialogues if any(r.ref is not None for r in d.rounds))
    entry = collect_features(model, [load_sample(dialogue)], [TEACHER_FORCED, ROLLOUT])[0]
    first_ref = next(i for i, r in enumerate(dialogue.rounds) if r.ref is not None)
    forced, rolled = entry.features[TEACHER_FORCED], entry.features[ROLLOUT]
    assert forced.shape == rolled.shape == (len(dialogue.rounds), 256)
    # Before the first referring round both read the same tokens; from it on the crop/box come from
    # the ground truth in one and from the model's own (poor) mask in the other.
    torch.testing.assert_close(rolled[:first_ref], forced[:first_ref], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(rolled[first_ref], forced[first_ref], rtol=1e-4, atol=1e-5)


def test_rollout_cli_run_mixes_sources(jcm_recipe):
    path = jcm_recipe("rollout", train={"max_steps": 1}, validation={"max_dialogues": 1},
                      checkpoint={"every": 0})
    result = CliRunner().invoke(cli, ["train-jcm", str(path), "--cpu", "--rollout", "jcm.rollout_fraction=0.5"])
    assert result.exit_code == 0, result.output
    output = Path(load_jcm_recipe(path).output)
    start = next(e for e in read_events(output / "train_log.jsonl") if e["event"] == "start")
    assert start["rollout"] is True and start["rollout_fraction"] == 0.5
    run = json.loads((output / "run.json").read_text())
    assert run["recipe"]["jcm"]["rollout"] is True
    assert json.loads((output / MODEL_FOLDER / "config.json").read_text())["trainable"]["jcm"] is True
    assert "judge Spearman" in result.output


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["jcm.rollout_fraction=2"], "key 'jcm.rollout_fraction': must be in [0, 1], got 2.0"),
        (["jcm.betta=0.5"], "unknown key 'jcm.betta' (did you mean 'jcm.beta'?)"),
        (["--model", "/nowhere/ckpt"], "key 'model': not a MediRound checkpoint folder"),
        (["train.batch_size=two"], "key 'train.batch_size': expected an integer, got 'two'"),
        (["train.betas=[0.9, 1.5]"], "key 'train.betas': each beta must be in [0, 1), got [0.9, 1.5]"),
        (["train.clip_grad_norm=0"], "key 'train.clip_grad_norm': must be positive (or null for no clipping)"),
        (["train.weight_decay=-1"], "key 'train.weight_decay': must not be negative, got -1.0"),
        (["jcm.feature_mode=train"], "key 'jcm.feature_mode': 'train' draws dropout afresh for every batch"),
    ],
)
def test_bad_recipe_is_one_line_before_launch(jcm_recipe, arguments, expected):
    path = jcm_recipe("bad")
    result = CliRunner().invoke(cli, ["train-jcm", str(path), "--cpu", "--num-processes", "2", *arguments])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert expected in lines[0]
    assert "launching" not in result.output


def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([10, 20, 30], [3, 2, 1]) == pytest.approx(-1.0)
    np.testing.assert_allclose(average_ranks(np.array([5.0, 1.0, 5.0])), [1.5, 0.0, 1.5])
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / np.sqrt(3.0))
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_rollout_sources_are_a_fixed_draw_per_epoch():
    indices = list(range(200))
    assert rollout_sources(indices, 0, 0, rollout=False, fraction=1.0) == [TEACHER_FORCED] * 200
    assert rollout_sources(indices, 0, 0, rollout=True, fraction=1.0) == [ROLLOUT] * 200
    mixed = rollout_sources(indices, 0, 0, rollout=True, fraction=0.5)
    assert mixed == rollout_sources(indices, 0, 0, rollout=True, fraction=0.5)
    assert mixed != rollout_sources(indices, 0, 1, rollout=True, fraction=0.5)
    assert 70 < mixed.count(ROLLOUT) < 130


def test_shipped_recipes_parse(synth_data, frozen_model):
    tiny = load_jcm_recipe(SHIPPED_RECIPES / "jcm-tiny-cpu.yaml", [
        f"model={frozen_model}", f"data.train={synth_data / 'train.jsonl'}", f"data.val={synth_data / 'val.jsonl'}"])
    assert tiny.jcm.beta == 0.6 and tiny.jcm.cache_features
    assert (tiny.jcm.judge_weight, tiny.jcm.refine_bce_weight, tiny.jcm.refine_dice_weight) == (2.0, 2.0, 0.5)
    paper = yaml.safe_load((SHIPPED_RECIPES / "jcm-7b-4gpu.yaml").read_text(encoding="utf-8"))
    assert paper["train"]["lr"] == 3.0e-4 and paper["train"]["batch_size"] == 15
    assert tiny.jcm.feature_mode == "eval"
    assert load_typed(JCMSection, paper["jcm"], "jcm-7b-4gpu.yaml").feature_mode == "train"  # the authors' stage 2
    with pytest.raises(RecipeError, match="key 'model': missing"):
        load_jcm_recipe(SHIPPED_RECIPES / "jcm-7b-4gpu.yaml")


def test_original_iou_is_the_authors_judge_target():
    """``heads.judge_iou: original`` (the 7B preset): intersection / (union + 1e-6) at the original size,
    so two empty masks score 0 (``resized`` scores them 1)."""
    import numpy as np

    from mediround.model.frame import ImageFrame
    from mediround.training.jcm_data import original_iou

    frame = ImageFrame((4, 8), 8)  # the resized frame is the original one: no resampling in between
    truth = np.zeros((2, 4, 8), dtype=bool)
    truth[0, :2, :4] = True  # 8 pixels
    logits = torch.full((2, 4, 8), -1.0)
    logits[0, :2, :2] = 1.0  # 4 of them predicted
    iou = original_iou(logits, frame, list(truth))
    torch.testing.assert_close(iou, torch.tensor([4 / (8 + 1e-6), 0.0]))


def test_collect_features_teaches_the_original_size_iou_when_the_config_says_so(frozen_model, synth_data):
    from mediround.training.jcm_data import decode_at_supervision_size, original_iou, raw_iou

    model = load_checkpoint(frozen_model).eval()
    sample = load_sample(load_dialogues(synth_data / "train.jsonl").dialogues[0])
    masks = [mask for mask in sample.masks if mask is not None]
    resized = collect_features(model, [sample], [TEACHER_FORCED])[0]
    model.config.heads.judge_iou = "original"
    entry = collect_features(model, [sample], [TEACHER_FORCED])[0]
    logits = decode_at_supervision_size(model, entry, entry.features[TEACHER_FORCED])
    torch.testing.assert_close(entry.iou[TEACHER_FORCED], original_iou(logits, entry.frame, masks))
    torch.testing.assert_close(resized.iou[TEACHER_FORCED], raw_iou(logits, entry.targets))


def test_train_mode_features_draw_lora_dropout_and_eval_mode_features_do_not(frozen_model, synth_data):
    """``jcm.feature_mode: train`` (the authors' stage 2 runs its frozen model in ``train()``): LoRA dropout
    is on in the forward that gives the judge its inputs, so two collections of the same dialogue differ
    from each other and from the eval-mode features, and each IoU target is that of its own draw's raw mask.
    Eval mode gives the same features every time; with dropout 0 (the parity harness) both modes agree."""
    model = load_checkpoint(frozen_model).eval()
    assert model.config.lora.dropout == 0.05
    with torch.no_grad():  # a fresh adapter's B is zero, which would hide dropout on the adapter's input
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    sample = load_sample(load_dialogues(synth_data / "train.jsonl").dialogues[0])

    def collect(train_mode: bool):
        return collect_features(model, [sample], [TEACHER_FORCED], train_mode=train_mode)[0]

    eval_a, eval_b, train_a, train_b = collect(False), collect(False), collect(True), collect(True)
    assert not model.training  # the mode is restored after the forward
    assert torch.equal(eval_a.features[TEACHER_FORCED], eval_b.features[TEACHER_FORCED])
    assert torch.equal(eval_a.iou[TEACHER_FORCED], eval_b.iou[TEACHER_FORCED])
    for drawn in (train_a, train_b):
        shift = (drawn.features[TEACHER_FORCED] - eval_a.features[TEACHER_FORCED]).abs().max()
        assert shift > 1e-4, shift
        logits = decode_at_supervision_size(model, drawn, drawn.features[TEACHER_FORCED])
        torch.testing.assert_close(drawn.iou[TEACHER_FORCED], raw_iou(logits, drawn.targets))
    assert not torch.allclose(train_a.features[TEACHER_FORCED], train_b.features[TEACHER_FORCED])

    # Stage 2's cache draws afresh when it keeps nothing (the combination the recipe allows).
    cache = FeatureCache(model, lambda index: sample, keep=False, train_mode=True)
    first, second = (cache.get([0], [TEACHER_FORCED])[0].features[TEACHER_FORCED] for _ in range(2))
    assert not torch.allclose(first, second)

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.testing.assert_close(collect(True).features[TEACHER_FORCED], eval_a.features[TEACHER_FORCED],
                               rtol=0, atol=0)
