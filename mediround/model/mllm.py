"""The multimodal LLM: a stock ``LlavaForConditionalGeneration`` with MediRound's tokens, crop encoder and LoRA.

The language model is called directly on ``inputs_embeds`` that the caller has already filled with image
patch features, crop vectors and box vectors (``masked_scatter`` into the rows of their placeholder
tokens), so training and KV-cached inference share one path. peft injects LoRA layers in place, so the
LLaVA submodules below already carry the adapters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    PreTrainedTokenizerBase,
)

from mediround.errors import CheckpointError
from mediround.model.config import MediRoundConfig
from mediround.model.load_report import LoadReport, report_from_lists
from mediround.model.tokenizer import IMAGE_TOKEN, add_mediround_tokens, train_tiny_tokenizer
from mediround.model.weight_sources import missing_path_detail

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_llava_config(config: MediRoundConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """The tiny LLaVA layout: CLIP-style tower (112 px, patch 14 -> 64 tokens) + Mistral-style decoder."""
    vision, text = config.mllm.tiny_vision, config.mllm.tiny_text
    vision_config = CLIPVisionConfig(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        projection_dim=vision.hidden_size,
    )
    text_config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        max_position_embeddings=text.max_positions,
        sliding_window=None,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_layer=config.mllm.vision_feature_layer,
        vision_feature_select_strategy="default",
    )


def load_llava(
    config: MediRoundConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str | torch.device = "cpu",
    allow_partial: bool = False,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase, int, LoadReport | None]:
    """Build or load the base LLaVA and its tokenizer with MediRound's tokens added.

    Returns the model, the tokenizer, the vocabulary size before the tokens were added (rows at and
    above it are new and random) and the load report of a folder's weights (``CheckpointError`` on
    missing/unexpected/mis-shaped keys unless ``allow_partial``). On the meta device nothing is allocated
    or read but the config.
    """
    source = config.mllm.source
    if source == "tiny":
        tokenizer = tokenizer or train_tiny_tokenizer(config.mllm.tiny_text.vocab_size)
        add_mediround_tokens(tokenizer)
        llava_config = tiny_llava_config(config, tokenizer)
        with torch.device(device):
            torch.manual_seed(config.mllm.seed)
            model = LlavaForConditionalGeneration(llava_config)
        return model, tokenizer, len(tokenizer), None
    folder = Path(source)
    if not folder.exists():
        raise CheckpointError(missing_path_detail(source, "LLaVA folder"))
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not an HF-format LLaVA folder (no config.json)")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    report = None
    if torch.device(device).type == "meta":
        llava_config = LlavaConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(llava_config)
    else:
        model, info = LlavaForConditionalGeneration.from_pretrained(
            folder, output_loading_info=True, local_files_only=True
        )
        report = report_from_lists(
            str(folder),
            missing=info.get("missing_keys", []),
            unexpected=info.get("unexpected_keys", []),
            mismatched=[(k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", [])],
        )
        if not allow_partial:
            report.raise_if_bad()
    base_vocab = model.get_input_embeddings().weight.shape[0]
    add_mediround_tokens(tokenizer)
    if len(tokenizer) > base_vocab:
        torch.manual_seed(config.mllm.seed)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=torch.device(device).type != "meta")
    return model, tokenizer, base_vocab, report


class CropEncoder(nn.Module):
    """The reference crop as tokens: CLIP's layer-``vision_feature_layer`` CLS (plus an optional pooled
    grid of patches) through the LLaVA projector."""

    def __init__(self, llava: LlavaForConditionalGeneration, feature_layer: int, tokens: int):
        super().__init__()
        self.llava = [llava]
        self.feature_layer = feature_layer
        self.grid = round((tokens - 1) ** 0.5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) normalised crops -> (n, tokens, hidden)."""
        llava = self.llava[0]
        hidden = llava.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        parts = [hidden[:, :1]]
        if self.grid:
            side = round((hidden.shape[1] - 1) ** 0.5)
            patches = hidden[:, 1:].transpose(1, 2).reshape(hidden.shape[0], -1, side, side)
            parts.append(F.adaptive_avg_pool2d(patches, self.grid).flatten(2).transpose(1, 2))
        return llava.model.multi_modal_projector(torch.cat(parts, dim=1))


def clip_processor_view(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, size, size) as transformers' ``CLIPImageProcessor`` makes it: the shortest
    side resized to ``size`` by PIL's bicubic filter on the uint8 image (the longer one to the truncated
    proportion), the centre cropped to a square, CLIP mean/std. Keeps the aspect ratio that ``clip_normalise``
    squashes."""
    height, width = image.shape[:2]
    longer = int(size * max(height, width) / min(height, width))
    new_width, new_height = (size, longer) if width <= height else (longer, size)
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.BICUBIC))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    view = torch.from_numpy(resized[top : top + size, left : left + size].astype(np.float32)).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (view[None] / 255.0 - mean) / std


def clip_normalise(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, H, W) float in [0, 255] -> resized to size x size, CLIP mean/std."""
    resized = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return ((resized / 255.0).clamp(0, 1) - mean) / std
