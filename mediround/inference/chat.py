"""A multi-round session over one image, one question at a time (``mediround chat``).

The image is encoded once (SAM and CLIP); each question is one ``DialogueSession.step`` over the KV cache
of the earlier rounds, so a new question costs only its own tokens. The model writes every answer
(greedy), as ``infer`` does for a round without an answer. A question refers to an earlier round's
predicted mask with ``@N`` (``parse_question``); that mask's crop and box are the round's reference, as in
Algorithm 1. JCM runs at ``beta`` (None: off) on the rounds ``jcm_rounds`` names, as in ``chain_dialogue``:
with ``all`` every round is judged when it is asked; with ``referred`` (the authors' convention) a round
is shown raw until a later question refers to it, and is judged then (its stored [SEG] feature, refined
when ``q <= beta``) before its mask becomes that question's reference. So every mask and every reference
equals what ``infer`` computes on the saved dialogue, where the whole dialogue is known up front.

``undo`` cuts the last round off the cache (the next question computes what a session without that round
computes) and returns a round it got judged (``referred``) to its raw mask, ``reset`` starts over on the same encoded image, and ``dialogue`` is the session as a
``Dialogue`` that ``write_jsonl`` saves and ``mediround infer`` reads back. With an output folder every
round writes ``round-N.png`` (the mask, 0/255) and ``round-N-overlay.png`` (the image and the rounds so
far, round N last); when an earlier round's mask changes (judged late, or raw again after an undo), its
mask and the overlays from that round on are rewritten.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mediround.data.dialogue import Dialogue, Round
from mediround.data.formats import write_jsonl
from mediround.data.images import load_image, save_mask
from mediround.errors import MediRoundError
from mediround.model import DialogueSession, MediRound, encode_image
from mediround.model.frame import mask_from_logits
from mediround.model.jcm import apply_jcm
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
    """One answered question: the model's answer, its mask (H, W) bool, whether greedy decoding produced
    [SEG] itself, the seconds the round took (the step and its decodes; the image was encoded before), the
    JCM score (None while the round is not judged) and whether the refined [SEG] was decoded, and the round
    whose question got it judged (``judged_at``: its own number with ``all``, the first round referring to
    it with ``referred``). ``raw_mask`` and ``seg_feature`` (h_c) are what a later judgement starts from."""

    number: int
    query: str
    ref: int | None
    answer: str
    mask: np.ndarray
    seg_found: bool
    seconds: float
    raw_mask: np.ndarray = field(repr=False)
    seg_feature: torch.Tensor = field(repr=False)
    jcm_score: float | None = None
    refined: bool = False
    judged_at: int | None = None

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
                 out: str | os.PathLike | None = None, jcm_rounds: str | None = None):
        self.model = model
        self.image_path = Path(image_path)
        self.image = load_image(self.image_path)
        self.beta = beta
        self.jcm_rounds = jcm_rounds or model.config.heads.jcm_rounds
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
        """Answer ``query`` (referring to round ``ref``'s mask when given) and write the round's files. With
        ``referred``, round ``ref`` is judged first unless it was already (its ``judged_at`` is then this
        round's number)."""
        if ref is not None and not 1 <= ref <= len(self.rounds):
            span = f"1..{len(self.rounds)}" if self.rounds else "none yet"
            raise QuestionError(f"@{ref}: there is no round {ref} to refer to (rounds: {span})")
        if not query.strip():
            raise QuestionError("empty question")
        started = time.perf_counter()
        number = len(self.rounds) + 1
        if ref is not None and self._judge(self.rounds[ref - 1], number):
            self._rewrite_from(ref)
        reference = None if ref is None else self.rounds[ref - 1].mask
        with torch.no_grad():
            result = self.session.step(query, None, reference, refers=ref is not None)
        mask = mask_from_logits(result.mask_logits[0])
        round_ = ChatRound(number, query, ref, result.answer, mask, seg_found=not result.seg_fed, seconds=0.0,
                           raw_mask=mask, seg_feature=result.seg_feature)
        if self.jcm_rounds == "all":
            self._judge(round_, number)
        round_.seconds = time.perf_counter() - started
        self.rounds.append(round_)
        self._rewrite_from(number)
        return round_

    def undo(self) -> ChatRound:
        """Forget the last round (its files too); returns it. A round it got judged (``referred``: it was
        the first to refer to it, and no later round remains) goes back to its raw mask. A round that later
        rounds refer to can only go after them, so references stay valid."""
        if not self.rounds:
            raise QuestionError("nothing to undo")
        self.session.undo()
        self._remove_round_files(len(self.rounds))
        unjudged = self.judged_by(len(self.rounds))
        last = self.rounds.pop()
        for round_ in unjudged:
            refined = round_.refined
            round_.mask, round_.jcm_score, round_.refined, round_.judged_at = round_.raw_mask, None, False, None
            if refined:
                self._rewrite_from(round_.number)
        return last

    def judged_by(self, number: int) -> list[ChatRound]:
        """The earlier rounds that round ``number``'s question got judged (``referred``: at most the one it
        refers to, when no earlier round referred to it)."""
        return [r for r in self.rounds[: number - 1] if r.judged_at == number]

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

    def _judge(self, round_: ChatRound, at: int) -> bool:
        """Judge ``round_`` for round ``at`` unless JCM is off or it was judged already: its JCM score, and
        its mask decoded from refine(h_c) when ``q <= beta``. Returns whether its mask changed."""
        if self.beta is None or round_.judged_at is not None:
            return False
        decision = apply_jcm(self.model.jcm, round_.seg_feature, [self.beta], self.session.decode)
        round_.jcm_score, round_.refined = decision.score, decision.refines(self.beta)
        if round_.refined:
            round_.mask = mask_from_logits(decision.refined_logits[0])
        round_.judged_at = at
        return round_.refined

    def _rewrite_from(self, number: int) -> None:
        """Write round ``number``'s mask and the overlays of rounds ``number`` and later (each shows the
        rounds up to its own)."""
        if self.out is None:
            return
        save_mask(self.out / ROUND_FILE.format(number), self.rounds[number - 1].mask)
        dialogue = self.dialogue()
        masks = [r.mask for r in self.rounds]
        for last in range(number, len(self.rounds) + 1):
            write_overlay(self.out / OVERLAY_FILE.format(last), dialogue, self.image, masks[:last])

    def _remove_round_files(self, first: int) -> None:
        """Remove the round files of rounds ``first`` and later (from this session or an earlier one)."""
        for path in self.out.glob("round-*.png") if self.out is not None else ():
            match = re.fullmatch(r"round-(\d+)(-overlay)?\.png", path.name)
            if match and int(match.group(1)) >= first:
                path.unlink()
