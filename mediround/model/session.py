"""Dialogues round by round over one KV cache, beside the model (as segment-anything keeps ``SamPredictor``
beside ``Sam``): the one implementation of an inference round.

``encode_images`` runs SAM's image encoder and CLIP once per image (``ImageContext``). A ``BatchSession``
holds the rows of dialogues in progress and their shared cache; each ``step`` appends one round to the
rows that take part (their user turns, and teacher-forced answers, in one language-model forward; then
generated answers token by token, all rows together), so earlier rounds are never recomputed. A step
returns, per round, the [SEG] feature and the mask it decodes to. ``DialogueSession`` is one dialogue: a
view of a one-row ``BatchSession`` (its ``fork`` copies the session, ``undo`` cuts the last round off).

Rows hold different numbers of tokens, so the cache carries a 2-D attention mask (rows x columns): a row
joins left-padded to the current width, a round's chunks are right-padded to the longest one, and a
padded column keeps mask 0. Position ids come from the cumulative mask, so every real token sits at the
position it has in its own unpadded sequence; rows that do not take part in a step (or have finished a
generated answer) are fed pad tokens with mask 0. Masked columns get zero attention weight, so a row
computes what it computes alone, up to the order of float additions in batched matrix products
(docs/inference.md gives the measured difference). Without padding (one row, or rows of equal length)
no mask is passed at all.

``add`` prefills the prompt and image tokens of new rows in one forward; ``fork`` copies a row (JCM tracks
that feed different references); ``remove`` drops rows and the columns no remaining row uses; ``undo``
takes a row's last round back; ``prepare`` turns one row's round into token ids and reference inputs
(where a bad input raises ``ValueError``, so that a caller can drop that dialogue alone); ``step`` runs the
prepared rounds together and returns one ``RoundResult`` per round.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from mediround.model.frame import ImageFrame
from mediround.model.mediround import MediRound
from mediround.model.processor import TEXT, Piece
from mediround.model.references import PredictedMask, Reference
from mediround.model.segmenter import decode_masks_per_image

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class ImageContext:
    """One image, encoded once: SAM embedding (1, 256, g, g), projected CLIP patch features (N, hidden),
    and its frame in SAM's input (``mediround.model.frame``)."""

    image: np.ndarray
    sam_embedding: torch.Tensor
    image_features: torch.Tensor
    frame: ImageFrame


@dataclass
class RoundResult:
    """One round: the projected [SEG] feature (256,) it used, that feature's mask logits (1, H, W) at the
    original image size (foreground: > ``MASK_THRESHOLD``), the answer as text (without the end-of-turn
    token) and as token ids (with it), and whether [SEG] had to be fed because greedy decoding ended
    without it."""

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
    processor = model.processor
    embeddings = model.sam_embed(torch.cat([processor.sam_pixels(image) for image in images]))
    features = model.clip_features(torch.cat([processor.clip_pixels(image) for image in images]))
    return [
        ImageContext(image, embeddings[index : index + 1], features[index], processor.frame(image))
        for index, image in enumerate(images)
    ]


@torch.no_grad()
def decode_features(model: MediRound, embeddings: torch.Tensor, features: torch.Tensor,
                    frames: Sequence[ImageFrame]) -> list[torch.Tensor]:
    """The i-th feature (n, 256) on the i-th image embedding (n, 256, g, g), SAM's mask decoder run once
    for all: each (1, H, W) mask logits at its image's original size (``frames[i]``)."""
    decoder_dtype = next(model.sam.mask_decoder.parameters()).dtype
    low_res = decode_masks_per_image(model.sam, embeddings, features.to(decoder_dtype))
    return [frame.original_logits(low_res[index : index + 1]) for index, frame in enumerate(frames)]


def answer_text(tokenizer: PreTrainedTokenizerBase, answer_ids: list[int]) -> str:
    """An answer's token ids as text, without the end-of-turn token every answer ends with."""
    if answer_ids and answer_ids[-1] == tokenizer.eos_token_id:
        answer_ids = answer_ids[:-1]
    return tokenizer.decode(answer_ids, skip_special_tokens=False).strip()


class GreedyAnswer:
    """The token-by-token state of one greedily decoded answer.

    ``next_token(logits)`` gives the next token to feed (None once the answer is complete) and ``fed(token,
    feature)`` records it with its projected [SEG] feature. Decoding stops at </s> or after
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
        """Record a fed token; ``feature`` is its projected [SEG] feature, kept when it is [SEG]."""
        self.answer_ids.append(token)
        if token == self.seg_id:
            self.feature = feature


@dataclass
class BatchRow:
    """One row of a ``BatchSession``: a dialogue (or a fork of one) over its encoded image, its rounds so
    far and how many real tokens it held when each of them started (what ``undo`` cuts back to)."""

    batch: BatchSession
    context: ImageContext
    rounds: int = 0
    round_starts: list[int] = field(default_factory=list)

    def fork(self) -> BatchRow:
        """A new row of the same session with this row's rounds so far (its cache copied)."""
        return self.batch.fork(self)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 256) features -> (n, H, W) mask logits at the original image size (foreground: > 0)."""
        features = features.reshape(-1, self.batch.model.config.heads.seg_dim)
        count = features.shape[0]
        embeddings = self.context.sam_embedding.expand(count, -1, -1, -1)
        return torch.cat(decode_features(self.batch.model, embeddings, features, [self.context.frame] * count))


@dataclass
class PreparedRound:
    """One row's round as inputs: its user turn (plus the answer when teacher-forced), where [SEG] is in
    that chunk (None: the answer is generated, up to ``max_new_tokens`` tokens), and the reference crop/box
    when the round refers."""

    row: BatchRow
    piece: Piece
    seg_at: int | None
    reference: Reference | None
    max_new_tokens: int

    @property
    def answer_ids(self) -> list[int]:
        """A teacher-forced round's answer tokens (the labelled ones, </s> included)."""
        return [token for token, labelled in zip(self.piece.ids, self.piece.labelled) if labelled]


class BatchSession:
    """The rows of dialogues in progress, their shared KV cache and its attention mask."""

    def __init__(self, model: MediRound, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.rows: list[BatchRow] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=model.device)

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.llava.config.text_config)

    def _index(self, row: BatchRow) -> int:
        return next(index for index, candidate in enumerate(self.rows) if candidate is row)

    def length(self, row: BatchRow) -> int:
        """The real tokens (not padding) ``row`` holds."""
        return int(self.mask[self._index(row)].sum())

    @torch.no_grad()
    def add(self, contexts: list[ImageContext]) -> list[BatchRow]:
        """New rows over encoded images, their prompt and image tokens prefilled in one forward."""
        if not contexts:
            return []
        model = self.model
        prefix = model.processor.layout.prefix()
        count, length = len(contexts), len(prefix.ids)
        ids = torch.tensor([prefix.ids] * count, device=model.device)
        kinds = torch.tensor([prefix.kinds] * count, device=model.device)
        features = torch.stack([context.image_features for context in contexts])
        joined = self._new_cache()
        model.hidden_states(model.embed(ids, kinds, features, None, None), None, joined)
        new_mask = torch.ones(count, length, dtype=torch.long, device=model.device)
        if self.cache is None:
            self.cache, self.mask = joined, new_mask
        else:
            width = max(self.mask.shape[1], length)
            for old_layer, new_layer in zip(self.cache.layers, joined.layers):
                old_layer.keys = torch.cat([_left_pad(old_layer.keys, width), _left_pad(new_layer.keys, width)])
                old_layer.values = torch.cat([_left_pad(old_layer.values, width), _left_pad(new_layer.values, width)])
            self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(new_mask, width)])
        rows = [BatchRow(self, context) for context in contexts]
        self.rows += rows
        return rows

    def fork(self, row: BatchRow) -> BatchRow:
        index = self._index(row)
        for layer in self.cache.layers:
            layer.keys = torch.cat([layer.keys, layer.keys[index : index + 1]])
            layer.values = torch.cat([layer.values, layer.values[index : index + 1]])
        self.mask = torch.cat([self.mask, self.mask[index : index + 1]])
        twin = BatchRow(self, row.context, row.rounds, list(row.round_starts))
        self.rows.append(twin)
        return twin

    def clone(self) -> BatchSession:
        """An independent copy: the same rows and rounds, its own cache; model and images are shared."""
        twin = BatchSession(self.model, self.max_new_tokens)
        twin.cache = copy.deepcopy(self.cache)
        twin.mask = self.mask.clone()
        twin.rows = [BatchRow(twin, row.context, row.rounds, list(row.round_starts)) for row in self.rows]
        return twin

    def remove(self, rows: list[BatchRow]) -> None:
        """Drop ``rows``; columns that only they used go too, so finished dialogues cost nothing later."""
        if not rows:
            return
        gone = {id(row) for row in rows}
        self._keep([index for index, row in enumerate(self.rows) if id(row) not in gone])

    def undo(self, row: BatchRow) -> None:
        """Forget ``row``'s last round: its columns get mask 0 (and go when no other row uses them), so the
        row's next step computes what it would in a session that never had that round (attention is causal:
        earlier entries never change)."""
        if not row.round_starts:
            raise ValueError("no round to undo")
        index = self._index(row)
        kept = row.round_starts.pop()
        self.mask[index] *= (self.mask[index].cumsum(dim=0) <= kept).long()
        row.rounds -= 1
        self._keep(list(range(len(self.rows))))

    def _keep(self, keep: list[int]) -> None:
        """Keep the rows at ``keep`` and only the span of columns they use."""
        self.rows = [self.rows[index] for index in keep]
        if not keep:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        mask = self.mask[keep]
        used = torch.nonzero(mask.any(dim=0)).flatten()
        start, end = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
        selected = torch.tensor(keep, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[selected, :, start:end]
            layer.values = layer.values[selected, :, start:end]
        self.mask = mask[:, start:end]

    def prepare(self, row: BatchRow, query: str, answer: str | None,
                reference_mask: np.ndarray | PredictedMask | None, refers: bool,
                max_new_tokens: int | None = None) -> PreparedRound:
        """One row's round as token ids and a reference (``answer=None``: the answer is generated greedily,
        up to ``max_new_tokens``, default the session's); raises ``ValueError`` for an answer without
        exactly one [SEG] or a reference mask of the wrong size. A referring round with a missing or tiny
        mask uses the whole image; a ``PredictedMask`` is cut by ``heads.predicted_reference`` (references.py)."""
        processor = self.model.processor
        reference = processor.reference(row.context.image, reference_mask) if refers else None
        piece, seg_at = processor.layout.round(row.rounds, query, refers, answer)
        return PreparedRound(row, piece, seg_at, reference, max_new_tokens or self.max_new_tokens)

    @torch.no_grad()
    def step(self, rounds: list[PreparedRound]) -> list[RoundResult]:
        """Run prepared rounds (at most one per row) in one forward, then the generated answers token by
        token together; returns their results in the order given."""
        model = self.model
        layout = model.processor.layout
        by_row = {self._index(prepared.row): prepared for prepared in rounds}
        if len(by_row) != len(rounds):
            raise ValueError("a batch step takes at most one round per row")
        order = sorted(by_row)
        for index in order:
            by_row[index].row.round_starts.append(int(self.mask[index].sum()))
        # masked_scatter fills crop and box rows in row-major order: references in row order.
        references = [by_row[index].reference for index in order if by_row[index].reference is not None]
        crop_pixels, boxes = model.processor.reference_inputs(references) if references else (None, None)
        chunks = [by_row[index].piece if index in by_row else Piece() for index in range(len(self.rows))]
        hidden = self._feed(chunks, crop_pixels, boxes)

        features: dict[int, torch.Tensor] = {}
        answers: dict[int, GreedyAnswer] = {}
        last_hidden: dict[int, torch.Tensor] = {}
        for index in order:
            prepared = by_row[index]
            if prepared.seg_at is not None:
                features[index] = model.project(model.seg_states(hidden[index], [prepared.seg_at]))[0]
            else:
                answers[index] = GreedyAnswer(layout.seg_id, layout.eos_id, prepared.max_new_tokens)
                last_hidden[index] = hidden[index, len(prepared.piece.ids) - 1]
        self._generate(dict(answers), last_hidden)

        for index, answer in answers.items():
            features[index] = answer.feature
        contexts = [by_row[index].row.context for index in order]
        mask_logits = decode_features(model, torch.cat([context.sam_embedding for context in contexts]),
                                      torch.stack([features[index] for index in order]),
                                      [context.frame for context in contexts])
        results: dict[int, RoundResult] = {}
        for index, logits in zip(order, mask_logits):
            prepared = by_row[index]
            answer = answers.get(index)
            answer_ids = prepared.answer_ids if answer is None else answer.answer_ids
            results[index] = RoundResult(features[index], logits, answer_text(model.tokenizer, answer_ids),
                                         answer_ids, answer is not None and answer.seg_fed)
            prepared.row.rounds += 1
        return [results[self._index(prepared.row)] for prepared in rounds]

    def _generate(self, answers: dict[int, GreedyAnswer], last_hidden: dict[int, torch.Tensor]) -> None:
        """Greedy decoding of every row in ``answers`` at once, one token per row and forward; rows without
        a token to feed (not generating, or done) are fed pad with mask 0. Rows leave ``answers`` when done."""
        model = self.model
        seg_id = model.processor.layout.seg_id
        while answers:
            asking = [index for index, answer in answers.items() if answer.needs_logits]
            logits = {}
            if asking:
                rows_logits = model.answer_logits(torch.stack([last_hidden[index] for index in asking]))
                logits = dict(zip(asking, rows_logits))
            tokens = {index: answer.next_token(logits.get(index)) for index, answer in answers.items()}
            tokens = {index: token for index, token in tokens.items() if token is not None}
            for index in set(answers) - set(tokens):
                del answers[index]
            if not tokens:
                return
            chunks = [Piece().add([tokens[index]]) if index in tokens else Piece() for index in range(len(self.rows))]
            hidden = self._feed(chunks, None, None)
            for index, token in tokens.items():
                emitting, last_hidden[index] = last_hidden[index], hidden[index, 0]
                feature = None
                if token == seg_id:
                    # [SEG] is the newest of the two states: its own state or the one that emitted it.
                    feature = model.project(model.seg_states(torch.stack([emitting, hidden[index, 0]]), [1]))[0]
                answers[index].fed(token, feature)

    def _feed(self, chunks: list[Piece], crop_pixels: torch.Tensor | None, boxes: torch.Tensor | None) -> torch.Tensor:
        """Append one chunk per row (right-padded with mask 0) to the cache; the new columns' hidden states."""
        model = self.model
        width = max(len(chunk.ids) for chunk in chunks)
        count = len(chunks)
        ids = torch.full((count, width), model.processor.layout.pad_id, dtype=torch.long)
        kinds = torch.full((count, width), TEXT, dtype=torch.long)
        new_mask = torch.zeros(count, width, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, : len(chunk.ids)] = torch.tensor(chunk.ids, dtype=torch.long)
            kinds[row, : len(chunk.ids)] = torch.tensor(chunk.kinds, dtype=torch.long)
            new_mask[row, : len(chunk.ids)] = 1
        device = model.device
        self.mask = torch.cat([self.mask, new_mask.to(device)], dim=1)
        embeds = model.embed(ids.to(device), kinds.to(device), None, crop_pixels, boxes)
        if bool(self.mask.all()):
            # No padding anywhere: positions continue from the cache length, and no mask is needed.
            return model.hidden_states(embeds, None, self.cache)
        positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)[:, -width:]
        return model.hidden_states(embeds, self.mask, self.cache, positions)


class DialogueSession:
    """One dialogue over one encoded image: a view of a one-row ``BatchSession`` (the same code computes a
    round for one dialogue and for many)."""

    def __init__(self, model: MediRound, context: ImageContext, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.batch = BatchSession(model, max_new_tokens)
        (self.row,) = self.batch.add([context])

    @classmethod
    def for_image(cls, model: MediRound, image: np.ndarray) -> DialogueSession:
        """A session over ``image``, encoded here."""
        return cls(model, encode_image(model, image))

    @classmethod
    def _of(cls, batch: BatchSession) -> DialogueSession:
        session = cls.__new__(cls)
        session.batch, (session.row,) = batch, batch.rows
        return session

    @property
    def model(self) -> MediRound:
        return self.batch.model

    @property
    def context(self) -> ImageContext:
        return self.row.context

    @property
    def cache(self) -> DynamicCache:
        return self.batch.cache

    @property
    def rounds(self) -> int:
        return self.row.rounds

    @property
    def length(self) -> int:
        """The tokens the cache holds."""
        return self.batch.length(self.row)

    def fork(self) -> DialogueSession:
        """An independent copy: the same rounds so far, its own cache; image and model are shared."""
        return DialogueSession._of(self.batch.clone())

    def undo(self) -> None:
        """Forget the last round: the next ``step`` computes exactly what it would in a session that never
        had that round."""
        self.batch.undo(self.row)

    def step(self, query: str, answer: str | None, reference_mask: np.ndarray | PredictedMask | None = None,
             refers: bool | None = None, max_new_tokens: int | None = None) -> RoundResult:
        """Append one round; return its projected [SEG] feature and that feature's mask.

        ``answer`` given: teacher-forced (fed with the user turn in one chunk). ``answer=None``: greedy
        decoding until </s>; [SEG] is fed when decoding ends without one (``seg_fed=True``). ``refers``
        defaults to ``reference_mask is not None``.
        """
        refers = reference_mask is not None if refers is None else refers
        prepared = self.batch.prepare(self.row, query, answer, reference_mask, refers, max_new_tokens)
        (result,) = self.batch.step([prepared])
        return result

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 256) features -> (n, H, W) mask logits at the original image size (foreground: > 0)."""
        return self.row.decode(features)


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the column axis (dim 1 of a mask, dim 2 of cached keys/values) up to ``width``."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
