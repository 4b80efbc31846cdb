"""Tokenizers: the added MediRound tokens, and an offline byte-level BPE tokenizer for the tiny preset.

The tiny tokenizer is trained on the project's own text (``mediround.data.synth.text_corpus`` plus a
built-in set of medical-dialogue phrases), so nothing is downloaded. Training is
deterministic for a given corpus and the result is saved with every checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mediround.data.synth import text_corpus

SEG_TOKEN = "[SEG]"
CROP_TOKEN = "[REF_CROP]"
BOX_TOKEN = "[REF_BOX]"
IMAGE_TOKEN = "<image>"
MEDIROUND_TOKENS = (SEG_TOKEN, CROP_TOKEN, BOX_TOKEN)

TINY_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)

BUILTIN_CORPUS = (
    "Segment the liver in this CT slice.",
    "Please segment the left kidney.",
    "Where is the tumour? Segment it.",
    "Segment the region next to the previous output.",
    "Segment the structure above the one you found before.",
    "Segment the organ below the previous mask.",
    "Which structure is the largest? Segment it.",
    "It is the liver [SEG].",
    "Sure, it is [SEG].",
    "The lesion is here [SEG].",
    "Segment the lesion inside the organ from round one.",
    "Segment the vessel to the right of the previous region.",
    "Now segment the spleen, which lies left of the earlier output.",
    "The heart is shown in this MRI image; segment the left ventricle.",
    "Segment the polyp in this endoscopy frame.",
    "Segment the optic disc in this fundus photograph.",
    "Segment the nodule in the lung on this chest X-ray.",
    "Segment the gallbladder, the pancreas, the stomach and the aorta.",
    "Segment the brain tumour core, the oedema and the enhancing tumour.",
    "Segment the prostate and the bladder in this MR slice.",
    "Segment the smaller of the two lesions.",
    "Segment the circle, the square, the triangle, the ring and the ellipse.",
    "Segment the bright structure at the top left, bottom right, centre.",
    "It is the right kidney [SEG]. It is the aorta [SEG]. Here it is [SEG].",
    "Segment the region that touches the previous one.",
    "Segment what is enclosed by the region from the first round.",
    "Segment the structure that is farthest from the previous output.",
    "CT MRI X-ray ultrasound endoscopy dermoscopy fundus pathology",
    "abdomen thorax head neck pelvis chest brain spine knee hip shoulder",
)


def tokenizer_corpus() -> list[str]:
    """The text the tiny tokenizer is trained on: the synthetic generator's phrases plus built-ins."""
    return list(BUILTIN_CORPUS) + [str(line) for line in text_corpus()]


def train_tiny_tokenizer(
    vocab_size: int, corpus: Iterable[str] | None = None, with_mediround_tokens: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline, with LLaVA's ``<image>`` (and MediRound's tokens) added."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sorted(set(corpus if corpus is not None else tokenizer_corpus())), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if with_mediround_tokens:
        add_mediround_tokens(tokenizer)
    return tokenizer


def add_mediround_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Add [SEG], the crop and the box tokens (no-op when present); return their ids by name."""
    missing = [t for t in MEDIROUND_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return {t: tokenizer.convert_tokens_to_ids(t) for t in MEDIROUND_TOKENS}
