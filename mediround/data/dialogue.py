"""The data model every command reads: a ``Dialogue`` about one image, made of ``Round``s.

Plain dataclasses, no I/O. Rounds are numbered from 1 at every boundary (``Round.ref``, outputs),
as in the paper. Paths are kept exactly as written in the data file (relative to ``Dialogue.root``)
so that conversions are lossless; ``Dialogue.path`` resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Round:
    """One question/answer turn pair.

    ``answer`` is the assistant's answer, absent in new data that has questions only (inference then
    generates it). ``mask`` is the ground-truth mask path (absent for pure inference). ``ref`` is the 1-based number of
    an earlier round whose mask this round refers to. ``names_target`` says whether the query or answer
    names the target entity outright (True) or whether only the referenced round resolves it (False);
    unknown (None) for external data. Reports split scores by it, since history-blind models solve
    rounds that name their target.
    """

    query: str
    answer: str | None = None
    mask: str | None = None
    ref: int | None = None
    entity: str | None = None
    difficulty: str | None = None
    names_target: bool | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Dialogue:
    """A multi-round dialogue about one image. ``root`` is the folder paths are relative to."""

    id: str
    image: str
    rounds: list[Round]
    root: Path = field(default_factory=Path)
    modality: str | None = None
    scenario: str | None = None
    difficulty: str | None = None
    source: str | None = None
    item: int | None = None
    extra: dict = field(default_factory=dict)

    def path(self, relative: str) -> Path:
        """Absolute path of a file named in this dialogue (image or mask)."""
        return (self.root / relative).resolve()

    @property
    def image_path(self) -> Path:
        return self.path(self.image)

    def mask_path(self, round_number: int) -> Path | None:
        """Ground-truth mask of the 1-based ``round_number``, or None when the round has none."""
        mask = self.rounds[round_number - 1].mask
        return None if mask is None else self.path(mask)
