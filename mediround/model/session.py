"""One image and one dialogue, round by round over a KV cache, beside the model (as segment-anything keeps
``SamPredictor`` beside ``Sam``).

``encode_image`` runs SAM's image encoder and CLIP once per image; ``DialogueSession`` prefills the system
prompt and image tokens into a fresh cache, and each ``step`` appends one round's user turn and answer, so
earlier rounds are never recomputed. A step returns the round's [SEG] feature and the mask it decodes to.
``fork`` copies the cache, so that two continuations of the same rounds can feed different inputs
(``mediround.inference.chain`` forks when JCM tracks feed different reference masks). ``undo`` cuts the
last round off the cache (``mediround.inference.chat``'s ``:undo``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from mediround.model.mediround import MediRound
from mediround.model.processor import TEXT
from mediround.model.references import reference_from_mask
from mediround.model.segmenter import upsample_logits


@dataclass
class ImageContext:
    """One image, encoded once: SAM embedding (1, 256, g, g), projected CLIP patch features (N, hidden)."""

    image: np.ndarray
    sam_embedding: torch.Tensor
    image_features: torch.Tensor
    original_size: tuple[int, int]
    resized_size: tuple[int, int]


@dataclass
class RoundResult:
    """One round: the projected [SEG] feature (256,) it used, that feature's mask logits (1, H, W) at the
    original image size (foreground: > ``MASK_THRESHOLD``), the answer text and token ids, and whether
    [SEG] had to be fed because greedy decoding ended without it."""

    seg_feature: torch.Tensor
    mask_logits: torch.Tensor
    answer: str
    answer_ids: list[int]
    seg_fed: bool = False


@torch.no_grad()
def encode_image(model: MediRound, image: np.ndarray) -> ImageContext:
    """Run SAM's image encoder and CLIP once for an (H, W, 3) uint8 image."""
    pixels, resized = model.processor.sam_pixels(image)
    embedding = model.sam_embed(pixels)
    features = model.clip_features(model.processor.clip_pixels(image))[0]
    return ImageContext(image, embedding, features, tuple(image.shape[:2]), resized)


class DialogueSession:
    """A dialogue in progress over one encoded image: its KV cache and how many tokens and rounds it holds."""

    def __init__(self, model: MediRound, context: ImageContext):
        self.model = model
        self.context = context
        self.cache = DynamicCache(config=model.llava.config.text_config)
        prefix = model.processor.layout.prefix()
        with torch.no_grad():
            self._feed(prefix.ids, prefix.kinds, context.image_features[None])
        self.length = len(prefix.ids)
        self.rounds = 0
        self._round_starts: list[int] = []

    @classmethod
    def for_image(cls, model: MediRound, image: np.ndarray) -> DialogueSession:
        """A session over ``image``, encoded here."""
        return cls(model, encode_image(model, image))

    def fork(self) -> DialogueSession:
        """An independent copy: the same rounds so far, its own cache; image and model are shared."""
        twin = copy.copy(self)
        twin.cache = copy.deepcopy(self.cache)
        twin._round_starts = list(self._round_starts)
        return twin

    def undo(self) -> None:
        """Forget the last round: its tokens leave the cache, so the next ``step`` computes exactly what it
        would in a session that never had that round (attention is causal: earlier entries never change)."""
        if not self._round_starts:
            raise ValueError("no round to undo")
        start = self._round_starts.pop()
        self.cache.crop(start - self.length)
        self.length = start
        self.rounds -= 1

    def _feed(self, ids: list[int], kinds: list[int], image_features: torch.Tensor | None = None,
              crop_pixels: torch.Tensor | None = None, boxes: torch.Tensor | None = None) -> torch.Tensor:
        model = self.model
        embeds = model.embed(torch.tensor([ids], device=model.device), torch.tensor([kinds], device=model.device),
                             image_features, crop_pixels, boxes)
        return model.hidden_states(embeds, None, self.cache)[0]

    @torch.no_grad()
    def step(
        self,
        query: str,
        answer: str | None,
        reference_mask: np.ndarray | None = None,
        refers: bool | None = None,
        max_new_tokens: int = 64,
    ) -> RoundResult:
        """Append one round to the cache; return its projected [SEG] feature and that feature's mask.

        ``answer`` given: teacher-forced (fed with the user turn in one chunk). ``answer=None``: greedy
        decoding until </s>; the [SEG] hidden state comes from the step that feeds [SEG], and [SEG] is fed
        when decoding ends without one (``seg_fed=True``). ``refers`` defaults to ``reference_mask is not
        None``; a referring round with a missing or tiny mask uses the whole image (references.py).
        """
        refers = reference_mask is not None if refers is None else refers
        layout = self.model.processor.layout
        crop_pixels = boxes = None
        if refers:
            reference = reference_from_mask(self.context.image, reference_mask)
            crop_pixels, boxes = self.model.processor.reference_inputs([reference])
        user = layout.user(self.rounds, query, refers)
        if answer is not None:
            answer_piece = layout.answer(answer)
            ids = user.ids + answer_piece.ids
            hidden = self._feed(ids, user.kinds + answer_piece.kinds, None, crop_pixels, boxes)
            seg_at = len(user.ids) + answer_piece.ids.index(layout.seg_id)
            feature = self.model.project(hidden[seg_at])
            answer_ids = answer_piece.ids
            seg_fed = False
        else:
            hidden = self._feed(user.ids, user.kinds, None, crop_pixels, boxes)
            feature, answer_ids, seg_fed = self._greedy(hidden[-1], max_new_tokens)
            ids = user.ids + answer_ids
        self._round_starts.append(self.length)
        self.length += len(ids)
        self.rounds += 1
        text = self.model.tokenizer.decode(answer_ids, skip_special_tokens=False)
        return RoundResult(feature, self.decode(feature), text, answer_ids, seg_fed)

    def _greedy(self, last_hidden: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, list[int], bool]:
        layout = self.model.processor.layout
        lm_head = self.model.llava.lm_head
        answer_ids: list[int] = []
        feature = None
        while len(answer_ids) < max_new_tokens:
            token = int(lm_head(last_hidden).argmax())
            if token == layout.seg_id and feature is not None:
                token = layout.eos_id
            answer_ids.append(token)
            if token == layout.eos_id:
                break
            last_hidden = self._feed([token], [TEXT])[-1]
            if token == layout.seg_id:
                feature = self.model.project(last_hidden)
        if answer_ids and answer_ids[-1] == layout.eos_id:
            answer_ids.pop()
        seg_fed = feature is None
        if seg_fed:
            answer_ids.append(layout.seg_id)
            feature = self.model.project(self._feed([layout.seg_id], [TEXT])[-1])
        answer_ids.append(layout.eos_id)
        self._feed([layout.eos_id], [TEXT])
        return feature, answer_ids, seg_fed

    @torch.no_grad()
    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 256) features -> (n, H, W) mask logits at the original image size (foreground: > 0)."""
        model, context = self.model, self.context
        low_res = model.decode_low_res(context.sam_embedding, features.reshape(-1, model.config.heads.seg_dim))
        return upsample_logits(low_res, model.config.segmenter.image_size, context.resized_size, context.original_size)
