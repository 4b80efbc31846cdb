"""``build_model(config)``: the one path from a config to a ``MediRound`` (tiny, real paths, or meta)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from mediround.model.config import PARTS, MediRoundConfig, Part
from mediround.model.mediround import MediRound
from mediround.model.mllm import load_llava
from mediround.model.segmenter import load_sam
from mediround.model.tokenizer import MEDIROUND_TOKENS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The torch dtype of each ``precision`` setting."""


def build_model(
    config: MediRoundConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str | torch.device = "cpu",
    allow_partial: bool = False,
    on_base: Callable[[nn.Module, nn.Module, int], None] | None = None,
) -> MediRound:
    """Build MediRound from ``config``: load or build LLaVA and SAM, add tokens, wrap LoRA, set trainability.

    ``tokenizer`` overrides the one the config would make (a checkpoint passes its saved tokenizer).
    On ``torch.device("meta")`` nothing is allocated and no weight file is read. ``on_base(llava, sam,
    base_vocab)`` runs on the base models before LoRA is wrapped (a checkpoint loads saved base weights there).
    The reports of the base weight files are on ``model.load_reports`` (with ``allow_partial``, what was
    left random).
    """
    config.validate()
    llava, tokenizer, base_vocab, llava_report = load_llava(config, tokenizer, device, allow_partial=allow_partial)
    sam, sam_report = load_sam(config.segmenter, device, allow_partial=allow_partial)
    if on_base is not None:
        on_base(llava, sam, base_vocab)
    mllm = _wrap_language_model(llava, tokenizer, config)
    with torch.device(device):
        torch.manual_seed(config.heads.seed)
        model = MediRound(config, mllm, tokenizer, sam, base_vocab)
    if torch.device(device).type != "meta":
        # SAM and the small heads stay fp32: SAM's prompt-encoder position encoding is fp32-only.
        model.mllm.to(DTYPES[config.precision])
    apply_trainability(model)
    model.load_reports = [r for r in (llava_report, sam_report) if r is not None]
    if config.gradient_checkpointing:
        model.llava.activation_checkpointing_enable({"use_reentrant": False})
    return model


def _wrap_language_model(llava: nn.Module, tokenizer: PreTrainedTokenizerBase, config: MediRoundConfig) -> nn.Module:
    mode, embeddings = config.trainable.language_model, config.trainable.token_embeddings
    if mode != "lora":
        return llava
    lora = config.lora
    settings = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": lora.target_modules}
    if embeddings == "full":
        settings["modules_to_save"] = ["embed_tokens", "lm_head"]
    elif embeddings == "rows":
        ids = sorted(tokenizer.convert_tokens_to_ids(list(MEDIROUND_TOKENS)))
        settings["trainable_token_indices"] = {"embed_tokens": ids, "lm_head": ids}
    # peft's PeftModel reads transformers' deprecated ``is_gradient_checkpointing`` (no peft release reads
    # ``is_activation_checkpointing`` yet), which warns on every command that loads a model; silenced
    # for that one call and that one message, so any other warning still shows.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(llava, LoraConfig(**settings))


def part_module(model: MediRound, part: Part) -> nn.Module | None:
    """The module ``part`` names in ``model`` (None for a head the config leaves out: the entity head)."""
    module = model
    for name in part.module.split("."):
        module = getattr(module, name)
        if module is None:
            return None
    return module


def apply_trainability(model: MediRound) -> None:
    """Set ``requires_grad`` on every parameter from ``config.trainable`` (peft already froze the base):
    the language model by its mode, each ``Part`` by its switch, in declaration order."""
    switches = model.config.trainable
    llava = model.llava
    lm_owned = switches.language_model == "lora"
    for name, param in model.named_parameters():
        if not name.startswith("mllm."):
            param.requires_grad_(False)
        elif not lm_owned:
            param.requires_grad_(switches.language_model == "full" and ".language_model." in name)
    for switch, part in PARTS.items():
        module = part_module(model, part)
        if module is not None:
            module.requires_grad_(getattr(switches, switch))
    if not lm_owned and switches.token_embeddings == "full":
        llava.get_input_embeddings().requires_grad_(True)
        llava.get_output_embeddings().requires_grad_(True)
    if lm_owned and switches.token_embeddings == "frozen":
        for name, param in model.mllm.named_parameters():
            if "modules_to_save" in name or "trainable_tokens" in name:
                param.requires_grad_(False)


def keep_trainable_fp32(model: nn.Module) -> None:
    """Cast the trainable parameters to fp32 in place (frozen weights keep ``config.precision``).

    The optimizer then updates fp32 master weights with fp32 moments, so that the small late updates of
    the decaying schedule are not rounded away in bf16; compute runs in bf16 under autocast.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total and trainable, and trainable per top-level part."""
    counts: dict[str, int] = {"total": 0, "trainable": 0}
    for name, param in model.named_parameters():
        counts["total"] += param.numel()
        if param.requires_grad:
            counts["trainable"] += param.numel()
            part = re.sub(r"\..*", "", name)
            counts[f"trainable.{part}"] = counts.get(f"trainable.{part}", 0) + param.numel()
    return counts
