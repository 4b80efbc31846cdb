"""Check a data file and the images and masks it names; problems are returned as data, never printed."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mediround.data.dialogue import Dialogue
from mediround.data.formats import load_dialogues
from mediround.data.formats.common import dialogue_label, round_field
from mediround.data.images import check_image, load_mask
from mediround.errors import DataError


@dataclass
class ValidationStats:
    """Counts over a data file. ``rounds`` and the breakdowns cover the dialogues that parsed."""

    dialogues: int = 0
    valid: int = 0
    rounds: int = 0
    scenarios: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    rounds_per_dialogue: Counter = field(default_factory=Counter)


@dataclass
class ValidationReport:
    file: str
    format: str
    problems: list[DataError]
    stats: ValidationStats

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dialogue_files(
    dialogue: Dialogue, source_format: str, file: str, image_sizes: dict | None = None
) -> list[DataError]:
    """Problems with the files of one dialogue: missing, undecodable, size mismatch, empty reference mask.

    ``image_sizes`` caches image checks across dialogues that share an image.
    """
    label = dialogue_label(dialogue, source_format)
    image_field = "conversations[0].value" if source_format == "mrmedseg" else "image"
    problems: list[DataError] = []

    def problem(field_name: str, error: DataError) -> None:
        problems.append(DataError(file, label, field_name, f"{error.file}: {error.reason}"))

    image_sizes = {} if image_sizes is None else image_sizes
    if dialogue.image_path not in image_sizes:
        try:
            image_sizes[dialogue.image_path] = check_image(dialogue.image_path)
        except DataError as error:
            image_sizes[dialogue.image_path] = error
    size = image_sizes[dialogue.image_path]
    if isinstance(size, DataError):
        problem(image_field, size)
        size = None
    referenced = {r.ref for r in dialogue.rounds if r.ref is not None}
    for number, round_ in enumerate(dialogue.rounds, start=1):
        if round_.mask is None:
            continue
        field_name = round_field(source_format, number)
        try:
            mask = load_mask(dialogue.path(round_.mask))
        except DataError as error:
            problem(field_name, error)
            continue
        height, width = mask.shape
        if size is not None and (width, height) != size:
            problems.append(
                DataError(
                    file,
                    label,
                    field_name,
                    f"mask {round_.mask} is {width}x{height} but the image is {size[0]}x{size[1]}",
                )
            )
        if number in referenced and not np.any(mask):
            problems.append(
                DataError(
                    file,
                    label,
                    field_name,
                    f"mask {round_.mask} is empty but a later round refers to round {number}",
                )
            )
    return problems


def validate(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    check_files: bool = True,
    format: str = "auto",
    on_dialogue: Callable[[int, int], None] | None = None,
) -> ValidationReport:
    """Load a data file, check every dialogue (and, with ``check_files``, its images and masks).

    ``on_dialogue(done, total)`` is called after each dialogue (progress display). Raises ``DataError``
    only when the file itself cannot be read.
    """
    loaded = load_dialogues(path, root=root, allow_outside_root=allow_outside_root, format=format)
    problems = list(loaded.problems)
    stats = ValidationStats(dialogues=loaded.total)
    image_sizes: dict = {}
    for done, dialogue in enumerate(loaded.dialogues, start=1):
        stats.rounds += len(dialogue.rounds)
        stats.scenarios[dialogue.scenario or "-"] += 1
        stats.modalities[dialogue.modality or "-"] += 1
        stats.rounds_per_dialogue[len(dialogue.rounds)] += 1
        found = check_dialogue_files(dialogue, loaded.format, str(path), image_sizes) if check_files else []
        problems += found
        stats.valid += not found
        if on_dialogue is not None:
            on_dialogue(done, len(loaded.dialogues))
    return ValidationReport(str(path), loaded.format, problems, stats)
