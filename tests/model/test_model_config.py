import dataclasses
import json

import pytest

from mediround.errors import RecipeError
from mediround.model.config import MediRoundConfig, preset


def test_json_round_trip_keeps_every_field(tmp_path):
    config = preset("tiny")
    config.lora.r = 4
    config.trainable.clip_tower = True
    config.mllm.crop_tokens = 5
    config.to_json(tmp_path / "config.json")
    again = MediRoundConfig.from_json(tmp_path / "config.json")
    assert again == config
    assert again.segmenter.image_size == 128


def test_unknown_key_is_named():
    data = preset("tiny").to_dict()
    data["trainable"]["sam_encoder_typo"] = True
    with pytest.raises(RecipeError, match="trainable.*sam_encoder_typo"):
        MediRoundConfig.from_dict(data)


def test_bad_choice_and_crop_tokens_are_refused():
    data = preset("tiny").to_dict()
    data["precision"] = "fp8"
    with pytest.raises(RecipeError, match="precision"):
        MediRoundConfig.from_dict(data)
    data = preset("tiny").to_dict()
    data["mllm"]["crop_tokens"] = 3
    with pytest.raises(RecipeError, match="crop_tokens"):
        MediRoundConfig.from_dict(data)


def test_7b_preset_defaults_follow_the_authors():
    config = preset("llava-med-7b", mllm_path="/w/llava", sam_checkpoint="/w/medsam.pth")
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 16, 0.05)
    assert (config.loss.ce, config.loss.bce, config.loss.dice) == (1.0, 2.0, 0.5)
    assert config.segmenter.variant == "vit_b" and config.segmenter.image_size == 1024
    assert not config.trainable.sam_image_encoder and config.trainable.sam_mask_decoder
    assert config.precision == "bf16" and config.gradient_checkpointing


@pytest.mark.parametrize(("change", "message"), [
    ({"precision": "fp8"}, "key 'precision': 'fp8' is not one of 'fp32', 'bf16' or 'fp16'"),
    ({"heads": {"reference_min_fragment": -1}}, "key 'heads.reference_min_fragment': must not be negative, got -1.0"),
    ({"heads": {"reference_min_fragment": 1}}, "key 'heads.reference_min_fragment': must be below 1, got 1.0"),
    ({"mllm": {"crop_tokens": 3}}, "key 'mllm.crop_tokens': must be 1 (CLS) or 1 + g*g (CLS plus a g x g grid"),
    ({"trainable": {"language_model": "full", "token_embeddings": "rows"}},
     "key 'trainable.token_embeddings': 'rows' needs language_model 'lora'"),
])
def test_a_bad_value_is_one_line_naming_the_file_and_key_whether_loaded_or_set_in_code(tmp_path, change, message):
    data = preset("tiny").to_dict()
    for section, value in change.items():
        data[section] = {**data[section], **value} if isinstance(value, dict) else value
    (tmp_path / "config.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RecipeError) as loaded:
        MediRoundConfig.from_json(tmp_path / "config.json")
    assert "\n" not in str(loaded.value) and str(loaded.value).startswith(f"{tmp_path / 'config.json'}: {message}")
    config = preset("tiny")
    for section, value in change.items():
        if isinstance(value, dict):
            setattr(config, section, dataclasses.replace(getattr(config, section), **value))
        else:
            setattr(config, section, value)
    with pytest.raises(RecipeError) as in_code:
        config.validate()
    assert "\n" not in str(in_code.value) and str(in_code.value).startswith(f"model config: {message}")
