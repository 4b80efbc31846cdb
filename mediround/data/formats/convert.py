"""Convert between formats, rewriting paths so the output is valid where it is written."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from mediround.data.dialogue import Dialogue
from mediround.data.formats import load_dialogues
from mediround.data.formats.common import attach, dialogue_label
from mediround.data.formats.jsonl import write_jsonl
from mediround.data.formats.mrmedseg import retarget, unwritable_reason, write_mrmedseg
from mediround.data.paths import RootGuard, relocate
from mediround.errors import DataError

TARGETS = {".jsonl": "jsonl", ".json": "mrmedseg"}


@dataclass
class ConvertResult:
    source_format: str
    target_format: str
    written: int
    total: int
    problems: list[DataError]
    outside_output_folder: int
    """Written dialogues naming files outside the output's folder (validate with ``allow_outside_root``)."""


def target_format_for(output: str | os.PathLike) -> str:
    """``jsonl`` for ``.jsonl``, ``mrmedseg`` for ``.json``; any other extension needs an explicit format."""
    suffix = Path(output).suffix.lower()
    if suffix not in TARGETS:
        raise DataError(
            str(output),
            None,
            None,
            "cannot tell the output format from the extension; give --to jsonl|mrmedseg",
        )
    return TARGETS[suffix]


def moved(dialogue: Dialogue, new_root: Path) -> Dialogue:
    """A copy of ``dialogue`` whose paths are relative to ``new_root`` (unchanged if the root is the same)."""
    copied = copy.deepcopy(dialogue)

    def move(relative: str) -> str:
        return relocate(relative, dialogue.root, new_root)

    copied.image = move(dialogue.image)
    for round_ in copied.rounds:
        if round_.mask is not None:
            round_.mask = move(round_.mask)
    retarget(copied, move)
    copied.root = new_root
    return copied


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    source_format: str = "auto",
    target_format: str | None = None,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> ConvertResult:
    """Write the valid dialogues of ``source`` to ``output`` atomically; skipped ones come back as problems."""
    output = Path(output)
    target = target_format or target_format_for(output)
    if target not in ("jsonl", "mrmedseg"):
        raise DataError(str(output), None, None, f"unknown output format '{target}' (jsonl or mrmedseg)")
    loaded = load_dialogues(source, root=root, allow_outside_root=allow_outside_root, format=source_format)
    new_root = output.parent
    dialogues = [moved(dialogue, new_root) for dialogue in loaded.dialogues]
    problems = list(loaded.problems)
    if target == "mrmedseg":
        dialogues = _writable_as_mrmedseg(dialogues, Path(source), loaded.format, problems)
    writer = write_jsonl if target == "jsonl" else write_mrmedseg
    writer(dialogues, output)
    guard = RootGuard(new_root)
    outside = sum(1 for dialogue in dialogues if _leaves_root(dialogue, guard))
    return ConvertResult(loaded.format, target, len(dialogues), loaded.total, problems, outside)


def _writable_as_mrmedseg(
    dialogues: list[Dialogue], source: Path, source_format: str, problems: list[DataError]
) -> list[Dialogue]:
    """The dialogues MR-MedSeg can hold; the others are reported as problems of the source file."""
    kept = []
    for dialogue in dialogues:
        problem = unwritable_reason(dialogue)
        if problem is None:
            kept.append(dialogue)
        else:
            problems += attach(source, dialogue_label(dialogue, source_format), [problem])
    return kept


def _leaves_root(dialogue: Dialogue, guard: RootGuard) -> bool:
    paths = [dialogue.image] + [r.mask for r in dialogue.rounds if r.mask is not None]
    return any(guard.reason(path) is not None for path in paths)
