"""The run's logs beside its checkpoints: ``train_log.jsonl`` (one event per line, fsynced) and
``validation.parquet`` (per-round validation scores of the ``teacher_forced`` and ``chained`` tracks,
rewritten atomically after every validation).

On resume both are cut back to the checkpoint's step, so they read as one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mediround.atomic import append_jsonl_line, atomic_open, atomic_path
from mediround.metrics import METRICS, Scores, aggregate, group_scores
from mediround.training.events import TEACHER_FORCED_TRACK, Event

TRAIN_LOG = "train_log.jsonl"
VALIDATION_LOG = "validation.parquet"
VALIDATION_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("track", pa.string()),
        ("split", pa.string()),
        ("round", pa.int32()),
        ("names_target", pa.bool_()),
        ("count", pa.int64()),
        *((metric, pa.float64()) for metric in METRICS),
    ]
)


class TrainingLog:
    """Append-only JSONL events (``mediround.training.events``): one ``{"event": kind, "time": ..., **record}``
    line each."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        self.path = folder / TRAIN_LOG
        if resume_step is not None and self.path.exists():
            kept = [line for line in read_events(self.path) if line.get("step", 0) <= resume_step]
            with atomic_open(self.path) as handle:
                for event in kept:
                    handle.write(json.dumps(event, sort_keys=True) + "\n")
        # Open for the whole run: every event is appended and fsynced as it happens.
        self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, event: Event) -> None:
        append_jsonl_line(self.handle, {"event": event.kind, "time": round(time.time(), 3), **event.record()})

    def close(self) -> None:
        self.handle.close()


def read_events(path: Path) -> list[dict]:
    """Events of a training log; a torn last line (killed mid-write) is ignored."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def score_rows(step: int, mask_rows: Sequence[Mapping[str, Any]], track: str = TEACHER_FORCED_TRACK) -> list[dict]:
    """Validation summary rows of one step and track: all rounds, each round, and rounds that do / don't
    name the target."""
    rows = [_row(step, track, "all", None, None, aggregate(mask_rows))]
    for round_number, scores in sorted(group_scores(mask_rows, "round").items()):
        rows.append(_row(step, track, "round", round_number, None, scores))
    for names_target, scores in group_scores(mask_rows, "names_target").items():
        if names_target is not None:
            rows.append(_row(step, track, "names_target", None, bool(names_target), scores))
    return rows


class ValidationLog:
    """All validation summary rows of the run, kept in memory and rewritten atomically as Parquet."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        self.path = folder / VALIDATION_LOG
        self.rows: list[dict] = []
        if resume_step is not None and self.path.exists():
            self.rows = [row for row in pq.read_table(self.path).to_pylist() if row["step"] <= resume_step]

    def add(self, rows: Sequence[dict]) -> None:
        self.rows.extend(rows)
        table = pa.Table.from_pylist([{n: r.get(n) for n in VALIDATION_SCHEMA.names} for r in self.rows],
                                     schema=VALIDATION_SCHEMA)
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)


def _row(step: int, track: str, split: str, round_number: int | None, names_target: bool | None,
         scores: Scores) -> dict:
    return {
        "step": step,
        "track": track,
        "split": split,
        "round": round_number,
        "names_target": names_target,
        "count": scores.count,
        **{metric: getattr(scores, metric) for metric in METRICS},
    }
