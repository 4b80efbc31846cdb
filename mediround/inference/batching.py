"""Many dialogues through Algorithm 1 together, round by round, with continuous batching.

Up to ``batch_size`` dialogues are in progress at once. Each round step gathers the session steps of every
dialogue in progress (``DialogueChain.next_steps``: one per group of tracks, so beta sweeps and
teacher-forcing tracks share work as in ``chain_dialogue``) and runs them as one ``BatchSession.step``;
each dialogue then finishes its round itself (``DialogueChain.record``: its own JCM scores and refined
decodes), and its next referring round uses its own predicted masks. A dialogue that has run all its
rounds leaves the batch at once (its cache rows are dropped) and the next dialogue joins; the images of
the dialogues joining in one step go through both image encoders together.

A dialogue whose inputs fail (``prepare`` raising ``DataError``, or a round that cannot be turned into
tokens) leaves with its error and the others go on. Outcomes come in the order dialogues finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mediround.data.dialogue import Dialogue
from mediround.errors import DataError
from mediround.inference.chain import DialogueChain, RoundPrediction, Track
from mediround.model import MediRound
from mediround.model.batch_session import BatchSession
from mediround.model.session import encode_images

Prepare = Callable[[Dialogue], tuple[np.ndarray, Mapping[int, np.ndarray] | None]]
"""A dialogue -> its decoded image and the ground-truth masks of its referred rounds (None without
teacher forcing); raises ``DataError`` for a dialogue that cannot be predicted."""


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
) -> Iterator[ChainOutcome]:
    """``chain_dialogue`` of every dialogue, ``batch_size`` at a time sharing each forward; yields each
    dialogue's outcome as it finishes. ``file`` names the data file in errors found mid-dialogue;
    ``jcm_rounds`` is as in ``chain_dialogue``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
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
                rows = batch.add(encode_images(model, [image for _, image, _ in joining]))
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
