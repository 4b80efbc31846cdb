"""Typed errors. The library raises these; the CLI turns them into one-line messages and exit codes."""

from __future__ import annotations


class MediRoundError(Exception):
    """Base class of every error the library raises on purpose (bad input, bad config, bad checkpoint)."""

    exit_code = 2


class DataError(MediRoundError):
    """A problem with one item of a data file: which file, which item (line or index), which field, why."""

    def __init__(self, file: str, item: str | int | None, field: str | None, reason: str):
        self.file = str(file)
        self.item = item
        self.field = field
        self.reason = reason
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [self.file]
        if self.item is not None:
            parts.append(str(self.item))
        if self.field:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts) + f": {self.reason}"

    def as_dict(self) -> dict:
        return {"file": self.file, "item": self.item, "field": self.field, "reason": self.reason}


class RecipeError(MediRoundError):
    """A run recipe (YAML + overrides) that cannot be used: unknown key, wrong type, missing file."""


class CheckpointError(MediRoundError):
    """A checkpoint or weight file that is missing, altered, or does not match the model."""


class OutputError(MediRoundError):
    """An output that could not be written (disk full, read-only folder, no permission); earlier files stay."""

    def __init__(self, path: str, error: OSError):
        self.path = str(path)
        self.reason = error.strerror or str(error)
        super().__init__(f"{self.path}: cannot write: {self.reason}")


class LaunchError(MediRoundError):
    """A multi-process launch that did not get what it asked for (e.g. fewer processes)."""


class InputWarning(UserWarning):
    """Valid input the library had to change to use (e.g. a query truncated to the model's maximum length)."""
