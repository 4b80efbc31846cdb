"""Dialogue samples -> model inputs, outside the ``nn.Module`` (as transformers keeps a processor beside
its model): the chat template and token layout in one place (``ChatLayout``), image and reference-crop
pixels, and padded training batches (``DialogueProcessor.collate`` -> ``DialogueBatch``).

Layout of a dialogue with ``mllm.chat_template: spaced`` (each text piece tokenized on its own, ids
concatenated, so training and incremental inference see the same tokens)::

    <s> {system prompt} [INST] <image> x N \\n                        <- prefix (DialogueSession prefill)
    {crop x k}{box} {query 1} [/INST]  {answer 1 with one [SEG]} </s>   <- round 1 (no reference)
     [INST] {crop x k}{box} {query r} [/INST]  {answer r} </s>         <- round r (crop/box if it refers)

and with ``llava-mistral`` (the authors' text; each run of text between added tokens tokenized in one
call, as their code tokenizes it)::

    <s>[INST] <image> x N                                               <- prefix
    \\n {query 1} [/INST] {answer 1} </s>                                <- round 1
    [INST] {crop x k}{box} {query r} [/INST] {answer r} </s>            <- round r

Only answer tokens (including [SEG] and </s>) carry a cross-entropy label. Every position also has a
kind (text, image, crop, box) so features are scattered by layout, never by matching token ids.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from mediround.data.dialogue import Dialogue
from mediround.data.images import load_image, load_mask
from mediround.errors import DataError, InputWarning
from mediround.model.config import MediRoundConfig
from mediround.model.frame import ImageFrame
from mediround.model.mllm import clip_normalise, clip_processor_view
from mediround.model.references import (
    PredictedMask,
    Reference,
    reference_from_mask,
    reference_from_prediction,
)
from mediround.model.tokenizer import BOX_TOKEN, CROP_TOKEN, IMAGE_TOKEN, SEG_TOKEN

TEXT, IMAGE, CROP, BOX = 0, 1, 2, 3
IGNORE = -100
USER_OPEN = " [INST]"
USER_CLOSE = " [/INST]"
MAX_QUERY_TOKENS = 512
"""Longest query kept, in tokens: the first ``MAX_QUERY_TOKENS`` are used and an ``InputWarning`` says so.
Eight rounds of that still fit a 4,096-position LLaVA/Mistral context next to 576 image tokens."""


@dataclass
class Piece:
    """A run of token ids with their kinds and whether they are answer tokens (labelled)."""

    ids: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)
    labelled: list[bool] = field(default_factory=list)

    def add(self, ids: list[int], kind: int = TEXT, labelled: bool = False) -> Piece:
        self.ids += ids
        self.kinds += [kind] * len(ids)
        self.labelled += [labelled] * len(ids)
        return self

    def extend(self, other: Piece) -> Piece:
        self.ids += other.ids
        self.kinds += other.kinds
        self.labelled += other.labelled
        return self


def answer_with_seg(answer: str) -> str:
    """The answer text with exactly one [SEG]: appended when absent; more than one is refused."""
    count = answer.count(SEG_TOKEN)
    if count > 1:
        raise ValueError(f"answer holds {count} {SEG_TOKEN} tokens, expected one: {answer!r}")
    return answer if count == 1 else f"{answer.rstrip()} {SEG_TOKEN}"


class ChatLayout:
    """Token ids of the prefix, user turns and answers for one tokenizer and one image-token count."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_tokens: int, crop_tokens: int, system_prompt: str,
                 reference_tokens: str = "crop+box", template: str = "spaced"):
        self.tokenizer = tokenizer
        self.template = template
        self.image_tokens = image_tokens
        # A referring round's crop and box tokens; heads.reference_tokens may drop one (an ablation).
        self.crop_tokens = crop_tokens if "crop" in reference_tokens else 0
        self.box_tokens = 1 if "box" in reference_tokens else 0
        self.system_prompt = system_prompt
        ids = tokenizer.convert_tokens_to_ids
        self.seg_id, self.crop_id, self.box_id, self.image_id = ids(SEG_TOKEN), ids(CROP_TOKEN), ids(BOX_TOKEN), ids(IMAGE_TOKEN)
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        # Tokenized once: every round holds them, and a tokenizer call costs more than the round's matmuls
        # on the tiny preset.
        self.user_open_ids, self.user_close_ids = self.text(USER_OPEN), self.text(USER_CLOSE)

    def text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def prefix(self) -> Piece:
        piece = Piece()
        if self.bos_id is not None:
            piece.add([self.bos_id])
        if self.template == "llava-mistral":
            # Their prompt up to <image>, tokenized as their code tokenizes the chunk before it.
            return piece.add(self.text(f"{self.system_prompt}[INST] ")).add([self.image_id] * self.image_tokens, IMAGE)
        piece.add(self.text(self.system_prompt)).add(self.user_open_ids)
        return piece.add([self.image_id] * self.image_tokens, IMAGE).add(self.text("\n"))

    def user(self, round_index: int, query: str, refers: bool) -> Piece:
        """The user turn of the 0-based ``round_index``; crop and box tokens when the round refers."""
        piece = Piece()
        if round_index > 0:
            piece.add(self.user_open_ids)
        if refers:
            piece.add([self.crop_id] * self.crop_tokens, CROP).add([self.box_id] * self.box_tokens, BOX)
        return piece.add(self.query(query)).add(self.user_close_ids)

    def query(self, query: str) -> list[int]:
        """The query's token ids, cut to ``MAX_QUERY_TOKENS`` (with an ``InputWarning``) so that a huge
        query costs a bounded sequence instead of overflowing the model's context."""
        ids = self.text(f" {query.strip()}")
        if len(ids) > MAX_QUERY_TOKENS:
            warnings.warn(
                f"a query of {len(ids)} tokens was truncated to its first {MAX_QUERY_TOKENS} "
                f"(starts {query.strip()[:40]!r})",
                InputWarning,
                stacklevel=2,
            )
            ids = ids[:MAX_QUERY_TOKENS]
        return ids

    def query_text(self, query: str) -> str:
        """The query, or its first ``MAX_QUERY_TOKENS`` tokens as text (``query`` warns), for a layout that
        tokenizes the query with the text around it."""
        if len(self.text(f" {query.strip()}")) <= MAX_QUERY_TOKENS:
            return query.strip()
        return self.tokenizer.decode(self.query(query)).strip()

    def answer(self, answer: str) -> Piece:
        """The answer tokens (labelled) ending with </s>; holds exactly one [SEG]."""
        ids = self.text(f" {answer_with_seg(answer.strip())}")
        if ids.count(self.seg_id) != 1:
            raise ValueError(f"answer does not tokenize to one {SEG_TOKEN}: {answer!r}")
        return Piece().add(ids + [self.eos_id], labelled=True)

    def dialogue(self, dialogue: Dialogue) -> tuple[Piece, list[int]]:
        """The whole dialogue as one piece, and the position of each round's [SEG]."""
        piece = self.prefix()
        seg_positions = []
        for index, round_ in enumerate(dialogue.rounds):
            try:
                if round_.answer is None:
                    raise ValueError("no answer: a teacher-forced round needs one")
                tokens, seg_at = self.round(index, round_.query, round_.ref is not None, round_.answer)
            except ValueError as error:
                raise DataError(f"dialogue {dialogue.id}", dialogue.item, f"rounds[{index}].answer", str(error)) from None
            seg_positions.append(len(piece.ids) + seg_at)
            piece.extend(tokens)
        return piece, seg_positions

    def round(self, round_index: int, query: str, refers: bool, answer: str | None) -> tuple[Piece, int | None]:
        """One round's tokens: the user turn, then the answer when one is given (teacher forcing), and where
        [SEG] sits among them (None without an answer: it will be generated). The one place that lays out a
        round, for the training forward and inference alike; raises ``ValueError`` for an answer without
        exactly one [SEG]."""
        if self.template == "llava-mistral":
            return self.llava_mistral_round(round_index, query, refers, answer)
        piece = self.user(round_index, query, refers)
        if answer is None:
            return piece, None
        answer_piece = self.answer(answer)
        seg_at = len(piece.ids) + answer_piece.ids.index(self.seg_id)
        return piece.extend(answer_piece), seg_at

    def llava_mistral_round(self, round_index: int, query: str, refers: bool,
                            answer: str | None) -> tuple[Piece, int | None]:
        """A round in the authors' layout, ``[INST] <image>\\n {q} [/INST] {a} </s>`` (the first round after
        ``prefix``; later ones ``[INST] {crop}{box} {q} [/INST] {a} </s>``), tokenized as their code does:
        each run of text between added tokens in one call (a SentencePiece tokenizer starts each with a
        space of its own). The user turn is that text up to ``[/INST]``; its tokens start the run that goes
        on into the answer, so generation continues the ids training saw."""
        piece = Piece()
        if round_index > 0:
            piece.add(self.text("[INST] "))
        if refers:
            piece.add([self.crop_id] * self.crop_tokens, CROP).add([self.box_id] * self.box_tokens, BOX)
        lead = "\n " if round_index == 0 else (" " if refers else "")
        user_text = f"{lead}{self.query_text(query)} [/INST]"
        user_ids = self.text(user_text)
        if answer is None:
            return piece.add(user_ids), None
        before, after = answer_with_seg(answer.strip()).split(SEG_TOKEN)
        run = self.text(f"{user_text} {before}")
        if run[: len(user_ids)] != user_ids:
            raise ValueError(f"the answer's first tokens merge with the query's: {answer!r}")
        piece.add(user_ids)
        seg_at = len(piece.ids) + len(run) - len(user_ids)
        piece.add(run[len(user_ids):] + [self.seg_id] + self.text(f"{after} ") + [self.eos_id], labelled=True)
        return piece, seg_at


@dataclass
class DialogueSample:
    """One training/eval item: the dialogue, its image (H, W, 3) uint8, and per-round GT masks (bool or None).

    ``reference_masks`` replaces, by 0-based round index, the mask a referring round's crop and box are cut
    from (training's reference swaps, ``mediround.training.reference_swaps``); any other referring round
    refers to its referenced round's ground truth."""

    dialogue: Dialogue
    image: np.ndarray
    masks: list[np.ndarray | None]
    reference_masks: dict[int, np.ndarray] = field(default_factory=dict)

    def reference_mask(self, index: int) -> np.ndarray | None:
        """The mask round ``index`` (0-based, a referring round) takes its reference from."""
        if index in self.reference_masks:
            return self.reference_masks[index]
        return self.masks[self.dialogue.rounds[index].ref - 1]


def load_sample(dialogue: Dialogue) -> DialogueSample:
    """Read a dialogue's image and ground-truth masks (``mediround.data.images``); errors are ``DataError``."""
    image = load_image(dialogue.image_path)
    masks: list[np.ndarray | None] = []
    for number in range(1, len(dialogue.rounds) + 1):
        path = dialogue.mask_path(number)
        mask = None if path is None else load_mask(path)
        if mask is not None and mask.shape != image.shape[:2]:
            raise DataError(str(path), dialogue.id, f"rounds[{number - 1}].mask",
                            f"mask size {mask.shape[::-1]} differs from image size {image.shape[1::-1]}")
        masks.append(mask)
    return DialogueSample(dialogue, image, masks)


def check_references(dialogue: Dialogue) -> None:
    """Refs must point to an earlier round (1-based)."""
    for index, round_ in enumerate(dialogue.rounds):
        if round_.ref is not None and not 1 <= round_.ref <= index:
            raise DataError(f"dialogue {dialogue.id}", dialogue.item, f"rounds[{index}].ref",
                            f"refers to round {round_.ref}, not an earlier round of round {index + 1}")


@dataclass
class DialogueBatch:
    """Padded token layout of B dialogues plus their encoder inputs and targets."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    kinds: torch.Tensor
    seg_positions: list[list[int]]
    sam_pixels: torch.Tensor
    clip_pixels: torch.Tensor
    crop_pixels: torch.Tensor
    boxes: torch.Tensor
    frames: list[ImageFrame]
    target_masks: list[torch.Tensor]
    target_valid: list[torch.Tensor]
    entity_labels: list[torch.Tensor]

    def to(self, device: torch.device) -> DialogueBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        moved["target_masks"] = [m.to(device) for m in self.target_masks]
        moved["target_valid"] = [m.to(device) for m in self.target_valid]
        moved["entity_labels"] = [m.to(device) for m in self.entity_labels]
        return DialogueBatch(**moved)


class DialogueProcessor:
    """Everything between a dialogue sample and the model's tensors for one model configuration: the chat
    layout, SAM and CLIP pixels of an image, reference crops and boxes, and collated training batches."""

    def __init__(self, config: MediRoundConfig, tokenizer: PreTrainedTokenizerBase, vision: PretrainedConfig):
        self.segmenter = config.segmenter
        self.clip_size = vision.image_size
        self.crop_size = config.mllm.crop_size or vision.image_size
        self.entity_index = {name: index for index, name in enumerate(config.heads.entity_names)}
        self.reference_min_fragment = config.heads.reference_min_fragment
        self.box_max = config.heads.box_max
        self.mask_loss_frame = config.heads.mask_loss_frame
        self.predicted_reference = config.heads.predicted_reference
        self.clip_view = config.mllm.clip_view
        self.layout = ChatLayout(
            tokenizer,
            image_tokens=(vision.image_size // vision.patch_size) ** 2,
            crop_tokens=config.mllm.crop_tokens,
            system_prompt=config.mllm.system_prompt,
            reference_tokens=config.heads.reference_tokens,
            template=config.mllm.chat_template,
        )

    def frame(self, image: np.ndarray) -> ImageFrame:
        """The image's frame in this model's SAM input."""
        return ImageFrame.of(image, self.segmenter.image_size)

    def sam_pixels(self, image: np.ndarray) -> torch.Tensor:
        """SAM's (1, 3, size, size) input of an (H, W, 3) uint8 image."""
        return self.frame(image).pixels(image, self.segmenter.normalisation, self.segmenter.resize)

    def clip_pixels(self, image: np.ndarray) -> torch.Tensor:
        """CLIP's (1, 3, s, s) input of an (H, W, 3) uint8 image (the image tokens)."""
        return self.clip_input(image, self.clip_size)

    def clip_input(self, image: np.ndarray, size: int) -> torch.Tensor:
        """(1, 3, size, size) CLIP input of an (H, W, 3) uint8 image or crop, in this model's ``clip_view``."""
        if self.clip_view == "clip-processor":
            return clip_processor_view(image, size)
        return clip_normalise(_to_tensor(image), size)

    def reference(self, image: np.ndarray, mask: np.ndarray | PredictedMask | None) -> Reference:
        """The crop and box a referring round gets from ``mask`` (references.py), with this model's
        stray-fragment rule and box edges: a ground-truth mask (training, teacher forcing) is cut by the
        mask; a ``PredictedMask`` (a chain) by this model's ``heads.predicted_reference`` rule."""
        if isinstance(mask, PredictedMask):
            return reference_from_prediction(image, mask, self.predicted_reference, self.reference_min_fragment,
                                             self.box_max)
        return reference_from_mask(image, mask, self.reference_min_fragment, self.box_max)

    def reference_inputs(self, references: list[Reference]) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops' CLIP pixels (n, 3, s, s) and the boxes (n, 4) of ``references``, in order."""
        if not references:
            return torch.zeros(0, 3, self.crop_size, self.crop_size), torch.zeros(0, 4)
        crops = torch.cat([self.clip_input(r.crop, self.crop_size) for r in references])
        return crops, torch.from_numpy(np.stack([r.box for r in references]))

    def collate(self, samples: list[DialogueSample]) -> DialogueBatch:
        """Token layout, encoder inputs, reference crops/boxes (from GT masks) and targets of B dialogues."""
        pieces, seg_positions, references = [], [], []
        sam_pixels, clip_pixels, frames, targets, valid = [], [], [], [], []
        entity_labels = []
        for sample in samples:
            dialogue = sample.dialogue
            check_references(dialogue)
            piece, positions = self.layout.dialogue(dialogue)
            pieces.append(piece)
            seg_positions.append(positions)
            for index, round_ in enumerate(dialogue.rounds):
                if round_.ref is not None:
                    references.append(self.reference(sample.image, sample.reference_mask(index)))
            frame = self.frame(sample.image)
            frames.append(frame)
            sam_pixels.append(frame.pixels(sample.image, self.segmenter.normalisation, self.segmenter.resize))
            clip_pixels.append(self.clip_pixels(sample.image))
            present = torch.tensor([m is not None for m in sample.masks])
            masks = torch.zeros(len(dialogue.rounds), *frame.supervision_size(self.mask_loss_frame))
            masks[present] = frame.supervised_masks([m for m in sample.masks if m is not None],
                                                    self.mask_loss_frame).float()
            targets.append(masks)
            valid.append(present)
            entity_labels.append(torch.tensor([self.entity_index.get(r.entity, IGNORE) for r in dialogue.rounds]))
        length = max(len(p.ids) for p in pieces)
        input_ids = torch.full((len(pieces), length), self.layout.pad_id, dtype=torch.long)
        attention = torch.zeros((len(pieces), length), dtype=torch.long)
        labels = torch.full((len(pieces), length), IGNORE, dtype=torch.long)
        kinds = torch.zeros((len(pieces), length), dtype=torch.long)
        for row, piece in enumerate(pieces):
            n = len(piece.ids)
            ids = torch.tensor(piece.ids)
            input_ids[row, :n] = ids
            attention[row, :n] = 1
            labels[row, :n] = torch.where(torch.tensor(piece.labelled), ids, torch.tensor(IGNORE))
            kinds[row, :n] = torch.tensor(piece.kinds)
        crop_pixels, boxes = self.reference_inputs(references)
        return DialogueBatch(
            input_ids=input_ids,
            attention_mask=attention,
            labels=labels,
            kinds=kinds,
            seg_positions=seg_positions,
            sam_pixels=torch.cat(sam_pixels),
            clip_pixels=torch.cat(clip_pixels),
            crop_pixels=crop_pixels,
            boxes=boxes,
            frames=frames,
            target_masks=targets,
            target_valid=valid,
            entity_labels=entity_labels,
        )


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 255]."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None]
