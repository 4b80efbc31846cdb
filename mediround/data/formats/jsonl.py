"""MediRound JSONL: one dialogue per line.

``{"id": "...", "image": "images/a.png", "modality": "CT", "scenario": "organ-lesion",
"difficulty": "regular", "rounds": [{"query": "...", "answer": "... [SEG].", "mask": "masks/a_r1.png"},
{"query": "...", "answer": "...", "mask": "masks/a_r2.png", "ref": 1}]}``

``ref`` is the 1-based number of the earlier round the round refers to. Only ``query`` is required in a
round: a round without ``answer`` gets the model's own answer at inference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from mediround.atomic import atomic_open
from mediround.data.dialogue import Dialogue, Round
from mediround.data.formats.common import Problem, attach, check_path, guard_for, item_label
from mediround.data.paths import RootGuard
from mediround.errors import DataError

ROUND_FIELDS = ("query", "answer", "mask", "ref", "entity", "difficulty", "names_target")


def round_to_record(round_: Round) -> dict:
    """The JSON object of one round; absent optional fields are left out."""
    record: dict = {"query": round_.query}
    for name in ROUND_FIELDS[1:]:
        value = getattr(round_, name)
        if value is not None:
            record[name] = value
    record.update(round_.extra)
    return record


def dialogue_to_record(dialogue: Dialogue) -> dict:
    """The JSON object of one dialogue (one JSONL line)."""
    record: dict = {"id": dialogue.id, "image": dialogue.image}
    for name in ("modality", "scenario", "difficulty"):
        value = getattr(dialogue, name)
        if value is not None:
            record[name] = value
    record["rounds"] = [round_to_record(r) for r in dialogue.rounds]
    record.update(dialogue.extra)
    return record


def write_jsonl(dialogues: Iterable[Dialogue], path: str | os.PathLike) -> None:
    """Write dialogues as JSONL, atomically."""
    with atomic_open(path) as handle:
        for dialogue in dialogues:
            handle.write(json.dumps(dialogue_to_record(dialogue), ensure_ascii=False) + "\n")


_TEXT = (str,)
_OPTIONAL_TEXT = (str, type(None))
DIALOGUE_TYPES: dict[str, tuple[type, ...]] = {
    "id": _TEXT,
    "image": _TEXT,
    "modality": _OPTIONAL_TEXT,
    "scenario": _OPTIONAL_TEXT,
    "difficulty": _OPTIONAL_TEXT,
    "rounds": (list,),
    "mrmedseg": (dict,),
}
ROUND_TYPES: dict[str, tuple[type, ...]] = {
    "query": _TEXT,
    "answer": _OPTIONAL_TEXT,
    "mask": _OPTIONAL_TEXT,
    "ref": (int, type(None)),
    "entity": _OPTIONAL_TEXT,
    "difficulty": _OPTIONAL_TEXT,
    "names_target": (bool, type(None)),
    "mrmedseg": (dict,),
}
EXTRA_FIELDS = ("mrmedseg",)
"""Fields kept in ``extra``: details of the MR-MedSeg original, so converting back is lossless."""

_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer", bool: "true/false"}


def _type_problems(
    record: dict, types: dict[str, tuple[type, ...]], required: tuple[str, ...], prefix: str
) -> list[Problem]:
    problems: list[Problem] = []
    for name in record:
        if name not in types:
            problems.append((f"{prefix}{name}", f"unknown field '{name}' (allowed: {', '.join(types)})"))
    for name in required:
        if name not in record:
            problems.append((f"{prefix}{name}", "required field is missing"))
    for name, allowed in types.items():
        if name not in record:
            continue
        value = record[name]
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            expected = " or ".join("null" if kind is type(None) else _TYPE_NAMES[kind] for kind in allowed)
            problems.append(
                (f"{prefix}{name}", f"must be {expected}, got {type(value).__name__} {value!r:.40}")
            )
    return problems


def record_to_dialogue(
    record: object, root: Path, guard: RootGuard | None = None
) -> tuple[Dialogue | None, list[Problem]]:
    """The dialogue of one JSONL record, or None and every (field, reason) problem found in it.

    ``guard`` refuses paths leaving the root; without one, paths are not checked.
    """
    if not isinstance(record, dict):
        return None, [(None, f"a line must be a JSON object, got {type(record).__name__}")]
    problems = _type_problems(record, DIALOGUE_TYPES, ("id", "image", "rounds"), "")
    if problems:
        return None, problems
    if not record["id"]:
        problems.append(("id", "must not be empty"))
    if not record["rounds"]:
        return None, problems + [("rounds", "a dialogue needs at least one round")]
    problems += check_path(guard, record["image"], "image")
    if "mrmedseg" in record and (
        set(record["mrmedseg"]) != {"item"} or not isinstance(record["mrmedseg"]["item"], dict)
    ):
        problems.append(("mrmedseg", 'must be {"item": object} (the original MR-MedSeg item fields)'))
    rounds: list[Round] = []
    for index, entry in enumerate(record["rounds"]):
        prefix = f"rounds[{index}]."
        if not isinstance(entry, dict):
            problems.append(
                (f"rounds[{index}]", f"a round must be a JSON object, got {type(entry).__name__}")
            )
            continue
        round_problems = _type_problems(entry, ROUND_TYPES, ("query",), prefix)
        problems += round_problems
        if round_problems:
            continue
        number = index + 1
        ref = entry.get("ref")
        if ref is not None and not 1 <= ref < number:
            span = "no earlier round exists" if number == 1 else f"allowed 1..{number - 1}"
            problems.append((f"{prefix}ref", f"ref {ref} must point to an earlier round ({span})"))
        if entry.get("mask") is not None:
            problems += check_path(guard, entry["mask"], f"{prefix}mask")
        kept = entry.get("mrmedseg")
        if kept is not None and not _is_kept_turns(kept):
            problems.append(
                (
                    f"{prefix}mrmedseg",
                    'must be {"human": turn, "gpt": turn}, each turn an object with a string "value"',
                )
            )
        extra = {name: entry[name] for name in EXTRA_FIELDS if name in entry}
        fields = {name: entry.get(name) for name in ROUND_FIELDS}
        rounds.append(Round(**fields, extra=extra))
    if problems:
        return None, problems
    dialogue = Dialogue(
        id=record["id"],
        image=record["image"],
        rounds=rounds,
        root=root,
        modality=record.get("modality"),
        scenario=record.get("scenario"),
        difficulty=record.get("difficulty"),
        source="jsonl",
        extra={name: record[name] for name in EXTRA_FIELDS if name in record},
    )
    return dialogue, []


def _is_kept_turns(kept: dict) -> bool:
    return set(kept) == {"human", "gpt"} and all(
        isinstance(turn, dict) and isinstance(turn.get("value"), str) for turn in kept.values()
    )


def read_jsonl(
    path: str | os.PathLike, root: Path, allow_outside_root: bool = False
) -> tuple[list[Dialogue], list[DataError], int]:
    """Dialogues of a JSONL file, the problems of the skipped lines, and the number of dialogue lines.

    A line that is not UTF-8, not JSON or not a valid dialogue is a problem of that line only; a
    ``DataError`` is raised only when the file cannot be read at all.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(str(path), None, None, f"cannot read file: {error.strerror or error}") from None
    guard = guard_for(root, allow_outside_root)
    dialogues: list[Dialogue] = []
    problems: list[DataError] = []
    count = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        count += 1
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            problems.append(
                DataError(
                    str(path), f"line {number}", None, f"not UTF-8 text (byte {error.start + 1} of the line)"
                )
            )
            continue
        except json.JSONDecodeError as error:
            problems.append(
                DataError(
                    str(path), f"line {number}", None, f"invalid JSON: {error.msg} (column {error.colno})"
                )
            )
            continue
        dialogue_id = (
            record.get("id") if isinstance(record, dict) and isinstance(record.get("id"), str) else None
        )
        dialogue, found = record_to_dialogue(record, root, guard)
        if dialogue is None:
            problems += attach(path, item_label("line", number, dialogue_id), found)
            continue
        dialogue.item = number
        dialogues.append(dialogue)
    return dialogues, problems, count
