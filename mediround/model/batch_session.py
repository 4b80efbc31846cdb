"""Many dialogues round by round over one batched KV cache: what ``DialogueSession`` does for one, with
one language-model forward per round step for all of them.

Each dialogue in progress (or each fork of one, when JCM tracks feed different references) is a row of
the cache. Rows hold different numbers of tokens, so the cache carries a 2-D attention mask (rows x
columns) that only grows: a row joins left-padded to the current width, a round's chunks are right-padded
to the longest one, and a padded column keeps mask 0 forever. Position ids come from the cumulative mask,
so every real token sits at the position it has in its own unpadded sequence; rows that do not take part
in a step (or have finished a generated answer) are fed pad tokens with mask 0. Masked columns get zero
attention weight, so a row computes what its own ``DialogueSession`` computes, up to the order of float
additions in batched matrix products (docs/inference.md gives the measured difference).

``add`` prefills the prompt and image tokens of new rows in one forward; ``fork`` copies a row;
``remove`` drops rows (and the columns no remaining row uses); ``prepare`` turns one row's round into
token ids and reference inputs (where a bad input raises, so that a caller can drop that dialogue alone);
``step`` runs the prepared rounds together and returns one ``RoundResult`` per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from mediround.model.mediround import MediRound
from mediround.model.processor import TEXT, Piece
from mediround.model.references import Reference
from mediround.model.segmenter import decode_masks_per_image, upsample_logits
from mediround.model.session import GreedyAnswer, ImageContext, RoundResult, decode_features, seg_feature


class BatchRow:
    """One row of a ``BatchSession``: a dialogue (or a fork of one) over its encoded image."""

    def __init__(self, batch: BatchSession, context: ImageContext, rounds: int = 0):
        self.batch = batch
        self.context = context
        self.rounds = rounds

    def fork(self) -> BatchRow:
        """A new row with this row's rounds so far (its cache copied), as ``DialogueSession.fork``."""
        return self.batch.fork(self)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 256) features -> (n, H, W) mask logits at the original image size (foreground: > 0)."""
        return decode_features(self.batch.model, self.context, features)


@dataclass
class PreparedRound:
    """One row's round as inputs: its user turn (plus the answer when teacher-forced), where [SEG] is in
    that chunk (None: the answer is generated), the teacher-forced answer's ids, and the reference crop/box
    when the round refers."""

    row: BatchRow
    piece: Piece
    seg_at: int | None
    answer_ids: list[int]
    reference: Reference | None


class BatchSession:
    """The rows of dialogues in progress, their shared KV cache and its attention mask."""

    def __init__(self, model: MediRound, max_new_tokens: int = 64):
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.rows: list[BatchRow] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=model.device)

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.llava.config.text_config)

    def _index(self, row: BatchRow) -> int:
        return next(index for index, candidate in enumerate(self.rows) if candidate is row)

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
        twin = BatchRow(self, row.context, row.rounds)
        self.rows.append(twin)
        return twin

    def remove(self, rows: list[BatchRow]) -> None:
        """Drop ``rows``; columns that only they used go too, so finished dialogues cost nothing later."""
        if not rows:
            return
        gone = {id(row) for row in rows}
        keep = [index for index, row in enumerate(self.rows) if id(row) not in gone]
        self.rows = [self.rows[index] for index in keep]
        if not keep:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        mask = self.mask[keep]
        used = torch.nonzero(mask.any(dim=0)).flatten()
        start = int(used[0]) if len(used) else mask.shape[1]
        selected = torch.tensor(keep, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[selected, :, start:]
            layer.values = layer.values[selected, :, start:]
        self.mask = mask[:, start:]

    def prepare(self, row: BatchRow, query: str, answer: str | None, reference_mask: np.ndarray | None,
                refers: bool) -> PreparedRound:
        """``DialogueSession.step``'s inputs for one row, as token ids and a reference; raises
        ``ValueError`` for an answer without exactly one [SEG] or a reference mask of the wrong size."""
        layout = self.model.processor.layout
        reference = self.model.processor.reference(row.context.image, reference_mask) if refers else None
        piece = layout.user(row.rounds, query, refers)
        if answer is None:
            return PreparedRound(row, piece, None, [], reference)
        answer_piece = layout.answer(answer)
        seg_at = len(piece.ids) + answer_piece.ids.index(layout.seg_id)
        return PreparedRound(row, piece.extend(answer_piece), seg_at, answer_piece.ids, reference)

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
                features[index] = model.project(hidden[index, prepared.seg_at + model.seg_state_offset])
            else:
                answers[index] = GreedyAnswer(layout.seg_id, layout.eos_id, self.max_new_tokens)
                last_hidden[index] = hidden[index, len(prepared.piece.ids) - 1]
        self._generate(dict(answers), last_hidden)

        for index, answer in answers.items():
            features[index] = answer.feature
        mask_logits = self._decode([by_row[index].row.context for index in order], [features[index] for index in order])
        results: dict[int, RoundResult] = {}
        for index, logits in zip(order, mask_logits):
            prepared = by_row[index]
            answer = answers.get(index)
            answer_ids = prepared.answer_ids if answer is None else answer.answer_ids
            text = model.tokenizer.decode(answer_ids, skip_special_tokens=False)
            results[index] = RoundResult(features[index], logits, text, answer_ids,
                                         answer is not None and answer.seg_fed)
            prepared.row.rounds += 1
        return [results[self._index(prepared.row)] for prepared in rounds]

    def _decode(self, contexts: list[ImageContext], features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each row's feature on its own image, SAM's mask decoder run once for all: (1, H, W) logits each."""
        model = self.model
        decoder_dtype = next(model.sam.mask_decoder.parameters()).dtype
        low_res = decode_masks_per_image(model.sam, torch.cat([context.sam_embedding for context in contexts]),
                                         torch.stack(features).to(decoder_dtype))
        size = model.config.segmenter.image_size
        return [upsample_logits(low_res[index : index + 1], size, context.resized_size, context.original_size)
                for index, context in enumerate(contexts)]

    def _generate(self, answers: dict[int, GreedyAnswer], last_hidden: dict[int, torch.Tensor]) -> None:
        """Greedy decoding of every row in ``answers`` at once, one token per row and forward; rows without
        a token to feed (not generating, or done) are fed pad with mask 0. Rows leave ``answers`` when done."""
        model = self.model
        seg_id = model.processor.layout.seg_id
        while answers:
            asking = [index for index, answer in answers.items() if answer.needs_logits]
            logits = {}
            if asking:
                rows_logits = model.llava.lm_head(torch.stack([last_hidden[index] for index in asking]))
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
                answers[index].fed(token, seg_feature(model, emitting, hidden[index, 0]) if token == seg_id else None)

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
        positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)[:, -width:]
        embeds = model.embed(ids.to(device), kinds.to(device), None, crop_pixels, boxes)
        return model.hidden_states(embeds, self.mask, self.cache, positions)


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the column axis (dim 1 of a mask, dim 2 of cached keys/values) up to ``width``."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
