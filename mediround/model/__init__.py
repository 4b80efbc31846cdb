"""The MediRound model: config, build, processor, forward over dialogues, sessions over rounds, checkpoints."""

from mediround.model.build import build_model, trainable_parameters
from mediround.model.config import MediRoundConfig, preset
from mediround.model.frame import MASK_THRESHOLD
from mediround.model.mediround import MediRound
from mediround.model.processor import DialogueProcessor, DialogueSample, load_sample
from mediround.model.session import DialogueSession, ImageContext, RoundResult, encode_image

__all__ = [
    "MASK_THRESHOLD",
    "DialogueProcessor",
    "DialogueSample",
    "DialogueSession",
    "ImageContext",
    "MediRound",
    "MediRoundConfig",
    "RoundResult",
    "build_model",
    "encode_image",
    "load_sample",
    "preset",
    "trainable_parameters",
]
