"""The predictions folder: the contract between ``mediround infer`` (writes) and ``mediround eval`` (reads).

Layout (see docs/predictions.md)::

    DIR/predictions.jsonl   one JSON object per predicted round, appended and fsynced one at a time
    DIR/masks/<safe id>_r<round>.png   8-bit masks, 0 = background, 255 = foreground

Each line holds at least ``id`` (dialogue id), ``round`` (1-based) and ``mask`` (path relative to DIR),
and may hold ``answer``, ``ref_round``, ``jcm_score``, ``refined`` and other fields. The mask file is
written (atomically) before its line, so every line names a complete mask. A kill can leave only a
trailing half-written line, which the writer truncates and the reader ignores. If a round appears on
several lines (a resumed run redid a dialogue), the last line wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from mediround.atomic import append_jsonl_line
from mediround.data.images import save_mask
from mediround.errors import DataError

PREDICTIONS_FILE = "predictions.jsonl"
MASKS_FOLDER = "masks"
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME = 80


def safe_name(dialogue_id: str) -> str:
    """A file-name stem for any dialogue id, unique per id.

    Ids made only of letters, digits, ``.``, ``_`` and ``-`` (not starting with ``.``, at most 80
    characters) are used as they are. Any other id is sanitised (other characters become ``_``,
    cut to 80 characters) and gets ``-`` plus 12 hex digits of its SHA-1, so two ids that sanitise
    alike still get different names.
    """
    if _SAFE_ID.fullmatch(dialogue_id) and not dialogue_id.startswith(".") and len(dialogue_id) <= _MAX_NAME:
        return dialogue_id
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", dialogue_id).lstrip(".")[:_MAX_NAME]
    digest = hashlib.sha1(dialogue_id.encode("utf-8")).hexdigest()[:12]
    return f"{cleaned}-{digest}"


def mask_relative_path(dialogue_id: str, round_number: int) -> str:
    """``masks/<safe id>_r<round>.png``, relative to the predictions folder."""
    return f"{MASKS_FOLDER}/{safe_name(dialogue_id)}_r{round_number}.png"


def _validate_record(record: Any, file: Path, line_number: int) -> dict:
    if not isinstance(record, dict):
        raise DataError(str(file), f"line {line_number}", None, "expected a JSON object")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise DataError(str(file), f"line {line_number}", "id", "must be a non-empty string")
    round_number = record.get("round")
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
        raise DataError(str(file), f"line {line_number}", "round", "must be an integer >= 1 (rounds are 1-based)")
    mask = record.get("mask")
    if not isinstance(mask, str) or not mask:
        raise DataError(str(file), f"line {line_number}", "mask", "must be a path relative to the predictions folder")
    relative = PurePosixPath(mask)
    if relative.is_absolute() or ".." in relative.parts or "\\" in mask:
        raise DataError(str(file), f"line {line_number}", "mask", f"'{mask}' must stay inside the predictions folder")
    return record


def _complete_lines(data: bytes) -> tuple[bytes, bool]:
    """The part of ``data`` up to its last newline, and whether a partial line followed it."""
    end = data.rfind(b"\n") + 1
    return data[:end], end < len(data)


def read_predictions(predictions_dir: str | os.PathLike) -> dict[tuple[str, int], dict]:
    """Every record of ``DIR/predictions.jsonl`` keyed by ``(id, round)``; later lines win.

    A trailing line without its newline (a run killed mid-write) is ignored. Any other bad line raises
    ``DataError`` naming the file, line and field.
    """
    file = Path(predictions_dir) / PREDICTIONS_FILE
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise DataError(str(file), None, None, "no predictions file in this folder") from None
    except OSError as error:
        raise DataError(str(file), None, None, f"cannot read: {error.strerror}") from None
    complete, _ = _complete_lines(data)
    records: dict[tuple[str, int], dict] = {}
    for line_number, raw in enumerate(complete.split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(str(file), f"line {line_number}", None, f"not valid JSON: {error}") from None
        record = _validate_record(record, file, line_number)
        records[(record["id"], record["round"])] = record
    return records


def is_predictions_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a predictions folder (one holding ``predictions.jsonl``), not data to score against."""
    return (Path(path) / PREDICTIONS_FILE).is_file()


def read_predictions_if_any(predictions_dir: str | os.PathLike) -> dict[tuple[str, int], dict]:
    """``read_predictions`` of a folder that may hold no predictions file yet (then no records)."""
    if not (Path(predictions_dir) / PREDICTIONS_FILE).exists():
        return {}
    return read_predictions(predictions_dir)


def complete_dialogue_ids(
    records: Mapping[tuple[str, int], dict], rounds_per_dialogue: Mapping[str, int]
) -> set[str]:
    """Ids in ``rounds_per_dialogue`` whose rounds 1..n all have a record."""
    return {
        dialogue_id
        for dialogue_id, n_rounds in rounds_per_dialogue.items()
        if all((dialogue_id, number) in records for number in range(1, n_rounds + 1))
    }


class PredictionWriter:
    """Appends predicted rounds to a predictions folder, safe to kill and to resume.

    Opening an existing folder keeps its records (for ``--resume``) and cuts off a trailing
    half-written line left by a killed run. Use as a context manager, or call ``close``.
    """

    def __init__(self, predictions_dir: str | os.PathLike):
        self.directory = Path(predictions_dir)
        (self.directory / MASKS_FOLDER).mkdir(parents=True, exist_ok=True)
        self.file = self.directory / PREDICTIONS_FILE
        self._truncate_partial_line()
        self._handle = open(self.file, "a", encoding="utf-8")  # noqa: SIM115 - held open for the writer's life

    def _truncate_partial_line(self) -> None:
        if not self.file.exists():
            return
        complete, partial = _complete_lines(self.file.read_bytes())
        if partial:
            with open(self.file, "r+b") as handle:
                handle.truncate(len(complete))
                os.fsync(handle.fileno())

    def write(self, dialogue_id: str, round_number: int, mask: np.ndarray, **fields: Any) -> dict:
        """Save ``mask`` (H, W, non-zero = foreground) and append its record; returns the record.

        Extra ``fields`` (``answer``, ``ref_round``, ``jcm_score``, ``refined``, ...) must be JSON values.
        """
        if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
            raise ValueError(f"round numbers are 1-based integers, got {round_number!r}")
        reserved = {"id", "round", "mask"} & fields.keys()
        if reserved:
            raise ValueError(f"fields {sorted(reserved)} are set by the writer")
        relative = mask_relative_path(dialogue_id, round_number)
        save_mask(self.directory / relative, np.asarray(mask, dtype=bool))
        record = {"id": dialogue_id, "round": round_number, "mask": relative, **fields}
        append_jsonl_line(self._handle, record)
        return record

    def complete_ids(self, rounds_per_dialogue: Mapping[str, int]) -> set[str]:
        """Dialogue ids whose every round is already written (those a resumed run can skip).

        Read back from the file: the writer keeps no record in memory, so a long run's memory stays flat.
        """
        return complete_dialogue_ids(read_predictions(self.directory), rounds_per_dialogue)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> PredictionWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
