"""The synthetic multi-round benchmark: anatomy-like slices and dialogues of the paper's five scenarios."""

from mediround.data.synth.corpus import text_corpus
from mediround.data.synth.generator import (
    SPLITS,
    SyntheticDialogue,
    SynthSummary,
    generate,
    iter_dialogues,
    make_dialogue,
    split_sizes,
)
from mediround.data.synth.scenarios import SCENARIOS
from mediround.data.synth.textures import MODALITIES

__all__ = [
    "MODALITIES",
    "SCENARIOS",
    "SPLITS",
    "SynthSummary",
    "SyntheticDialogue",
    "generate",
    "iter_dialogues",
    "make_dialogue",
    "split_sizes",
    "text_corpus",
]
