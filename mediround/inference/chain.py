"""Algorithm 1 of the paper: one dialogue, round by round, each round's reference from a predicted mask.

For every round ``t`` the model reads the query (and, unless it generates, the dialogue's own answer)
together with the crop and box of the mask of the round ``t`` refers to. That mask is the model's own
prediction for that round (``Track.teacher_forcing`` uses the ground truth instead); the crop/box rule,
including "a predicted mask of <= 9 pixels means the whole image", lives in ``mediround.model.references``
and is applied when a session prepares the round. The [SEG] feature ``h_c`` then goes through JCM
(``mediround.model.jcm.apply_jcm``): with score ``q = judge(h_c)``, the round's mask is ``decode(h_c)``
when ``q > beta`` and ``decode(refine(h_c))`` otherwise. ``beta=None`` turns JCM off (always ``decode(h_c)``). With ``jcm_rounds="referred"`` (the
authors' evaluation) only rounds whose mask a later round refers to are judged; the others, the final
round included, decode ``h_c`` raw.

Several tracks (JCM thresholds, predicted or ground-truth references) run in one pass over a dialogue.
What they share: the decoded image and both image encoders (``encode_image`` runs once per dialogue), and
one session row (the text model's state) for as long as the tracks have fed it identical reference
masks. Tracks split when their references differ (one track refined the referred round's [SEG] and
another did not, or one uses ground truth); the split forks the row (a copy of its KV cache), so every
track computes what a run with that track alone computes. Within a shared row, ``h_c`` with its raw
decode, ``q`` and (when a track refines) the refined decode are computed once per round.

``chain_batched`` runs many dialogues this way, their rounds sharing each forward (``BatchSession``);
``chain_dialogue`` is ``chain_batched`` of one dialogue, or, without the cache, the authors' re-forward of
the whole history every round (``_ReplaySession``, over the same session code).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mediround.data.dialogue import Dialogue
from mediround.errors import DataError
from mediround.model import DialogueSession, ImageContext, MediRound, RoundResult
from mediround.model.frame import mask_from_logits
from mediround.model.jcm import apply_jcm
from mediround.model.processor import answer_with_seg
from mediround.model.references import PredictedMask
from mediround.model.session import BatchSession, encode_images
from mediround.reports.rows import REFERENCES

Prepare = Callable[[Dialogue], tuple[np.ndarray, Mapping[int, np.ndarray] | None]]
"""A dialogue -> its decoded image and the ground-truth masks of its referred rounds (None without
teacher forcing); raises ``DataError`` for a dialogue that cannot be predicted."""


@dataclass(frozen=True)
class Track:
    """One way to chain a dialogue: a JCM threshold (None: JCM off) and the source of reference masks."""

    beta: float | None = None
    teacher_forcing: bool = False

    @property
    def label(self) -> str:
        """A folder name for this track's predictions, e.g. ``beta-0.6``, ``jcm-off-tf``."""
        name = "jcm-off" if self.beta is None else f"beta-{self.beta:g}"
        return f"{name}-tf" if self.teacher_forcing else name

    @property
    def references(self) -> str:
        """The ``references`` column of this track's metric rows."""
        return REFERENCES[self.teacher_forcing]


@dataclass
class RoundPrediction:
    """What one track predicted for one (1-based) round, and the round's [SEG] feature ``h_c`` (256,),
    before any refinement."""

    round: int
    mask: np.ndarray
    answer: str
    ref_round: int | None
    jcm_score: float | None
    refined: bool
    seg_found: bool
    seg_feature: torch.Tensor

    def record_fields(self) -> dict[str, Any]:
        """The fields of this round's line in predictions.jsonl (besides id, round and mask)."""
        return {
            "answer": self.answer,
            "ref_round": self.ref_round,
            "jcm_score": self.jcm_score,
            "refined": self.refined,
            "seg_found": self.seg_found,
        }


def check_dialogue(dialogue: Dialogue, file: str, generate: bool = False) -> None:
    """Raise ``DataError`` for what would stop the chain mid-way: a reference to a round that is not an
    earlier one, or (unless the model generates its answers) an answer with more than one [SEG]. A round
    without an answer is fine: the model generates that round's answer."""
    item = dialogue.item if dialogue.item is not None else dialogue.id
    for number, round_ in enumerate(dialogue.rounds, start=1):
        if round_.ref is not None and not 1 <= round_.ref < number:
            raise DataError(file, item, f"rounds[{number - 1}].ref",
                            f"round {number} refers to round {round_.ref}, which is not an earlier round")
        if not generate and round_.answer is not None:
            try:
                answer_with_seg(round_.answer)
            except ValueError as error:
                raise DataError(file, item, f"rounds[{number - 1}].answer", str(error)) from None


class _ReplaySession:
    """The authors' path (``--no-cache``): every round re-runs the image encoders and the whole history in
    a fresh ``DialogueSession`` (the same round code as the cached path); the latest one decodes the
    round's refined feature."""

    def __init__(self, model: MediRound, image: np.ndarray):
        self.model = model
        self.image = image
        self.history: list[tuple[str, str, np.ndarray | PredictedMask | None, bool]] = []
        self.latest: DialogueSession | None = None

    def step(self, query: str, answer: str | None, reference: np.ndarray | PredictedMask | None,
             refers: bool) -> RoundResult:
        session = DialogueSession.for_image(self.model, self.image)
        for past_query, past_answer, past_reference, past_refers in self.history:
            session.step(past_query, past_answer, past_reference, refers=past_refers)
        result = session.step(query, answer, reference, refers=refers)
        self.history.append((query, result.answer, reference, refers))
        self.latest = session
        return result

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return self.latest.decode(features)

    def fork(self) -> _ReplaySession:
        twin = copy.copy(self)
        twin.history = list(self.history)
        return twin


@dataclass
class _Group:
    """Tracks that have fed the model identical inputs so far and therefore share one session."""

    session: DialogueSession | _ReplaySession
    tracks: list[Track]


def _reference_key(track: Track, ref: int, results: Mapping[Track, list[RoundPrediction]]) -> tuple:
    """Which reference mask ``track`` feeds for a round referring to ``ref``, relative to its group.

    Tracks of one group saw the same [SEG] feature in round ``ref``, so their predicted masks of that round
    differ only by whether JCM refined it.
    """
    if track.teacher_forcing:
        return ("truth",)
    return ("predicted", results[track][ref - 1].refined)


@dataclass
class SessionStep:
    """One session step a round needs: the arguments of ``session.step`` for one group of tracks."""

    session: Any
    query: str
    answer: str | None
    reference: np.ndarray | PredictedMask | None
    refers: bool


class DialogueChain:
    """Algorithm 1 over one dialogue as a state machine, so that a caller can run the session steps of a
    round itself (batched with other dialogues in ``chain_batched``, one by one in the no-cache replay).

    ``next_steps()`` splits the track groups for the next round and gives one ``SessionStep`` per group;
    ``record(results)`` takes those steps' ``RoundResult``s in the same order and finishes the round (JCM
    score, refined decodes). ``sessions`` is every session the chain holds; ``results`` the rounds so far.
    """

    def __init__(self, model: MediRound, dialogue: Dialogue, tracks: Sequence[Track], root: Any, *,
                 generate: bool = False, reference_truth: Mapping[int, np.ndarray] | None = None,
                 jcm_rounds: str | None = None):
        tracks = list(dict.fromkeys(tracks))
        if not tracks:
            raise ValueError("chain_dialogue needs at least one track")
        if (jcm_rounds or model.config.heads.jcm_rounds) == "referred":
            self.judged = {round_.ref for round_ in dialogue.rounds if round_.ref is not None}
        else:
            self.judged = set(range(1, len(dialogue.rounds) + 1))
        self.model = model
        self.dialogue = dialogue
        self.generate = generate
        self.reference_truth = reference_truth
        self.results: dict[Track, list[RoundPrediction]] = {track: [] for track in tracks}
        self.groups = [_Group(root, tracks)]
        self.rounds_done = 0

    @property
    def finished(self) -> bool:
        return self.rounds_done == len(self.dialogue.rounds)

    @property
    def sessions(self) -> list[Any]:
        return [group.session for group in self.groups]

    def next_steps(self) -> list[SessionStep]:
        round_ = self.dialogue.rounds[self.rounds_done]
        self.groups = [sub for group in self.groups for sub in _split(group, round_.ref, self.results)]
        answer = None if self.generate else round_.answer
        return [
            SessionStep(group.session, round_.query, answer,
                        _reference(group.tracks[0], round_.ref, self.results, self.reference_truth),
                        round_.ref is not None)
            for group in self.groups
        ]

    def record(self, results: Sequence[RoundResult]) -> None:
        round_ = self.dialogue.rounds[self.rounds_done]
        self.rounds_done += 1
        for group, result in zip(self.groups, results, strict=True):
            _record_round(self.model, group, self.rounds_done, round_.ref, result, self.results,
                          self.rounds_done in self.judged)


def chain_dialogue(
    model: MediRound,
    dialogue: Dialogue,
    image: np.ndarray,
    tracks: Sequence[Track],
    *,
    generate: bool = False,
    use_cache: bool = True,
    reference_truth: Mapping[int, np.ndarray] | None = None,
    context: ImageContext | None = None,
    jcm_rounds: str | None = None,
) -> dict[Track, list[RoundPrediction]]:
    """Predict every round of ``dialogue`` for each track (Algorithm 1); returns the rounds per track.

    ``generate`` lets the model write its answers (greedy) and keeps them in the history; otherwise the
    dialogue's own answers are fed, and a round without one (``answer`` None) is generated.
    ``use_cache=False`` re-runs the whole model for every round (the authors' path).
    ``reference_truth`` maps referred round numbers to ground-truth masks; teacher-forcing tracks need it.
    ``context`` is ``image`` already encoded (``encode_image``); the cached path then encodes nothing.
    ``jcm_rounds`` (``all`` or ``referred``) defaults to the model's ``heads.jcm_rounds``.
    With the cache this is ``chain_batched`` of one dialogue; a failing input raises its ``DataError``.
    """
    if not use_cache:
        return _replay(model, dialogue, image, tracks, generate=generate, reference_truth=reference_truth,
                       jcm_rounds=jcm_rounds)
    encode = None if context is None else (lambda images: [context])
    (outcome,) = chain_batched(model, [dialogue], lambda _: (image, reference_truth), tracks, batch_size=1,
                               generate=generate, jcm_rounds=jcm_rounds, encode=encode)
    if outcome.error is not None:
        raise outcome.error
    return outcome.results


def _replay(model: MediRound, dialogue: Dialogue, image: np.ndarray, tracks: Sequence[Track], *,
            generate: bool, reference_truth: Mapping[int, np.ndarray] | None,
            jcm_rounds: str | None) -> dict[Track, list[RoundPrediction]]:
    """``chain_dialogue`` without the cache: the same chain, each session step a full re-forward."""
    with torch.no_grad():
        chain = DialogueChain(model, dialogue, tracks, _ReplaySession(model, image), generate=generate,
                              reference_truth=reference_truth, jcm_rounds=jcm_rounds)
        while not chain.finished:
            chain.record([step.session.step(step.query, step.answer, step.reference, step.refers)
                          for step in chain.next_steps()])
    return chain.results


def _split(group: _Group, ref: int | None, results: Mapping[Track, list[RoundPrediction]]) -> list[_Group]:
    """The group's tracks partitioned by the reference they feed this round; extra parts get a copied session."""
    if ref is None:
        return [group]
    parts: dict[tuple, list[Track]] = {}
    for track in group.tracks:
        parts.setdefault(_reference_key(track, ref, results), []).append(track)
    members = list(parts.values())
    if len(members) == 1:
        return [group]
    forks = [group.session.fork() for _ in members[1:]]
    return [_Group(group.session, members[0])] + [_Group(s, m) for s, m in zip(forks, members[1:])]


def _reference(
    track: Track,
    ref: int | None,
    results: Mapping[Track, list[RoundPrediction]],
    reference_truth: Mapping[int, np.ndarray] | None,
) -> np.ndarray | PredictedMask | None:
    """The mask a round referring to ``ref`` is cut from: the ground truth (teacher forcing), or the track's
    own prediction with the ground truth beside it when known (``heads.predicted_reference`` decides how
    a prediction is cut, and whether the ground truth is its fallback)."""
    if ref is None:
        return None
    if track.teacher_forcing:
        if reference_truth is None or ref not in reference_truth:
            raise ValueError(f"teacher forcing needs the ground-truth mask of round {ref}")
        return reference_truth[ref]
    truth = None if reference_truth is None else reference_truth.get(ref)
    return PredictedMask(results[track][ref - 1].mask, truth)


def _record_round(
    model: MediRound,
    group: _Group,
    number: int,
    ref: int | None,
    result: RoundResult,
    results: dict[Track, list[RoundPrediction]],
    judged: bool,
) -> None:
    """Finish one round for one group from its session step (which decoded the raw feature): JCM applied
    once for the group's thresholds when the round is ``judged``, each distinct mask thresholded once."""
    feature = result.seg_feature
    betas = [track.beta for track in group.tracks if track.beta is not None] if judged else []
    decision = apply_jcm(model.jcm, feature, betas, group.session.decode) if betas else None
    logits = {False: result.mask_logits, True: None if decision is None else decision.refined_logits}
    masks: dict[bool, np.ndarray] = {}
    for track in group.tracks:
        refined = decision is not None and track.beta is not None and decision.refines(track.beta)
        if refined not in masks:
            masks[refined] = mask_from_logits(logits[refined][0])
        results[track].append(
            RoundPrediction(
                round=number,
                mask=masks[refined],
                answer=result.answer,
                ref_round=ref,
                jcm_score=decision.score if decision is not None and track.beta is not None else None,
                refined=refined,
                seg_found=not result.seg_fed,
                seg_feature=feature,
            )
        )


@dataclass
class ChainOutcome:
    """A finished dialogue: its rounds per track and its image, or the error that stopped it."""

    dialogue: Dialogue
    results: dict[Track, list[RoundPrediction]] | None
    image: np.ndarray | None
    error: DataError | None = None


@dataclass
class _InProgress:
    dialogue: Dialogue
    image: np.ndarray
    chain: DialogueChain


def chain_batched(
    model: MediRound,
    dialogues: Iterable[Dialogue],
    prepare: Prepare,
    tracks: Sequence[Track],
    *,
    batch_size: int,
    generate: bool = False,
    jcm_rounds: str | None = None,
    file: str = "",
    encode: Callable[[list[np.ndarray]], list[ImageContext]] | None = None,
) -> Iterator[ChainOutcome]:
    """``chain_dialogue`` of every dialogue, ``batch_size`` at a time sharing each forward (continuous
    batching); yields each dialogue's outcome as it finishes.

    Each round step gathers the session steps of every dialogue in progress (``DialogueChain.next_steps``:
    one per group of tracks) and runs them as one ``BatchSession.step``; each dialogue then finishes its
    round itself (``DialogueChain.record``: its own JCM scores and refined decodes), and its next
    referring round uses its own predicted masks. A dialogue that has run all its rounds leaves the batch
    at once (its cache rows are dropped) and the next one joins; the images joining in one step go through
    both image encoders together (``encode``, default ``encode_images``). A dialogue whose inputs fail
    (``prepare`` raising ``DataError``, or a round that cannot be turned into tokens) leaves with its error
    and the others go on. ``file`` names the data file in errors found mid-dialogue; ``jcm_rounds`` is as
    in ``chain_dialogue``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encode = encode or (lambda images: encode_images(model, images))
    batch = BatchSession(model)
    waiting = iter(dialogues)
    in_progress: list[_InProgress] = []
    exhausted = False
    with torch.no_grad():
        while True:
            joining: list[tuple[Dialogue, np.ndarray, Mapping[int, np.ndarray] | None]] = []
            while not exhausted and len(in_progress) + len(joining) < batch_size:
                dialogue = next(waiting, None)
                if dialogue is None:
                    exhausted = True
                    break
                try:
                    image, truth = prepare(dialogue)
                except DataError as error:
                    yield ChainOutcome(dialogue, None, None, error)
                    continue
                joining.append((dialogue, image, truth))
            if joining:
                rows = batch.add(encode([image for _, image, _ in joining]))
                in_progress += [
                    _InProgress(dialogue, image, DialogueChain(model, dialogue, tracks, row, generate=generate,
                                                               reference_truth=truth, jcm_rounds=jcm_rounds))
                    for (dialogue, image, truth), row in zip(joining, rows)
                ]
            if not in_progress:
                return

            prepared, owners = [], []
            for item in list(in_progress):
                try:
                    rounds = [batch.prepare(step.session, step.query, step.answer, step.reference, step.refers)
                              for step in item.chain.next_steps()]
                except (DataError, ValueError) as error:
                    in_progress.remove(item)
                    batch.remove(item.chain.sessions)
                    yield ChainOutcome(item.dialogue, None, item.image, _data_error(error, file, item.dialogue))
                    continue
                prepared += rounds
                owners.append((item, len(rounds)))
            results = iter(batch.step(prepared) if prepared else [])
            finished = []
            for item, count in owners:
                item.chain.record([next(results) for _ in range(count)])
                if item.chain.finished:
                    finished.append(item)
            # One removal for all of them: each removal copies the whole cache.
            batch.remove([session for item in finished for session in item.chain.sessions])
            for item in finished:
                in_progress.remove(item)
                yield ChainOutcome(item.dialogue, item.chain.results, item.image)


def _data_error(error: DataError | ValueError, file: str, dialogue: Dialogue) -> DataError:
    if isinstance(error, DataError):
        return error
    item = dialogue.item if dialogue.item is not None else dialogue.id
    return DataError(file, item, None, str(error))
