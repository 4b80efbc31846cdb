"""``checkpoint.keep_best``: ``checkpoints/best`` is the model of the best validation (the maximum the
training log records), survives ``--resume`` without being replaced by a worse one, loads as a
``--model`` folder, and stage 2 keeps its own. ``train.loss_averaging``: the two ways of making one loss
of a step's micro-batches give the gradients of their formulas."""

from __future__ import annotations

import hashlib
import itertools
import json
import types
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from mediround.data.formats import load_dialogues
from mediround.errors import RecipeError
from mediround.model import build_model, load_sample, preset
from mediround.model.checkpoint import load_checkpoint
from mediround.model.losses import LOSS_KEYS
from mediround.training.checkpointing import BEST, BEST_RECORD, read_best
from mediround.training.engine import MicroBatch, TrainingEngine
from mediround.training.events import BestKept
from mediround.training.logging import read_events
from mediround.training.recipe import SHIPPED_RECIPES, load_jcm_recipe, load_recipe
from mediround.training.stage1 import TeacherForcing, _loss_counts, run_training
from mediround.training.stage2 import run_jcm_training

STEPS = 3
SECTIONS = {
    # A small learning rate keeps the random masks from collapsing to empty, so the validations differ.
    "train": {"max_steps": STEPS, "lr": 1.0e-5},
    "validation": {"every": 1, "at_start": True, "batch_size": 2},
    "checkpoint": {"every": 1, "keep_last": STEPS, "keep_best": "giou"},
}


def chained_gious(output: Path) -> dict[int, float]:
    return {e["step"]: e["chained_giou"] for e in read_events(output / "train_log.jsonl") if e["event"] == "validation"}


@pytest.fixture(scope="module")
def stage1(write_module_recipe, synth_data):
    path = write_module_recipe("best", data={"train": str(synth_data / "train.jsonl"),
                                             "val": str(synth_data / "val.jsonl")}, **SECTIONS)
    recipe = load_recipe(path)
    result = run_training(recipe, cpu=True)
    assert result.step == STEPS
    return path, Path(recipe.output)


def test_best_is_the_highest_validation_of_the_log_and_equals_that_steps_model(stage1):
    _, output = stage1
    gious = chained_gious(output)
    assert sorted(gious) == list(range(STEPS + 1))  # at_start's step 0 is scored, not a candidate
    best_value = max(gious[step] for step in range(1, STEPS + 1))
    best_step = min(step for step in range(1, STEPS + 1) if gious[step] == best_value)
    record = read_best(output / "checkpoints")
    assert record["step"] == best_step and record["value"] == best_value
    assert (record["metric"], record["best_of"], record["rounds"]) == ("giou", "chained", "all")
    assert record["validation_dialogues"] == 2
    kept = [e for e in read_events(output / "train_log.jsonl") if e["event"] == "best"]
    assert kept[-1]["step"] == best_step and all(a["value"] < b["value"] for a, b in itertools.pairwise(kept))
    best = output / "checkpoints" / BEST
    loaded = load_checkpoint(best).state_dict()
    same_step = load_checkpoint(output / "checkpoints" / f"step-{best_step:08d}" / "model").state_dict()
    assert loaded.keys() == same_step.keys()
    assert all(torch.equal(loaded[name], same_step[name]) for name in loaded)


def test_a_resumed_run_keeps_a_better_best(stage1):
    path, output = stage1
    best = output / "checkpoints" / BEST
    # Stand in for a best no later validation can reach (gIoU is at most 1): the manifest is re-signed.
    record = read_best(output / "checkpoints") | {"value": 2.0}
    (best / BEST_RECORD).write_text(json.dumps(record), encoding="utf-8")
    manifest = json.loads((best / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"][BEST_RECORD] = hashlib.sha256((best / BEST_RECORD).read_bytes()).hexdigest()
    (best / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    weights_before = (best / "heads.safetensors").read_bytes()

    resumed = run_training(load_recipe(path, [f"train.max_steps={STEPS + 1}"]), resume=True, cpu=True)
    assert resumed.step == STEPS + 1 and STEPS + 1 in chained_gious(output)
    assert read_best(output / "checkpoints") == record
    assert (best / "heads.safetensors").read_bytes() == weights_before
    load_checkpoint(best)


def test_train_jcm_loads_the_best_checkpoint_and_keeps_its_own_best(stage1, tmp_path, synth_data):
    _, output = stage1
    recipe = {
        "output": str(tmp_path / "jcm"), "model": str(output / "checkpoints" / BEST),
        "data": {"train": str(synth_data / "train.jsonl"), "val": str(synth_data / "val.jsonl")},
        "train": {"batch_size": 4, "max_steps": 2, "threads": 1, "lr": 1.0e-3, "warmup_steps": 1},
        "validation": {"every": 1, "max_dialogues": 1},
        "checkpoint": {"every": 1, "keep_last": 2, "keep_best": "dice"},
        "log": {"every": 1},
    }
    path = tmp_path / "jcm.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = run_jcm_training(load_jcm_recipe(path), cpu=True)
    assert result.stopped == "finished"
    events = read_events(tmp_path / "jcm" / "train_log.jsonl")
    dices = {e["step"]: e["jcm_dice"] for e in events if e["event"] == "validation"}
    record = read_best(tmp_path / "jcm" / "checkpoints")
    assert record["value"] == max(dices.values()) and dices[record["step"]] == record["value"]
    best = load_checkpoint(tmp_path / "jcm" / "checkpoints" / BEST)
    assert best.config.trainable.jcm
    at_step = load_file(str(tmp_path / "jcm" / "checkpoints" / f"step-{record['step']:08d}" / "trainable.safetensors"))
    assert all(torch.equal(best.jcm.state_dict()[name], value) for name, value in at_step.items())
    # Saving the best left the JCM being trained as it was: the final model is the last step's.
    final = load_checkpoint(result.model)
    last = load_file(str(tmp_path / "jcm" / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    assert all(torch.equal(final.jcm.state_dict()[name], value) for name, value in last.items())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["checkpoint.keep_best=giou"], "key 'checkpoint.keep_best': needs validation dialogues"),
        (["checkpoint.keep_best=loss"], "key 'checkpoint.keep_best'"),
        (["checkpoint.keep_best=giou", "validation.chained=false", "data.val={val}"],
         "key 'checkpoint.best_of': 'chained' needs validation.chained: true"),
        (["train.loss_averaging=mean"], "key 'train.loss_averaging'"),
    ],
)
def test_bad_best_settings_are_one_line(write_recipe, synth_data, overrides, expected):
    overrides = [o.format(val=synth_data / "val.jsonl") for o in overrides]
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(")) as error:
        load_recipe(write_recipe(), overrides)
    assert "\n" not in str(error.value)


def _gradients(model, batches, averaging: str) -> dict[str, torch.Tensor]:
    """The gradients ``TeacherForcing.accumulate`` leaves after one step of ``batches`` on one process."""
    model.zero_grad(set_to_none=True)
    objective = TeacherForcing(types.SimpleNamespace(train=types.SimpleNamespace(loss_averaging=averaging),
                                                     model=model.config))
    engine = types.SimpleNamespace(accelerator=Accelerator(cpu=True), world_size=1, wrapped=model,
                                   accumulating=lambda last: nullcontext(), backward=lambda loss: loss.backward())
    objective.accumulate(engine, [MicroBatch(batch, None, []) for batch in batches])
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_loss_averaging_weighs_micro_batches_by_their_counts_or_equally(synth_data):
    config = preset("tiny")
    config.lora.dropout = 0.0
    torch.manual_seed(0)
    model = build_model(config).train()
    dialogues = load_dialogues(synth_data / "train.jsonl").dialogues
    # Two micro-batches of different sizes: their answer-token and mask counts differ.
    batches = [model.processor.collate([load_sample(d) for d in dialogues[:1]]),
               model.processor.collate([load_sample(d) for d in dialogues[1:4]])]
    counts = [_loss_counts(batch) for batch in batches]
    assert counts[0][LOSS_KEYS.index("ce")] != counts[1][LOSS_KEYS.index("ce")]
    totals = [sum(c[k] for c in counts) for k in range(len(LOSS_KEYS))]

    def expected(weigh) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = 0
        for batch, count in zip(batches, counts):
            losses = model(batch).losses
            loss = loss + sum(getattr(config.loss, key) * losses[key] * weigh(count[k], totals[k])
                              for k, key in enumerate(LOSS_KEYS))
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    weighted = _gradients(model, batches, "weighted")
    mean = _gradients(model, batches, "micro-batch-mean")
    for got, want in ((weighted, expected(lambda count, total: count / max(1.0, total))),
                      (mean, expected(lambda count, total: 0.5))):
        assert got.keys() == want.keys()
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(weighted[name], mean[name], rtol=1e-3, atol=1e-6) for name in weighted)


def test_only_a_strictly_higher_finite_score_up_to_best_until_step_replaces_the_best(tmp_path, write_recipe,
                                                                                     synth_data):
    """The selection over a score sequence that rises, falls, ties, turns NaN and rises past
    ``best_until_step`` (real runs this short only fall): each replacement writes the folder through the
    objective, with its record."""
    recipe = load_recipe(write_recipe(data={"val": str(synth_data / "val.jsonl")},
                                      checkpoint={"keep_best": "giou", "best_until_step": 6}))
    scores = dict(enumerate([0.3, 0.5, 0.4, 0.5, float("nan"), 0.6, 0.9], start=1))
    written = []

    class Scores:
        def validate(self, engine, step):
            return scores[step]

        def best_score(self, event, metric, best_of):
            return event

        def save_best(self, folder, write_extra):
            folder.mkdir()
            write_extra(folder)
            written.append(folder)

    engine = TrainingEngine.__new__(TrainingEngine)
    engine.recipe, engine.objective, engine.checkpoints = recipe, Scores(), tmp_path / "checkpoints"
    engine.accelerator = types.SimpleNamespace(wait_for_everyone=lambda: None)
    engine.is_main, engine.best, engine.val_count, emitted = True, None, 2, []
    engine.emit = emitted.append
    for step in scores:
        engine._validate(types.SimpleNamespace(validations=[]), step)
    kept = [(e.step, e.value) for e in emitted if isinstance(e, BestKept)]
    assert kept == [(1, 0.3), (2, 0.5), (6, 0.6)] and len(written) == 3
    assert read_best(tmp_path / "checkpoints") == engine.best
    assert (engine.best["step"], engine.best["value"], engine.best["best_until_step"]) == (6, 0.6, 6)


def test_7b_recipes_validate_the_whole_split_ten_times_and_keep_the_best_of_the_first_nine(tmp_path, synth_data):
    """The authors' cadence (their --epochs default 10, best of epochs 1-9 as ckpt_model) and averaging."""
    (tmp_path / "manifest.json").write_text("{}", encoding="utf-8")
    data = [f"data.train={synth_data / 'train.jsonl'}", f"data.val={synth_data / 'val.jsonl'}", "data.root=null"]
    recipes = [load_recipe(SHIPPED_RECIPES / name, require_data=False)
               for name in ("mediround-7b-4gpu.yaml", "mediround-7b-24gb.yaml")]
    recipes.append(load_jcm_recipe(SHIPPED_RECIPES / "jcm-7b-4gpu.yaml", [f"model={tmp_path}", *data]))
    for recipe in recipes:
        validation, checkpoint = recipe.validation, recipe.checkpoint
        assert validation.every * 10 == recipe.train.max_steps and not validation.at_start
        assert validation.max_dialogues is None
        assert (checkpoint.keep_best, checkpoint.best_of) == ("giou", "chained")
        assert checkpoint.best_until_step == 9 * validation.every
        assert recipe.train.loss_averaging == "micro-batch-mean"
    for name in ("tiny-cpu.yaml", "default-tiny.yaml"):
        tiny = load_recipe(SHIPPED_RECIPES / name, require_data=False)
        assert tiny.checkpoint.keep_best is None and tiny.train.loss_averaging == "weighted"
