"""The paper's configuration (Mistral-7B + CLIP ViT-L/14-336 LLaVA, SAM ViT-B) built on the meta device."""

import dataclasses

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from mediround.model import build_model, preset, trainable_parameters
from mediround.model.memory import GIB, estimate_training_memory, known_sizes, model_sizes
from mediround.model.stand_in import llava_med_v15_config, write_stand_in_folder


def test_real_configuration_parameter_counts_on_meta(tmp_path):
    write_stand_in_folder(tmp_path)
    with torch.device("meta"):
        plain = LlavaForConditionalGeneration(llava_med_v15_config())
    assert sum(p.numel() for p in plain.parameters()) == 7_566_219_264

    config = preset("llava-med-7b", mllm_path=str(tmp_path), sam_checkpoint=None)
    model = build_model(config, device="meta")
    assert model.base_vocab == 32000 and len(model.tokenizer) == 32003
    assert sum(p.numel() for p in model.sam.parameters()) == 93_735_472
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 3_407_872
    assert not any("vision_tower" in n for n, _ in model.named_parameters() if "lora_" in n)
    counts = trainable_parameters(model)
    new_rows = 2 * 3 * 4096
    embeddings = 2 * 32003 * 4096  # trained copies of embed_tokens and lm_head (modules_to_save)
    assert counts["trainable.mllm"] == lora + embeddings
    llava_total = sum(p.numel() for p in model.llava.parameters())
    assert llava_total == 7_566_219_264 + new_rows + embeddings + lora

    estimate = estimate_training_memory(config, model)
    assert estimate.trainable == counts["trainable"]
    print(f"trainable parameters: {counts}")
    print(f"training memory per GPU, batch 1, 1024 tokens, bf16, gradient checkpointing: {estimate.as_gib()} GiB")
    assert 14 * GIB < estimate.weights < 17 * GIB


@pytest.mark.parametrize("token_embeddings", ["full", "rows"])
def test_known_sizes_are_the_sizes_of_the_model_built_on_meta(tmp_path, token_embeddings):
    write_stand_in_folder(tmp_path)
    config = preset("llava-med-7b", mllm_path=str(tmp_path), sam_checkpoint=None)
    config.trainable.token_embeddings = token_embeddings
    built = model_sizes(build_model(config, device="meta"))
    assert known_sizes("llava-med-7b", config) == built
    assert built.trainable == {"full": 287_352_800, "rows": 25_208_800}[token_embeddings]


def test_no_known_sizes_for_a_config_that_changes_a_count(tmp_path):
    config = preset("llava-med-7b", mllm_path=str(tmp_path), sam_checkpoint=None)
    assert known_sizes("llava-med-7b", config) is not None
    assert known_sizes("tiny", config) is None
    for change in ({"lora": dataclasses.replace(config.lora, r=16)},
                   {"trainable": dataclasses.replace(config.trainable, sam_image_encoder=True)},
                   {"segmenter": dataclasses.replace(config.segmenter, variant="vit_l")}):
        assert known_sizes("llava-med-7b", dataclasses.replace(config, **change)) is None, change
