"""The paper's configuration (Mistral-7B + CLIP ViT-L/14-336 LLaVA, SAM ViT-B) built on the meta device."""

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    PreTrainedTokenizerFast,
)

from mediround.model import build_model, preset, trainable_parameters
from mediround.model.memory import GIB, estimate_training_memory


def llava_med_config() -> LlavaConfig:
    """LLaVA-Med v1.5 Mistral-7B's layout (as in its converted HF config.json)."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=31999, image_seq_length=576)


def stand_in_tokenizer() -> PreTrainedTokenizerFast:
    """A 32,000-entry word-level tokenizer: the real one is not on this machine; only the size matters."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(32000)}
    for i, token in enumerate(("<unk>", "<s>", "</s>")):
        vocab[token] = i
    vocab["<image>"] = 31999
    vocab = {k: v for k, v in vocab.items() if k not in ("w0", "w1", "w2", "w31999")}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_real_configuration_parameter_counts_on_meta(tmp_path):
    llava_med_config().save_pretrained(tmp_path)
    stand_in_tokenizer().save_pretrained(tmp_path)
    with torch.device("meta"):
        plain = LlavaForConditionalGeneration(llava_med_config())
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
