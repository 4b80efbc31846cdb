"""A run's dialogues to outcomes: each dialogue's inputs read and checked (its image, and for teacher
forcing its referred rounds' ground truth) on a background thread ahead of the model, then chained one at a
time or in batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mediround.data.dialogue import Dialogue
from mediround.data.images import load_image, load_mask
from mediround.errors import DataError
from mediround.inference.chain import (
    ChainOutcome,
    chain_batched,
    chain_dialogue,
    check_dialogue,
)
from mediround.inference.overlap import ReadAhead
from mediround.inference.settings import InferenceConfig


def _item(dialogue: Dialogue) -> Any:
    return dialogue.item if dialogue.item is not None else dialogue.id


def _reference_truth(dialogue: Dialogue, file: str, shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Ground-truth masks of every referred round (for teacher-forcing tracks), checked against the image."""
    truth = {}
    for number, round_ in enumerate(dialogue.rounds, start=1):
        if round_.ref is None or round_.ref in truth:
            continue
        field_name = f"rounds[{round_.ref - 1}].mask"
        path = dialogue.mask_path(round_.ref)
        if path is None:
            raise DataError(file, _item(dialogue), field_name, f"teacher forcing needs the ground-truth mask "
                            f"of round {round_.ref} (round {number} refers to it)")
        try:
            mask = load_mask(path)
        except DataError as error:
            raise DataError(file, _item(dialogue), field_name, f"{error.file}: {error.reason}") from None
        if mask.shape != shape:
            raise DataError(file, _item(dialogue), field_name, f"mask size {mask.shape[1]}x{mask.shape[0]} "
                            f"differs from the image's {shape[1]}x{shape[0]}")
        truth[round_.ref] = mask
    return truth


def prepare_dialogue(dialogue: Dialogue, config: InferenceConfig) -> tuple[np.ndarray, dict[int, np.ndarray] | None]:
    """Check the references, decode the image and (for teacher forcing) read the referred rounds' masks."""
    check_dialogue(dialogue, config.data, generate=config.generate)
    try:
        image = load_image(dialogue.image_path)
    except DataError as error:
        raise DataError(config.data, _item(dialogue), "image", f"{error.file}: {error.reason}") from None
    truth = _reference_truth(dialogue, config.data, image.shape[:2]) if any(config.teacher_forcing) else None
    return image, truth


def predict_dialogues(model: Any, dialogues: Sequence[Dialogue], config: InferenceConfig) -> Iterator[ChainOutcome]:
    """Every dialogue's outcome: ``config.batch_size`` at a time in finishing order, or one by one in order
    (batch size 1, or ``use_cache=False``). A dialogue that fails is an outcome with its ``DataError``.

    The inputs are prepared (``prepare_dialogue``) on a background thread up to a batch ahead of the model
    (``overlap.ReadAhead``), so decoding the next dialogues' images overlaps the model's steps.
    """
    with ReadAhead(dialogues, lambda dialogue: prepare_dialogue(dialogue, config), depth=config.batch_size) as ahead:
        if config.batch_size > 1 and config.use_cache:
            yield from chain_batched(model, dialogues, ahead.take, config.tracks, batch_size=config.batch_size,
                                     generate=config.generate, jcm_rounds=config.jcm_rounds, file=config.data)
            return
        for dialogue in dialogues:
            try:
                image, truth = ahead.take(dialogue)
                results = chain_dialogue(model, dialogue, image, config.tracks, generate=config.generate,
                                         use_cache=config.use_cache, reference_truth=truth,
                                         jcm_rounds=config.jcm_rounds)
            except DataError as error:
                yield ChainOutcome(dialogue, None, None, error)
            else:
                yield ChainOutcome(dialogue, results, image)
