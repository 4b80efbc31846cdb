"""A per-GPU training-memory estimate, from parameter counts of the model built on the meta device.

Counts come from the real module tree (nothing allocated); the activation term is a standard transformer
estimate. It is a planning number for ``doctor`` and the docs, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mediround.model.build import build_model
from mediround.model.config import MediRoundConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 1024**3


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

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimiser + self.activations + self.logits

    def as_gib(self) -> dict[str, float]:
        names = ("weights", "gradients", "optimiser", "activations", "logits", "total")
        return {name: round(getattr(self, name) / GIB, 2) for name in names}


def estimate_training_memory(
    config: MediRoundConfig, model: torch.nn.Module | None = None, batch_size: int = 1, sequence_length: int = 1024
) -> MemoryEstimate:
    """Memory of one training process, as the trainer runs it: frozen LLaVA weights in ``config.precision``,
    trainable parameters (LoRA, embed_tokens/lm_head copies, heads) as fp32 master weights with fp32
    gradients, SAM and heads in fp32; AdamW's two fp32 moments (8 bytes per trainable parameter); so 16 bytes
    per trainable parameter whatever the precision. Activations of the language model (with gradient
    checkpointing: one hidden state per layer plus one layer's working set, else ~34 values per hidden
    unit per layer) and the fp32 logits of the answer positions (bounded by the sequence length).
    ZeRO partitioning is applied by ``mediround.doctor.memory.shard_for_zero``.

    ``model`` may be a MediRound already built (e.g. on meta); otherwise one is built on meta from
    ``config`` (reads only the LLaVA config.json, no weights).
    """
    if model is None:
        model = build_model(config, device="meta")
    width = BYTES[config.precision]
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mllm = sum(p.numel() for p in model.mllm.parameters())
    mllm_trainable = sum(p.numel() for p in model.mllm.parameters() if p.requires_grad)
    text = model.llava.config.text_config
    tokens = batch_size * sequence_length
    per_layer = tokens * text.hidden_size * width
    if config.gradient_checkpointing:
        activations = text.num_hidden_layers * per_layer + 34 * per_layer
    else:
        activations = 34 * text.num_hidden_layers * per_layer
    frozen_mllm = mllm - mllm_trainable
    return MemoryEstimate(
        parameters=parameters,
        trainable=trainable,
        weights=frozen_mllm * width + (parameters - frozen_mllm) * 4,
        gradients=trainable * 4,
        optimiser=trainable * 8,
        activations=activations,
        logits=tokens * text.vocab_size * 4,
    )
