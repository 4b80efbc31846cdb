"""On-disk dialogue formats: MediRound JSONL, the released MR-MedSeg JSON, SA-Med2D folders.

``load_dialogues`` detects the format from the content, never the file name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mediround.data.dialogue import Dialogue
from mediround.data.formats.common import dialogue_label, round_field
from mediround.data.formats.jsonl import read_jsonl, write_jsonl
from mediround.data.formats.mrmedseg import read_mrmedseg, write_mrmedseg
from mediround.data.formats.samed2d import read_samed2d
from mediround.errors import DataError

FORMATS = ("jsonl", "mrmedseg", "sa-med2d")


@dataclass
class LoadResult:
    """The valid dialogues of a data source, the problems of the skipped ones, and how many there were."""

    dialogues: list[Dialogue]
    problems: list[DataError]
    format: str
    total: int = 0


def detect(path: str | os.PathLike) -> str:
    """``"jsonl"`` or ``"mrmedseg"`` from the file's content (``"sa-med2d"`` for a folder). An MR-MedSeg
    file is a JSON list of items or one item object (the authors' ``data_sample.json``)."""
    path = Path(path)
    if path.is_dir():
        return "sa-med2d"
    try:
        with open(path, "rb") as handle:
            first_line = handle.readline()
            while first_line and not first_line.strip():
                first_line = handle.readline()
            has_more_lines = bool(handle.read(1 << 16).strip())
    except FileNotFoundError:
        raise DataError(str(path), None, None, "file not found") from None
    except OSError as error:
        raise DataError(str(path), None, None, f"cannot read file: {error.strerror or error}") from None
    start = first_line.lstrip()[:1]
    if not start:
        raise DataError(str(path), None, None, "empty file: no dialogues")
    if start == b"{":
        # A pretty-printed single object (the authors' data_sample.json) does not parse line by line.
        try:
            record = json.loads(first_line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "mrmedseg"
        return "mrmedseg" if isinstance(record, dict) and "conversations" in record and not has_more_lines else "jsonl"
    if start != b"[":
        return "jsonl"
    try:
        json.loads(first_line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "mrmedseg"
    return "jsonl" if has_more_lines else "mrmedseg"


def load_dialogues(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
    format: str = "auto",
    require_labels: bool = False,
) -> LoadResult:
    """Read every valid dialogue of a data file (or SA-Med2D folder); bad ones are skipped and reported.

    Paths resolve relative to ``root`` when given, else to the data file's folder. A path that leaves
    the root is a problem unless ``allow_outside_root``. Rounds without an answer or a ground-truth mask
    (and refs to them) are valid: inference generates the answer and only needs the predicted masks.
    ``require_labels`` (training) skips and reports every dialogue with a round that lacks either.
    Raises ``DataError`` for an unreadable file.
    """
    path = Path(path)
    kind = detect(path) if format == "auto" else format
    if kind not in FORMATS:
        raise DataError(str(path), None, None, f"unknown format '{kind}' (known: {', '.join(FORMATS)})")
    if kind == "sa-med2d":
        dialogues, problems, total = read_samed2d(path, allow_outside_root)
    else:
        base = Path(root) if root is not None else path.parent
        reader = read_jsonl if kind == "jsonl" else read_mrmedseg
        dialogues, problems, total = reader(path, base, allow_outside_root)
    unique = _drop_duplicate_ids(dialogues, problems, path, kind)
    if require_labels:
        unique = _drop_unlabelled(unique, problems, path, kind)
    return LoadResult(unique, problems, kind, total)


def _drop_unlabelled(dialogues: list[Dialogue], problems: list[DataError], path: Path, kind: str) -> list[Dialogue]:
    """Keep the dialogues whose every round has an answer and a ground-truth mask; report the others."""
    kept = []
    for dialogue in dialogues:
        problem = _missing_label(dialogue, kind)
        if problem is None:
            kept.append(dialogue)
        else:
            problems.append(DataError(str(path), dialogue_label(dialogue, kind), *problem))
    return kept


def _missing_label(dialogue: Dialogue, kind: str) -> tuple[str, str] | None:
    """(field, reason) of the first round without an answer or a ground-truth mask, or None."""
    for number, round_ in enumerate(dialogue.rounds, start=1):
        if round_.answer is None:
            return (round_field(kind, number, "answer"),
                    f"round {number} has no answer; training needs one for every round")
        if round_.mask is None:
            return (round_field(kind, number),
                    f"round {number} has no ground-truth mask; training needs one for every round")
    return None


def _drop_duplicate_ids(
    dialogues: list[Dialogue], problems: list[DataError], path: Path, kind: str
) -> list[Dialogue]:
    """Keep the first dialogue of each id; report the others (predictions and scores are keyed by id)."""
    first_seen: dict[str, str] = {}
    unique = []
    for dialogue in dialogues:
        label = dialogue_label(dialogue, kind)
        if dialogue.id in first_seen:
            problems.append(
                DataError(
                    str(path),
                    label,
                    "id",
                    f"duplicate id '{dialogue.id}' (first at {first_seen[dialogue.id]})",
                )
            )
        else:
            first_seen[dialogue.id] = label
            unique.append(dialogue)
    return unique


__all__ = ["FORMATS", "LoadResult", "detect", "load_dialogues", "write_jsonl", "write_mrmedseg"]
