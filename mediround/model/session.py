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
from mediround.model.segmenter import decode_masks_per_image, upsample_logits


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
    return encode_images(model, [image])[0]


@torch.no_grad()
def encode_images(model: MediRound, images: list[np.ndarray]) -> list[ImageContext]:
    """``encode_image`` of several images, each encoder run once over all of them."""
    sam_inputs = [model.processor.sam_pixels(image) for image in images]
    embeddings = model.sam_embed(torch.cat([pixels for pixels, _ in sam_inputs]))
    features = model.clip_features(torch.cat([model.processor.clip_pixels(image) for image in images]))
    return [
        ImageContext(image, embeddings[index : index + 1], features[index], tuple(image.shape[:2]), resized)
        for index, (image, (_, resized)) in enumerate(zip(images, sam_inputs))
    ]


def decode_features(model: MediRound, context: ImageContext, features: torch.Tensor) -> torch.Tensor:
    """(n, 256) features on ``context``'s image -> (n, H, W) mask logits at the original image size."""
    prompts = features.reshape(-1, model.config.heads.seg_dim)
    embeddings = context.sam_embedding.expand(prompts.shape[0], -1, -1, -1)
    low_res = decode_masks_per_image(model.sam, embeddings, prompts)
    return upsample_logits(low_res, model.config.segmenter.image_size, context.resized_size, context.original_size)


def seg_feature(model: MediRound, emitting: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """h_c projected, from the hidden state that emitted [SEG] or the one of [SEG] itself (``heads.seg_state``)."""
    return model.project(emitting if model.seg_state_offset else seg)


class GreedyAnswer:
    """The token-by-token state of one greedily decoded answer, shared by ``DialogueSession`` and the
    batched session so that both choose the same tokens.

    ``next_token(logits)`` gives the next token to feed (None once the answer is complete) and ``fed(token,
    feature)`` records it with its projected hidden state. Decoding stops at </s> or after
    ``max_new_tokens`` tokens; a second [SEG] becomes </s>; [SEG] is fed before </s> when the answer has
    none (``seg_fed``), so every answer holds exactly one [SEG] and ends with </s>.
    """

    def __init__(self, seg_id: int, eos_id: int, max_new_tokens: int):
        self.seg_id, self.eos_id, self.max_new_tokens = seg_id, eos_id, max_new_tokens
        self.answer_ids: list[int] = []
        self.feature: torch.Tensor | None = None
        self.seg_fed = False
        self.closing: list[int] | None = None

    @property
    def needs_logits(self) -> bool:
        """Whether the next token is chosen from the language model's logits (not a closing token)."""
        return self.closing is None and len(self.answer_ids) < self.max_new_tokens

    def next_token(self, logits: torch.Tensor | None) -> int | None:
        if self.needs_logits:
            token = int(logits.argmax())
            if token == self.seg_id and self.feature is not None:
                token = self.eos_id
            if token != self.eos_id:
                return token
        if self.closing is None:
            self.seg_fed = self.feature is None
            self.closing = ([self.seg_id] if self.seg_fed else []) + [self.eos_id]
        return self.closing.pop(0) if self.closing else None

    def fed(self, token: int, feature: torch.Tensor | None) -> None:
        """Record a fed token; ``feature`` is its projected hidden state, kept when it is [SEG]."""
        self.answer_ids.append(token)
        if token == self.seg_id:
            self.feature = feature


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
            reference = self.model.processor.reference(self.context.image, reference_mask)
            crop_pixels, boxes = self.model.processor.reference_inputs([reference])
        user = layout.user(self.rounds, query, refers)
        if answer is not None:
            answer_piece = layout.answer(answer)
            ids = user.ids + answer_piece.ids
            hidden = self._feed(ids, user.kinds + answer_piece.kinds, None, crop_pixels, boxes)
            seg_at = len(user.ids) + answer_piece.ids.index(layout.seg_id)
            feature = self.model.project(hidden[seg_at + self.model.seg_state_offset])
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
        answer = GreedyAnswer(layout.seg_id, layout.eos_id, max_new_tokens)
        while True:
            token = answer.next_token(self.model.llava.lm_head(last_hidden) if answer.needs_logits else None)
            if token is None:
                return answer.feature, answer.answer_ids, answer.seg_fed
            emitting, last_hidden = last_hidden, self._feed([token], [TEXT])[-1]
            answer.fed(token, seg_feature(self.model, emitting, last_hidden) if token == layout.seg_id else None)

    @torch.no_grad()
    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 256) features -> (n, H, W) mask logits at the original image size (foreground: > 0)."""
        return decode_features(self.model, self.context, features)
