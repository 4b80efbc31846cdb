"""The paper's configuration (Mistral-7B + CLIP ViT-L/14-336 LLaVA, SAM ViT-B) built on the meta device."""

import torch
from transformers import LlavaForConditionalGeneration

from mediround.model import build_model, preset, trainable_parameters
from mediround.model.memory import GIB, estimate_training_memory
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
