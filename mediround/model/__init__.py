"""The MediRound model: config, build, forward over dialogues, incremental rounds, checkpoints."""

from mediround.model.build import build_model, trainable_parameters
from mediround.model.config import MediRoundConfig, preset
from mediround.model.inputs import DialogueSample, load_sample
from mediround.model.mediround import MASK_THRESHOLD, DialogueState, ImageContext, MediRound, RoundOutput

__all__ = [
    "MASK_THRESHOLD",
    "DialogueSample",
    "DialogueState",
    "ImageContext",
    "MediRound",
    "MediRoundConfig",
    "RoundOutput",
    "build_model",
    "load_sample",
    "preset",
    "trainable_parameters",
]
