"""``errors.jsonl``: one JSON object a line for each item a batch command skipped, naming the file, the
item, the field and the reason (``infer`` adds the dialogue id). Written atomically, read back by the
commands that merge part or shard outputs."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from mediround.atomic import atomic_open

ERRORS_FILE = "errors.jsonl"


def write_error_log(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write ``records`` one a line (keys sorted), replacing the file atomically; no records, empty file."""
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def read_error_log(path: str | os.PathLike) -> list[dict]:
    """The records of an error log; none when the file does not exist. A last line without its newline
    (a write killed midway) is not a record."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]
