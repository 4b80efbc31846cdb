"""A multi-round session over one image, one question at a time (``mediround chat``).

The image is encoded once (SAM and CLIP); each question is one ``DialogueSession.step`` over the KV cache
of the earlier rounds, so a new question costs only its own tokens. The model writes every answer
(greedy), as ``infer`` does for a round without an answer. A question refers to an earlier round's
predicted mask with ``@N`` (``parse_question``); that mask's crop and box are the round's reference, as in
Algorithm 1. JCM applies to every round at ``beta`` (None: off), as in ``chain_dialogue``.

``undo`` cuts the last round off the cache (the next question computes what a session without that round
computes), ``reset`` starts over on the same encoded image, and ``dialogue`` is the session as a
``Dialogue`` that ``write_jsonl`` saves and ``mediround infer`` reads back. With an output folder every
round writes ``round-N.png`` (the mask, 0/255) and ``round-N-overlay.png`` (the image and the rounds so
far, round N last).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mediround.data.dialogue import Dialogue, Round
from mediround.data.formats import write_jsonl
from mediround.data.images import load_image, save_mask
from mediround.errors import MediRoundError
from mediround.model import MASK_THRESHOLD, DialogueSession, MediRound, encode_image
from mediround.reports.overlays import write_overlay

REFERENCE = re.compile(r"@(\d+)")
"""``@N`` in a question: the question refers to the predicted mask of round N (1-based)."""
ROUND_FILE = "round-{}.png"
OVERLAY_FILE = "round-{}-overlay.png"


class QuestionError(MediRoundError):
    """A question the session cannot ask (a reference to a round that does not exist, no text)."""


@dataclass(frozen=True)
class Question:
    """A question's text without its ``@N`` marker, and the round it refers to (None: no reference)."""

    query: str
    ref: int | None = None


def parse_question(line: str) -> Question:
    """``"@2 Segment what lies below it."`` -> ``Question("Segment what lies below it.", 2)``.

    The marker may stand anywhere in the line; one reference at most (the model takes one reference mask).
    """
    refs = [int(match.group(1)) for match in REFERENCE.finditer(line)]
    if len(refs) > 1:
        raise QuestionError(f"{line!r}: {len(refs)} references (@N); a question refers to one round at most")
    query = " ".join(REFERENCE.sub(" ", line).split())
    if not query:
        raise QuestionError(f"{line!r}: no question besides the reference")
    return Question(query, refs[0] if refs else None)


@dataclass
class ChatRound:
    """One answered question: the model's answer, its mask (H, W) bool, the JCM score (None when JCM is
    off) and whether the refined [SEG] was decoded, whether greedy decoding produced [SEG] itself, and the
    seconds the round took (the step and its decodes; the image was encoded before)."""

    number: int
    query: str
    ref: int | None
    answer: str
    mask: np.ndarray
    jcm_score: float | None
    refined: bool
    seg_found: bool
    seconds: float

    @property
    def area(self) -> int:
        """Mask pixels."""
        return int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """(x_min, y_min, x_max, y_max) of the mask, inclusive pixel coordinates; None for an empty mask."""
        rows, columns = np.nonzero(self.mask)
        if rows.size == 0:
            return None
        return int(columns.min()), int(rows.min()), int(columns.max()), int(rows.max())


class ChatSession:
    """Questions about one image, answered round by round over one KV cache; see the module docstring."""

    def __init__(self, model: MediRound, image_path: str | os.PathLike, beta: float | None = None,
                 out: str | os.PathLike | None = None):
        self.model = model
        self.image_path = Path(image_path)
        self.image = load_image(self.image_path)
        self.beta = beta
        self.out = None if out is None else Path(out)
        started = time.perf_counter()
        self.context = encode_image(model, self.image)
        self.encode_seconds = time.perf_counter() - started
        self.session = DialogueSession(model, self.context)
        self.rounds: list[ChatRound] = []
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._remove_round_files(1)

    def ask(self, query: str, ref: int | None = None) -> ChatRound:
        """Answer ``query`` (referring to round ``ref``'s mask when given) and write the round's files."""
        if ref is not None and not 1 <= ref <= len(self.rounds):
            span = f"1..{len(self.rounds)}" if self.rounds else "none yet"
            raise QuestionError(f"@{ref}: there is no round {ref} to refer to (rounds: {span})")
        if not query.strip():
            raise QuestionError("empty question")
        started = time.perf_counter()
        reference = None if ref is None else self.rounds[ref - 1].mask
        with torch.no_grad():
            result = self.session.step(query, None, reference, refers=ref is not None)
            feature = result.seg_feature
            score = None if self.beta is None else float(self.model.jcm.judge(feature).reshape(-1)[0])
            refined = self.beta is not None and not score > self.beta
            logits = self.session.decode(self.model.jcm.refine(feature)) if refined else result.mask_logits
        mask = (logits[0] > MASK_THRESHOLD).cpu().numpy()
        answer = self.model.tokenizer.decode(result.answer_ids[:-1], skip_special_tokens=False).strip()
        round_ = ChatRound(len(self.rounds) + 1, query, ref, answer, mask, score, refined, not result.seg_fed,
                           time.perf_counter() - started)
        self.rounds.append(round_)
        if self.out is not None:
            save_mask(self.out / ROUND_FILE.format(round_.number), mask)
            write_overlay(self.out / OVERLAY_FILE.format(round_.number), self.dialogue(), self.image,
                          [r.mask for r in self.rounds])
        return round_

    def undo(self) -> ChatRound:
        """Forget the last round (its files too); returns it. A round that later rounds refer to can only
        go after them, so references stay valid."""
        if not self.rounds:
            raise QuestionError("nothing to undo")
        self.session.undo()
        self._remove_round_files(len(self.rounds))
        return self.rounds.pop()

    def reset(self) -> None:
        """Start over on the same image (not encoded again): no rounds, no round files."""
        self.session = DialogueSession(self.model, self.context)
        self._remove_round_files(1)
        self.rounds = []

    def dialogue(self, root: str | os.PathLike | None = None) -> Dialogue:
        """The rounds so far as a dialogue whose image path is relative to ``root`` (default: the image's
        folder), with the model's answers and the references."""
        base = Path(root) if root is not None else self.image_path.parent
        image = os.path.relpath(self.image_path.resolve(), base.resolve())
        rounds = [Round(query=r.query, answer=r.answer, ref=r.ref) for r in self.rounds]
        return Dialogue(id=f"chat-{self.image_path.stem}", image=image, rounds=rounds, root=base)

    def save(self, path: str | os.PathLike) -> Dialogue:
        """Write the rounds so far as a one-line JSONL dialogue (atomically) that ``mediround infer`` reads;
        the image path is relative to the file's folder. Returns the dialogue written."""
        if not self.rounds:
            raise QuestionError("no rounds to save")
        dialogue = self.dialogue(Path(path).parent)
        write_jsonl([dialogue], path)
        return dialogue

    def _remove_round_files(self, first: int) -> None:
        """Remove the round files of rounds ``first`` and later (from this session or an earlier one)."""
        for path in self.out.glob("round-*.png") if self.out is not None else ():
            match = re.fullmatch(r"round-(\d+)(-overlay)?\.png", path.name)
            if match and int(match.group(1)) >= first:
                path.unlink()
