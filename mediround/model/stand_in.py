"""A weightless stand-in for the converted LLaVA-Med v1.5 folder: its layout and a same-size tokenizer.

The real weights are not on every machine (and never on CI), but the ``llava-med-7b`` preset reads a
folder. ``write_stand_in_folder`` writes one with the real ``config.json`` layout (Mistral-7B + CLIP
ViT-L/14-336, vocabulary 32,000, bf16) and a word-level tokenizer of the same size, plus a weight file
holding no tensors. ``build_model(config, device="meta")`` reads only its config; ``build_model(config,
allow_partial=True)`` goes through the same ``from_pretrained`` path as the real folder and leaves every
weight at transformers' random initialisation (every key is listed as missing in the load report). A
model built this way answers shape, dtype and memory questions at full size; its outputs mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig, PreTrainedTokenizerFast

from mediround.model.tokenizer import IMAGE_TOKEN

VOCAB_SIZE = 32000
IMAGE_TOKEN_ID = 31999
LLAVA_MED_TEXT_LAYERS = 32


def llava_med_v15_config(text_layers: int = LLAVA_MED_TEXT_LAYERS) -> LlavaConfig:
    """LLaVA-Med v1.5 Mistral-7B's layout (as in its converted HF ``config.json``). ``text_layers`` below 32
    keeps every width, the vocabulary and the image tokens and drops decoder layers: the same shapes at a
    fraction of the compute."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = MistralConfig(vocab_size=VOCAB_SIZE, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=text_layers, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID, image_seq_length=576)


def stand_in_tokenizer() -> PreTrainedTokenizerFast:
    """A 32,000-entry word-level tokenizer with LLaVA-Med's special tokens: only its size and the ids of
    ``<unk>``, ``<s>``, ``</s>`` and ``<image>`` matter (every ordinary word reads as ``<unk>``)."""
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, IMAGE_TOKEN: IMAGE_TOKEN_ID}
    vocab = {f"w{i}": i for i in range(VOCAB_SIZE) if i not in specials.values()}
    vocab.update(specials)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_stand_in_folder(
    folder: str | Path, llava_config: LlavaConfig | None = None, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """An HF LLaVA folder without weights: ``config.json`` (``llava_config``, default the 7B layout, in
    ``dtype`` so ``from_pretrained`` builds in that dtype and never holds an fp32 copy), the stand-in
    tokenizer, and a ``model.safetensors`` with no tensors (``from_pretrained`` needs a weight file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llava_config = llava_config or llava_med_v15_config()
    llava_config.dtype = dtype
    llava_config.save_pretrained(folder)
    stand_in_tokenizer().save_pretrained(folder)
    save_file({}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
