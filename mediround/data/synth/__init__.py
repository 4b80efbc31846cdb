"""The synthetic multi-round benchmark: anatomy-like slices and dialogues of the paper's five scenarios."""

from mediround.data.synth.corpus import text_corpus
from mediround.data.synth.generator import (
    ANSWER_STYLES,
    PHRASINGS,
    SPLITS,
    SyntheticDialogue,
    SynthSummary,
    Wording,
    generate,
    iter_dialogues,
    make_dialogue,
    split_sizes,
)
from mediround.data.synth.scenarios import SCENARIOS
from mediround.data.synth.textures import MODALITIES

__all__ = [
    "ANSWER_STYLES",
    "MODALITIES",
    "PHRASINGS",
    "SCENARIOS",
    "SPLITS",
    "SynthSummary",
    "SyntheticDialogue",
    "Wording",
    "generate",
    "iter_dialogues",
    "make_dialogue",
    "split_sizes",
    "text_corpus",
]
