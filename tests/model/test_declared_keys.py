"""What the tool derives from the declarations on the config (``config.Setting`` on each key, ``config.Part``
on each trainability switch) holds for the model actually built: every key that changes a parameter count
is declared to, so ``known_sizes`` never gives sizes the built model does not have, and never refuses a
config whose counts are the preset's; every part names a module, and the checkpoint's heads file holds them."""

from __future__ import annotations

import dataclasses
import operator
import shutil
import typing
from pathlib import Path

import pytest
import torch

from mediround.model import build_model, preset
from mediround.model.build import apply_trainability, part_module
from mediround.model.checkpoint import HEAD_PARTS, head_state
from mediround.model.config import FINE_TUNE_KEYS, PARTS, MediRoundConfig, Trainability, key_settings
from mediround.model.memory import known_sizes, model_sizes
from mediround.model.stand_in import write_stand_in_folder

ENTITIES = ["kidney", "liver"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> tuple[Path, Path]:
    """Two copies of the 7B stand-in LLaVA folder (config and tokenizer only): a moved base is the same model."""
    folder = tmp_path_factory.mktemp("llava-med")
    write_stand_in_folder(folder)
    moved = folder.parent / "moved-llava-med"
    shutil.copytree(folder, moved)
    return folder, moved


def seven_b(folder: Path) -> MediRoundConfig:
    return preset("llava-med-7b", mllm_path=str(folder), sam_checkpoint=None)


def tiny_with_entities() -> MediRoundConfig:
    """The tiny preset with an entity head, so that every trainable part exists."""
    config = preset("tiny")
    config.heads.entity_names = list(ENTITIES)
    return config


def flipped(key: str, value: typing.Any, hint: typing.Any, moved: Path) -> typing.Any:
    """Another valid value of ``key``."""
    special = {
        "mllm.source": str(moved), "mllm.crop_tokens": 5, "mllm.crop_size": 224,
        # The tiny tokenizer's corpus has under 1,000 tokens to learn: a larger vocab_size gives the same one.
        "mllm.tiny_text.vocab_size": 500,
        "segmenter.checkpoint": "/elsewhere/medsam.pth", "lora.target_modules": r".*language_model.*\.q_proj",
    }
    if key in special:
        return special[key]
    if typing.get_origin(hint) is typing.Literal:
        return next(choice for choice in typing.get_args(hint) if choice != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, int):
        return value // 2 if abs(value) > 1 else value + 1
    if isinstance(value, list):
        return [*value, "spleen"]
    if isinstance(value, str):
        return value + " Be brief."
    raise AssertionError(f"{key}: no other value known for {value!r}; add one to flipped()")


def leaf_hints(section: type = MediRoundConfig, prefix: str = "") -> dict[str, typing.Any]:
    """Each leaf key's type, ``Annotated`` marks removed."""
    hints = {}
    for name, hint in typing.get_type_hints(section).items():
        if dataclasses.is_dataclass(hint):
            hints.update(leaf_hints(hint, f"{prefix}{name}."))
        else:
            hints[f"{prefix}{name}"] = hint
    return hints


def with_value(config: MediRoundConfig, key: str, value: typing.Any) -> MediRoundConfig:
    changed = MediRoundConfig.from_dict(config.to_dict())
    *sections, name = key.split(".")
    setattr(operator.attrgetter(".".join(sections))(changed) if sections else changed, name, value)
    changed.validate()
    return changed


def sizes_on_meta(config: MediRoundConfig):
    return model_sizes(build_model(config, device="meta"))


@pytest.mark.parametrize("change", [{"reference_tokens": "crop"}, {"reference_tokens": "box"},
                                    {"reference_min_fragment": 0.1}])
def test_known_sizes_of_a_7b_config_with_a_reference_setting_are_the_built_sizes(stand_ins, change):
    config = seven_b(stand_ins[0])
    config.heads = dataclasses.replace(config.heads, **change)
    sizes = known_sizes("llava-med-7b", config)
    assert sizes is not None
    assert sizes == sizes_on_meta(config)


@pytest.mark.slow
def test_every_key_that_changes_a_parameter_count_is_declared_so(stand_ins):
    """Each key of the config flipped in turn, on the tiny preset with an entity head and on the 7B preset: a
    key declared count-neutral changes no count of either, and ``known_sizes`` of the 7B config is the
    built model's; a key declared to change counts changes one of them, and ``known_sizes`` refuses it
    (but ``trainable.token_embeddings``, whose two trained splits it knows). The 7B model (0.5 s on meta)
    is built only where the tiny one cannot decide."""
    folder, moved = stand_ins
    tiny, paper = tiny_with_entities(), seven_b(folder)
    tiny_sizes, paper_sizes = sizes_on_meta(tiny), sizes_on_meta(paper)
    hints = leaf_hints()
    settings = key_settings()
    assert set(settings) == set(hints)
    for key, setting in settings.items():
        other = flipped(key, operator.attrgetter(key)(paper), hints[key], moved)
        changed_paper = with_value(paper, key, other)
        known = known_sizes("llava-med-7b", changed_paper)
        modelled = key == "trainable.token_embeddings"
        if setting.counts and not modelled:
            assert known is None, f"{key}: known_sizes gave sizes for a config that changes a count"
        # A folder in place of the tiny LLaVA is another model, not the same one moved.
        changes_tiny = key != "mllm.source" and sizes_on_meta(
            with_value(tiny, key, flipped(key, operator.attrgetter(key)(tiny), hints[key], moved))) != tiny_sizes
        if changes_tiny and setting.counts and not modelled:
            continue
        built = sizes_on_meta(changed_paper)
        if not setting.counts or modelled:
            assert known == built, f"{key}: known_sizes differs from the model built on meta"
        changes = changes_tiny or built != paper_sizes
        assert changes == setting.counts, (f"{key} is declared to change a parameter count but changes none "
                                           "(declare it BEHAVIOUR or RUNTIME)" if setting.counts else
                                           f"{key} changes a parameter count but is declared not to")


def test_fine_tune_keys_are_where_weights_lie_loss_weights_and_targets_and_how_compute_runs():
    assert set(FINE_TUNE_KEYS) == {"mllm.source", "segmenter.checkpoint", "lora.dropout", "precision",
                                   "gradient_checkpointing", "heads.judge_iou", "heads.mask_loss_frame",
                                   "heads.dice_smoothing",
                                   *(f"loss.{f.name}" for f in dataclasses.fields(MediRoundConfig().loss))}


def test_every_trainability_switch_but_the_language_models_names_a_part_of_the_model():
    switches = {name for name, hint in typing.get_type_hints(Trainability).items() if hint is bool}
    assert set(PARTS) == switches
    model = build_model(tiny_with_entities(), device="meta")
    for switch, part in PARTS.items():
        module = part_module(model, part)
        assert isinstance(module, torch.nn.Module), switch
        if part.heads_file:  # its state-dict keys are named by its path
            assert model.get_submodule(part.module) is module, switch


def test_each_switch_trains_its_part_and_the_heads_file_holds_the_head_parts():
    model = build_model(tiny_with_entities(), device="meta")
    names = {name for name, _ in model.named_parameters()}
    for switch, part in PARTS.items():
        # A part's own parameters: those of a later part inside it (the IoU head in the decoder) follow theirs.
        inner = {id(p) for later in PARTS.values() if later.module.startswith(part.module + ".")
                 for p in part_module(model, later).parameters()}
        own = [p for p in part_module(model, part).parameters() if id(p) not in inner]
        for flag in (True, False):
            setattr(model.config.trainable, switch, flag)
            apply_trainability(model)
            assert all(p.requires_grad == flag for p in own), (switch, flag)
        setattr(model.config.trainable, switch, getattr(Trainability(), switch))
    apply_trainability(model)
    saved = set(head_state(model))
    for part in HEAD_PARTS:
        assert any(key.startswith(part.module + ".") for key in saved), part
    assert saved <= names
    # The IoU head lies inside the mask decoder and is off by default: trained decoder, frozen IoU head.
    decoder, iou = model.sam.mask_decoder, model.sam.mask_decoder.iou_prediction_head
    assert all(p.requires_grad for n, p in decoder.named_parameters() if not n.startswith("iou_prediction_head."))
    assert not any(p.requires_grad for p in iou.parameters())
