"""Pieces shared by the format readers: problem labels, path checks."""

from __future__ import annotations

from pathlib import Path

from mediround.data.dialogue import Dialogue
from mediround.data.paths import RootGuard
from mediround.errors import DataError

Problem = tuple[str | None, str]
"""A (field, reason) pair found inside one dialogue, before the file and item are attached."""


def item_label(kind: str, number: int, dialogue_id: str | None) -> str:
    """``"line 3"`` or ``"item 0: id abc"``: where a problem is, for ``DataError.item``."""
    label = f"{kind} {number}"
    return f"{label}: id {dialogue_id}" if dialogue_id else label


ITEM_KINDS = {"jsonl": "line", "mrmedseg": "item", "sa-med2d": "mask"}


def dialogue_label(dialogue: Dialogue, source_format: str) -> str:
    """Where a loaded dialogue came from, in the words problems use (``"line 3: id a3"``)."""
    number = dialogue.item if dialogue.item is not None else 0
    return item_label(ITEM_KINDS[source_format], number, dialogue.id)


def round_field(source_format: str, number: int, name: str = "mask") -> str:
    """The field that holds the ground-truth mask (``name="mask"``) or the answer (``"answer"``) of the
    1-based round ``number`` in a source format (MR-MedSeg keeps both in the round's gpt turn)."""
    if source_format == "mrmedseg":
        return f"conversations[{2 * number - 1}].value"
    return f"rounds[{number - 1}].{name}" if source_format == "jsonl" else name


def attach(file: Path, label: str, problems: list[Problem]) -> list[DataError]:
    return [DataError(str(file), label, field, reason) for field, reason in problems]


def guard_for(root: Path, allow_outside_root: bool) -> RootGuard | None:
    """The root check readers apply to every path; None when paths outside the root are allowed."""
    return None if allow_outside_root else RootGuard(root)


def check_path(guard: RootGuard | None, relative: str, field: str) -> list[Problem]:
    """A problem when ``relative`` is empty or (with a guard) leaves the guarded root."""
    if not relative:
        return [(field, "empty path")]
    reason = None if guard is None else guard.reason(relative)
    return [] if reason is None else [(field, reason)]
