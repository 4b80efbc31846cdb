"""The entity head: a CE on every round's [SEG] state that names the target (``loss.entity``)."""

from __future__ import annotations

import math

import pytest
import torch
from model_fixtures import sample

from mediround.data.dialogue import Dialogue, Round
from mediround.errors import RecipeError
from mediround.model import build_model, preset
from mediround.model.checkpoint import load_checkpoint, save_checkpoint
from mediround.training.stage1 import with_entity_names

NAMES = ["heart", "left kidney", "liver"]


def entity_model(weights=(0.0, 0.0, 0.0, 1.0)):
    config = preset("tiny")
    config.heads.entity_names = list(NAMES)
    config.loss.ce, config.loss.bce, config.loss.dice, config.loss.entity = weights
    return build_model(config)


def named_sample(entities):
    item = sample(len(entities), seed=3)
    for round_, entity in zip(item.dialogue.rounds, entities):
        round_.entity = entity
    return item


def test_a_zero_head_gives_the_uniform_cross_entropy_and_unknown_entities_are_ignored():
    torch.set_num_threads(1)
    model = entity_model()
    with torch.no_grad():
        model.entity_head.weight.zero_()
        model.entity_head.bias.zero_()
    batch = model.processor.collate([named_sample(["liver", "not-a-class", "heart"])])
    assert batch.entity_labels[0].tolist() == [2, -100, 0]
    output = model(batch)
    assert math.isclose(float(output.losses["entity"].detach()), math.log(3), rel_tol=1e-6)
    assert math.isclose(float(output.loss.detach()), math.log(3), rel_tol=1e-6)


def test_the_entity_loss_alone_trains_the_language_model_and_the_head():
    torch.set_num_threads(1)
    model = entity_model()
    batch = model.processor.collate([named_sample(["liver", "heart"])])
    model(batch).loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and float(g.abs().sum()) > 0 for g in lora_grads)
    assert float(model.entity_head.weight.grad.abs().sum()) > 0
    decoder_grad = model.sam.mask_decoder.output_upscaling[0].weight.grad
    assert decoder_grad is None or float(decoder_grad.abs().sum()) == 0.0


def test_entity_head_round_trips_through_a_checkpoint(tmp_path):
    torch.set_num_threads(1)
    model = entity_model()
    with torch.no_grad():
        model.entity_head.weight.normal_()
    folder = save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(folder)
    assert loaded.config.heads.entity_names == NAMES
    assert torch.equal(loaded.entity_head.weight, model.entity_head.weight)


def test_without_names_there_is_no_head_and_no_entity_loss():
    model = build_model(preset("tiny"))
    assert model.entity_head is None
    output = model(model.processor.collate([named_sample(["liver", "heart"])]))
    assert float(output.losses["entity"]) == 0.0


def test_names_are_filled_sorted_from_the_training_rounds_only_when_the_loss_is_on():
    dialogues = [Dialogue(id="a", image="x.png", rounds=[Round(query="q", answer="[SEG]", entity="spleen"),
                                                          Round(query="q", answer="[SEG]", entity="heart")])]
    config = preset("tiny")
    assert with_entity_names(config, dialogues) is config
    config.loss.entity = 0.5
    filled = with_entity_names(config, dialogues)
    assert filled.heads.entity_names == ["heart", "spleen"] and config.heads.entity_names == []
    without = [Dialogue(id="b", image="x.png", rounds=[Round(query="q", answer="[SEG]")])]
    with pytest.raises(RecipeError, match="model.loss.entity"):
        with_entity_names(config, without)
