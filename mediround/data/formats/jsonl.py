"""MediRound JSONL: one dialogue per line.

``{"id": "...", "image": "images/a.png", "modality": "CT", "scenario": "organ-lesion",
"difficulty": "regular", "rounds": [{"query": "...", "answer": "... [SEG].", "mask": "masks/a_r1.png"},
{"query": "...", "answer": "...", "mask": "masks/a_r2.png", "ref": 1}]}``

``ref`` is the 1-based number of the earlier round the round refers to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from mediround.atomic import atomic_open
from mediround.data.dialogue import Dialogue, Round

DIALOGUE_FIELDS = ("id", "image", "modality", "scenario", "difficulty", "rounds")
ROUND_FIELDS = ("query", "answer", "mask", "ref", "entity", "difficulty", "names_target")


def round_to_record(round_: Round) -> dict:
    """The JSON object of one round; absent optional fields are left out."""
    record: dict = {"query": round_.query, "answer": round_.answer}
    for name in ROUND_FIELDS[2:]:
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
