"""A per-GPU training-memory estimate, from parameter counts of the model built on the meta device or,
without the weights' config, from the ``llava-med-7b`` preset's known sizes.

Counts come from the real module tree (nothing allocated) or from the known sizes; the activation term
is a standard transformer estimate, and the frozen SAM image encoder's attention scores (which the first
version left out: docs/model.md, "What the memory estimate covers") are counted from SAM's layout. It is a
planning number for ``doctor`` and the docs, checked against CPU runs by benchmarks/paper_path_rehearsal.py.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from mediround.model.build import build_model
from mediround.model.config import MediRoundConfig, key_settings, preset

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 1024**3
# The sequence length assumed where no training dialogue can be measured (and the docs' table).
DEFAULT_SEQUENCE_LENGTH = 1024
SAM_SCORE_BYTES = {"fp32": 12, "bf16": 10, "fp16": 10}
"""Bytes per attention score that segment_anything's global-attention blocks hold at once, under no_grad too
(the (heads, tokens, tokens) scores; 12 x 4,096^2 per image for ViT-B at 1,024 px). In fp32: three fp32
copies (q @ k^T and the two sums of ``add_decomposed_rel_pos``), 12 bytes; measured 2.45 GiB above the
baseline for one image against 2.25 GiB counted. A bf16/fp16 model computes under CUDA autocast, which
runs softmax in fp32: the bf16 sum, its fp32 cast and the fp32 softmax are alive together, 10 bytes. (CPU
autocast keeps softmax in bf16: three bf16 copies, 6 bytes; docs/model.md.)"""


@dataclass
class MemoryEstimate:
    """Bytes per GPU by component; ``total`` is their sum."""

    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimiser: int
    activations: int
    logits: int
    image_encoder: int
    """SAM's attention scores while it encodes the micro-batch's images, before the language model runs:
    the peak is the larger of this and the language model's activations and logits."""

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimiser
                + max(self.image_encoder, self.activations + self.logits))

    def as_gib(self) -> dict[str, float]:
        names = ("weights", "gradients", "optimiser", "activations", "logits", "image_encoder", "total")
        return {name: round(getattr(self, name) / GIB, 2) for name in names}


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs to know of a model: its parameter counts and its language model's shape."""

    parameters: int
    trainable: int
    mllm: int
    mllm_trainable: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    sam_heads: int
    sam_tokens: int
    """Heads and tokens (the image-embedding grid, squared) of SAM's global-attention blocks."""


def model_sizes(model: torch.nn.Module) -> ModelSizes:
    """The sizes of a built MediRound (on meta or not)."""
    text = model.llava.config.text_config
    encoder = model.sam.image_encoder
    return ModelSizes(
        parameters=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        mllm=sum(p.numel() for p in model.mllm.parameters()),
        mllm_trainable=sum(p.numel() for p in model.mllm.parameters() if p.requires_grad),
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        sam_heads=encoder.blocks[0].attn.num_heads,
        sam_tokens=encoder.pos_embed.shape[1] * encoder.pos_embed.shape[2],
    )


# The llava-med-7b preset's parts (docs/model.md; tests/model/test_memory_known_sizes.py checks them against
# the model built on meta): LLaVA-Med v1.5 Mistral-7B before the new tokens, the 3 new tokens' rows of
# embed_tokens and lm_head, LoRA r=8 on q,v, the trained full copies of embed_tokens and lm_head, SAM ViT-B,
# the heads ([SEG] projection, box encoder, entity head, JCM), and what stage 1 trains outside LLaVA
# (SAM's mask decoder without the IoU head, and the heads).
LLAVA_MED_V15 = 7_566_219_264
NEW_TOKEN_ROWS = 2 * 3 * 4_096
LORA_R8_QV = 3_407_872
EMBEDDING_COPIES = 2 * 32_003 * 4_096
SAM_VIT_B = 93_735_472
HEADS_7B = 18_770_945
TRAINED_OUTSIDE_LLAVA_7B = 21_776_352
# The config keys known_sizes compares with the preset's: those declared to change a count (config.Setting),
# but token_embeddings, whose two trained splits it knows.
COMPARED_KEYS = tuple(key for key, setting in key_settings().items()
                      if setting.counts and key != "trainable.token_embeddings")


def known_sizes(preset_name: str, config: MediRoundConfig) -> ModelSizes | None:
    """The sizes of the ``llava-med-7b`` preset without its weights (both token-embedding splits), or None
    for another preset, a tiny LLaVA, or a config that changes a count (another LoRA rank, other trainable
    parts: any key declared to, see ``config.Setting``)."""
    if (preset_name != "llava-med-7b" or config.mllm.source == "tiny"
            or config.trainable.token_embeddings not in ("full", "rows")):
        return None
    reference = preset(preset_name, mllm_path=config.mllm.source, sam_checkpoint=config.segmenter.checkpoint)
    if _compared(config) != _compared(reference):
        return None
    # "rows" trains a separate copy of the new tokens' rows; "full" trains copies of both whole matrices.
    trained_copies = EMBEDDING_COPIES if config.trainable.token_embeddings == "full" else NEW_TOKEN_ROWS
    mllm = LLAVA_MED_V15 + NEW_TOKEN_ROWS + LORA_R8_QV + trained_copies
    mllm_trainable = LORA_R8_QV + trained_copies
    return ModelSizes(
        parameters=mllm + SAM_VIT_B + HEADS_7B,
        trainable=mllm_trainable + TRAINED_OUTSIDE_LLAVA_7B,
        mllm=mllm,
        mllm_trainable=mllm_trainable,
        hidden_size=4_096,
        num_layers=32,
        vocab_size=32_003,
        sam_heads=12,
        sam_tokens=(1_024 // 16) ** 2,
    )


def _compared(config: MediRoundConfig) -> dict:
    return {key: operator.attrgetter(key)(config) for key in COMPARED_KEYS}


def estimate_training_memory(
    config: MediRoundConfig, model: torch.nn.Module | None = None, batch_size: int = 1,
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH,
) -> MemoryEstimate:
    """``estimate_from_sizes`` of ``model``, a MediRound already built (e.g. on meta); without one, the
    model is built on meta from ``config`` (reads only the LLaVA config.json, no weights)."""
    if model is None:
        model = build_model(config, device="meta")
    return estimate_from_sizes(config, model_sizes(model), batch_size, sequence_length)


def estimate_from_sizes(
    config: MediRoundConfig, sizes: ModelSizes, batch_size: int = 1, sequence_length: int = DEFAULT_SEQUENCE_LENGTH
) -> MemoryEstimate:
    """Memory of one training process, as the trainer runs it: frozen LLaVA weights in ``config.precision``,
    trainable parameters (LoRA, embed_tokens/lm_head copies, heads) as fp32 master weights with fp32
    gradients, SAM and heads in fp32; AdamW's two fp32 moments (8 bytes per trainable parameter); so 16 bytes
    per trainable parameter whatever the precision. Activations of the language model (with gradient
    checkpointing: one hidden state per layer plus one layer's working set, else ~34 values per hidden
    unit per layer) and the fp32 logits of the answer positions (bounded by the sequence length); or, if
    larger, the frozen SAM image encoder's global-attention scores while it encodes the micro-batch's
    images (``SAM_SCORE_BYTES`` per score: the model encodes the whole micro-batch at once).
    ZeRO partitioning is applied by ``mediround.doctor.memory.shard_for_zero``.
    """
    width = BYTES[config.precision]
    tokens = batch_size * sequence_length
    per_layer = tokens * sizes.hidden_size * width
    if config.gradient_checkpointing:
        activations = sizes.num_layers * per_layer + 34 * per_layer
    else:
        activations = 34 * sizes.num_layers * per_layer
    frozen_mllm = sizes.mllm - sizes.mllm_trainable
    return MemoryEstimate(
        parameters=sizes.parameters,
        trainable=sizes.trainable,
        weights=frozen_mllm * width + (sizes.parameters - frozen_mllm) * 4,
        gradients=sizes.trainable * 4,
        optimiser=sizes.trainable * 8,
        activations=activations,
        logits=tokens * sizes.vocab_size * 4,
        image_encoder=batch_size * sizes.sam_heads * sizes.sam_tokens**2 * SAM_SCORE_BYTES[config.precision],
    )
